"""BLOOM as DeepSpeed pipeline layers: Enter (embedding + LayerNorm), BloomBlock x L, Exit (ln_f [+ head]).

What differs from llama: ALiBi instead of RoPE, a fused QKV projection interleaved per head, LayerNorms
with bias (also right after the embedding), GELU (tanh) MLP with biases, and an LM head tied to the
embedding (a trailing `TiedLayerSpec`, so the first and last stage share the matrix).

Attention paths: eager blocks run `alibi_causal_attention` (SDPA with a float `[B, nh, S, S]` bias mask
built per call, or flash-attn with `alibi_slopes`). With `compile_blocks` every block runs its math
through one shared `torch.compile`d function, and the SDPA path becomes FlexAttention: ALiBi is a
`score_mod` (slope·(kv_idx − q_idx), or slope·(pos_j − pos_i) for packed rows) and causality (and, for
packed rows, the document boundaries) a `BlockMask`, so no mask tensor is materialised and masked
blocks are skipped. The causal block mask is cached per (S, device); a packed one is built once per
micro-batch and shared by the blocks of a stage. FlexAttention has no backward on CPU/MPS in torch 2.13,
so there a compiled block that needs gradients keeps the SDPA + mask math (compiled).
Reference: transformers' `BloomForCausalLM`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .attention import causal_block_mask, flex_usable, packed_block_mask
from .common import (EmbeddingEnter, ModelError, ModelOptions, alibi_causal_attention, alibi_slopes, cfg_get,
                     check_attention_backend, make_linear, maybe_checkpoint, tied_head_fn)
from .family import Family, WeightRule, even_parts, pipeline_specs

BLOOM_7B_LAYERS = 30


@dataclass(frozen=True)
class BloomArgs:
    """The subset of a bloom config.json that determines the weights and the math."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    residual_post_layernorm: bool = False
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _first_key(cfg: dict, keys: tuple[str, ...], kind: type, default=...):
    """BloomConfig accepts legacy names (`n_embed`, `n_layer`, `n_head`); hub configs use both spellings."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg_get(cfg, key, kind)
    return cfg_get(cfg, keys[0], kind, default)


def read_config(cfg: dict) -> BloomArgs:
    """config.json dict -> BloomArgs; the hidden size must split evenly into heads."""
    hidden = _first_key(cfg, ("hidden_size", "n_embed"), int)
    heads = _first_key(cfg, ("n_head", "num_attention_heads"), int, 8)
    if hidden % heads:
        raise ModelError(f"config.json: hidden_size ({hidden}) must be a multiple of n_head ({heads})")
    return BloomArgs(
        vocab_size=cfg_get(cfg, "vocab_size", int),
        hidden_size=hidden,
        num_layers=_first_key(cfg, ("n_layer", "num_hidden_layers"), int),
        num_heads=heads,
        layer_norm_eps=float(cfg_get(cfg, "layer_norm_epsilon", (int, float), 1e-5)),
        tie_word_embeddings=cfg_get(cfg, "tie_word_embeddings", bool, True),
        residual_post_layernorm=cfg_get(cfg, "apply_residual_connection_post_layernorm", bool, False),
        initializer_range=float(cfg_get(cfg, "initializer_range", (int, float), 0.02)),
    )


class BloomEnter(EmbeddingEnter):
    """Enter: `(input_ids, position_ids)` -> `(LayerNorm(embedding(input_ids)) [B,S,H], position_ids)`.

    Local names: `embed_tokens.weight` (no padding_idx, as in BLOOM), `norm.{weight,bias}`.
    """

    def __init__(self, args: BloomArgs, dtype: torch.dtype = torch.float32):
        super().__init__(args.vocab_size, args.hidden_size, None, args.initializer_range, dtype)
        self.norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps, dtype=dtype)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, position_ids = super().forward(inputs)
        return self.norm(hidden), position_ids


class BloomExit(nn.Module):
    """Exit: `(hidden, position_ids)` -> logits `[B,S,V]`, or the normalised hidden `[B,S,H]` when tied
    (the trailing tied spec then multiplies by the embedding). Local names `norm.*`, `lm_head.weight`."""

    def __init__(self, args: BloomArgs, dtype: torch.dtype = torch.float32, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps, dtype=dtype)
        if not args.tie_word_embeddings:
            self.lm_head = make_linear(args.hidden_size, args.vocab_size, False, args.initializer_range, dtype)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden = self.norm(inputs[0])
        if not hasattr(self, "lm_head"):
            return hidden
        return (hidden, self.lm_head.weight) if self.fused else self.lm_head(hidden)


# ----------------------------------------------------------------------------------------------
# ALiBi through FlexAttention (compiled blocks only)

COMPILE_BACKEND = "inductor"  # torch.compile backend of the blocks (the CPU gradient tests swap in aot_eager)


def flex_alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                         block_mask: BlockMask, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal ALiBi attention with FlexAttention (run it under torch.compile: eager flex is a slow reference).

    q/k/v [B, nh, S, hd], slopes [nh] fp32 on q's device, block_mask from `causal_block_mask` or
    `packed_block_mask` -> [B, S, nh, hd]. Score(i, j) = q_i·k_j/√hd + slope·(j − i), the relative form of
    `alibi_causal_attention` (equal to slope·(pos_j − pos_i) for rows whose positions count up by one, as
    unpacked rows do). `position_ids` [B, S] (packed rows) gives slope·(pos_j − pos_i) from the positions
    themselves, as the eager path does (inside a document of a `pad_collate` row that is j − i too); the
    documents are kept apart by `block_mask`. The bias is added in fp32 (the eager path rounds its mask to
    the compute dtype).
    """
    if position_ids is None:
        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)
    else:
        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (position_ids[b, kv_idx] - position_ids[b, q_idx])
    return flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask).transpose(1, 2)


