"""Mixtral (sparse mixture of experts) as DeepSpeed pipeline layers: Enter, MixtralBlock x L, Exit.

Attention, norms and RoPE are llama's; the feed-forward (a router choosing the top-k of E SwiGLU experts per
token), the statistics that carry the load-balancing loss across pipeline stages, the loss, the expert-load
metrics and LoRA on the stacked experts are `models.moe`'s (this module re-exports the names it always had).
Mixtral's settings there: softmax router with the k weights renormalised, experts `w1`/`w2`/`w3` under
`block_sparse_moe`, `router_jitter_noise`, every block sparse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from deepspeed.pipe import LayerSpec

from .attention import AttentionSpec
from .common import ModelError, ModelOptions, RopeConfig, Rotary, cfg_get, check_attention_backend, read_rope_config
from .family import Family, WeightRule, even_parts, pipeline_specs
from .llama import ATTENTION_RULES, EMBED_RULES, HEAD_RULES, LlamaAttention, read_decoder_fields, refuse_dropout
from .moe import (EXPERT_WEIGHTS, ExpertAdapters, Experts, MoeBlock, MoeCausalLMLoss, MoeConfig,  # noqa: F401
                  MoeEnter, MoeExit, SparseMoe, expert_load_metrics, grouped_linear, grouped_mm, grouped_mm_supported,
                  grouped_swiglu, load_balancing_loss, looped_swiglu, moe_loss_fn, routes_dtype, sort_by_expert,
                  tied_moe_head_weight, tied_moe_lm_head, unstack_experts, valid_tokens)

MixtralEnter = MoeEnter
MixtralExit = MoeExit

MIXTRAL_8X7B_LAYERS = 32
DEFAULT_ROPE_THETA = 1e6  # MixtralConfig's default when config.json names none


@dataclass(frozen=True)
class MixtralArgs:
    """The subset of a mixtral config.json that determines the weights and the math.

    The attention fields carry llama's names, so `LlamaAttention` is used as is.
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    num_experts: int
    top_k: int
    router_aux_loss_coef: float
    router_jitter_noise: float = 0.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    attention_bias: bool = False
    qkv_bias: bool | None = None  # the llama attention flags mixtral leaves at llama's math
    qk_norm: str | None = None
    offset_norm: bool = False
    fused_qkv: bool = False
    norm_weight_fp32: bool = False
    rope_interleaved: bool = False

    def spec(self, layer: int) -> AttentionSpec:
        """Every layer attends within `sliding_window` when the config sets one (as transformers' mixtral)."""
        return AttentionSpec(window=self.sliding_window)

    @property
    def moe(self) -> MoeConfig:
        """The sparse feed-forward's settings (`models.moe`): softmax top-k renormalised, experts w1/w2/w3."""
        return MoeConfig(self.num_experts, self.top_k, self.hidden_size, self.intermediate_size,
                         self.initializer_range, jitter=self.router_jitter_noise)


def read_config(cfg: dict) -> MixtralArgs:
    """config.json dict -> MixtralArgs; refuses settings this implementation does not compute."""
    fields = read_decoder_fields(cfg, "mixtral", 1e-5)
    refuse_dropout(cfg, ("attention_dropout",))
    experts = cfg_get(cfg, "num_local_experts", int, 8)
    top_k = cfg_get(cfg, "num_experts_per_tok", int, 2)
    if not 1 <= top_k <= experts:
        raise ModelError(f"config.json: num_experts_per_tok ({top_k}) must be between 1 and "
                         f"num_local_experts ({experts})")
    rope_cfg = dict(cfg)
    if rope_cfg.get("rope_theta") is None:
        rope_cfg["rope_theta"] = DEFAULT_ROPE_THETA
    return MixtralArgs(
        **fields,
        rope=read_rope_config(rope_cfg, fields["head_dim"]),
        num_experts=experts,
        top_k=top_k,
        router_aux_loss_coef=float(cfg_get(cfg, "router_aux_loss_coef", (int, float), 0.001)),
        router_jitter_noise=float(cfg_get(cfg, "router_jitter_noise", (int, float), 0.0)),
        sliding_window=cfg_get(cfg, "sliding_window", int, None),
    )


# ----------------------------------------------------------------------------------------------
# Layers (the MoE machinery is `models.moe`'s; mixtral adds llama's attention)


class MixtralBlock(MoeBlock):
    """Block layer `layer_idx` (`models.moe.MoeBlock`): llama's attention (RoPE from `position_ids`, causal, no
    mask for right padding), then the sparse MoE under mixtral's HF name `block_sparse_moe`."""
    moe_name = "block_sparse_moe"

    def __init__(self, args: MixtralArgs, opts: ModelOptions, layer_idx: int):
        super().__init__()
        self.sliding_window = args.sliding_window
        self.init_modules(args.hidden_size, args.rms_norm_eps, LlamaAttention(args, opts.use_flash_attn, opts.dtype),
                          Rotary(args.rope), SparseMoe(args, opts.dtype, opts.moe_grouped_gemm), opts, layer_idx,
                          layer_idx)


