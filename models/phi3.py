"""Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini (`model_type: "phi3"`): llama's block with HF's fused `qkv_proj`
(rows q | k | v) and `gate_up_proj` (rows gate | up) kept fused (so LoRA targets and PEFT adapters use Phi-3's own
module names), partial rotary (`partial_rotary_factor`), LongRoPE (`rope_scaling.type: longrope`: short factors, long
ones once a row passes `original_max_position_embeddings`, cos/sin scaled by the attention factor) and a sliding
window on every layer when `sliding_window` is set (Phi-3-mini: 2047, which bites at 2048 tokens).
Reference: transformers' `Phi3ForCausalLM`."""
from __future__ import annotations

from .common import cfg_get, read_rope_config
from .llama import LlamaArgs, dense_debug_config, dense_family, read_decoder_fields, read_windows, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None,
            "original_max_position_embeddings": 4096}


def read_config(cfg: dict) -> LlamaArgs:
    cfg = with_defaults(cfg, DEFAULTS)
    fields = read_decoder_fields(cfg, "phi3", 1e-5)
    layers = cfg_get(cfg, "num_hidden_layers", int)
    sliding = "sliding_attention" if cfg.get("sliding_window") is not None else "full_attention"
    return LlamaArgs(**fields, rope=read_rope_config(cfg, fields["head_dim"]), fused_qkv=True, fused_gate_up=True,
                     layer_windows=read_windows(cfg, [sliding] * layers))


def debug_config(**overrides) -> dict:
    """Tiny phi3: fused projections, a window of 8 on every layer."""
    cfg = dense_debug_config("phi3", "Phi3ForCausalLM", **{"sliding_window": 8, "rms_norm_eps": 1e-5,
                                                            "pad_token_id": 3, **overrides})
    cfg.pop("head_dim", None)  # Phi-3 configs have none: hidden / heads
    return cfg


FAMILY = dense_family("phi3", read_config, debug_config, {
    "phi-3-mini-4k-instruct": "phi-3-mini-4k-instruct.json", "phi-4": "phi-4.json"})
