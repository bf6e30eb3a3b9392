"""On-disk layout of a pipeline model directory: `config.json` plus one file per pipeline layer.

DeepSpeed's `PipelineModule` writes `layer_{idx:02d}-model_states.pt` (with a `-model_XX` rank part
under tensor parallelism, hence the glob `layer_XX-*model_states.pt`); idx 0 = Enter, 1..L = blocks,
L+1 = Exit. Each file is the `state_dict()` of that one layer module.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .common import ModelError

LAYER_FILE_RE = re.compile(r"layer_(\d+)-(?:.*)?model_states\.pt$")


def layer_file_name(idx: int) -> str:
    return f"layer_{idx:02d}-model_states.pt"


def find_layer_file(layer_dir: str | Path, idx: int) -> Path:
    """The one file holding pipeline layer `idx`; missing or ambiguous (several ranks) -> ModelError."""
    layer_dir = Path(layer_dir)
    exact = layer_dir / layer_file_name(idx)
    if exact.is_file():
        return exact
    matches = sorted(layer_dir.glob(f"layer_{idx:02d}-*model_states.pt"))
    if not matches:
        raise ModelError(f"missing layer file {exact}")
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        raise ModelError(f"several files for pipeline layer {idx} in {layer_dir} ({names}); "
                         "tensor-parallel shards are not supported")
    return matches[0]


def layer_indices_on_disk(layer_dir: str | Path) -> list[int]:
    """Sorted distinct layer indices of all `layer_XX-*model_states.pt` files in `layer_dir`."""
    found = {int(m.group(1)) for p in Path(layer_dir).iterdir() if (m := LAYER_FILE_RE.match(p.name))}
    return sorted(found)


def check_no_extra_layers(layer_dir: str | Path, num_files: int) -> None:
    """Layer files beyond L+1 mean config.json describes a different model than the weights."""
    extra = [i for i in layer_indices_on_disk(layer_dir) if i >= num_files]
    if extra:
        raise ModelError(f"{layer_dir} has layer files up to layer_{extra[-1]:02d} but config.json describes "
                         f"{num_files} pipeline layers (layer_00..layer_{num_files - 1:02d})")


def load_layer_file(layer_dir: str | Path, idx: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """(path, state_dict) of pipeline layer `idx`, loaded with `weights_only=True` on CPU."""
    path = find_layer_file(layer_dir, idx)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file, reported by name
        raise ModelError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} is not a state_dict of tensors")
    return path, state


def check_layer_tensors(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str) -> None:
    """Same keys and shapes as the layer built from config.json; the error names the first offender."""
    for key in expected:
        if key not in state:
            raise ModelError(f"{where}: missing tensor '{key}'")
    for key, tensor in state.items():
        if key not in expected:
            raise ModelError(f"{where}: unexpected tensor '{key}' (expected {', '.join(expected)})")
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ModelError(f"{where}: tensor '{key}' has shape {tuple(tensor.shape)}, "
                             f"config.json implies {tuple(expected[key])}")


def check_intact(layer_dir: Path) -> Path:
    """`layer_dir` when its checkpoint manifest (utils.checkpoint, training checkpoints only) matches the files
    on disk, else ModelError naming the damaged file."""
    from utils.checkpoint import verify_dir

    problem = verify_dir(str(layer_dir))
    if problem is not None:
        raise ModelError(f"checkpoint {layer_dir}: {problem}; use another checkpoint (save_path/global_stepN)")
    return layer_dir


def resolve_pp_dir(path: str | Path) -> tuple[Path, list[Path]]:
    """Directory holding the layer files, plus the directories to take config/tokenizer files from.

    Accepts a converted directory, a DeepSpeed tag directory (`save_path/global_stepN`), or the
    `save_path` of a training run whose `latest` file names the tag.
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"pipeline model directory {root} does not exist")
    if layer_indices_on_disk(root):
        return check_intact(root), [root]
    latest = root / "latest"
    if latest.is_file():
        tag_dir = root / latest.read_text().strip()
        if tag_dir.is_dir() and layer_indices_on_disk(tag_dir):
            return check_intact(tag_dir), [tag_dir, root]
    raise ModelError(f"no layer_XX-model_states.pt files in {root}")
