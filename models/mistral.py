"""Mistral-7B v0.1-v0.3, Mistral-Nemo, Ministral (`model_type: "mistral"`): llama's block with a sliding window on
every layer (`sliding_window`: v0.1 4096; null in v0.2+; a missing key means transformers' default 4096) and an
explicit `head_dim` (Nemo: 128 with hidden 5120). Reference: transformers' `MistralForCausalLM`."""
from __future__ import annotations

from .common import cfg_get, read_rope_config
from .llama import LlamaArgs, dense_debug_config, dense_family, read_decoder_fields, read_windows, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-6, "sliding_window": 4096, "tie_word_embeddings": False}


def read_config(cfg: dict) -> LlamaArgs:
    cfg = with_defaults(cfg, DEFAULTS)
    fields = read_decoder_fields(cfg, "mistral", 1e-6)
    layers = cfg_get(cfg, "num_hidden_layers", int)
    sliding = "sliding_attention" if cfg.get("sliding_window") is not None else "full_attention"
    return LlamaArgs(**fields, rope=read_rope_config(cfg, fields["head_dim"]),
                     layer_windows=read_windows(cfg, [sliding] * layers))


def debug_config(**overrides) -> dict:
    """Tiny mistral: a window of 8 on every layer, head_dim 32 != hidden/heads."""
    return dense_debug_config("mistral", "MistralForCausalLM", **{"sliding_window": 8, "head_dim": 32, **overrides})


FAMILY = dense_family("mistral", read_config, debug_config, {"mistral-7b-v0.3": "mistral-7b-instruct-v0.3.json"})
