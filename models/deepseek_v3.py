"""DeepSeek-V3 architecture (DeepSeek-V3/R1, Moonlight-16B-A3B, Kimi-K2; `model_type: "deepseek_v3"`) as DeepSpeed
pipeline layers: Enter, DeepseekBlock x L, Exit. Reference: transformers' `DeepseekV3ForCausalLM`.

Attention is Multi-head Latent Attention (`MlaAttention`): q = `q_b_proj(norm(q_a_proj x))` (or one `q_proj` when
`q_lora_rank` is null); `kv_a_proj_with_mqa x` splits into a `kv_lora_rank` latent (normed, then `kv_b_proj` gives
every head its k-nope part and its v) and one `qk_rope_head_dim` key part shared by all heads. RoPE turns the rope
dims only (pairs (2i, 2i+1) with `rope_interleave`, as the checkpoints are laid out; halves otherwise); q/k heads
are nope + rope dims, v heads `v_head_dim`. YaRN (`rope_scaling` type yarn, DeepSeek-V3's) scales the frequencies,
cos/sin by its attention factor, and the softmax scale by mscale(factor, mscale_all_dim)².

Feed-forward (`models.moe`): the first `first_k_dense_replace` layers a dense SwiGLU of `intermediate_size`, the
others a sigmoid router with `e_score_correction_bias` (it shifts the scores that choose the experts, not the
weights that mix them), group-limited top-k (the `topk_group` best of `n_group` groups, a group scored by its 2 best
experts), weights renormalised (`norm_topk_prob`) and times `routed_scaling_factor`, plus `n_shared_experts` shared
experts (one SwiGLU of n·`moe_intermediate_size`) on every token.

Balancing: the correction bias is not trained by gradient. After each optimizer step the trainer moves it by the
published auxiliary-loss-free rule, `b_e += rate · sign(mean load - load_e)` over the step's top-k assignments summed
over the data-parallel replicas (`models.moe.update_expert_bias`), with `rate` = the training config's
`moe_bias_update_rate` (default 0: the released biases stay frozen, as in transformers, which never updates them;
DeepSeek-V3's pretraining used 0.001). A config.json with `aux_loss_alpha` > 0 also trains DeepSeek's sequence-wise
balance loss (`seq_aux`, `models.moe.sequence_balance`, every position of a row as in DeepSeek's `MoEGate`);
transformers computes no aux loss for this model, and none is added otherwise.

Checkpoints: the hub's per-expert names and transformers 5's fused 3-D expert tensors are read, the hub layout is
written (`--format transformers5` writes the other; `models.moe_layout`). Multi-token-prediction layers beyond
`num_hidden_layers` (`num_nextn_predict_layers`, `model.layers.61.*` in DeepSeek-V3) are not trained and are dropped
on import, as transformers does. FP8 checkpoints (DeepSeek-V3's own files: `weight_scale_inv` tensors) are refused on
import: dequantize to bf16 first.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec  # noqa: F401  (the spec list is built by qwen3_moe.moe_specs)

from .attention import AttentionSpec, attend
from .common import (ModelError, ModelOptions, RMSNorm, RopeConfig, Rotary, apply_rope, cfg_get, make_linear,
                     rope_params)
from .family import Family, WeightRule, even_parts
from .llama import EMBED_RULES, HEAD_RULES, mean_keys, with_defaults
from .moe import (MoeBlock, MoeConfig, SparseLayers, SparseMoe, SwigluMlp, check_moe_config, expert_load_metrics,
                  moe_loss_fn, update_expert_bias)
from .moe_layout import FUSED_FORMAT, fused_experts_to_hub
from .qwen3_moe import ffn_params, moe_specs

DEEPSEEK_V3_LAYERS = 61
MLA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers' (and DeepSeek's) RMSNorm default, not rms_norm_eps
DEFAULTS = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
            "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
            "first_k_dense_replace": 3, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_interleave": True, "attention_bias": False, "tie_word_embeddings": False}


@dataclass(frozen=True)
class DeepseekArgs(SparseLayers):
    """The subset of a deepseek_v3 config.json that determines the weights and the math (see the module doc)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    yarn_inv_freq: tuple[float, ...] | None
    attn_scale: float
    rope_interleave: bool
    attention_bias: bool
    moe: MoeConfig
    sparse: tuple[bool, ...]
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    router_aux_loss_coef: float = 0.0  # transformers trains no Switch aux loss for this model

    @property
    def head_dim(self) -> int:
        """The q/k head size (nope + rope dims)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim



# ----------------------------------------------------------------------------------------------
# Config


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, factor: float, original: int, beta_fast: float, beta_slow: float,
                  truncate: bool = True) -> torch.Tensor:
    """YaRN's inverse frequencies [dim // 2], as transformers' `_compute_yarn_parameters`: interpolated (divided by
    `factor`) below the correction range, extrapolated (kept) above it, a linear ramp in between."""
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def read_rope(cfg: dict, rope_dim: int, qk_head_dim: int) -> tuple[RopeConfig, tuple[float, ...] | None, float]:
    """(RopeConfig of the rope dims, YaRN's inverse frequencies or None, the attention softmax scale)."""
    params = rope_params(cfg)
    theta = float(params.get("rope_theta", cfg.get("rope_theta")) or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    scale = qk_head_dim ** -0.5
    if kind == "default":
        return RopeConfig(head_dim=rope_dim, theta=theta), None, scale
    if kind != "yarn":
        raise ModelError(f"config.json: rope scaling type '{kind}' is not supported for deepseek_v3 "
                         "(supported: default, yarn)")
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if not isinstance(factor, (int, float)) or not isinstance(original, int):
        raise ModelError("config.json: rope scaling 'yarn' needs a numeric 'factor' and "
                         "'original_max_position_embeddings'")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention = params.get("attention_factor")
    if attention is None:
        attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                     else yarn_mscale(factor))
    if mscale_all_dim:
        scale = scale * yarn_mscale(factor, mscale_all_dim) ** 2
    inv = yarn_inv_freq(rope_dim, theta, float(factor), original, params.get("beta_fast") or 32,
                        params.get("beta_slow") or 1, params.get("truncate", True))
    rope = RopeConfig(head_dim=rope_dim, theta=theta, attention_factor=float(attention))
    return rope, tuple(inv.tolist()), scale


def read_config(cfg: dict) -> DeepseekArgs:
    """config.json -> DeepseekArgs; refuses what this implementation does not compute, naming the key."""
    cfg = with_defaults(cfg, DEFAULTS)
    for key, allowed in (("scoring_func", ("sigmoid",)), ("topk_method", ("noaux_tc",)), ("hidden_act", ("silu",))):
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            raise ModelError(f"config.json: {key} '{value}' is not supported for deepseek_v3 "
                             f"(supported: {', '.join(allowed)})")
    if cfg_get(cfg, "moe_layer_freq", int, 1) != 1:
        raise ModelError(f"config.json: moe_layer_freq {cfg['moe_layer_freq']} is not supported (only 1)")
    alpha = float(cfg_get(cfg, "aux_loss_alpha", (int, float), 0.0))
    if alpha > 0 and not cfg_get(cfg, "seq_aux", bool, True):
        raise ModelError("config.json: aux_loss_alpha with seq_aux false (the batch-wise balance loss) is not "
                         "supported; set seq_aux true or aux_loss_alpha 0")
    hidden, heads = cfg_get(cfg, "hidden_size", int), cfg_get(cfg, "num_attention_heads", int)
    layers, vocab = cfg_get(cfg, "num_hidden_layers", int), cfg_get(cfg, "vocab_size", int)
    nope, rope_dim = cfg_get(cfg, "qk_nope_head_dim", int), cfg_get(cfg, "qk_rope_head_dim", int)
    if rope_dim % 2:
        raise ModelError(f"config.json: 'qk_rope_head_dim' must be even, got {rope_dim}")
    rope, yarn, scale = read_rope(cfg, rope_dim, nope + rope_dim)
    first_dense = cfg_get(cfg, "first_k_dense_replace", int, 0)
    std = float(cfg_get(cfg, "initializer_range", (int, float), 0.02))
    moe = check_moe_config(MoeConfig(
        num_experts=cfg_get(cfg, "n_routed_experts", int), top_k=cfg_get(cfg, "num_experts_per_tok", int),
        hidden_size=hidden, expert_size=cfg_get(cfg, "moe_intermediate_size", int), init_std=std, router="sigmoid",
        norm_topk_prob=cfg_get(cfg, "norm_topk_prob", bool),
        routed_scaling_factor=float(cfg_get(cfg, "routed_scaling_factor", (int, float))),
        n_group=cfg_get(cfg, "n_group", int, 1), topk_group=cfg_get(cfg, "topk_group", int, 1),
        expert_names=("gate_proj", "down_proj", "up_proj"),
        shared_size=cfg_get(cfg, "n_shared_experts", int, 0) * cfg_get(cfg, "moe_intermediate_size", int),
        shared_name="shared_experts", seq_aux_alpha=alpha), experts_key="n_routed_experts")
    sparse = tuple(i >= first_dense for i in range(layers))
    if not any(sparse):
        raise ModelError(f"config.json: first_k_dense_replace ({first_dense}) leaves no MoE layer")
    pad = cfg_get(cfg, "pad_token_id", int, None)
    q_lora = cfg.get("q_lora_rank")
    if q_lora is not None:
        q_lora = cfg_get(cfg, "q_lora_rank", int)
    return DeepseekArgs(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=cfg_get(cfg, "intermediate_size", int),
        num_layers=layers, num_heads=heads, q_lora_rank=q_lora, kv_lora_rank=cfg_get(cfg, "kv_lora_rank", int),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=cfg_get(cfg, "v_head_dim", int),
        rms_norm_eps=float(cfg_get(cfg, "rms_norm_eps", (int, float))), rope=rope, yarn_inv_freq=yarn,
        attn_scale=scale, rope_interleave=cfg_get(cfg, "rope_interleave", bool),
        attention_bias=cfg_get(cfg, "attention_bias", bool), moe=moe, sparse=sparse,
        tie_word_embeddings=cfg_get(cfg, "tie_word_embeddings", bool),
        pad_token_id=pad if pad is not None and 0 <= pad < vocab else None, initializer_range=std)


# ----------------------------------------------------------------------------------------------
# Layers


class YarnRotary(Rotary):
    """`Rotary` with YaRN's inverse frequencies (cos/sin times the RopeConfig's attention factor)."""

    def __init__(self, rope: RopeConfig, inv_freq: tuple[float, ...]):
        super().__init__(rope)
        self.inv_freq = torch.tensor(inv_freq, dtype=torch.float32, device="cpu")


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, S, r] whose rope dims are pairs (2i, 2i+1), cos/sin [B, 1, S, r] (`Rotary`'s halves layout) ->
    the pairs rotated, laid out as (even results | odd results): transformers' `apply_rotary_pos_emb_interleave`
    (q and k get the same permutation, so q·k is that of the interleaved rotation)."""
    cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MlaAttention(nn.Module):
    """Multi-head Latent Attention; parameter names mirror HF's `self_attn.*`. x [B,S,H] -> [B,S,H]."""

    def __init__(self, args: DeepseekArgs, use_flash_attn: bool, dtype: torch.dtype):
        super().__init__()
        std, h, nh = args.initializer_range, args.hidden_size, args.num_heads
        self.num_heads, self.nope, self.rope_dim, self.v_dim = nh, args.qk_nope_head_dim, args.qk_rope_head_dim, \
            args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        qk = args.head_dim
        if args.q_lora_rank is None:
            self.q_proj = make_linear(h, nh * qk, False, std, dtype)
        else:
            self.q_a_proj = make_linear(h, args.q_lora_rank, args.attention_bias, std, dtype)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, MLA_NORM_EPS, dtype=dtype)
            self.q_b_proj = make_linear(args.q_lora_rank, nh * qk, False, std, dtype)
        self.kv_a_proj_with_mqa = make_linear(h, args.kv_lora_rank + args.qk_rope_head_dim, args.attention_bias, std,
                                              dtype)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, MLA_NORM_EPS, dtype=dtype)
        self.kv_b_proj = make_linear(args.kv_lora_rank, nh * (args.qk_nope_head_dim + args.v_head_dim), False, std,
                                     dtype)
        self.o_proj = make_linear(nh * args.v_head_dim, h, args.attention_bias, std, dtype)
        self.spec = AttentionSpec(scale=args.attn_scale)
        self.use_flash_attn = use_flash_attn
        self.rope = apply_rope_interleaved if args.rope_interleave else apply_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None, block_mask=None) -> torch.Tensor:
        """x [B,S,H], cos/sin [B,1,S,rope]; position_ids for packed rows -> [B,S,H]."""
        b, s, _ = x.shape
        nh = self.num_heads
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, nh, self.nope + self.rope_dim).transpose(1, 2)  # (B, nh, S, qk)
        q_pass, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        kv_nope, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_nope)).view(b, s, nh, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, nh, S, nope), (B, nh, S, v)
        q_rot = self.rope(q_rot, cos, sin)
        k_rot = self.rope(k_rot.view(b, 1, s, self.rope_dim), cos, sin)
        q = torch.cat((q_pass, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, nh, -1, -1)), dim=-1)
        if self.use_flash_attn and self.v_dim != q.shape[-1]:  # flash-attn wants one head size: pad v, cut after
            out = attend(q, k, F.pad(v, (0, q.shape[-1] - self.v_dim)), self.spec, True, position_ids)
            out = out[..., : self.v_dim]
        else:
            out = attend(q, k, v, self.spec, self.use_flash_attn, position_ids, block_mask)  # (B, S, nh, v)
        return self.o_proj(out.reshape(b, s, nh * self.v_dim))


