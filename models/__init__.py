"""Model families as DeepSpeed pipeline layers, looked up by config.json's `model_type`.

`resolve(config.json dict)` is the entry point (`models/resolved.py`): the family with its parsed args, layer
specs, loss, FLOPs, partitions and per-step metrics. Adding a family = one new file defining a `Family` plus
one line in `models/registry.py`.
"""
from __future__ import annotations

from . import torchao_import  # noqa: F401  (first: filters torchao's import-time log noise)
from .common import ModelError, ModelOptions
from .family import Family, HfFormat, WeightRule, parts_to_boundaries
from .hf_files import read_hf_config
from .registry import REGISTRY, get_family, register, unregister
from .resolved import ResolvedModel, resolve, resolve_dir
from .sequential import SequentialModel, load_sequential


def build_pipeline_layers(hf_cfg: dict, opts: ModelOptions | None = None) -> list:
    """config.json dict -> DeepSpeed layer specs (Enter, Block x L, Exit[, tied head]): `resolve(hf_cfg).specs`."""
    return resolve(hf_cfg).specs(opts)


def build_loss_fn(hf_cfg: dict, opts: ModelOptions | None = None):
    """config.json dict -> the last stage's `loss_fn(outputs, labels)`: `resolve(hf_cfg).loss_fn`."""
    return resolve(hf_cfg).loss_fn(opts)


__all__ = ["REGISTRY", "Family", "HfFormat", "ModelError", "ModelOptions", "ResolvedModel", "SequentialModel",
           "WeightRule", "build_loss_fn", "build_pipeline_layers", "get_family", "load_sequential",
           "parts_to_boundaries", "read_hf_config", "register", "resolve", "resolve_dir", "unregister"]
