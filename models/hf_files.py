"""Reading a HuggingFace model directory: `config.json`, the weight files (sharded or not, safetensors or
`pytorch_model*.bin` read with `weights_only=True`), a hub id fetched on demand. Read-only, and independent
of conversion: family modules (`reference_model`) and `models/convert.py` both use it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch

from .common import ModelError

AUX_FILE_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                     "added_tokens.json", "vocab.*", "merges.txt", "*.model", "*.tiktoken", "chat_template*",
                     "*.py")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_hf_config(model_dir: str | Path) -> dict:
    """`model_dir/config.json` as a plain dict (never runs remote code); must name a `model_type`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"no config.json in {model_dir}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ModelError(f"{path} has no 'model_type'")
    return cfg


def _repo_id_like(path: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and not path.startswith(".")


def resolve_hf_source(path: str | Path) -> Path:
    """A local HF directory, or a hub id fetched with `huggingface_hub.snapshot_download`."""
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"input path {local} is not a directory")
        return local
    if not _repo_id_like(str(path)):
        raise ModelError(f"input path {path} does not exist")
    return _download(str(path))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = list(AUX_FILE_PATTERNS) + ["*.safetensors", SAFETENSORS_INDEX]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not list(local.glob("*.safetensors")):
            local = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin*"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, auth: all reported in one line
        first_line = (str(err).splitlines() or [""])[0]
        raise ModelError(f"input path '{repo_id}' does not exist locally and could not be downloaded from the "
                         f"Hugging Face hub ({type(err).__name__}: {first_line})") from None
    return local


def _index_files(src: Path, index_name: str) -> list[Path]:
    path = src / index_name
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path}: {error_reason(err)}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{path} has no 'weight_map' of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    for name in files:
        if not (src / name).is_file():
            raise ModelError(f"{index_name} lists {name}, which is missing from {src}")
    return [src / name for name in files]


def hf_weight_files(src: Path) -> list[Path]:
    """Safetensors shards (via the index, or all `*.safetensors`), else `pytorch_model*.bin` files."""
    if (src / SAFETENSORS_INDEX).is_file():
        return _index_files(src, SAFETENSORS_INDEX)
    found = sorted(src.glob("*.safetensors"))
    if found:
        return found
    if (src / BIN_INDEX).is_file():
        return _index_files(src, BIN_INDEX)
    found = sorted(src.glob("pytorch_model*.bin"))
    if found:
        return found
    raise ModelError(f"no *.safetensors or pytorch_model*.bin weights in {src}")


def error_reason(err: BaseException) -> str:
    """One line for an I/O or format error: the OS's words for an errno anywhere in the chain (torch wraps
    them in RuntimeErrors, safetensors quotes them as `os error N`), else the error's first line."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    match = re.search(r"os error (\d+)", text)
    if match:
        return os.strerror(int(match.group(1)))
    return f"{type(err).__name__}: {(text.strip().splitlines() or [''])[0]}"


def open_safetensors(path: Path):
    """`safe_open` on a file that must be safetensors: a truncated or foreign file is a ModelError naming it."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        handle.keys()
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: reported by name, in one line
        raise ModelError(f"cannot read {path}: not a complete safetensors file ({error_reason(err)})") from None
    return handle


def iter_hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, one file open at a time; a name seen twice is an error."""
    seen: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            with open_safetensors(path) as handle:
                for name in handle.keys():
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as err:  # noqa: BLE001 - as in open_safetensors
                        raise ModelError(f"cannot read tensor '{name}' of {path}: {error_reason(err)}") from None
                    yield _once(name, seen, path), tensor
        else:
            state = load_bin(path)
            for name in list(state):
                yield _once(name, seen, path), state.pop(name)
            del state


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state_dict read with `weights_only=True` (memory-mapped when it is in the zip format; legacy
    files cannot be). A file pickling anything but tensors is refused, and any unreadable file is a ModelError
    naming it: never a traceback, never torch's advice to retry with weights_only=False."""
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it is about to refuse
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            except RuntimeError:
                state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text:
            detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            raise ModelError(f"refused {path}: it pickles more than tensors (loading it could run code: "
                             f"{detail[0] if detail else 'unsupported pickle content'}); only plain state_dicts "
                             f"of tensors are read") from None
        raise ModelError(f"cannot read {path}: not a PyTorch state_dict ({error_reason(err)})") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, not a pickle, I/O: reported by name, in one line
        raise ModelError(f"cannot read {path}: not a PyTorch state_dict ({error_reason(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelError(f"{path} is not a state_dict of named tensors")
    return state


def check_hf_weight_files(src: Path) -> list[Path]:
    """The weight files of an HF dir, each opened once (safetensors: header only) so that a truncated,
    foreign or pickled file is reported by name before transformers reads them."""
    files = hf_weight_files(src)
    for path in files:
        if path.suffix == ".safetensors":
            with open_safetensors(path):
                pass
        else:
            load_bin(path)
    return files


def _once(name: str, seen: set[str], path: Path) -> str:
    if name in seen:
        raise ModelError(f"tensor '{name}' appears twice (again in {path.name})")
    seen.add(name)
    return name