class BloomAttention(nn.Module):
    """ALiBi self-attention; `query_key_value` output is interleaved per head: `[B, S, nh, (q|k|v), hd]`.

    Without a block mask (eager blocks, flash-attn, or a CPU block that needs grad) it runs
    `alibi_causal_attention`; with one (compiled blocks) `flex_alibi_attention`. The slopes are a plain
    fp32 tensor (not a buffer) so DeepSpeed's `.half()` cannot round them; `slopes_on` keeps one copy per
    device.
    """

    def __init__(self, args: BloomArgs, use_flash_attn: bool, dtype: torch.dtype, packed: bool = False):
        super().__init__()
        h, std = args.hidden_size, args.initializer_range
        self.num_heads, self.head_dim, self.use_flash_attn = args.num_heads, args.head_dim, use_flash_attn
        self.packed = packed
        self.query_key_value = make_linear(h, 3 * h, True, std, dtype)
        self.dense = make_linear(h, h, True, std, dtype)
        self.slopes = alibi_slopes(args.num_heads)
        self._slopes_on: dict[torch.device, torch.Tensor] = {}

    def slopes_on(self, device: torch.device) -> torch.Tensor:
        """slopes [nh] fp32 on `device`, copied once (blocks call it eagerly before a compiled region reads it)."""
        if device not in self._slopes_on:
            self._slopes_on[device] = self.slopes.to(device)
        return self._slopes_on[device]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor,
                block_mask: BlockMask | None = None) -> torch.Tensor:
        """x [B,S,H], position_ids [B,S], block_mask (FlexAttention, compiled blocks) or None -> [B,S,H]."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # (B, nh, S, hd) each
        if block_mask is None:
            out = alibi_causal_attention(q, k, v, self.slopes, position_ids, self.use_flash_attn,
                                         self.packed)  # (B, S, nh, hd)
        else:
            out = flex_alibi_attention(q, k, v, self.slopes_on(q.device), block_mask,
                                       position_ids if self.packed else None)  # (B, S, nh, hd)
        return self.dense(out.reshape(b, s, self.num_heads * self.head_dim))


class BloomMLP(nn.Module):
    """`dense_4h_to_h(gelu_tanh(dense_h_to_4h x))`, both with bias, [B,S,H] -> [B,S,H]."""

    def __init__(self, args: BloomArgs, dtype: torch.dtype):
        super().__init__()
        h, std = args.hidden_size, args.initializer_range
        self.dense_h_to_4h = make_linear(h, 4 * h, True, std, dtype)
        self.dense_4h_to_h = make_linear(4 * h, h, True, std, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class BloomBlock(nn.Module):
    """Block: `(hidden [B,S,H], position_ids [B,S])` -> `(hidden, position_ids)`; names mirror HF's `h.{i}.*`.

    `apply_residual_connection_post_layernorm` (false in released BLOOMs) adds the normed input instead.
    With `use_grad_ckpt` the whole block is recomputed in backward. With `compile_blocks` the block's math
    runs through `compiled_block()` (one graph for all blocks; LayerNorms, GELU and residuals fuse) and its
    attention through FlexAttention with a block mask built here, outside the graph (`flex_block_mask`);
    flash-attn, and CPU/MPS blocks that need grad, keep their eager attention inside the compiled graph.
    """

    def __init__(self, args: BloomArgs, opts: ModelOptions):
        super().__init__()
        h, eps = args.hidden_size, args.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(h, eps=eps, dtype=opts.dtype)
        self.self_attention = BloomAttention(args, opts.use_flash_attn, opts.dtype, opts.packed_sequences)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps, dtype=opts.dtype)
        self.mlp = BloomMLP(args, opts.dtype)
        self.residual_post_layernorm = args.residual_post_layernorm
        self.use_grad_ckpt = opts.use_grad_ckpt
        self.compile_blocks = opts.compile_blocks

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, position_ids = inputs
        if not self.compile_blocks:
            return _run_block(self, hidden, position_ids, None), position_ids
        self.self_attention.slopes_on(hidden.device)  # no dict mutation inside a compiled/checkpointed region
        return compiled_block()(self, hidden, position_ids, self.flex_block_mask(position_ids)), position_ids

    def flex_block_mask(self, position_ids: torch.Tensor) -> BlockMask | None:
        """The BlockMask the compiled block's FlexAttention uses, or None where flex does not run."""
        if self.self_attention.use_flash_attn or not flex_usable(position_ids.device):
            return None
        if self.self_attention.packed:
            return packed_block_mask(position_ids)
        return causal_block_mask(position_ids.shape[1], position_ids.device)

    def _block(self, hidden: torch.Tensor, position_ids: torch.Tensor,
               block_mask: BlockMask | None = None) -> torch.Tensor:
        """hidden [B,S,H], position_ids [B,S] (block_mask: see BloomAttention) -> hidden [B,S,H]."""
        normed = self.input_layernorm(hidden)
        residual = normed if self.residual_post_layernorm else hidden
        hidden = residual + self.self_attention(normed, position_ids, block_mask)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.residual_post_layernorm else hidden
        return residual + self.mlp(normed)


