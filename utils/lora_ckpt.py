"""What a LoRA checkpoint records about its base model: `LORA.json` in each tag dir.

A LoRA run's checkpoint holds only the trained tensors (adapters, `modules_to_save`) and their optimizer
state; the frozen base weights stay in `model_path`. `LORA.json` names that base and fingerprints its
contents, so `resume: true` and `pp_to_hg` refuse a base whose weights changed:

    {"version": 1, "lora": {r, alpha, dropout, target_modules, modules_to_save, quantize},
     "base_model_path": "/abs/path/of/model_path", "base_fingerprint": "sha256:...", "model_type": ...}

The fingerprint is the sha256 over (name, size, sha256) of config.json, the tokenizer files (tokenizer.json,
tokenizer.model, vocab/merges, ...: two swapped token ids make another model for the adapters) and every
`layer_*-model_states.pt` of a pipeline base dir (the ZeRO trainer's HF dir: its `*.safetensors`, `*.bin`,
`*.index.json`), in name order (each file hashed in full, the files in parallel threads). LORA.json's
`fingerprint_version` says which files: 2 with the tokenizer files, 1 (absent: written before) without.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from utils.checkpoint import _digest, atomic_write_text

LORA_META = "LORA.json"


def _is_layer_file(name: str) -> bool:
    return name.startswith("layer_") and name.endswith("-model_states.pt")


def _is_hf_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".index.json"))


FINGERPRINT_VERSION = 2


def base_files(base_dir: str, version: int = FINGERPRINT_VERSION) -> list[str]:
    """config.json, the tokenizer files (version 2) and the weight files of a base dir, sorted by name: the layer
    files of a pipeline dir, else (an HF dir) its safetensors / bin shards and their index."""
    from utils.run_fingerprint import TOKENIZER_FILES

    names = os.listdir(base_dir)
    weights = _is_layer_file if any(map(_is_layer_file, names)) else _is_hf_weight_file
    tokenizer = set(TOKENIZER_FILES) if version >= 2 else set()
    names = sorted(n for n in names if n == "config.json" or weights(n) or n in tokenizer)
    if "config.json" not in names:
        raise FileNotFoundError(f"{base_dir}: no config.json (not a converted pipeline model dir)")
    return names


def base_fingerprint(base_dir: str, version: int = FINGERPRINT_VERSION) -> str:
    """'sha256:<hex>' over (name, size, sha256) of `base_files(base_dir, version)`."""
    names = base_files(base_dir, version)
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        digests = list(pool.map(lambda n: _digest(os.path.join(base_dir, n)), names))
    h = hashlib.sha256()
    for name, (size, digest) in zip(names, digests):
        h.update(f"{name}\0{size}\0{digest}\n".encode())
    return "sha256:" + h.hexdigest()


def write_lora_meta(tag_dir: str, lora: dict, base_dir: str, fingerprint: str, model_type: str) -> None:
    meta = {"version": 1, "lora": lora, "base_model_path": os.path.abspath(base_dir),
            "base_fingerprint": fingerprint, "fingerprint_version": FINGERPRINT_VERSION, "model_type": model_type}
    atomic_write_text(os.path.join(tag_dir, LORA_META), json.dumps(meta, indent=1) + "\n")


def read_lora_meta(tag_dir: str) -> dict | None:
    """The tag dir's LORA.json as a dict, or None for a full-fine-tuning checkpoint."""
    path = os.path.join(tag_dir, LORA_META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def base_mismatch(meta: dict, base_dir: str, fingerprint: str | None = None) -> str | None:
    """A one-line reason when `base_dir` is not the base `meta` was trained on (None when it is). `fingerprint`
    (this code's version) is reused when the checkpoint's fingerprint is of the same version."""
    version = int(meta.get("fingerprint_version", 1))
    if fingerprint is None or version != FINGERPRINT_VERSION:
        fingerprint = base_fingerprint(base_dir, version)
    if fingerprint != meta["base_fingerprint"]:
        return (f"{base_dir}: its weights differ from the base this LoRA checkpoint was trained on, or its tokenizer "
                f"files do "
                f"({meta['base_model_path']}, {meta['base_fingerprint'][:19]}..., now {fingerprint[:19]}...)")
    return None


# ----------------------------------------------------------------------------------------------
# The base an exported PEFT adapter belongs to

ADAPTER_BASE = "adapter_base.json"  # next to adapter_config.json: {"base_model_name_or_path", "base_weights", ...}
SOURCE = "source.json"  # in a converted pipeline dir (convert_model.py hg_to_pp): {"source": hub id or HF dir}
_SAMPLES = 1024


def sampled_fingerprint(weights: dict) -> str:
    """'sampled-bf16:<sha256>' over (name, shape, 1024 evenly spaced values rounded to bf16) of every tensor of
    `weights` ({module name: base weight}): cheap, the same for an fp32 or a bf16 copy of the same weights, and
    different for another model of the same shapes (its weights differ everywhere)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach()
        flat = tensor.reshape(-1)
        count = min(flat.numel(), _SAMPLES)
        index = torch.linspace(0, flat.numel() - 1, count, dtype=torch.float64).long()
        values = flat[index].to(torch.bfloat16).float().cpu().numpy().tobytes()
        h.update(f"{name}\0{tuple(tensor.shape)}\0".encode() + values)
    return "sampled-bf16:" + h.hexdigest()


def converted_from(pp_dir: str) -> str | None:
    """The HF source (hub id or directory) a converted pipeline dir was made from, if recorded."""
    try:
        with open(os.path.join(pp_dir, SOURCE)) as f:
            source = json.load(f).get("source")
        return source if isinstance(source, str) and source else None
    except (OSError, ValueError, AttributeError):
        return None
