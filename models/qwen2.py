"""Qwen2 / Qwen2.5 (Coder, Math) and DeepSeek-R1-Distill-Qwen (`model_type: "qwen2"`): llama's block with a bias on
q/k/v (not o), and a sliding window on the layers from `max_window_layers` on when `use_sliding_window` is set.
Reference: transformers' `Qwen2ForCausalLM`."""
from __future__ import annotations

from .common import cfg_get, read_rope_config
from .llama import (LlamaArgs, dense_debug_config, dense_family, read_decoder_fields, read_layer_types,
                    read_windows, with_defaults)

DEFAULTS = {"rms_norm_eps": 1e-6, "sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False,
            "tie_word_embeddings": False}


def sliding_layer_types(cfg: dict, family: str) -> list[str]:
    """Qwen2/Qwen3 windows: `layer_types` as given, else 'sliding_attention' on layers >= `max_window_layers` when
    `use_sliding_window` and a `sliding_window` are set. Windows apply only with `use_sliding_window` (transformers
    drops `sliding_window` otherwise)."""
    layers = cfg_get(cfg, "num_hidden_layers", int)
    on = cfg_get(cfg, "use_sliding_window", bool, False) and cfg.get("sliding_window") is not None
    first = cfg_get(cfg, "max_window_layers", int, layers)
    types = read_layer_types(cfg, layers, ["sliding_attention" if on and i >= first else "full_attention"
                                           for i in range(layers)])
    return types if on else ["full_attention"] * layers


def read_config(cfg: dict) -> LlamaArgs:
    cfg = with_defaults(cfg, DEFAULTS)
    fields = read_decoder_fields(cfg, "qwen2", 1e-6)
    return LlamaArgs(**fields, rope=read_rope_config(cfg, fields["head_dim"]), qkv_bias=True,
                     layer_windows=read_windows(cfg, sliding_layer_types(cfg, "qwen2")))


def debug_config(**overrides) -> dict:
    """Tiny qwen2 with a window of 8 on the last 2 of 4 layers (shorter than the tests' rows)."""
    return dense_debug_config("qwen2", "Qwen2ForCausalLM", **{
        "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2, "rope_theta": 1e6, **overrides})


FAMILY = dense_family("qwen2", read_config, debug_config, {"qwen2.5-7b": "qwen2.5-7b-instruct.json",
                                                               "qwen2.5-32b": "qwen2.5-32b.json"})