def build_layers(args: MixtralArgs, opts: ModelOptions) -> list:
    """Spec list: MixtralEnter, MixtralBlock x L, MixtralExit (+ a trailing tied head sharing key 'embed')."""
    check_attention_backend(opts)
    head_vocab = None if args.tie_word_embeddings else args.vocab_size
    return pipeline_specs((MixtralEnter, args.vocab_size, args.hidden_size, args.pad_token_id, args.initializer_range,
                           args.num_layers, args.num_experts, args.top_k, opts.dtype),
                          [LayerSpec(MixtralBlock, args, opts, i) for i in range(args.num_layers)],
                          LayerSpec(MixtralExit, args.hidden_size, head_vocab, args.rms_norm_eps,
                                    args.initializer_range, opts.dtype, opts.fused_head_loss),
                          args.tie_word_embeddings, tied_moe_head_weight if opts.fused_head_loss else tied_moe_lm_head)


# ----------------------------------------------------------------------------------------------
# Cost model, partitioning, weight map


def layer_flops(args: MixtralArgs, seq_len: int) -> list[float]:
    """Forward FLOPs of one sequence per logical layer: [Enter, Block x L, Exit] (len L+2).

    Block: attention projections and causal attention as llama, the router (H·E), and the top-k experts
    each token runs (k · 3·H·F); the E-k idle experts cost nothing. Exit: RMSNorm + the vocabulary head.
    """
    h, hd = args.hidden_size, args.head_dim
    q_dim, kv_dim = args.num_heads * hd, args.num_kv_heads * hd
    active = h * q_dim * 2 + h * kv_dim * 2 + h * args.num_experts + args.top_k * 3 * h * args.intermediate_size
    block = seq_len * (2.0 * active + 2.0 * seq_len * q_dim)
    exit_cost = seq_len * (4.0 * h + 2.0 * h * args.vocab_size)
    return [0.0] + [block] * args.num_layers + [exit_cost]


def default_parts(num_stages: int, num_layers: int | None = None) -> list[int]:
    """Logical layers per stage; L defaults to mixtral-8x7b's 32: 8 stages -> [5,4,4,4,4,4,4,5]."""
    return even_parts((MIXTRAL_8X7B_LAYERS if num_layers is None else num_layers) + 2, num_stages)


# The hub layout (transformers 4.x files; what transformers 5 `save_pretrained` writes too) is the one table.
MIXTRAL_WEIGHT_MAP = EMBED_RULES + ATTENTION_RULES + (
    WeightRule("model.layers.{}.block_sparse_moe.gate.weight", "block", "block_sparse_moe.gate.weight"),
    *(WeightRule(f"model.layers.{{}}.block_sparse_moe.experts.{{}}.{w}.weight", "block",
                 f"block_sparse_moe.experts.{{}}.{w}.weight") for w in ("w1", "w2", "w3")),
) + HEAD_RULES

_V5_MOE = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)")


def from_v5_layout(args: MixtralArgs, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One tensor of a transformers-5 in-memory layout checkpoint -> the hub names of `MIXTRAL_WEIGHT_MAP`.

    `mlp.gate.weight` -> `block_sparse_moe.gate.weight`; `mlp.experts.gate_up_proj` [E, 2F, H] -> per
    expert `w1` = rows [:F] (the gate) and `w3` = rows [F:]; `mlp.experts.down_proj` [E, H, F] -> per expert
    `w2`. Slices are views: the converter clones each into its own storage when it writes the layer file.
    Any other name passes through unchanged.
    """
    match = _V5_MOE.fullmatch(name)
    if match is None:
        return {name: tensor}
    layer, what = match.groups()
    prefix = f"model.layers.{layer}.block_sparse_moe"
    if what == "gate.weight":
        return {f"{prefix}.gate.weight": tensor}
    e, h, f = args.num_experts, args.hidden_size, args.intermediate_size
    expected = (e, 2 * f, h) if what == "experts.gate_up_proj" else (e, h, f)
    if tuple(tensor.shape) != expected:
        raise ModelError(f"tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies {expected}")
    if what == "experts.down_proj":
        return {f"{prefix}.experts.{i}.w2.weight": tensor[i] for i in range(e)}
    out = {}
    for i in range(e):
        out[f"{prefix}.experts.{i}.w1.weight"] = tensor[i, :f]
        out[f"{prefix}.experts.{i}.w3.weight"] = tensor[i, f:]
    return out


def debug_config(**overrides) -> dict:
    """config.json of a tiny random mixtral (4 experts, top-2) for tests and CPU runs."""
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 512, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
           "router_jitter_noise": 0.0, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 512,
           "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 3, "hidden_act": "silu", "initializer_range": 0.02}
    cfg.update(overrides)
    return cfg


FAMILY = Family(
    model_type="mixtral",
    read_config=read_config,
    build_layers=build_layers,
    weight_map=MIXTRAL_WEIGHT_MAP,
    layer_flops=layer_flops,
    default_parts=default_parts,
    loss_fn=moe_loss_fn,
    step_metrics=expert_load_metrics,
    tied_hf_names=("lm_head.weight",),
    from_hf_tensor=from_v5_layout,
)
