"""Gemma-3: the text-only 1B (`model_type: "gemma3_text"`) and the language model of the multimodal 4B-27B
(`model_type: "gemma3"`, whose `text_config` holds it).

The block is Gemma-2's (`models/gemma2.py`: (1 + w) norms in the sandwich layout, gelu-tanh MLP, √hidden embedding
scale, `query_pre_attn_scalar`, tied head) plus a per-head (1 + w) RMSNorm on q and k before RoPE, no soft-capping
(released configs: null; transformers' Gemma3 never applies `attn_logit_softcapping`, nor its multimodal model
`final_logit_softcapping`, so a config setting a cap transformers ignores is refused; gemma3_text's final cap is
applied), 5 sliding layers to 1 global (`sliding_window_pattern`, 6), and two RoPEs: sliding layers use
`rope_local_base_freq` (10k) unscaled, global ones `rope_theta` (1M) with `rope_scaling` (linear, factor 8 on 4B+).
transformers >= 5 saves both as `rope_parameters: {full_attention: {...}, sliding_attention: {...}}`; either layout
is read.

The multimodal family trains the language model only. Its vision tower and projector are carried verbatim
(`Family.carried_hf_prefixes`): `hg_to_pp` keeps them in `extra_tensors.safetensors`, `pp_to_hg` writes them back
bit for bit next to the trained language model, under the source checkpoint's own names (hub files:
`language_model.model.*`, `vision_tower.*`; transformers 5: `model.language_model.*`, `model.vision_tower.*`).
References: transformers' `Gemma3ForCausalLM`, and `Gemma3ForConditionalGeneration` on text-only input.
"""
from __future__ import annotations

from dataclasses import replace

from .common import ModelError, ModelOptions, RopeConfig, cfg_get, read_rope_config
from .family import WeightRule
from .gemma2 import gemma_fields, gemma_layer_types
from .llama import (DENSE_WEIGHT_MAP, LlamaArgs, build_layers as llama_build_layers, dense_debug_config,
                    dense_family, read_windows, with_defaults)

# transformers' Gemma3TextConfig defaults, for the keys a config.json omits (the multimodal checkpoints' text_config
# lists only a few)
DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "tie_word_embeddings": True,
            "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": None,
            "attn_logit_softcapping": None, "sliding_window_pattern": 6}
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0


def layer_rope_params(cfg: dict) -> dict[str, dict]:
    """{'full_attention': rope dict, 'sliding_attention': rope dict} as transformers' Gemma3TextConfig builds them:
    transformers 5's nested `rope_parameters`, else a default RoPE per layer type; a hub `rope_scaling` applies to
    the global layers; missing thetas are `rope_theta` (global, 1M) and `rope_local_base_freq` (sliding, 10k)."""
    nested = cfg.get("rope_parameters") or {}
    if not isinstance(nested, dict) or (nested and not set(nested) <= {"full_attention", "sliding_attention"}):
        raise ModelError("config.json: 'rope_parameters' must map 'full_attention' and 'sliding_attention' to rope "
                         "parameters (Gemma-3 has one RoPE per layer type)")
    full, sliding = dict(nested.get("full_attention") or {}), dict(nested.get("sliding_attention") or {})
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ModelError("config.json: 'rope_scaling' must be an object")
    full.update(scaling or {})
    full.setdefault("rope_theta", cfg_get(cfg, "rope_theta", (int, float), GLOBAL_THETA))
    sliding.setdefault("rope_theta", cfg_get(cfg, "rope_local_base_freq", (int, float), LOCAL_THETA))
    return {"full_attention": full, "sliding_attention": sliding}


def read_text_config(cfg: dict, family: str, ignored: tuple[str, ...] = ("attn_logit_softcapping",)) -> LlamaArgs:
    """A Gemma-3 language model's config (gemma3_text's config.json, or gemma3's `text_config`) -> LlamaArgs.
    `ignored`: keys transformers' model of this family does not apply, refused unless null."""
    cfg = with_defaults(cfg, DEFAULTS)
    for key in ignored:
        if cfg.get(key) is not None:
            raise ModelError(f"config.json: '{key}' {cfg[key]!r} is not supported for {family} (transformers' "
                             "Gemma-3 does not apply it; only null)")
    fields = gemma_fields(cfg, family)
    types = gemma_layer_types(cfg, cfg_get(cfg, "sliding_window_pattern", int, 6))
    ropes: dict[str, RopeConfig] = {t: read_rope_config(cfg, fields["head_dim"], params=p)
                                    for t, p in layer_rope_params(cfg).items()}
    return LlamaArgs(**fields, rope=ropes["full_attention"], qk_norm="head",
                     layer_windows=read_windows(cfg, types), layer_ropes=tuple(ropes[t] for t in types))


