"""Gemma-2 2B/9B/27B (`model_type: "gemma2"`): llama's block with flags. Every norm is `x·(1 + w)` and there are four
per block (before and after attention, before and after the MLP: the 'sandwich' layout); the MLP's gate is
`gelu_pytorch_tanh` (`hidden_activation`; hub configs also carry a `hidden_act` the model never reads); attention
scores are scaled by `query_pre_attn_scalar ** -0.5` and soft-capped (`attn_logit_softcapping`), the output logits
too (`final_logit_softcapping`, inside the fused head + loss as well); even layers (0, 2, ...) slide over
`sliding_window` keys, odd ones are global; embeddings are multiplied by √hidden; the head is tied.
Reference: transformers' `Gemma2ForCausalLM`."""
from __future__ import annotations

from .common import ModelError, cfg_get, read_rope_config
from .llama import (LlamaArgs, dense_debug_config, dense_family, read_decoder_fields, read_layer_types,
                    read_windows, with_defaults)

GELU_TANH = ("gelu_pytorch_tanh",)

# transformers' Gemma2Config defaults, for the keys a config.json omits
DEFAULTS = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "pad_token_id": 0, "tie_word_embeddings": True,
            "rope_theta": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0}


def refuse_bidirectional(cfg: dict) -> None:
    """`use_bidirectional_attention` (the embedding variants' encoder attention) is not causal LM math."""
    if cfg_get(cfg, "use_bidirectional_attention", bool, False):
        raise ModelError("config.json: 'use_bidirectional_attention' true is not supported (causal attention only)")


def gemma_layer_types(cfg: dict, pattern: int) -> list[str]:
    """`layer_types` as given, else transformers' rule: layer i slides unless (i + 1) is a multiple of `pattern`
    (Gemma-2: 2, so even layers slide; Gemma-3: `sliding_window_pattern`, 6)."""
    layers = cfg_get(cfg, "num_hidden_layers", int)
    return read_layer_types(cfg, layers, ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                          for i in range(layers)])


def gemma_fields(cfg: dict, family: str) -> dict:
    """The LlamaArgs flags Gemma-2 and Gemma-3 share: the decoder sizes with the gelu-tanh MLP, (1 + w) norms in the
    sandwich layout, √hidden embedding scale, the attention scale and both soft-caps (None when null)."""
    refuse_bidirectional(cfg)
    fields = read_decoder_fields(cfg, family, 1e-6, acts=GELU_TANH, act_key="hidden_activation", tied_default=True)
    attn_cap = cfg_get(cfg, "attn_logit_softcapping", (int, float), None)
    final_cap = cfg_get(cfg, "final_logit_softcapping", (int, float), None)
    for key, cap in (("attn_logit_softcapping", attn_cap), ("final_logit_softcapping", final_cap)):
        if cap is not None and cap <= 0:
            raise ModelError(f"config.json: '{key}' must be > 0 or null, got {cap!r}")
    scalar = cfg_get(cfg, "query_pre_attn_scalar", (int, float))
    if scalar <= 0:
        raise ModelError(f"config.json: 'query_pre_attn_scalar' must be > 0, got {scalar!r}")
    return dict(**fields, hidden_act="gelu_pytorch_tanh", offset_norm=True, norm_layout="sandwich",
                attn_scale=float(scalar) ** -0.5, attn_softcap=None if attn_cap is None else float(attn_cap),
                final_softcap=None if final_cap is None else float(final_cap),
                embed_scale=float(fields["hidden_size"]) ** 0.5)


def read_config(cfg: dict) -> LlamaArgs:
    cfg = with_defaults(cfg, DEFAULTS)
    fields = gemma_fields(cfg, "gemma2")
    return LlamaArgs(**fields, rope=read_rope_config(cfg, fields["head_dim"]),
                     layer_windows=read_windows(cfg, gemma_layer_types(cfg, 2)))


def debug_config(**overrides) -> dict:
    """Tiny gemma2, tied: windows of 8 on layers 0 and 2, soft-caps small enough to change the tiny model's scores
    (attention 2.0) and logits (1.0), query_pre_attn_scalar 24 != head_dim 16."""
    return dense_debug_config("gemma2", "Gemma2ForCausalLM", **{
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "query_pre_attn_scalar": 24, "sliding_window": 8, "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 1.0, "pad_token_id": 0, **overrides})


FAMILY = dense_family("gemma2", read_config, debug_config, {"gemma-2-9b": "gemma-2-9b-it.json"})
