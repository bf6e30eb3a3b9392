"""Qwen1.5-MoE / Qwen2-MoE (`model_type: "qwen2_moe"`): Qwen3-MoE's layers (`models/qwen3_moe.py`) with Qwen2's
attention (bias on q/k/v, not o; no q/k norm) and one shared expert beside the routed ones on every sparse layer,
its output scaled by `sigmoid(shared_expert_gate(x))` (`models.moe.SparseMoe`). Windows as transformers'
Qwen2-MoE: `layer_types`, by default 'sliding_attention' on the even layers below `max_window_layers` when
`use_sliding_window`. Reference: transformers' `Qwen2MoeForCausalLM`."""
from __future__ import annotations

from .common import cfg_get
from .llama import dense_debug_config, read_layer_types, with_defaults
from .qwen3_moe import QwenMoeArgs, qwen_moe_family, read_moe_fields

DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "intermediate_size": 5632, "num_experts": 60,
            "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
            "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "qkv_bias": True,
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}


def read_config(cfg: dict) -> QwenMoeArgs:
    cfg = with_defaults(cfg, DEFAULTS)
    layers = cfg_get(cfg, "num_hidden_layers", int)
    on = cfg_get(cfg, "use_sliding_window", bool) and cfg.get("sliding_window") is not None
    first = cfg_get(cfg, "max_window_layers", int)
    types = read_layer_types(cfg, layers, ["sliding_attention" if on and (i + 1) % 2 and i < first
                                           else "full_attention" for i in range(layers)])
    return read_moe_fields({**cfg, "attention_bias": False}, "qwen2_moe", types if on else ["full_attention"] * layers,
                           None, cfg_get(cfg, "qkv_bias", bool),
                           shared_size=cfg_get(cfg, "shared_expert_intermediate_size", int), shared_gate=True)


def debug_config(**overrides) -> dict:
    """Tiny qwen2_moe: 8 experts top-2 (not renormalised, as released), a shared expert of 48, layer 2 dense,
    windows of 8 on layers 0 and 2."""
    return dense_debug_config("qwen2_moe", "Qwen2MoeForCausalLM", **{
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "norm_topk_prob": False, "router_aux_loss_coef": 0.02,
        "decoder_sparse_step": 1, "mlp_only_layers": [2], "use_sliding_window": True, "sliding_window": 8,
        "max_window_layers": 3, "rope_theta": 1e6, "output_router_logits": False, **overrides})


FAMILY = qwen_moe_family("qwen2_moe", read_config, debug_config, {})
