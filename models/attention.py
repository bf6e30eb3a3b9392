"""Causal self-attention variants shared by the families: sliding windows, logit soft-capping, a custom scale,
and the FlexAttention block masks that make them fast in compiled blocks.

`AttentionSpec` says what a layer computes; `attend(q, k, v, spec, ...)` picks the path:

- flash-attn (`use_flash_attn`): `window_size` and `softcap` are kernel arguments (varlen for packed rows);
- a FlexAttention `BlockMask` (compiled blocks on CUDA): the window and the document boundaries are a block-sparse
  mask, the soft-cap a `score_mod`; nothing `[S, S]` is materialised and masked blocks are skipped;
- otherwise PyTorch SDPA: with no effective window and no soft-cap the plain causal kernel, else an explicit
  `[B, 1, S, S]` boolean mask (and, for soft-capping, the eager math transformers' own eager path runs).

Window semantics are transformers': query i sees key j iff j <= i and i - j < window (flash-attn's
`window_size=(window - 1, 0)`). A window at least as long as the sequence changes nothing and takes the plain path.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

NO_FLEX_BACKWARD = ("cpu", "mps")  # devices where torch 2.13's FlexAttention refuses inputs that need grad
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer computes beyond plain causal softmax(q kᵀ / √hd) v.

    window: keys at most `window - 1` positions back (None: all earlier keys).
    softcap: scores become `softcap · tanh(score / softcap)` before masking (Gemma-2).
    scale: the score scale (None: head_dim ** -0.5).
    """
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None

    def windowed(self, seq: int) -> bool:
        """Whether the window hides any key of a `seq`-long row."""
        return self.window is not None and self.window < seq

    def plain(self, seq: int) -> bool:
        """Whether a `seq`-long row needs nothing but causal SDPA (with `scale`)."""
        return not self.windowed(seq) and not self.softcap


PLAIN = AttentionSpec()


