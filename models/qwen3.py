"""Qwen3 dense 0.6B-32B (`model_type: "qwen3"`): llama's block with a per-head RMSNorm on q and k before RoPE and an
explicit `head_dim` (128, not hidden/heads); windows as Qwen2. Reference: transformers' `Qwen3ForCausalLM`."""
from __future__ import annotations

from .common import cfg_get, read_rope_config
from .llama import LlamaArgs, dense_debug_config, dense_family, read_decoder_fields, read_windows, with_defaults
from .qwen2 import DEFAULTS as QWEN2_DEFAULTS, sliding_layer_types

DEFAULTS = {**QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False}


def read_config(cfg: dict) -> LlamaArgs:
    cfg = with_defaults(cfg, DEFAULTS)
    fields = read_decoder_fields(cfg, "qwen3", 1e-6)
    return LlamaArgs(**fields, rope=read_rope_config(cfg, fields["head_dim"]),
                     attention_bias=cfg_get(cfg, "attention_bias", bool, False), qk_norm="head",
                     layer_windows=read_windows(cfg, sliding_layer_types(cfg, "qwen3")))


def debug_config(**overrides) -> dict:
    """Tiny qwen3: head_dim 24 != hidden/heads, a window of 8 on the last layer."""
    return dense_debug_config("qwen3", "Qwen3ForCausalLM", **{
        "head_dim": 24, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3, "rope_theta": 1e6,
        **overrides})


FAMILY = dense_family("qwen3", read_config, debug_config, {
    "qwen3-8b": "qwen3-8b.json", "qwen3-0.6b": "qwen3-0.6b.json", "qwen3-1.7b": "qwen3-1.7b.json",
    "qwen3-32b": "qwen3-32b.json"})
