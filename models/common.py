"""Pieces shared by every model family: options, errors, norms, RoPE, attention, Enter/Exit layers, the loss.

Family files (`models/llama.py`, ...) hold only what differs between architectures; everything here is
written once (the `Family` record and the spec-list assembly: `models/family.py`). Tensor layout
throughout: `[batch B, seq S, hidden H]`; attention runs as `[B, heads, S, head_dim]`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import (PLAIN, attend, document_causal_mask, document_ids, flex_block_mask,  # noqa: F401
                        varlen_cu_seqlens)

IGNORE_INDEX = -100


class ModelError(ValueError):
    """A model directory, config or checkpoint that we cannot use; the message says what and why."""


@dataclass
class ModelOptions:
    """Training-time switches that do not change the weights.

    use_grad_ckpt: recompute each block in backward (`torch.utils.checkpoint`, non-reentrant).
    use_flash_attn: use `flash_attn.flash_attn_func` instead of PyTorch SDPA (GPU, fp16/bf16 only).
    aux_max_z_loss_weight: weight of the `mean(max_logit²)` term added to the loss.
    dtype: dtype the layers' parameters are created in.
    packed_sequences: rows hold several documents, each starting at position id 0; attention stays
        inside each document (a block-diagonal causal mask, or flash-attn's varlen kernel).
    fused_head_loss: the Exit layer returns `(hidden, head weight)` instead of logits and the loss runs
        head + cross entropy chunk by chunk (`chunked_linear_cross_entropy`): the `[tokens, vocab]`
        logits never exist whole. The trainer turns it on; tests, `verify` and the demo see logits.
    compile_blocks: `torch.compile` each block's math (fuses norms, RoPE, SwiGLU, residuals).
    moe_grouped_gemm: MoE experts run as one grouped GEMM over tokens sorted by expert (`torch._grouped_mm`),
        with no host sync; False loops over the experts (one matmul chain each).
    """
    use_grad_ckpt: bool = False
    use_flash_attn: bool = False
    aux_max_z_loss_weight: float = 0.0
    dtype: torch.dtype = torch.float32
    packed_sequences: bool = False
    fused_head_loss: bool = False
    compile_blocks: bool = False
    moe_grouped_gemm: bool = True


# ----------------------------------------------------------------------------------------------
# Config helpers


def cfg_get(cfg: dict, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """`cfg[key]` checked against `kind`; missing without a default or wrongly typed -> ModelError."""
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise ModelError(f"config.json: missing required key '{key}'")
        return default
    value = cfg[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ModelError(f"config.json: '{key}' must be {names}, got {value!r}")
    if key in POSITIVE_CONFIG_KEYS and value < 1:
        raise ModelError(f"config.json: '{key}' must be >= 1, got {value!r}")
    return value


# sizes and counts of config.json: 0 or less divides by zero or builds an empty model
POSITIVE_CONFIG_KEYS = {"hidden_size", "n_embed", "num_hidden_layers", "n_layer", "num_layers", "num_attention_heads",
                        "n_head", "num_key_value_heads", "multi_query_group_num", "intermediate_size",
                        "ffn_hidden_size", "vocab_size", "padded_vocab_size", "head_dim", "kv_channels",
                        "num_local_experts", "num_experts_per_tok"}


# ----------------------------------------------------------------------------------------------
# Norm, RoPE, attention


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then times `weight` (HF llama order); with
    `weight_in_fp32` times `weight` in fp32 first, then cast (OLMo-2's order)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32, weight_in_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] -> [..., H] in x's dtype."""
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_fp32:
            return (self.weight * x32).to(input_dtype)
        return self.weight * x32.to(input_dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: `x / rms(x) · (1 + weight)` all in fp32, then cast to the input dtype; weight starts at 0."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] -> [..., H] in x's dtype."""
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.to(torch.float32))).to(x.dtype)