def read_config(cfg: dict) -> LlamaArgs:
    return read_text_config(cfg, "gemma3_text")


def read_multimodal_config(cfg: dict) -> LlamaArgs:
    """gemma3's config.json -> the LlamaArgs of its language model (`text_config`); the head is tied."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelError("config.json: 'text_config' must be an object (the Gemma-3 language model)")
    if cfg_get(cfg, "tie_word_embeddings", bool, True) is False:
        raise ModelError("config.json: 'tie_word_embeddings' false is not supported for gemma3 (its head is tied)")
    try:
        return read_text_config(text, "gemma3", ("attn_logit_softcapping", "final_logit_softcapping"))
    except ModelError as err:
        raise ModelError(str(err).replace("config.json: '", "config.json: 'text_config.", 1)) from None


def debug_config(**overrides) -> dict:
    """Tiny gemma3_text: layers 0, 1, 3 slide over 8 keys (sliding_window_pattern 3), layer 2 is global with linear
    RoPE scaling (factor 8, base 1M) while the sliding layers use base 10k; query_pre_attn_scalar 24 != head_dim 16."""
    return dense_debug_config("gemma3_text", "Gemma3ForCausalLM", **{
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "query_pre_attn_scalar": 24, "sliding_window": 8, "sliding_window_pattern": 3, "rope_theta": 1e6,
        "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "pad_token_id": 0,
        **overrides})


def multimodal_debug_config(**overrides) -> dict:
    """Tiny gemma3 (Gemma3ForConditionalGeneration): the tiny gemma3_text as `text_config`, a 2-layer SigLIP tower
    over 28x28 images (4 patches, 4 image tokens) and the special image tokens inside the 512-token vocabulary.
    `overrides` go into `text_config`."""
    text = debug_config(**overrides)
    text.pop("architectures")
    return {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                              "vision_use_head": False},
            "mm_tokens_per_image": 4, "boi_token_index": 508, "eoi_token_index": 509, "image_token_index": 510,
            "initializer_range": 0.02, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "use_cache": False}


# The multimodal checkpoint's language model, in transformers 5's names (`model.language_model.*`, `lm_head.*`); hub
# files' `language_model.model.*` / `language_model.lm_head.*` are respelled into them (`canonical_hf_name`).
LM_PREFIX, HUB_LM_PREFIX, HUB_HEAD_PREFIX = "model.language_model.", "language_model.model.", "language_model.lm_head."
MULTIMODAL_WEIGHT_MAP = tuple(
    WeightRule(LM_PREFIX + rule.hf.removeprefix("model.") if rule.hf.startswith("model.") else rule.hf,
               rule.kind, rule.local)
    for rule in DENSE_WEIGHT_MAP)


def canonical_hf_name(name: str) -> str:
    """Hub (transformers 4) names of the language model -> transformers 5's: `language_model.model.X` ->
    `model.language_model.X`, `language_model.lm_head.X` -> `lm_head.X`."""
    if name.startswith(HUB_LM_PREFIX):
        return LM_PREFIX + name.removeprefix(HUB_LM_PREFIX)
    if name.startswith(HUB_HEAD_PREFIX):
        return "lm_head." + name.removeprefix(HUB_HEAD_PREFIX)
    return name


def build_multimodal_layers(args: LlamaArgs, opts: ModelOptions) -> list:
    """The language model's layers (llama's with Gemma-3's flags); the vision tower is not built."""
    return llama_build_layers(args, opts)


# No published Gemma-3 config.json could be fetched here yet (gated on the hub; models/released/SOURCES.md): the
# released_configs stay empty until one is committed.
FAMILY = dense_family("gemma3_text", read_config, debug_config, {})

MULTIMODAL_FAMILY = replace(
    dense_family("gemma3", read_multimodal_config, multimodal_debug_config, {},
        canonical_hf_name=canonical_hf_name,
        carried_hf_prefixes=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                             "model.multi_modal_projector.")),
    build_layers=build_multimodal_layers, weight_map=MULTIMODAL_WEIGHT_MAP)
FAMILIES = (FAMILY, MULTIMODAL_FAMILY)
