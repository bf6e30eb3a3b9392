"""Llama 1/2/3 (MHA and GQA) as DeepSpeed pipeline layers: Enter, LlamaBlock x L, Exit.

Only what is llama-specific lives here: the args, the decoder block, the weight map and the cost model.
Norms, RoPE, attention backend, Enter/Exit layers and the loss come from `models.common`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec

from .attention import AttentionSpec, attend
from .common import (NORM_LAYOUTS, EmbeddingEnter, ModelError, ModelOptions, NormHeadExit, PairRotary, PreNormBlock,
                     RopeConfig, Rotary, apply_rope, apply_rope_pairs, cfg_get, check_attention_backend, make_linear,
                     make_norm, read_rope_config, tied_head_fn)
from .family import Family, WeightRule, even_parts, pipeline_specs

LLAMA_7B_LAYERS = 32


@dataclass(frozen=True)
class LlamaArgs:
    """The subset of a llama-style config.json that determines the weights and the math.

    The fields after `mlp_bias` are the flags other dense families set (each family's `read_config` says which);
    their defaults are llama's math.
    qkv_bias: bias on q/k/v (None: `attention_bias`, which also covers o_proj); Qwen2 has it on q/k/v only.
    qk_norm: 'head' (RMSNorm over each head's dims, before RoPE: Qwen3, Gemma-3) or 'proj' (over the whole q/k
        projection: OLMo-2), None: no q/k norm.
    offset_norm: every norm is Gemma's `x·(1 + w)` (`OffsetRMSNorm`).
    norm_layout: where the block's norms sit (`common.NORM_LAYOUTS`).
    hidden_act: the MLP's gate activation (`ACTIVATIONS`).
    fused_qkv / fused_gate_up: the projections are HF's fused `qkv_proj` / `gate_up_proj` (Phi-3, GLM-4).
    layer_windows: per layer, the sliding window (keys at most window - 1 back) or None (empty: none anywhere).
    layer_ropes: per layer, its RoPE (Gemma-3's local/global bases; empty: `rope` everywhere).
    attn_scale / attn_softcap: the score scale (None: head_dim ** -0.5) and tanh soft-cap of attention scores.
    final_softcap: tanh soft-cap of the output logits (Gemma-2).
    embed_scale: the embedding rows are multiplied by it (Gemma: √hidden).
    norm_weight_fp32: norms multiply by their weight in fp32 before the cast (OLMo-2's RMSNorm).
    rope_interleaved: RoPE turns pairs (2i, 2i+1) of the rotated dims (GLM-4), not the two halves.
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
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool | None = None
    qk_norm: str | None = None
    offset_norm: bool = False
    norm_layout: str = "pre"
    hidden_act: str = "silu"
    fused_qkv: bool = False
    fused_gate_up: bool = False
    layer_windows: tuple[int | None, ...] = ()
    layer_ropes: tuple[RopeConfig, ...] = ()
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    norm_weight_fp32: bool = False
    rope_interleaved: bool = False

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def rope_of(self, layer: int) -> RopeConfig:
        return self.layer_ropes[layer] if self.layer_ropes else self.rope

    def spec(self, layer: int) -> AttentionSpec:
        return AttentionSpec(window=self.window(layer), softcap=self.attn_softcap, scale=self.attn_scale)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# config.json `hidden_act` / `hidden_activation` -> the MLP's gate activation
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh, "gelu_tanh": gelu_tanh}


def read_attention_shape(cfg: dict, family: str, acts: tuple[str, ...] = ("silu",),
                         act_key: str = "hidden_act") -> tuple[int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim) of a llama-style config; GQA must divide, the MLP activation (under
    `act_key`) must be one of `acts`."""
    hidden = cfg_get(cfg, "hidden_size", int)
    heads = cfg_get(cfg, "num_attention_heads", int)
    kv_heads = cfg_get(cfg, "num_key_value_heads", int, heads)
    head_dim = cfg_get(cfg, "head_dim", int, hidden // heads)
    if heads % kv_heads:
        raise ModelError(f"config.json: num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    act = cfg_get(cfg, act_key, str, acts[0])
    if act not in acts:
        raise ModelError(f"config.json: {act_key} '{act}' is not supported for {family} (supported: {', '.join(acts)})")
    return hidden, heads, kv_heads, head_dim


def read_decoder_fields(cfg: dict, family: str, eps_default: float, acts: tuple[str, ...] = ("silu",),
                        act_key: str = "hidden_act", tied_default: bool = False) -> dict:
    """The fields every llama-style args dataclass shares (LlamaArgs, MixtralArgs), read from config.json:
    sizes and heads (`read_attention_shape`), norm eps, tying, pad id (None when outside the vocabulary), init std."""
    hidden, heads, kv_heads, head_dim = read_attention_shape(cfg, family, acts, act_key)
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
        tie_word_embeddings=cfg_get(cfg, "tie_word_embeddings", bool, tied_default),
        pad_token_id=pad if pad is not None and 0 <= pad < vocab else None,
        initializer_range=float(cfg_get(cfg, "initializer_range", (int, float), 0.02)),
    )


LAYER_TYPES = ("full_attention", "sliding_attention")


def read_layer_types(cfg: dict, num_layers: int, default: list[str]) -> list[str]:
    """config.json `layer_types` (one of `LAYER_TYPES` per layer) or, when absent, `default` (the family's rule)."""
    types = cfg.get("layer_types")
    if types is None:
        return default
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ModelError(f"config.json: 'layer_types' must list one of {', '.join(LAYER_TYPES)} per layer "
                         f"({num_layers} layers)")
    return types


def read_windows(cfg: dict, layer_types: list[str]) -> tuple[int | None, ...]:
    """Per-layer sliding windows: `sliding_window` on 'sliding_attention' layers, None elsewhere (empty when no
    layer slides)."""
    if "sliding_attention" not in layer_types:
        return ()
    window = cfg_get(cfg, "sliding_window", int)
    if window < 1:
        raise ModelError(f"config.json: 'sliding_window' must be >= 1, got {window}")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop")


def with_defaults(cfg: dict, defaults: dict) -> dict:
    """config.json with the family's transformers defaults for the keys it omits (an explicit null is kept: for
    some keys, e.g. `sliding_window`, null means off while a missing key means the default). Dropout keys must be
    0: training here runs without dropout, so a config asking for it is refused rather than silently ignored."""
    cfg = {**defaults, **cfg}
    refuse_dropout(cfg)
    return cfg


def refuse_dropout(cfg: dict, keys: tuple[str, ...] = DROPOUT_KEYS) -> None:
    """A non-zero dropout rate under any of `keys` is a ModelError naming the key (training runs without dropout)."""
    for key in keys:
        rate = float(cfg_get(cfg, key, (int, float), 0.0))
        if rate:
            raise ModelError(f"config.json: {key} {rate} is not supported (only 0.0)")


def dense_family(model_type: str, read: Callable[[dict], LlamaArgs], debug: Callable[..., dict],
                 released: dict[str, str], **kw) -> Family:
    """The `Family` of a dense family built on `LlamaBlock` with flags: llama's layers, FLOPs and partitions, the
    `DENSE_WEIGHT_MAP`; `read` turns its config.json into `LlamaArgs`."""
    return Family(model_type=model_type, read_config=read, build_layers=build_layers, weight_map=DENSE_WEIGHT_MAP,
                  layer_flops=layer_flops, default_parts=default_parts, tied_hf_names=("lm_head.weight",),
                  debug_config=debug, released_configs=released, **kw)


def dense_debug_config(model_type: str, architecture: str, **overrides) -> dict:
    """A tiny llama-shaped config.json (vocab 512, hidden 64, 4 layers, GQA 4/2, head_dim 16) of `model_type`, for
    the families' `debug_config`s to extend."""
    cfg = {"model_type": model_type, "architectures": [architecture], "vocab_size": 512, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "max_position_embeddings": 512, "initializer_range": 0.02, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "use_cache": False}
    cfg.update(overrides)
    return cfg


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
    """Self-attention with RoPE and grouped KV heads; parameter names mirror HF's `self_attn.*`.

    q/k/v are separate projections, or HF's fused `qkv_proj` (rows q | k | v); optional q/k norms before RoPE;
    the window, soft-cap and scale of `args.spec(layer)` (`models.attention`).
    """

    def __init__(self, args: LlamaArgs, use_flash_attn: bool, dtype: torch.dtype, layer: int = 0):
        super().__init__()
        std, hd = args.initializer_range, args.head_dim
        qkv_bias = args.attention_bias if args.qkv_bias is None else args.qkv_bias
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, hd
        self.use_flash_attn = use_flash_attn
        self.spec = args.spec(layer)
        q_dim, kv_dim = args.num_heads * hd, args.num_kv_heads * hd
        if args.fused_qkv:
            self.qkv_proj = make_linear(args.hidden_size, q_dim + 2 * kv_dim, qkv_bias, std, dtype)
        else:
            self.q_proj = make_linear(args.hidden_size, q_dim, qkv_bias, std, dtype)
            self.k_proj = make_linear(args.hidden_size, kv_dim, qkv_bias, std, dtype)
            self.v_proj = make_linear(args.hidden_size, kv_dim, qkv_bias, std, dtype)
        self.o_proj = make_linear(q_dim, args.hidden_size, args.attention_bias, std, dtype)
        if args.qk_norm is not None:
            q_size, k_size = (hd, hd) if args.qk_norm == "head" else (q_dim, kv_dim)
            self.q_norm = make_norm(q_size, args.rms_norm_eps, args.offset_norm, dtype, args.norm_weight_fp32)
            self.k_norm = make_norm(k_size, args.rms_norm_eps, args.offset_norm, dtype, args.norm_weight_fp32)
        self.qk_norm = args.qk_norm
        self.rope = apply_rope_pairs if args.rope_interleaved else apply_rope

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,S,H] -> q [B,S,nh*hd], k, v [B,S,nkv*hd]."""
        if hasattr(self, "qkv_proj"):
            kv_dim = self.num_kv_heads * self.head_dim
            return self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None, block_mask=None) -> torch.Tensor:
        """x [B,S,H], cos/sin [B,1,S,rot]; position_ids for packed rows, block_mask for FlexAttention -> [B,S,H]."""
        b, s, _ = x.shape
        q, k, v = self.project(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh|nkv, S, hd)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = attend(q, k, v, self.spec, self.use_flash_attn, position_ids, block_mask)  # (B, S, nh, hd)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """Gated MLP: `down(act(gate x) * up x)` (SwiGLU with silu), [B,S,H] -> [B,S,H]; gate|up fused into HF's
    `gate_up_proj` (rows gate | up) with `fused_gate_up`."""

    def __init__(self, args: LlamaArgs, dtype: torch.dtype):
        super().__init__()
        std, bias, h, f = args.initializer_range, args.mlp_bias, args.hidden_size, args.intermediate_size
        if args.fused_gate_up:
            self.gate_up_proj = make_linear(h, 2 * f, bias, std, dtype)
        else:
            self.gate_proj = make_linear(h, f, bias, std, dtype)
            self.up_proj = make_linear(h, f, bias, std, dtype)
        self.down_proj = make_linear(f, h, bias, std, dtype)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class LlamaBlock(PreNormBlock):
    """Block layer: `(hidden [B,S,H], position_ids [B,S])` -> `(hidden, position_ids)`.

    RoPE angles come from `position_ids`, so packed or right-padded batches need no mask. The norms sit as
    `args.norm_layout` says, under their HF names. With `use_grad_ckpt` the whole block is recomputed in backward.
    """

    def __init__(self, args: LlamaArgs, opts: ModelOptions, layer: int = 0):
        super().__init__()
        self.norm_layout = args.norm_layout
        for name in NORM_LAYOUTS[args.norm_layout].values():
            if name is not None:
                setattr(self, name, make_norm(args.hidden_size, args.rms_norm_eps, args.offset_norm, opts.dtype,
                                              args.norm_weight_fp32))
        self.self_attn = LlamaAttention(args, opts.use_flash_attn, opts.dtype, layer)
        self.mlp = LlamaMLP(args, opts.dtype)
        self.rotary = (PairRotary if args.rope_interleaved else Rotary)(args.rope_of(layer))
        self.set_options(opts)


def build_layers(args: LlamaArgs, opts: ModelOptions) -> list:
    """Spec list: Enter, LlamaBlock x L, Exit; tied: Enter and a trailing head share key 'embed'.

    Untied: L+2 specs. Tied: L+3 specs, the last one (no module of its own, hence no file) computes
    `hidden @ embed_tokens.weightᵀ` on the last stage with DeepSpeed keeping both copies in sync.
    """
    check_attention_backend(opts)
    tied = args.tie_word_embeddings
    exit_spec = LayerSpec(NormHeadExit, args.hidden_size, None if tied else args.vocab_size, args.rms_norm_eps,
                          args.initializer_range, opts.dtype, opts.fused_head_loss, args.offset_norm,
                          args.final_softcap, args.norm_weight_fp32)
    return pipeline_specs((EmbeddingEnter, args.vocab_size, args.hidden_size, args.pad_token_id,
                           args.initializer_range, opts.dtype, args.embed_scale),
                          [LayerSpec(LlamaBlock, args, opts, i) for i in range(args.num_layers)], exit_spec,
                          tied, tied_head_fn(opts, args.final_softcap))


def mean_keys(seq_len: int, window: int | None) -> float:
    """Keys a query attends to on average in a causal row of `seq_len`, counted as S/2 (window: at most `window`)."""
    if window is None or window >= seq_len:
        return seq_len / 2
    return window - window * (window - 1) / (2 * seq_len)


def layer_flops(args: LlamaArgs, seq_len: int) -> list[float]:
    """Forward FLOPs of one sequence per logical layer: [Enter, Block x L, Exit] (len L+2).

    Block: 2·params of the projections per token, plus causal attention (QKᵀ and AV over the keys a query sees:
    4·nh·hd per key, about S/2 keys, fewer under a sliding window). Exit: the RMSNorm (~4H per token) plus the
    vocabulary head 2·H·V. Enter is a table lookup, counted as 0.
    """
    h, hd = args.hidden_size, args.head_dim
    q_dim, kv_dim = args.num_heads * hd, args.num_kv_heads * hd
    proj_params = h * q_dim * 2 + h * kv_dim * 2 + 3 * h * args.intermediate_size
    blocks = [seq_len * (2.0 * proj_params + 4.0 * q_dim * mean_keys(seq_len, args.window(i)))
              for i in range(args.num_layers)]
    exit_cost = seq_len * (4.0 * h + 2.0 * h * args.vocab_size)
    return [0.0] + blocks + [exit_cost]


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
# Every name a `LlamaBlock` with flags can have (norms of every layout, q/k norms, fused projections): the weight
# map of the dense families built on it. A rule whose tensor a model lacks is never used.
DENSE_WEIGHT_MAP = LLAMA_WEIGHT_MAP + _same_name(
    "model.layers.{}.", "block",
    *sorted({f"{n}.weight" for layout in NORM_LAYOUTS.values() for n in layout.values() if n} - {
        "input_layernorm.weight", "post_attention_layernorm.weight"}),
    "self_attn.q_norm.weight", "self_attn.k_norm.weight", "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias",
    "mlp.gate_up_proj.weight", "mlp.gate_up_proj.bias")


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
