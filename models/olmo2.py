"""OLMo-2 7B/13B (`model_type: "olmo2"`): llama's block with its norms after attention and after the MLP (not
before), an RMSNorm over the whole q and k projections before RoPE, and every norm multiplying by its weight in
fp32 before the cast. Reference: transformers' `Olmo2ForCausalLM`."""
from __future__ import annotations

from .common import cfg_get, read_rope_config
from .llama import LlamaArgs, dense_debug_config, dense_family, read_decoder_fields, with_defaults

DEFAULTS = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False}


def read_config(cfg: dict) -> LlamaArgs:
    cfg = with_defaults(cfg, DEFAULTS)
    fields = read_decoder_fields(cfg, "olmo2", 1e-5)
    return LlamaArgs(**fields, rope=read_rope_config(cfg, fields["head_dim"]),
                     attention_bias=cfg_get(cfg, "attention_bias", bool, False), qk_norm="proj", norm_layout="post",
                     norm_weight_fp32=True)


def debug_config(**overrides) -> dict:
    cfg = dense_debug_config("olmo2", "Olmo2ForCausalLM", **{"rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                                                              **overrides})
    cfg.pop("head_dim", None)
    return cfg


FAMILY = dense_family("olmo2", read_config, debug_config, {"olmo-2-1124-7b": "olmo-2-1124-7b.json",
                                                                  "olmo-2-1124-13b": "olmo-2-1124-13b.json"})