def _run_block(block: BloomBlock, hidden: torch.Tensor, position_ids: torch.Tensor,
               block_mask: BlockMask | None) -> torch.Tensor:
    """The block, recomputed in backward with `use_grad_ckpt`. Compiled, the checkpoint is traced inside the
    graph (as `common._run_block`: compile the function that checkpoints, not checkpoint a compiled one)."""
    return maybe_checkpoint(block, block._block, hidden, position_ids, block_mask, enabled=block.use_grad_ckpt)


_COMPILED: dict[str | Callable, Callable] = {}  # per backend


def compiled_block() -> Callable:
    """One compiled `_run_block` for every BloomBlock (the module is an input, so its parameters are graph
    inputs and all blocks share one graph), per `COMPILE_BACKEND`. Built on first use."""
    if COMPILE_BACKEND not in _COMPILED:
        _COMPILED[COMPILE_BACKEND] = torch.compile(_run_block, backend=COMPILE_BACKEND)
    return _COMPILED[COMPILE_BACKEND]


def build_layers(args: BloomArgs, opts: ModelOptions) -> list:
    """Enter, BloomBlock x L, Exit; tied (the released models): a trailing head spec sharing key 'embed'."""
    check_attention_backend(opts)
    if opts.packed_sequences and opts.use_flash_attn:
        raise ModelError("bloom: packing: true needs the SDPA path (use_flash_attn: false); flash-attn's varlen "
                         "kernel is not wired up with ALiBi here")
    return pipeline_specs((BloomEnter, args, opts.dtype),
                          [LayerSpec(BloomBlock, args, opts) for _ in range(args.num_layers)],
                          LayerSpec(BloomExit, args, opts.dtype, opts.fused_head_loss),
                          args.tie_word_embeddings, tied_head_fn(opts))


