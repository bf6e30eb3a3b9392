"""GLM-4-9B / GLM-4-32B-0414 (`model_type: "glm4"`, transformers' own, not the remote-code `chatglm`): llama's block
with a bias on q/k/v (not o), fused `gate_up_proj`, RoPE over interleaved pairs of the first
`partial_rotary_factor` (0.5) of each head, and norms after attention and after the MLP as well as before them.
Reference: transformers' `Glm4ForCausalLM`."""
from __future__ import annotations

from .common import cfg_get, read_rope_config
from .llama import LlamaArgs, dense_debug_config, dense_family, read_decoder_fields, with_defaults

DEFAULTS = {"rms_norm_eps": 1.5625e-07, "tie_word_embeddings": False, "attention_bias": True, "head_dim": 128,
            "partial_rotary_factor": 0.5}


def read_config(cfg: dict) -> LlamaArgs:
    cfg = with_defaults(cfg, DEFAULTS)
    fields = read_decoder_fields(cfg, "glm4", 1.5625e-07)
    return LlamaArgs(**fields, rope=read_rope_config(cfg, fields["head_dim"]),
                     qkv_bias=cfg_get(cfg, "attention_bias", bool, True), fused_gate_up=True, norm_layout="glm4",
                     rope_interleaved=True)


def debug_config(**overrides) -> dict:
    return dense_debug_config("glm4", "Glm4ForCausalLM", **{"partial_rotary_factor": 0.5, "attention_bias": True,
                                                             "rms_norm_eps": 1e-5, **overrides})


FAMILY = dense_family("glm4", read_config, debug_config, {})  # no published config.json could be fetched yet
