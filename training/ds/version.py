"""The one DeepSpeed version check: the patches of training/ds were written against DeepSpeed 0.19.8's internals.

`check()` looks at every DeepSpeed internal the package relies on (`TARGETS`: a method it replaces or overrides
and the DeepSpeed code that calls it, a private attribute it reads or writes and the DeepSpeed method that sets or
reads it, a class it subclasses or allow-lists) and at the installed version:

- a target is missing: the patch would silently do nothing or break mid-run, so the run is refused with one
  line (`DeepSpeedVersionError`, a ConfigError: `error: ...`, exit 2) naming the installed and expected versions
  and the missing target;
- every target is there but the version is not 0.19.x: one warning line, the run goes on;
- a copied DeepSpeed method (`COPIED`) whose original's source changed: its patch is left out
  (`copy_is_current`), DeepSpeed's own method runs (same result, slower), and the warning says so.

`check_installed()` runs it once per process: training.cli calls it before the config is checked against
DeepSpeed (utils.config.check_deepspeed), so the refusal is one line, not a traceback.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from dataclasses import dataclass

from utils.config import ConfigError

CHECKED = "0.19.8"  # the DeepSpeed whose internals training/ds was written and tested against
SERIES = (0, 19)  # versions whose major.minor match run without a warning


class DeepSpeedVersionError(ConfigError):
    """The installed DeepSpeed lacks an internal that training/ds patches or reads."""


@dataclass(frozen=True)
class Target:
    """`owner.name` must exist; with `used_in`, DeepSpeed's method `owner.used_in` must also name it (an instance
    attribute it sets or reads, or a method it calls): what the patch relies on DeepSpeed doing."""
    owner: str  # "module:Class" or "module"
    name: str
    used_in: str | None = None

    def __str__(self) -> str:
        cls = self.owner.split(":")[-1] if ":" in self.owner else self.owner
        return f"{cls}.{self.name}" + (f" (used by {cls}.{self.used_in})" if self.used_in else "")


_PIPE_MODULE = "deepspeed.runtime.pipe.module:PipelineModule"
_ENGINE = "deepspeed.runtime.engine:DeepSpeedEngine"
_BF16 = "deepspeed.runtime.bf16_optimizer:BF16_Optimizer"

TARGETS = (
    # bf16_grads: replaces BF16_Optimizer._update_hp_grad, called by update_hp_grads (the copy's body: COPIED)
    Target(_BF16, "_update_hp_grad", "update_hp_grads"),
    # bf16_grads.drop_hp_grad: the pipeline engine reduces tied weights' `_hp_grad`
    Target("deepspeed.runtime.pipe.engine:PipelineEngine", "_hp_grad", "_exec_reduce_tied_grads"),
    # pipeline_module: given stage bounds, DeepSpeed's own layer list and bounds, trained-only checkpoints
    Target(_PIPE_MODULE, "_partition_layers", "__init__"),
    Target(_PIPE_MODULE, "_topo", "__init__"),
    Target(_PIPE_MODULE, "_layer_specs", "__init__"),
    Target(_PIPE_MODULE, "_set_bounds", "_partition_layers"),
    Target(_PIPE_MODULE, "_local_start", "_set_bounds"),
    Target(_PIPE_MODULE, "_get_frozen_parameter_names", "save_state_dict"),
    # safe_load: the engine's checkpoint engine is made from its config in _configure_checkpointing
    Target(_ENGINE, "checkpoint_engine", "_configure_checkpointing"),
    Target(_ENGINE, "_config", "_configure_checkpointing"),
    Target("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine:TorchCheckpointEngine", "load"),
    Target("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    Target("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    Target("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    Target("deepspeed.utils.tensor_fragment", "fragment_address"),
)

# Copied DeepSpeed methods -> sha256 (first 16 hex digits) of the original's source in CHECKED.
COPIED = {f"{_BF16}._update_hp_grad": "026f6bb3edea2557"}

_done = False


def _owner(path: str):
    module, _, cls = path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, cls) if cls else obj


def _names(code) -> set[str]:
    """Every name a function's code uses (attributes, globals, methods), nested code objects included."""
    out = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            out |= _names(const)
    return out


def present(target: Target) -> bool:
    try:
        owner = _owner(target.owner)
    except (ImportError, AttributeError):
        return False
    if target.used_in is None:
        return hasattr(owner, target.name)
    method = getattr(owner, target.used_in, None)
    code = getattr(inspect.unwrap(method), "__code__", None) if method is not None else None
    return code is not None and target.name in _names(code)


def _source_hash(qualified: str) -> str | None:
    owner, _, name = qualified.rpartition(".")
    try:
        method = getattr(_owner(owner), name)
        source = inspect.getsource(getattr(method, "patched_over", method))  # DeepSpeed's, also once replaced
    except (ImportError, AttributeError, OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def copy_is_current(qualified: str) -> bool:
    """Whether DeepSpeed's `qualified` method is still the one training/ds copied (its source unchanged; True when
    the source cannot be read, as for an installation without .py files)."""
    digest = _source_hash(qualified)
    return digest is None or digest == COPIED[qualified]


def _parse(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def check(installed: str | None = None) -> str | None:
    """Raise DeepSpeedVersionError if a target is missing; else the warning line (None: nothing to say)."""
    if installed is None:
        import deepspeed

        installed = deepspeed.__version__
    expected = f"{SERIES[0]}.{SERIES[1]}.x ({CHECKED})"
    missing = [str(t) for t in TARGETS if not present(t)]
    if missing:
        raise DeepSpeedVersionError(
            f"deepspeed {installed} is installed, but training/ds patches DeepSpeed internals checked against "
            f"{expected} and this version lacks {', '.join(missing)}: install deepspeed=={CHECKED}")
    notes = []
    if _parse(installed) != SERIES:
        notes.append(f"deepspeed {installed} is installed; training/ds's patches were checked against {expected}: "
                     f"their targets exist, but results may differ")
    stale = [q.split(":")[-1] for q in COPIED if not copy_is_current(q)]
    if stale:
        notes.append(f"{', '.join(stale)} differs from DeepSpeed {CHECKED}'s, which training/ds copied: DeepSpeed's "
                     f"own is used (same result, slower)")
    if not notes:
        return None
    return "; ".join(notes) + f" (pip install deepspeed=={CHECKED} runs what was tested)"


def check_installed() -> None:
    """`check()` once per process; its warning is one line on rank 0."""
    global _done
    if _done:
        return
    warning = check()
    _done = True
    if warning and int(os.environ.get("RANK", "0")) == 0:
        from utils.metrics import log

        log(f"warning: {warning}", 0)