def layer_flops(args: BloomArgs, seq_len: int) -> list[float]:
    """Forward FLOPs per logical layer for one sequence: [Enter, Block x L, Exit].

    Block: 2·(QKV 3H² + dense H² + MLP 8H²) per token plus causal attention 2·S·H. Exit: LayerNorm and the
    vocabulary head 2·H·V (BLOOM's 250880-token head costs about five blocks). Enter: the LayerNorm only.
    """
    h = args.hidden_size
    block = seq_len * (2.0 * 12 * h * h + 2.0 * seq_len * h)
    return [seq_len * 5.0 * h] + [block] * args.num_layers + [seq_len * (5.0 * h + 2.0 * h * args.vocab_size)]


def default_parts(num_stages: int, num_layers: int | None = None) -> list[int]:
    """Enter and Exit alone on the end stages, blocks balanced in between.

    BLOOM's vocabulary (250880) makes the embedding (first stage) and the tied head (last stage) each as
    large as ~5 blocks of bloom-7b1, in memory and, for the head, in compute: 30 layers on 8 stages ->
    [1, 5, 5, 5, 5, 5, 5, 1]. Too few stages or blocks for that: plain balanced split of L+2.
    """
    layers = BLOOM_7B_LAYERS if num_layers is None else num_layers
    if num_stages < 3 or layers < num_stages - 2:
        return even_parts(layers + 2, num_stages)
    return [1, *even_parts(layers, num_stages - 2), 1]


BLOOM_WEIGHT_MAP = (
    WeightRule("transformer.word_embeddings.weight", "enter", "embed_tokens.weight"),
    WeightRule("transformer.word_embeddings_layernorm.weight", "enter", "norm.weight"),
    WeightRule("transformer.word_embeddings_layernorm.bias", "enter", "norm.bias"),
    *(WeightRule(f"transformer.h.{{}}.{name}", "block", name) for name in (
        "input_layernorm.weight", "input_layernorm.bias",
        "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
        "self_attention.dense.weight", "self_attention.dense.bias",
        "post_attention_layernorm.weight", "post_attention_layernorm.bias",
        "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
        "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")),
    WeightRule("transformer.ln_f.weight", "exit", "norm.weight"),
    WeightRule("transformer.ln_f.bias", "exit", "norm.bias"),
    WeightRule("lm_head.weight", "exit", "lm_head.weight"),
)


def canonical_hf_name(name: str) -> str:
    """BigScience hub files were saved from `BloomModel` and lack the `transformer.` prefix; add it."""
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


FAMILY = Family(
    model_type="bloom",
    read_config=read_config,
    build_layers=build_layers,
    weight_map=BLOOM_WEIGHT_MAP,
    layer_flops=layer_flops,
    default_parts=default_parts,
    width_keys=("hidden_size", "n_embed"),
    tied_hf_names=("lm_head.weight",),
    canonical_hf_name=canonical_hf_name,
)
