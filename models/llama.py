"""Llama 1/2/3 (MHA and GQA) as DeepSpeed pipeline layers: Enter, LlamaBlock x L, Exit.

Only what is llama-specific lives here: the args, the decoder block, the weight map and the cost model.
Norms, RoPE, attention backend, Enter/Exit layers and the loss come from `models.common`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec

from .common import (EmbeddingEnter, ModelError, ModelOptions, NormHeadExit, RMSNorm, RopeConfig, Rotary, apply_rope,
                     causal_attention, cfg_get, check_attention_backend, make_linear, PreNormBlock, read_rope_config,
                     tied_head_fn)
from .family import Family, WeightRule, even_parts, pipeline_specs

LLAMA_7B_LAYERS = 32


@dataclass(frozen=True)
class LlamaArgs:
    """The subset of a llama config.json that determines the weights and the math."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    attention_bias: bool = False
    mlp_bias: bool = False


def read_attention_shape(cfg: dict, family: str) -> tuple[int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim) of a llama-style config; GQA must divide, the MLP must be SiLU."""
    hidden = cfg_get(cfg, "hidden_size", int)
    heads = cfg_get(cfg, "num_attention_heads", int)
    kv_heads = cfg_get(cfg, "num_key_value_heads", int, heads)
    head_dim = cfg_get(cfg, "head_dim", int, hidden // heads)
    if heads % kv_heads:
        raise ModelError(f"config.json: num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    act = cfg_get(cfg, "hidden_act", str, "silu")
    if act != "silu":
        raise ModelError(f"config.json: hidden_act '{act}' is not supported for {family} (supported: silu)")
    return hidden, heads, kv_heads, head_dim


def read_decoder_fields(cfg: dict, family: str, eps_default: float) -> dict:
    """The fields every llama-style args dataclass shares (LlamaArgs, MixtralArgs), read from config.json:
    sizes and heads (`read_attention_shape`), norm eps, tying, pad id (None when outside the vocabulary), init std."""
    hidden, heads, kv_heads, head_dim = read_attention_shape(cfg, family)
    pad = cfg_get(cfg, "pad_token_id", int, None)
    vocab = cfg_get(cfg, "vocab_size", int)
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=cfg_get(cfg, "intermediate_size", int),
        num_layers=cfg_get(cfg, "num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg_get(cfg, "rms_norm_eps", (int, float), eps_default)),
        tie_word_embeddings=cfg_get(cfg, "tie_word_embeddings", bool, False),
        pad_token_id=pad if pad is not None and 0 <= pad < vocab else None,
        initializer_range=float(cfg_get(cfg, "initializer_range", (int, float), 0.02)),
    )


def read_config(cfg: dict) -> LlamaArgs:
    """config.json dict -> LlamaArgs; refuses activations and shapes this implementation does not compute."""
    fields = read_decoder_fields(cfg, "llama", 1e-6)
    return LlamaArgs(
        **fields,
        rope=read_rope_config(cfg, fields["head_dim"]),
        attention_bias=cfg_get(cfg, "attention_bias", bool, False),
        mlp_bias=cfg_get(cfg, "mlp_bias", bool, False),
    )


class LlamaAttention(nn.Module):
    """Self-attention with RoPE and grouped KV heads; parameter names mirror HF's `self_attn.*`."""

    def __init__(self, args: LlamaArgs, use_flash_attn: bool, dtype: torch.dtype):
        super().__init__()
        std, bias, hd = args.initializer_range, args.attention_bias, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, hd
        self.use_flash_attn = use_flash_attn
        self.q_proj = make_linear(args.hidden_size, args.num_heads * hd, bias, std, dtype)
        self.k_proj = make_linear(args.hidden_size, args.num_kv_heads * hd, bias, std, dtype)
        self.v_proj = make_linear(args.hidden_size, args.num_kv_heads * hd, bias, std, dtype)
        self.o_proj = make_linear(args.num_heads * hd, args.hidden_size, bias, std, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,S,H], cos/sin [B,1,S,hd] -> [B,S,H]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, self.use_flash_attn, position_ids)  # (B, S, nh, hd)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: `down(silu(gate x) * up x)`, [B,S,H] -> [B,S,H]."""

    def __init__(self, args: LlamaArgs, dtype: torch.dtype):
        super().__init__()
        std, bias = args.initializer_range, args.mlp_bias
        self.gate_proj = make_linear(args.hidden_size, args.intermediate_size, bias, std, dtype)
        self.up_proj = make_linear(args.hidden_size, args.intermediate_size, bias, std, dtype)
        self.down_proj = make_linear(args.intermediate_size, args.hidden_size, bias, std, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(PreNormBlock):
    """Block layer: `(hidden [B,S,H], position_ids [B,S])` -> `(hidden, position_ids)`.

    RoPE angles come from `position_ids`, so packed or right-padded batches need no mask. With
    `use_grad_ckpt` the whole block is recomputed in backward.
    """

    def __init__(self, args: LlamaArgs, opts: ModelOptions):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=opts.dtype)
        self.self_attn = LlamaAttention(args, opts.use_flash_attn, opts.dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=opts.dtype)
        self.mlp = LlamaMLP(args, opts.dtype)
        self.rotary = Rotary(args.rope)
        self.set_options(opts)


