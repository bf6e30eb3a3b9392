"""Model families as DeepSpeed pipeline layers, looked up by config.json's `model_type`.

Adding a family = one new file defining a `Family` plus one line in `REGISTRY`.
"""
from __future__ import annotations

from .baichuan import FAMILY as BAICHUAN
from .bloom import FAMILY as BLOOM
from .chatglm import FAMILY as CHATGLM
from .common import Family, ModelError, ModelOptions, parts_to_boundaries
from .layout import read_hf_config
from .llama import FAMILY as LLAMA
from .mixtral import FAMILY as MIXTRAL
from .sequential import SequentialModel, load_sequential

REGISTRY: dict[str, Family] = {
    LLAMA.model_type: LLAMA,
    BLOOM.model_type: BLOOM,
    BAICHUAN.model_type: BAICHUAN,
    CHATGLM.model_type: CHATGLM,
    MIXTRAL.model_type: MIXTRAL,
}


def get_family(model_type: str | None) -> Family:
    """The Family registered for `model_type`; unknown types raise ModelError listing the supported ones."""
    if model_type not in REGISTRY:
        raise ModelError(f"unsupported model_type '{model_type}' (supported: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[model_type]


def build_pipeline_layers(hf_cfg: dict, opts: ModelOptions | None = None) -> list:
    """config.json dict -> DeepSpeed layer specs (Enter, Block x L, Exit[, tied head])."""
    family = get_family(hf_cfg.get("model_type"))
    return family.build_layers(family.read_config(hf_cfg), opts or ModelOptions())


def build_loss_fn(hf_cfg: dict, opts: ModelOptions | None = None):
    """config.json dict -> the last stage's `loss_fn(outputs, labels)` for `PipelineModule`."""
    family = get_family(hf_cfg.get("model_type"))
    return family.loss_fn(family.read_config(hf_cfg), opts or ModelOptions())


__all__ = ["REGISTRY", "Family", "ModelError", "ModelOptions", "SequentialModel", "build_loss_fn",
           "build_pipeline_layers", "get_family", "load_sequential", "parts_to_boundaries", "read_hf_config"]