class DeepseekBlock(MoeBlock):
    """Block layer (`models.moe.MoeBlock`): `MlaAttention`, then `mlp`: the sigmoid-routed `SparseMoe` with its shared
    experts, or (the first `first_k_dense_replace` layers) a dense `SwigluMlp(intermediate_size)`."""
    moe_name = "mlp"

    def __init__(self, args: DeepseekArgs, opts: ModelOptions, layer_idx: int):
        super().__init__()
        index = args.moe_index(layer_idx)
        ffn = (SparseMoe(args, opts.dtype, opts.moe_grouped_gemm) if index is not None else
               SwigluMlp(args.hidden_size, args.intermediate_size, args.initializer_range, opts.dtype))
        rotary = YarnRotary(args.rope, args.yarn_inv_freq) if args.yarn_inv_freq else Rotary(args.rope)
        self.init_modules(args.hidden_size, args.rms_norm_eps, MlaAttention(args, opts.use_flash_attn, opts.dtype),
                          rotary, ffn, opts, layer_idx, index)


def build_layers(args: DeepseekArgs, opts: ModelOptions) -> list:
    return moe_specs(args, opts, DeepseekBlock)


# ----------------------------------------------------------------------------------------------
# Cost model, partitioning, weight map


def attention_params(args: DeepseekArgs) -> float:
    """Weights one token multiplies in MLA: the q path, kv_a, kv_b (every head's k-nope and v) and o."""
    h, nh = args.hidden_size, args.num_heads
    q = h * nh * args.head_dim if args.q_lora_rank is None else \
        h * args.q_lora_rank + args.q_lora_rank * nh * args.head_dim
    kv = h * (args.kv_lora_rank + args.qk_rope_head_dim) + args.kv_lora_rank * nh * (args.qk_nope_head_dim +
                                                                                   args.v_head_dim)
    return q + kv + nh * args.v_head_dim * h