def build_layers(args: LlamaArgs, opts: ModelOptions) -> list:
    """Spec list: Enter, LlamaBlock x L, Exit; tied: Enter and a trailing head share key 'embed'.

    Untied: L+2 specs. Tied: L+3 specs, the last one (no module of its own, hence no file) computes
    `hidden @ embed_tokens.weightᵀ` on the last stage with DeepSpeed keeping both copies in sync.
    """
    check_attention_backend(opts)
    tied = args.tie_word_embeddings
    exit_spec = LayerSpec(NormHeadExit, args.hidden_size, None if tied else args.vocab_size, args.rms_norm_eps,
                          args.initializer_range, opts.dtype, opts.fused_head_loss)
    return pipeline_specs((EmbeddingEnter, args.vocab_size, args.hidden_size, args.pad_token_id,
                           args.initializer_range, opts.dtype),
                          [LayerSpec(LlamaBlock, args, opts) for _ in range(args.num_layers)], exit_spec,
                          tied, tied_head_fn(opts))


def layer_flops(args: LlamaArgs, seq_len: int) -> list[float]:
    """Forward FLOPs of one sequence per logical layer: [Enter, Block x L, Exit] (len L+2).

    Block: 2·params of the projections per token, plus causal attention (QKᵀ and AV over on average
    half the keys: 2·S·nh·hd per token). Exit: the RMSNorm (~4H per token) plus the vocabulary head 2·H·V.
    Enter is a table lookup, counted as 0.
    """
    h, hd = args.hidden_size, args.head_dim
    q_dim, kv_dim = args.num_heads * hd, args.num_kv_heads * hd
    proj_params = h * q_dim * 2 + h * kv_dim * 2 + 3 * h * args.intermediate_size
    block = seq_len * (2.0 * proj_params + 2.0 * seq_len * q_dim)
    exit_cost = seq_len * (4.0 * h + 2.0 * h * args.vocab_size)
    return [0.0] + [block] * args.num_layers + [exit_cost]


def default_parts(num_stages: int, num_layers: int | None = None) -> list[int]:
    """Logical layers per stage; `num_layers` (L) defaults to llama-7b's 32: 8 stages -> [5,4,4,4,4,4,4,5]."""
    return even_parts((LLAMA_7B_LAYERS if num_layers is None else num_layers) + 2, num_stages)


def _same_name(hf_prefix: str, kind: str, *locals_: str) -> tuple[WeightRule, ...]:
    """Rows whose local name is the HF name without its prefix (`model.layers.{}.` for blocks)."""
    return tuple(WeightRule(hf_prefix + name, kind, name) for name in locals_)


EMBED_RULES = _same_name("model.", "enter", "embed_tokens.weight")
# Attention half of a llama-style block (biases only exist with `attention_bias`); shared with mixtral.
ATTENTION_RULES = _same_name(
    "model.layers.{}.", "block", "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.{t}" for t in ("weight", "bias") for p in "qkvo"),
) + (WeightRule("model.layers.{}.self_attn.rotary_emb.inv_freq", None),)
MLP_RULES = _same_name("model.layers.{}.", "block",
                       *(f"mlp.{p}_proj.{t}" for t in ("weight", "bias") for p in ("gate", "up", "down")))
HEAD_RULES = (WeightRule("model.norm.weight", "exit", "norm.weight"),
              WeightRule("lm_head.weight", "exit", "lm_head.weight"))
LLAMA_WEIGHT_MAP = EMBED_RULES + ATTENTION_RULES + MLP_RULES + HEAD_RULES


FAMILY = Family(
    model_type="llama",
    read_config=read_config,
    build_layers=build_layers,
    weight_map=LLAMA_WEIGHT_MAP,
    layer_flops=layer_flops,
    default_parts=default_parts,
    tied_hf_names=("lm_head.weight",),
    autotp_tested=True,
)