# ----------------------------------------------------------------------------------------------
# Masks


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, S] -> [B, S] int64: which document of its row each token belongs to.

    A position id 0 starts a new document (packed rows restart positions per sample); right padding keeps
    counting, so it stays in the last document, where causal attention never lets real tokens see it.
    """
    return (position_ids == 0).cumsum(-1)


def causal_window_mask(seq: int, window: int | None, device: torch.device) -> torch.Tensor:
    """bool [S, S], True where query i may attend key j: j <= i and (window) i - j < window."""
    idx = torch.arange(seq, device=device)
    rel = idx[:, None] - idx[None, :]  # query - key
    mask = rel >= 0
    return mask & (rel < window) if window is not None else mask


def document_causal_mask(position_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """position_ids [B, S] -> bool [B, 1, S, S], True where query i may attend key j: j <= i, same document,
    and (window) i - j < window."""
    doc = document_ids(position_ids)
    causal = causal_window_mask(position_ids.shape[-1], window, position_ids.device)
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def flex_usable(device: torch.device) -> bool:
    """Whether FlexAttention can run a block on `device` now: anywhere without grad, else not on CPU/MPS."""
    return device.type not in NO_FLEX_BACKWARD or not torch.is_grad_enabled()


def _window_mod(window: int | None):
    if window is None:
        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        return causal

    def causal_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return causal_window


_CAUSAL_MASKS: dict[tuple[int, int | None, torch.device], BlockMask] = {}
_LAST_PACKED: dict[int | None, tuple] = {}  # window -> (weakref to position_ids, its _version, BlockMask)


def causal_block_mask(seq: int, device: torch.device, window: int | None = None) -> BlockMask:
    """Causal (sliding-window) `BlockMask` for `[*, *, seq, seq]` (broadcast over batch and heads), built once per
    (seq, window, device)."""
    key = (seq, window, device)
    if key not in _CAUSAL_MASKS:
        _CAUSAL_MASKS[key] = create_block_mask(_window_mod(window), None, None, seq, seq, device=device)
    return _CAUSAL_MASKS[key]


def document_block_mask(position_ids: torch.Tensor, window: int | None = None) -> BlockMask:
    """position_ids [B, S] of packed rows -> `BlockMask` [B, 1, S, S]: `document_causal_mask` as a block-sparse
    map plus a `mask_mod` that flex evaluates only inside blocks the boundaries cut."""
    doc = document_ids(position_ids)  # (B, S)
    causal = _window_mod(window)

    def same_document(b, h, q_idx, kv_idx):
        return causal(b, h, q_idx, kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    batch, seq = position_ids.shape
    return create_block_mask(same_document, batch, None, seq, seq, device=position_ids.device)


def packed_block_mask(position_ids: torch.Tensor, window: int | None = None) -> BlockMask:
    """`document_block_mask`, built once per micro-batch and window: the blocks of a stage pass the same
    position_ids tensor along, so the latest one (same object, not modified since) reuses its mask."""
    cached = _LAST_PACKED.get(window)
    if cached is not None:
        ref, version, mask = cached
        if ref() is position_ids and version == position_ids._version:
            return mask
    mask = document_block_mask(position_ids, window)
    _LAST_PACKED[window] = (weakref.ref(position_ids), position_ids._version, mask)
    return mask


def flex_block_mask(spec: AttentionSpec, position_ids: torch.Tensor, packed: bool) -> BlockMask | None:
    """The `BlockMask` a compiled block's FlexAttention runs `spec` with, or None where the plain SDPA kernel is
    exact (no window that bites, no soft-cap, unpacked) or flex cannot run (CPU/MPS with grad)."""
    seq = position_ids.shape[-1]
    if not flex_usable(position_ids.device) or (spec.plain(seq) and not packed):
        return None
    window = spec.window if spec.windowed(seq) else None
    if packed:
        return packed_block_mask(position_ids, window)
    return causal_block_mask(seq, position_ids.device, window)


# ----------------------------------------------------------------------------------------------
# Paths


def _softcap_mod(cap: float):
    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return softcap


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention (run it under torch.compile): q [B, nh, S, hd], k/v [B, nkv, S, hd] -> [B, S, nh, hd]."""
    score_mod = _softcap_mod(spec.softcap) if spec.softcap else None
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=spec.scale,
                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def varlen_cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """position_ids [B, S] -> (cu_seqlens int32 [docs + 1], longest document) over the flattened B*S tokens.

    Every row starts a document at its first token, whatever its position id, so rows never merge.
    """
    starts = position_ids == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
    total = torch.tensor([position_ids.numel()], device=idx.device, dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                 position_ids: torch.Tensor | None) -> torch.Tensor:
    """flash-attn (varlen over the documents of packed rows): q [B, nh, S, hd] -> [B, S, nh, hd]."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    kw = dict(causal=True, softmax_scale=spec.scale)
    if spec.window is not None:
        kw["window_size"] = (spec.window - 1, 0)
    if spec.softcap:
        kw["softcap"] = spec.softcap
    if position_ids is None:
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    b, nh, s, hd = q.shape
    cu, longest = varlen_cu_seqlens(position_ids)

    def flat(x):
        return x.transpose(1, 2).reshape(b * s, x.shape[1], hd)
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, longest, longest, **kw)
    return out.view(b, s, nh, hd)


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_rep = q.shape[1] // k.shape[1]
    if n_rep == 1:
        return k, v
    return k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                position_ids: torch.Tensor | None) -> torch.Tensor:
    """PyTorch SDPA (GQA-aware), or the eager math for a soft-cap: q [B, nh, S, hd] -> [B, S, nh, hd].

    `position_ids` is given for packed rows only (attention then stays inside each document). With no window
    that bites, no soft-cap and no packing: the maskless causal kernel.
    """
    seq = q.shape[2]
    window = spec.window if spec.windowed(seq) else None
    if position_ids is not None:
        mask = document_causal_mask(position_ids, window)
    elif window is not None or spec.softcap:
        mask = causal_window_mask(seq, window, q.device)
    else:
        mask = None
    if spec.softcap:  # transformers' eager attention: scores in the compute dtype, softmax in fp32
        k, v = _repeat_kv(q, k, v)
        scale = q.shape[-1] ** -0.5 if spec.scale is None else spec.scale
        scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * scale / spec.softcap) * spec.softcap
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2)
    kw = dict(attn_mask=mask, is_causal=mask is None, scale=spec.scale)
    if q.shape[1] != k.shape[1] and _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw).transpose(1, 2)
    k, v = _repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, **kw).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec = PLAIN,
           use_flash_attn: bool = False, position_ids: torch.Tensor | None = None,
           block_mask: BlockMask | None = None) -> torch.Tensor:
    """Causal self-attention as `spec` says. q [B, nh, S, hd], k/v [B, nkv, S, hd] (nh % nkv == 0: query head j
    reads kv head j // (nh/nkv)) -> [B, S, nh, hd].

    `position_ids` [B, S] for packed rows only; `block_mask` (from `flex_block_mask`, compiled blocks) selects
    FlexAttention. Right padding needs no mask: real tokens never attend to later positions.
    """
    if use_flash_attn:
        return flash_attend(q, k, v, spec, position_ids)
    if block_mask is not None:
        return flex_attend(q, k, v, spec, block_mask)
    return sdpa_attend(q, k, v, spec, position_ids)