def layer_flops(args: DeepseekArgs, seq_len: int) -> list[float]:
    """Forward FLOPs of one sequence per logical layer: [Enter, Block x L, Exit] (len L+2): MLA's projections,
    QKᵀ (q/k head size) and AV (v head size) over about S/2 keys, and the feed-forward weights a token runs
    (`qwen3_moe.ffn_params`: router, top-k and shared experts; the idle experts cost nothing)."""
    scores = 2.0 * args.num_heads * (args.head_dim + args.v_head_dim) * mean_keys(seq_len, None)
    blocks = [seq_len * (2.0 * (attention_params(args) + ffn_params(args, i)) + scores)
              for i in range(args.num_layers)]
    return [0.0] + blocks + [seq_len * (4.0 * args.hidden_size + 2.0 * args.hidden_size * args.vocab_size)]


def default_parts(num_stages: int, num_layers: int | None = None) -> list[int]:
    """Logical layers per stage; L defaults to DeepSeek-V3's 61."""
    return even_parts((DEEPSEEK_V3_LAYERS if num_layers is None else num_layers) + 2, num_stages)


def _block_rule(name: str) -> WeightRule:
    return WeightRule(f"model.layers.{{}}.{name}", "block", name)


DEEPSEEK_WEIGHT_MAP = EMBED_RULES + (
    _block_rule("input_layernorm.weight"),
    _block_rule("post_attention_layernorm.weight"),
    _block_rule("self_attn.q_proj.weight"),
    _block_rule("self_attn.q_a_proj.weight"),
    _block_rule("self_attn.q_a_proj.bias"),
    _block_rule("self_attn.q_a_layernorm.weight"),
    _block_rule("self_attn.q_b_proj.weight"),
    _block_rule("self_attn.kv_a_proj_with_mqa.weight"),
    _block_rule("self_attn.kv_a_proj_with_mqa.bias"),
    _block_rule("self_attn.kv_a_layernorm.weight"),
    _block_rule("self_attn.kv_b_proj.weight"),
    _block_rule("self_attn.o_proj.weight"),
    _block_rule("self_attn.o_proj.bias"),
    _block_rule("mlp.gate.weight"),
    _block_rule("mlp.gate.e_score_correction_bias"),
    _block_rule("mlp.experts.{}.gate_proj.weight"),
    _block_rule("mlp.experts.{}.up_proj.weight"),
    _block_rule("mlp.experts.{}.down_proj.weight"),
    _block_rule("mlp.shared_experts.gate_proj.weight"),
    _block_rule("mlp.shared_experts.up_proj.weight"),
    _block_rule("mlp.shared_experts.down_proj.weight"),
    _block_rule("mlp.gate_proj.weight"),
    _block_rule("mlp.up_proj.weight"),
    _block_rule("mlp.down_proj.weight"),
    WeightRule("model.layers.{}.self_attn.rotary_emb.inv_freq", None),
) + HEAD_RULES

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def from_checkpoint_tensor(args: DeepseekArgs, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """`Family.from_hf_tensor`: multi-token-prediction layers (index >= num_hidden_layers) dropped, transformers 5's
    fused experts split per expert (`moe_layout.fused_experts_to_hub`)."""
    match = _LAYER.match(name)
    if match is not None and int(match.group(1)) >= args.num_layers:
        return {}
    if name.endswith("_scale_inv") or tensor.dtype in FP8_DTYPES:
        raise ModelError(f"tensor '{name}' is FP8 block-quantized ({tensor.dtype}): dequantize the checkpoint to bf16 "
                         "first (the training weights are bf16/fp32)")
    return fused_experts_to_hub(args, name, tensor)


def after_step(module: nn.Module, rate: float, group=None) -> int:
    """`Family.after_step`: the auxiliary-loss-free bias update of every sigmoid router on this stage."""
    return update_expert_bias(module, rate, group)


def debug_config(**overrides) -> dict:
    """Tiny deepseek_v3: MLA with a q LoRA (q/k heads 16+8, v heads 16, interleaved RoPE), 8 routed experts in 4
    groups (best 2 kept), top-3, scaling 2.5, one shared expert, layer 0 dense."""
    cfg = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 512,
           "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8,
           "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 8,
           "v_head_dim": 16, "qk_nope_head_dim": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
           "first_k_dense_replace": 1, "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 512,
           "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_interleave": True,
           "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 3, "use_cache": False}
    cfg.update(overrides)
    return cfg


FAMILY = Family(
    model_type="deepseek_v3",
    read_config=read_config,
    build_layers=build_layers,
    weight_map=DEEPSEEK_WEIGHT_MAP,
    layer_flops=layer_flops,
    default_parts=default_parts,
    loss_fn=moe_loss_fn,
    step_metrics=expert_load_metrics,
    after_step=after_step,
    tied_hf_names=("lm_head.weight",),
    from_hf_tensor=from_checkpoint_tensor,
    hf_formats={"transformers5": FUSED_FORMAT},
    width_keys=("hidden_size", "intermediate_size", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank",
                "qk_nope_head_dim", "v_head_dim"),
    debug_config=debug_config,
    released_configs={"deepseek-v3": "deepseek-v3.json"},
)