def make_norm(size: int, eps: float, offset: bool, dtype: torch.dtype, weight_in_fp32: bool = False) -> nn.Module:
    """`OffsetRMSNorm` (Gemma, `offset`) or the llama `RMSNorm` (OLMo-2's order with `weight_in_fp32`) over the last
    `size` dims."""
    if offset:
        return OffsetRMSNorm(size, eps, dtype=dtype)
    return RMSNorm(size, eps, dtype=dtype, weight_in_fp32=weight_in_fp32)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters.

    head_dim: the rotated dims per head (the whole head, or its first `partial_rotary_factor` part).
    kind: 'default', 'llama3' (llama-3.1's smooth band), 'linear' (positions divided by `factor`) or 'longrope'
        (Phi-3: per-frequency `short_factor`s, or `long_factor`s once a row is longer than the original context).
    scaling: the kind's parameters (None for 'default').
    attention_factor: cos and sin are multiplied by it (longrope's magnitude correction; 1 elsewhere).
    """
    head_dim: int
    theta: float = 10000.0
    scaling: dict | None = None
    kind: str = "default"
    attention_factor: float = 1.0


SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope")
ROPE_TYPE_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "linear": ("factor",),
                  "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def rope_params(cfg: dict) -> dict:
    """The rope dict of config.json, in either layout (a copy): a non-empty `rope_scaling` (hub checkpoints) takes
    precedence over `rope_parameters` (transformers >= 5 saves), as in transformers."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelError("config.json: 'rope_parameters'/'rope_scaling' must be an object")
    return dict(params)


def read_rope_config(cfg: dict, head_dim: int, params: dict | None = None,
                     default_theta: float = 10000.0) -> RopeConfig:
    """Read RoPE settings from config.json (or from `params`, one layer type's rope dict).

    Hub checkpoints: `rope_theta` (+ optional `rope_scaling` with `rope_type` or legacy `type`).
    transformers >= 5 saves: `rope_parameters` holding `rope_theta`, `rope_type` and the scaling keys.
    A `rope_theta` inside the chosen dict wins over the top-level one. `partial_rotary_factor` (top level or in
    the dict) rotates only the first `int(head_dim * factor)` dims. Types outside `SUPPORTED_ROPE_TYPES` are
    refused, so a model never silently trains with the wrong positions.
    """
    params = rope_params(cfg) if params is None else dict(params)
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    theta = float(default_theta if theta is None else theta)
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None:
        if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise ModelError(f"config.json: 'partial_rotary_factor' must be in (0, 1], got {partial!r}")
        head_dim = int(head_dim * partial)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"config.json: rope scaling type '{rope_type}' is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return RopeConfig(head_dim=head_dim, theta=theta)
    params.setdefault("original_max_position_embeddings",
                      cfg.get("original_max_position_embeddings") or cfg.get("max_position_embeddings"))
    missing = [k for k in ROPE_TYPE_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise ModelError(f"config.json: rope scaling '{rope_type}' needs {', '.join(missing)}")
    if rope_type == "longrope":
        return read_longrope(cfg, params, head_dim, theta)
    scaling = {k: float(params[k]) for k in ROPE_TYPE_KEYS[rope_type]}
    return RopeConfig(head_dim=head_dim, theta=theta, scaling=scaling, kind=rope_type)


def read_longrope(cfg: dict, params: dict, head_dim: int, theta: float) -> RopeConfig:
    """LongRoPE as transformers' `_compute_longrope_parameters`: one factor per frequency, the attention factor
    from `factor` (else max_position_embeddings / original) unless given."""
    original = int(params["original_max_position_embeddings"])
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = params[key]
        if not isinstance(values, list) or len(values) != head_dim // 2:
            raise ModelError(f"config.json: rope scaling '{key}' must be a list of {head_dim // 2} numbers "
                             f"(rotary dims / 2), got {len(values) if isinstance(values, list) else values!r}")
        factors[key] = tuple(float(v) for v in values)
    factor = params.get("factor") or cfg.get("max_position_embeddings", original) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeConfig(head_dim=head_dim, theta=theta, kind="longrope", attention_factor=float(attention),
                      scaling={**factors, "original_max_position_embeddings": original})


def rope_inv_freq(rope: RopeConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` in fp32 on CPU (explicit device: safe under meta init).

    The 'llama3' branch reproduces transformers' `_compute_llama3_parameters`: long wavelengths are
    divided by `factor`, short ones kept, the band in between interpolated smoothly. 'linear' divides every
    frequency by `factor`; 'longrope' divides them by its short (or, `long`, its long) factors.
    """
    dim = rope.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    if rope.kind == "longrope":
        ext = torch.tensor(rope.scaling["long_factor" if long else "short_factor"], dtype=torch.float32,
                           device="cpu")
        return 1.0 / (ext * rope.theta ** exponents)
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.kind == "linear":
        return inv_freq / rope.scaling["factor"]
    if rope.scaling is None:
        return inv_freq
    factor = rope.scaling["factor"]
    low_factor, high_factor = rope.scaling["low_freq_factor"], rope.scaling["high_freq_factor"]
    old_context = rope.scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_factor
    high_freq_wavelen = old_context / high_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """Computes RoPE cos/sin from position ids.

    Holds `inv_freq` as a plain fp32 tensor, not a module buffer, so `module.half()`/`.bfloat16()`
    (which DeepSpeed applies to the whole model) cannot degrade the angles. LongRoPE keeps both sets and picks
    per micro-batch, as transformers does per forward: the long factors once the longest row
    (max position id + 1) exceeds the original context, chosen on the device (no host sync).
    """

    def __init__(self, rope: RopeConfig):
        self.rope = rope
        self.inv_freq = rope_inv_freq(rope)
        if rope.kind == "longrope":
            self.inv_freq = torch.stack([self.inv_freq, rope_inv_freq(rope, long=True)])  # (2, hd/2): short, long
        self._cached: dict[torch.device, torch.Tensor] = {}

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """`inv_freq` on `device`, copied once (blocks call it eagerly before a compiled region reads it)."""
        if device not in self._cached:
            self._cached[device] = self.inv_freq.to(device)
        return self._cached[device]

    def _inv_freq_for(self, position_ids: torch.Tensor) -> torch.Tensor:
        inv = self.inv_freq_on(position_ids.device)
        if self.rope.kind != "longrope":
            return inv
        longer = position_ids.max() + 1 > self.rope.scaling["original_max_position_embeddings"]
        return torch.where(longer, inv[1], inv[0])

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] int64 -> (cos, sin), each [B, 1, S, head_dim] in `dtype` (angles in fp32)."""
        freqs = position_ids[..., None].to(torch.float32) * self._inv_freq_for(position_ids)  # (B, S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, hd)
        cos, sin = emb.cos(), emb.sin()
        if self.rope.attention_factor != 1.0:
            cos, sin = cos * self.rope.attention_factor, sin * self.rope.attention_factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, hd], cos/sin [B, 1, S, r] -> x with its first r dims rotated (half-split llama
    convention over those r dims; r < hd is partial rotary, the rest passes unchanged)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def check_attention_backend(opts: ModelOptions) -> None:
    """Fail at build time, not on the first step, when flash attention is asked for but missing."""
    if opts.use_flash_attn and not flash_attn_available():
        raise ModelError("use_flash_attn: true but flash-attn is not installed")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, use_flash_attn: bool,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Plain causal self-attention (`models.attention.attend` with no window, soft-cap or custom scale).

    q [B, nh, S, hd], k/v [B, nkv, S, hd] with nh % nkv == 0 -> [B, S, nh, hd]. `position_ids` [B, S] is given
    for packed rows only: attention then stays inside each document (flash-attn varlen, or SDPA with
    `document_causal_mask`); without it no mask is materialised.
    """
    return attend(q, k, v, PLAIN, use_flash_attn, position_ids)


def maybe_checkpoint(module: nn.Module, fn: Callable, *args: torch.Tensor, enabled: bool) -> Any:
    """Run `fn(*args)`, recomputing it in backward when `enabled` and the module is training."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# Where a block's norms sit, by role, under their HF names (None: no norm in that place). Llama's
# "post_attention_layernorm" is the norm *before* its MLP; Gemma and OLMo-2 use that name for the norm after attention.
NORM_LAYOUTS = {
    "pre": {"pre_attn": "input_layernorm", "post_attn": None,
            "pre_mlp": "post_attention_layernorm", "post_mlp": None},
    "sandwich": {"pre_attn": "input_layernorm", "post_attn": "post_attention_layernorm",  # Gemma-2/3
                 "pre_mlp": "pre_feedforward_layernorm", "post_mlp": "post_feedforward_layernorm"},
    "post": {"pre_attn": None, "post_attn": "post_attention_layernorm",  # OLMo-2
             "pre_mlp": None, "post_mlp": "post_feedforward_layernorm"},
    "glm4": {"pre_attn": "input_layernorm", "post_attn": "post_self_attn_layernorm",
             "pre_mlp": "post_attention_layernorm", "post_mlp": "post_mlp_layernorm"},
}


def _norm_or_identity(block: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
    return x if name is None else getattr(block, name)(x)


class PreNormBlock(nn.Module):
    """Residual decoder block: `(hidden [B,S,H], position_ids [B,S])` -> `(hidden, position_ids)`.

    `h += post_attn(attn(pre_attn(h), rope(position_ids))); h += post_mlp(mlp(pre_mlp(h)))`, the norms placed as
    `norm_layout` says (`NORM_LAYOUTS`; llama's pre-norm by default). Subclasses create the norms under their HF
    names, the attention under `attn_name` (its HF name, with an `AttentionSpec` as `spec`), `mlp` and `rotary`,
    and call `set_options(opts)`; RoPE angles come from `position_ids`, so right-padded batches need no mask.
    With `use_grad_ckpt` the whole block is recomputed in backward; with `packed_sequences` attention
    stays inside each document; with `compile_blocks` the block's math runs through `torch.compile`, and
    attention that needs a mask (a window shorter than the row, a soft-cap, packed rows) through FlexAttention
    with a block mask built outside the graph.
    """
    attn_name = "self_attn"
    norm_layout = "pre"
    rope_in_fp32 = False  # angles in fp32 whatever the compute dtype (Baichuan2 does this)
    use_grad_ckpt = packed_sequences = compile_blocks = False

    def set_options(self, opts: ModelOptions) -> None:
        self.use_grad_ckpt = opts.use_grad_ckpt
        self.packed_sequences = opts.packed_sequences
        self.compile_blocks = opts.compile_blocks

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, position_ids = inputs
        self.rotary.inv_freq_on(position_ids.device)  # no dict mutation inside a compiled/checkpointed region
        if not self.compile_blocks:
            return _run_block(self, hidden, position_ids), position_ids
        return compiled_block()(self, hidden, position_ids, self.flex_mask(position_ids)), position_ids

    def flex_mask(self, position_ids: torch.Tensor):
        """The FlexAttention `BlockMask` of a compiled block, or None (plain SDPA, flash-attn, CPU with grad)."""
        attn = getattr(self, self.attn_name)
        spec = getattr(attn, "spec", None)
        if spec is None or getattr(attn, "use_flash_attn", False):
            return None
        return flex_block_mask(spec, position_ids, self.packed_sequences)

    def _block(self, hidden: torch.Tensor, position_ids: torch.Tensor, block_mask=None) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(position_ids, torch.float32 if self.rope_in_fp32 else hidden.dtype)
        attn = getattr(self, self.attn_name)
        docs = position_ids if self.packed_sequences else None
        norms = NORM_LAYOUTS[self.norm_layout]
        mask_kw = {} if block_mask is None else {"block_mask": block_mask}
        out = attn(_norm_or_identity(self, norms["pre_attn"], hidden), cos, sin, docs, **mask_kw)
        hidden = hidden + _norm_or_identity(self, norms["post_attn"], out)
        out = self.mlp(_norm_or_identity(self, norms["pre_mlp"], hidden))
        return hidden + _norm_or_identity(self, norms["post_mlp"], out)


def _run_block(block: PreNormBlock, hidden: torch.Tensor, position_ids: torch.Tensor,
               block_mask=None) -> torch.Tensor:
    """The block, recomputed in backward with `use_grad_ckpt`. Compiled, the checkpoint is traced inside the
    graph (compiling the function that checkpoints, not checkpointing a compiled function, which fails
    torch.utils.checkpoint's recomputation check)."""
    if block_mask is None:
        return maybe_checkpoint(block, block._block, hidden, position_ids, enabled=block.use_grad_ckpt)
    return maybe_checkpoint(block, block._block, hidden, position_ids, block_mask, enabled=block.use_grad_ckpt)


_COMPILED: list = []


def compiled_block() -> Callable:
    """One compiled function for every block: the module is an input (its parameters become graph inputs),
    so the blocks of a stage share one graph instead of compiling once each. Built on first use."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_run_block))
    return _COMPILED[0]


# ----------------------------------------------------------------------------------------------
# Enter / Exit pipeline layers


class EmbeddingEnter(nn.Module):
    """Enter layer: `(input_ids [B,S] int64, position_ids [B,S] int64)` -> `(hidden [B,S,H], position_ids)`.

    `padding_idx` follows HF (its row gets no gradient), so gradients match `LlamaForCausalLM`. `scale` (Gemma:
    √hidden) multiplies the looked-up rows, rounded to the weight's dtype first as transformers does.
    """

    def __init__(self, vocab_size: int, hidden_size: int, padding_idx: int | None, init_std: float,
                 dtype: torch.dtype = torch.float32, scale: float | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, padding_idx=padding_idx, dtype=dtype)
        nn.init.normal_(self.embed_tokens.weight, std=init_std)
        self.scale = scale

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, position_ids = inputs
        hidden = self.embed_tokens(input_ids)
        if self.scale is not None:
            hidden = hidden * torch.tensor(self.scale, dtype=torch.float32).to(hidden.dtype)
        return hidden.contiguous(), position_ids.contiguous()


class NormHeadExit(nn.Module):
    """Exit layer: `(hidden [B,S,H], position_ids)` -> logits `[B,S,V]` (final RMSNorm + LM head).

    With `vocab_size=None` (tied embeddings) there is no head: it returns the normalised hidden
    `[B,S,H]` and the trailing tied spec (`tied_lm_head`) multiplies by the embedding matrix.
    With `fused=True` it returns `(normalised hidden, head weight)` and the loss applies the head chunk
    by chunk (`chunked_linear_cross_entropy`).
    """

    def __init__(self, hidden_size: int, vocab_size: int | None, eps: float, init_std: float,
                 dtype: torch.dtype = torch.float32, fused: bool = False, offset_norm: bool = False,
                 softcap: float | None = None, norm_weight_fp32: bool = False):
        super().__init__()
        self.norm = make_norm(hidden_size, eps, offset_norm, dtype, norm_weight_fp32)
        self.fused = fused
        self.softcap = softcap
        if vocab_size is not None:
            self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False, dtype=dtype)
            nn.init.normal_(self.lm_head.weight, std=init_std)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hidden = self.norm(inputs[0])
        if not hasattr(self, "lm_head"):
            return hidden
        if self.fused:
            return hidden, self.lm_head.weight
        return softcap_logits(self.lm_head(hidden), self.softcap)


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap · tanh(logits / cap)` (Gemma-2's final soft-cap), or `logits` when `cap` is None."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def tied_lm_head(enter: EmbeddingEnter, hidden: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """`forward_fn` of the trailing tied spec: hidden [B,S,H] @ embed_tokens.weightᵀ -> logits [B,S,V]."""
    return softcap_logits(F.linear(hidden, enter.embed_tokens.weight), softcap)


def tied_head_weight(enter: EmbeddingEnter, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward_fn` of the trailing tied spec with a fused loss: (hidden, embed_tokens.weight)."""
    return hidden, enter.embed_tokens.weight


def tied_head_fn(opts: ModelOptions, softcap: float | None = None) -> Callable:
    """The trailing tied spec's `forward_fn`; with a final soft-cap the unfused head applies it (the fused loss
    applies it itself: `CausalLMLoss(softcap=...)`)."""
    if opts.fused_head_loss:
        return tied_head_weight
    return functools.partial(tied_lm_head, softcap=softcap) if softcap else tied_lm_head


# ----------------------------------------------------------------------------------------------
# Loss


def split_labels(labels: torch.Tensor | tuple | list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`labels` or `(labels, scale)` -> (labels [B,S] int64, scale [1] float or None)."""
    if isinstance(labels, (tuple, list)):
        if len(labels) != 2:
            raise ValueError(f"labels tuple must be (labels, scale), got {len(labels)} items")
        return labels[0], labels[1]
    return labels, None


def head_chunk_rows(vocab: int, budget_bytes: int = 1 << 30) -> int:
    """Tokens per chunk of the fused head + loss: about `budget_bytes` of fp32 logits (1 GiB)."""
    return max(1, budget_bytes // (4 * vocab))


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, z_weight: float, write_grad: bool,
                softcap: float = 0.0) -> torch.Tensor:
    """One chunk: logits [c, V] (compute dtype), targets [c] -> Σ CE (+ z·Σ max²), fp32 scalar.

    `softcap` (> 0): the loss is taken on `softcap · tanh(logits / softcap)` (in fp32), and the gradient
    written back is with respect to the raw logits (times 1 − tanh²).

    With `write_grad`, `logits` is overwritten in place with d loss / d logits: softmax − onehot (+ 2·z·max
    at the argmax), zero on ignored rows, computed in fp32 and stored in the compute dtype, as the unfused
    loss's backward hands it to the head. Written as one expression per step so that `torch.compile` fuses
    it into two passes over the chunk (reductions, then the gradient) with no fp32 `[c, V]` temporaries.
    """
    x = logits.float()
    if softcap:
        t = torch.tanh(x / softcap)
        x = t * softcap
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, safe_t[:, None])[:, 0]
    total = torch.where(valid, lse - picked, 0.0).sum()
    if z_weight:
        top, top_idx = x.max(dim=-1)
        total = total + z_weight * torch.where(valid, top.square(), 0.0).sum()
    if not write_grad:
        return total
    cols = torch.arange(x.shape[-1], device=x.device)
    g = torch.exp(x - lse[:, None]) - (cols == safe_t[:, None]).to(torch.float32)
    if z_weight:
        g = g + (cols == top_idx[:, None]).to(torch.float32) * (2.0 * z_weight * top)[:, None]
    if softcap:
        g = g * (1.0 - t * t)
    logits.copy_(g * valid[:, None])
    return total


_COMPILED_CHUNK: list = []


def chunk_loss_fn(device: torch.device) -> Callable:
    """`_chunk_loss`, through `torch.compile` on CUDA (measured: benchmarks/results/gpu-checks-*.json), eager
    elsewhere (CPU tests check the eager function; the compiled one computes the same expressions)."""
    if device.type != "cuda":
        return _chunk_loss
    if not _COMPILED_CHUNK:
        _COMPILED_CHUNK.append(torch.compile(_chunk_loss, dynamic=False))
    return _COMPILED_CHUNK[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ CE(hidden @ weightᵀ, targets) (+ z · Σ max_logit²) over rows, the fp32 part chunk by chunk.

    Forward writes each chunk's logits into one `[rows, vocab]` buffer in the compute dtype (the size of the
    unfused path's bf16 logits) and, while they are fresh, turns them in place into d loss / d logits
    (`_chunk_loss`). Backward is then the unfused head's backward, the same two GEMMs over all rows:
    d hidden = g @ W and d W = gᵀ @ h, scaled by the incoming gradient. So the `[rows, vocab]` fp32 logits
    and their fp32 gradient never exist whole, nothing is recomputed, and no `[vocab, hidden]` fp32
    accumulator is read and written per chunk (what made the earlier in-forward version slow at large vocab).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, z_weight: float, chunk: int, softcap: float = 0.0):
        rows = hidden.shape[0]
        needs_grad = hidden.requires_grad or weight.requires_grad
        run = chunk_loss_fn(hidden.device)
        grad_logits = torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device) \
            if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h = hidden[start:start + chunk]
            if needs_grad:
                logits = torch.mm(h, weight.t(), out=grad_logits[start:start + chunk])
            else:
                logits = h @ weight.t()
            total += run(logits, targets[start:start + chunk], z_weight, needs_grad, softcap)
        ctx.save_for_backward(grad_logits, hidden, weight)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_logits, hidden, weight = ctx.saved_tensors
        scale = grad_out.to(hidden.dtype)
        gh = (grad_logits @ weight).mul_(scale) if ctx.needs_input_grad[0] else None
        gw = (grad_logits.t() @ hidden).mul_(scale) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 z_weight: float = 0.0, chunk: int | None = None,
                                 softcap: float | None = None) -> torch.Tensor:
    """hidden [N, H], weight [V, H], targets [N] (-100 = ignore) -> Σ CE (+ z·Σ max_logit²), fp32 scalar.

    Equal to `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")` in value and
    gradients (with `softcap`, of the soft-capped logits), without the `[N, V]` logits ever existing whole
    (see `_LinearCrossEntropy`).
    """
    chunk = chunk or head_chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, float(z_weight), int(chunk), float(softcap or 0.0))


class CausalLMLoss:
    """Last-stage loss: `scale * (mean CE + z_weight * mean max_logit²)` over trained tokens.

    outputs: logits [B,S,V] (any dtype, upcast to fp32), or `(hidden [B,S,H], head weight [V,H])` from a
    fused Exit, in which case the head runs inside `chunked_linear_cross_entropy`. labels [B,S] aligned
    with the inputs as in HF (`-100` = ignore), shifted here so position t predicts token t+1. With
    `(labels, scale)` the scale (float tensor [1]) multiplies the whole loss. A micro-batch with no
    trained token gives 0, not NaN.
    """
    __name__ = "causal_lm_loss"

    def __init__(self, z_loss_weight: float = 0.0, softcap: float | None = None):
        self.z_loss_weight = float(z_loss_weight)
        self.softcap = softcap  # a fused Exit's logits are soft-capped here (an unfused Exit caps its own)

    def __call__(self, outputs: torch.Tensor | tuple, labels: torch.Tensor | tuple) -> torch.Tensor:
        labels, scale = split_labels(labels)
        fused = isinstance(outputs, (tuple, list))
        device = outputs[0].device if fused else outputs.device
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(device)
        trained = shifted != IGNORE_INDEX
        count = trained.sum().clamp(min=1).to(torch.float32)
        if fused:
            hidden, weight = outputs
            loss = chunked_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shifted,
                                                self.z_loss_weight, softcap=self.softcap) / count
        else:
            flat = outputs.reshape(-1, outputs.shape[-1]).float()  # (B*S, V)
            loss = F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum") / count
            if self.z_loss_weight:
                max_logit = flat.max(dim=-1).values  # (B*S,)
                loss = loss + self.z_loss_weight * (max_logit.square() * trained).sum() / count
        if scale is not None:
            loss = loss * scale.to(device=loss.device, dtype=torch.float32).reshape(())
        return loss


def causal_lm_loss_fn(args: Any, opts: ModelOptions) -> CausalLMLoss:
    """Family.loss_fn for plain decoder LMs (no MoE aux loss); `args.final_softcap` where the family has one."""
    return CausalLMLoss(opts.aux_max_z_loss_weight, getattr(args, "final_softcap", None))


# ----------------------------------------------------------------------------------------------
# Pieces for families beyond llama: linear init, pair-interleaved partial RoPE, ALiBi, reference loading


def make_linear(n_in: int, n_out: int, bias: bool, std: float, dtype: torch.dtype) -> nn.Linear:
    """nn.Linear initialised as HF does: weight ~ N(0, std), bias 0."""
    layer = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    nn.init.normal_(layer.weight, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class PairRotary(Rotary):
    """RoPE over interleaved pairs (2i, 2i+1) of the first `rope.head_dim` dims of each head (GLM, ChatGLM).

    `cos_sin` returns one angle per pair, `[B, 1, S, rope.head_dim // 2]`; see `apply_rope_pairs`.
    """

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq_on(position_ids.device)  # (B, S, rot/2)
        return freqs.cos().to(dtype)[:, None], freqs.sin().to(dtype)[:, None]


def apply_rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, hd], cos/sin [B, 1, S, r] -> x with dims 0..2r-1 rotated by pairs, the rest unchanged.

    Pair (x[2i], x[2i+1]) turns by angle i: (x0 cos - x1 sin, x1 cos + x0 sin), as ChatGLM's
    `apply_rotary_pos_emb` and transformers' glm `rotate_half` interleaved variant.
    """
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x0, x1 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, S, r) each
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes `[num_heads]` fp32 (BLOOM / Press et al.), any head count.

    n = largest power of two <= heads: slopes (2^(-8/n))^k for k = 1..n; the remaining heads take every
    other slope of the 2n sequence, (2^(-8/(2n)))^(1, 3, 5, ...). Same fp32 ops as transformers' bloom.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device="cpu")
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32, device="cpu"))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device="cpu")
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32, device="cpu"))
        slopes = torch.cat([slopes, extra])
    return slopes


