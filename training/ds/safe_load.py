"""Checkpoint loading that never runs code: every `torch.load` on resume is `weights_only=True`.

DeepSpeed 0.19.8's `TorchCheckpointEngine.load` unpickles with `weights_only=False`, so a planted
`__reduce__` in any checkpoint file (model states, layer files, optimizer and ZeRO/bf16 shards) would run
on `resume: true`. Two layers:

- `scan_checkpoint(tag_dir)`, before any process group exists: every `*.pt` of the tag dir is
  disassembled (opcodes only, nothing built) and a file naming a global outside torch's defaults and
  `ALLOWED_GLOBALS` stops the run with one line naming it (`CheckpointError`), on every rank alike.
- `load_checkpoint(engine, ...)`: the engine's checkpoint engine (`install`) and, for DeepSpeed's few
  direct `torch.load` calls, `torch.load` itself (`direct_loads_weights_only`) go through `safe_load`:
  `torch.load(weights_only=True)` with `ALLOWED_GLOBALS` allow-listed for that call only.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from utils.checkpoint import CheckpointError

# The non-tensor types DeepSpeed 0.19.8 pickles into its checkpoints (found by saving real ones with
# both trainers and loading them with weights_only=True, tests/test_checkpoint_security.py keeps it so).
# Each is a plain data holder: unpickling it only sets attributes, it runs none of our code.
ALLOWED_GLOBALS = (
    # bf16 (BF16_Optimizer, ZeRO-1/2 with bf16): `param_slice_mappings` in mp_rank_XX_model_states.pt
    # and in the *_optim_states.pt shards map each parameter to its slice, a dataclass(numel, start).
    fragment_address,
    # ZeRO-1/2/3 *_optim_states.pt shards (offload or not, fp32 or bf16): `zero_stage` is this IntEnum and
    # `loss_scaler` the optimizer's scaler object: a static LossScaler with fp32/bf16, a DynamicLossScaler
    # with fp16 (runtime/fp16/loss_scaler.py CreateLossScaler; fp16 needs a GPU, so that one is known from
    # the source and checked by a round trip, not by a saved run).
    ZeroStageEnum,
    LossScaler,
    DynamicLossScaler,
)

_torch_load = torch.load  # the real one, also while `direct_loads_weights_only` has replaced it
_GLOBAL_IN_ERROR = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


ALLOWED_NAMES = frozenset(_name(g) for g in ALLOWED_GLOBALS)


def refusal(path, names: list[str]) -> str:
    what = ", ".join(f"'{n}'" for n in sorted(names))
    return (f"checkpoint {path}: refuses to unpickle {what} (weights_only); the file may be malicious or "
            f"from an incompatible DeepSpeed")


def disallowed_globals(path) -> list[str] | None:
    """The globals `path`'s pickle names beyond torch's defaults and ALLOWED_GLOBALS, read from its
    opcodes (nothing is built); None when `path` is no zip-format torch.save file (legacy format,
    torchscript, unreadable): then only the weights_only load itself can judge it."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - any reason it cannot be disassembled: leave it to safe_load
        return None
    return sorted(n for n in names if n not in ALLOWED_NAMES)


def scan_checkpoint(tag_dir) -> None:
    """Refuse the checkpoint dir `tag_dir` if any of its `*.pt` files names a global outside the
    allow-list, before any process group exists. Every rank scans every file, so all ranks stop with the
    same line instead of one rank failing inside `load_checkpoint` while its peers wait in a collective.
    A static check: an object built at unpickling time escapes it, the weights_only load still refuses it."""
    for path in sorted(Path(tag_dir).rglob("*.pt")):
        names = disallowed_globals(path)
        if names:
            raise CheckpointError(refusal(path, names), every_rank=True)


def _refusal_from_error(path, err: Exception) -> str:
    names = disallowed_globals(path)
    if not names:
        m = _GLOBAL_IN_ERROR.search(str(err))
        names = [m.group(1)] if m else []
    if not names:
        detail = " ".join(str(err).split())[:200]
        return f"checkpoint {path}: refused by the weights_only unpickler ({detail})"
    return refusal(path, names)


def safe_load(path, map_location=None, **kwargs) -> Any:
    """`torch.load(path, weights_only=True)` with ALLOWED_GLOBALS; a refused or unreadable file raises
    CheckpointError naming it."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_refusal_from_error(path, err)) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path}: cannot read it: {type(err).__name__}: {first}") from None


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's default engine (torch.save / torch.load) with `load` through `safe_load`."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def _engine_load(path: str, map_location=None):
    return safe_load(path, map_location=map_location)


def install(engine) -> None:
    """Give `engine` (DeepSpeedEngine or PipelineEngine, after `deepspeed.initialize`) a weights_only
    checkpoint engine. DeepSpeed has no argument for it: `_configure_checkpointing` sets
    `engine.checkpoint_engine` from the config, and every load of `load_checkpoint` (SDLoader for
    mp_rank_XX_model_states.pt, PipelineModule.load_state_dir for layer_XX-model_states.pt, the optimizer
    and ZeRO/bf16 shards) goes through that attribute, so replacing it is DeepSpeed's extension point."""
    current = engine.checkpoint_engine
    if type(current) is TorchCheckpointEngine:
        engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)
    elif not isinstance(current, SafeTorchCheckpointEngine):
        # `checkpoint.writer` (Fast/Decoupled engines) or DataStates: they hold writer state (threads,
        # processes) made at init, so keep the instance and its save; its `load` (a plain torch.load) is
        # replaced on the instance.
        current.load = _engine_load


@contextlib.contextmanager
def direct_loads_weights_only() -> Iterator[None]:
    """While DeepSpeed's `load_checkpoint` runs, route `torch.load` itself through `safe_load`.

    A few of DeepSpeed's load paths bypass the checkpoint engine and call `torch.load(...,
    weights_only=False)` directly: universal checkpoints (`checkpoint.load_universal`):
    `ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir` (runtime/base_optimizer.py),
    `DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3` and
    `.load_hp_checkpoint_state` (runtime/zero/stage3.py), `load_hp_checkpoint_state`
    (checkpoint/universal_checkpoint.py). They reach it as the `torch.load` attribute, so the only
    patch that covers them is that attribute, and only for the duration of the call (nothing else runs
    meanwhile: the data loader starts after resume). A path added by a later DeepSpeed is covered too.
    """
    original = torch.load

    def load(f, map_location=None, pickle_module=None, **kwargs):
        kwargs.pop("weights_only", None)  # whatever the caller asked for
        return safe_load(f, map_location=map_location, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_checkpoint(engine, load_dir: str, tag: str, **kwargs):
    """`engine.load_checkpoint(load_dir, tag, **kwargs)` with every file read by `safe_load`."""
    install(engine)
    with direct_loads_weights_only():
        return engine.load_checkpoint(load_dir, tag=tag, **kwargs)