def alibi_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                           position_ids: torch.Tensor, use_flash_attn: bool, packed: bool = False) -> torch.Tensor:
    """Causal attention with ALiBi. q/k/v [B, nh, S, hd], slopes [nh] fp32, position_ids [B, S] -> [B, S, nh, hd].

    Score(i, j) = q_i·k_j/√hd + slope·(pos_j − pos_i). HF bloom adds slope·pos_j only; the −slope·pos_i
    term is constant along each softmax row, so the result is the same, but the relative form stays
    small near the diagonal and keeps its precision when the bias is cast to bf16/fp16.
    SDPA path: a float mask `[B, nh, S, S]` (causal −inf plus bias), built per call; flash-attn path:
    `alibi_slopes`, which uses token indices (equal to positions for the right-padded batches we train on).
    `packed`: rows hold several documents (position 0 starts one); keys of other documents are masked.
    """
    if use_flash_attn:
        from flash_attn import flash_attn_func
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                               alibi_slopes=slopes.to(device=q.device, dtype=torch.float32))
    seq = q.shape[2]
    pos = position_ids.to(torch.float32)
    rel = pos[:, None, :] - pos[:, :, None]  # (B, S_q, S_k): key position - query position
    bias = slopes.to(q.device)[None, :, None, None] * rel[:, None]  # (B, nh, S, S)
    if packed:
        hidden_keys = ~document_causal_mask(position_ids)  # (B, 1, S, S)
    else:
        hidden_keys = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    bias = bias.masked_fill(hidden_keys, float("-inf")).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.transpose(1, 2)


def load_renamed_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> nn.Module:
    """Copy `(name, tensor)` pairs into `model`'s state_dict entries of those names, one at a time.

    Strict: an unknown name, a wrong shape, a name seen twice or a state entry left unfilled (other than
    non-persistent buffers, which are not in the state_dict) raises ModelError. Used to build reference
    models from checkpoints whose HF class needs remote code.
    """
    state = model.state_dict()
    filled: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in state or name in filled:
                raise ModelError(f"reference model: unexpected or repeated tensor '{name}'")
            if state[name].shape != tensor.shape:
                raise ModelError(f"reference model: '{name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(state[name].shape)}")
            state[name].copy_(tensor)
            filled.add(name)
    missing = sorted(set(state) - filled)
    if missing:
        raise ModelError(f"reference model: no tensor for '{missing[0]}'")
    return model
