"""Mixtral (sparse mixture of experts) as DeepSpeed pipeline layers: Enter, MixtralBlock x L, Exit.

Attention, norms and RoPE are llama's. What differs is the feed-forward (a router choosing the top-k of E
SwiGLU experts per token) and the load-balancing loss, whose inputs live on every pipeline stage.

A block's experts are three stacked parameters, w1/w3 [E, F, H] and w2 [E, H, F] (`Experts`), run by default
as one grouped GEMM per weight over the tokens sorted by expert (`grouped_swiglu`, `torch._grouped_mm`: no
host sync in forward or backward); `moe_grouped_gemm: false`, and CUDA dtypes other than bf16, loop over
the experts instead. On disk nothing changed: `state_dict()` / `load_state_dict()` use the hub's per-expert
keys `block_sparse_moe.experts.{e}.w1.weight`, so layer files, the converter and checkpoints keep their layout.

The tuple that crosses stage boundaries (fixed shapes, as DeepSpeed needs):

    hidden       [B, S, H]     compute dtype
    position_ids [B, S]        int64
    router_probs [B, S, E]     fp32, per token the sum over the blocks run so far of the router softmax
    routes       [B, S, L, k]  uint8 (int32 if E > 254), the top-k expert ids of every block; E = not yet run

`router_probs` is a float tensor, so DeepSpeed marks it as requiring grad on the receiving stage and sends
its gradient back: the load-balancing gradient reaches the routers of every stage. `routes` is an integer
tensor: no gradient (top-k is not differentiable, as in transformers) and cheap (L·k bytes per token).
The loss needs nothing else: the Switch/transformers aux loss `E · Σ_e f_e·P_e` over all (layer, token)
rows is a function of per-expert sums, and summing per token first (over layers) and over non-padding
tokens last is the same sum. Keeping the statistics per token (instead of per micro-batch) lets the last
stage decide which tokens are padding from the labels, which only it has; see `valid_tokens`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec

from .attention import AttentionSpec
from .common import (IGNORE_INDEX, CausalLMLoss, EmbeddingEnter, ModelError, ModelOptions, NormHeadExit, RMSNorm,
                     RopeConfig, Rotary, cfg_get, check_attention_backend, make_linear, maybe_checkpoint,
                     read_rope_config, split_labels)
from .family import Family, WeightRule, even_parts, pipeline_specs
from .llama import ATTENTION_RULES, EMBED_RULES, HEAD_RULES, LlamaAttention, read_decoder_fields
from .lora import LoraConfig, init_lora_pair, merged_weight

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

    def spec(self, layer: int) -> AttentionSpec:
        """Every layer attends within `sliding_window` when the config sets one (as transformers' mixtral)."""
        return AttentionSpec(window=self.sliding_window)


def read_config(cfg: dict) -> MixtralArgs:
    """config.json dict -> MixtralArgs; refuses settings this implementation does not compute."""
    fields = read_decoder_fields(cfg, "mixtral", 1e-5)
    dropout = float(cfg_get(cfg, "attention_dropout", (int, float), 0.0))
    if dropout:
        raise ModelError(f"config.json: attention_dropout {dropout} is not supported (only 0.0)")
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


def routes_dtype(num_experts: int) -> torch.dtype:
    """Smallest dtype NCCL and gloo both send that holds expert ids 0..E (E = the 'not routed' mark)."""
    return torch.uint8 if num_experts < 255 else torch.int32


# ----------------------------------------------------------------------------------------------
# Layers


EXPERT_WEIGHTS = ("w1", "w2", "w3")  # the hub's names: expert e computes w2(silu(w1 x) * w3 x)
# F.grouped_mm is the public name in recent torch; torch._grouped_mm (same signature) in older releases
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k ids [T, k] -> (order [T·k] int64, ends [E] int32), on device without a host sync.

    `order` lists the (token, slot) pairs (pair a is token a // k) stably sorted by expert id; expert e owns
    rows `ends[e-1]:ends[e]` of the sorted list (`ends` = cumulative counts, the offsets `grouped_mm` takes).
    The counts come from `searchsorted` on the sorted ids: CUDA's `bincount` reads the ids' min and max on
    the host.
    """
    sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
    ends = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=ids.device), right=True)
    return order, ends.to(torch.int32)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `grouped_mm` takes x [N, H] and stacked weights w [E, F, H] (else the caller loops over experts).

    CPU: always (torch loops over the groups, any float dtype). CUDA: bf16 only, with 16-byte rows (H and F
    divisible by 8: every group starts a whole number of rows into x, h and the output). CUDA in fp16/fp32
    would take torch's per-group fallback, which reads the offsets on the host, so it loops instead. On
    sm90/sm100 bf16 runs torch's CUTLASS kernel without a host sync; older GPUs get that fallback too.
    LoRA adapters are stacked weights too (A [E, r, in], B [E, out, r]): the rank must be a multiple of 8.
    """
    if x.device.type == "cpu":
        return True
    rows_aligned = w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0
    return x.device.type == "cuda" and x.dtype == w.dtype == torch.bfloat16 and rows_aligned


@dataclass(frozen=True)
class ExpertAdapters:
    """The LoRA adapters of an `Experts` module, as its forward hands them to the SwiGLU functions:
    `pairs[w] = (A [E, r, in], B [E, out, r])` for each adapted weight w, `scaling` = alpha / r, `dropout`
    applied to the input of the adapter path only (a fresh mask per projection, as PEFT's per-linear dropout)."""
    pairs: dict
    scaling: float
    dropout: Callable


def grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, name: str,
                   adapters: ExpertAdapters | None) -> torch.Tensor:
    """x [N, in] grouped by expert, w [E, out, in] -> [N, out]: rows of expert e = x w[e]ᵀ, plus, when `name`
    has an adapter, scaling · (dropout(x) A[e]ᵀ) B[e]ᵀ as two more grouped GEMMs over the same offsets."""
    out = grouped_mm(x, w.transpose(-2, -1), offs=ends)
    if adapters is None or name not in adapters.pairs:
        return out
    a, b = adapters.pairs[name]
    low = grouped_mm(adapters.dropout(x), a.transpose(-2, -1), offs=ends)  # [N, r]
    return out + grouped_mm(low, b.transpose(-2, -1), offs=ends) * adapters.scaling


def grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                   ends: torch.Tensor, adapters: ExpertAdapters | None = None) -> torch.Tensor:
    """All experts in three grouped GEMMs: x [N, H] grouped by expert (`ends` [E] int32), w1/w3 [E, F, H],
    w2 [E, H, F] -> [N, H], rows of expert e = w2[e](silu(w1[e] x) * w3[e] x). `adapters`: LoRA on some of
    w1/w2/w3, two more grouped GEMMs per adapted weight (`grouped_linear`), still no host sync.

    No host sync forward or backward; experts with 0 rows are fine. Groups are not padded to 8 rows as
    torchtitan does: CUDA's kernel checks group sizes only where a group's start moves along a contiguous
    dimension. Here groups move along rows: forward and the input gradient are (row-major x [N, ·], 3D) GEMMs,
    and autograd computes the weight gradient, w being a transposed view, as grouped_mm(gradᵀ, x): a
    (column-major, row-major) 2D/2D GEMM that takes any group size, 0 included (`GroupMMCommon.cuh`).
    """
    h = F.silu(grouped_linear(x, w1, ends, "w1", adapters)) * grouped_linear(x, w3, ends, "w3", adapters)
    return grouped_linear(h, w2, ends, "w2", adapters)


def looped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  ends: torch.Tensor, adapters: ExpertAdapters | None = None) -> torch.Tensor:
    """`grouped_swiglu` as one matmul chain per expert over its slice of x (reads `ends` on the host); an
    adapted weight adds scaling · F.linear(F.linear(dropout(x), A[e]), B[e]), as `LoraLinear`.

    `unbind` gives every expert its weight views in one op, so backward stacks the E gradients once (zeros
    for an expert with 0 rows) instead of summing E full-size [E, ...] gradients.
    """
    chunks = x.tensor_split(ends[:-1].tolist())
    per_expert = {} if adapters is None else {
        name: list(zip(a.unbind(0), b.unbind(0))) for name, (a, b) in adapters.pairs.items()}

    def linear(c: torch.Tensor, w: torch.Tensor, name: str, e: int) -> torch.Tensor:
        out = F.linear(c, w)
        if name not in per_expert:
            return out
        a, b = per_expert[name][e]
        return out + F.linear(F.linear(adapters.dropout(c), a), b) * adapters.scaling

    outs = [linear(F.silu(linear(c, a, "w1", e)) * linear(c, b, "w3", e), d, "w2", e)
            for e, (c, a, d, b) in enumerate(zip(chunks, w1.unbind(0), w2.unbind(0), w3.unbind(0)))]
    return torch.cat(outs)


LORA_SUFFIXES = (("lora_A", "_lora_A"), ("lora_B", "_lora_B"))  # (per-expert file name, stacked attribute suffix)


def unstack_experts(tensors: dict, prefix: str, num_experts: int) -> None:
    """In place: stacked `{prefix}w1` [E, ...] (w2, w3) -> the hub's `{prefix}{e}.w1.weight` = row e (a view),
    in the hub's order (expert 0's w1, w2, w3, then expert 1's, ...). LoRA adapters `{prefix}w1_lora_A`
    [E, r, in] / `{prefix}w1_lora_B` [E, out, r], where present, likewise -> `{prefix}{e}.w1.lora_A` [r, in] /
    `{prefix}{e}.w1.lora_B` [out, r], right after that expert's weight (PEFT's per-linear names). A value of
    None (a frozen weight's gradient) stays None per expert."""
    stacked = {(w, "weight"): tensors.pop(prefix + w) for w in EXPERT_WEIGHTS}
    for w in EXPERT_WEIGHTS:
        for own, suffix in LORA_SUFFIXES:
            if prefix + w + suffix in tensors:
                stacked[w, own] = tensors.pop(prefix + w + suffix)
    for e in range(num_experts):
        for w in EXPERT_WEIGHTS:
            for own in ("weight", "lora_A", "lora_B"):
                if (w, own) in stacked:
                    value = stacked[w, own]
                    tensors[f"{prefix}{e}.{w}.{own}"] = None if value is None else value[e]


def _per_expert_state(module: Experts, state: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook of `Experts`: write the per-expert keys of the files (see `unstack_experts`)."""
    unstack_experts(state, prefix, module.num_experts)


def _stack_per_expert(module: Experts, state: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook of `Experts`: `{prefix}{e}.w1.weight` for e = 0..E-1 -> stacked `{prefix}w1`,
    and `{prefix}{e}.w1.lora_A` / `lora_B` -> stacked `{prefix}w1_lora_A` / `{prefix}w1_lora_B`.

    A tensor with any expert missing is left as it is, so strict loading names the keys that do not fit.
    """
    for w in EXPERT_WEIGHTS:
        for own, attr in (("weight", w), *((own, w + suffix) for own, suffix in LORA_SUFFIXES)):
            names = [f"{prefix}{e}.{w}.{own}" for e in range(module.num_experts)]
            if all(name in state for name in names):
                state[prefix + attr] = torch.stack([state.pop(name) for name in names])


def stacked_weight(num_experts: int, n_out: int, n_in: int, std: float, dtype: torch.dtype) -> nn.Parameter:
    """[E, n_out, n_in] ~ N(0, std): E nn.Linear(n_in, n_out) weights, initialised as `make_linear`."""
    return nn.Parameter(nn.init.normal_(torch.empty(num_experts, n_out, n_in, dtype=dtype), std=std))


class Experts(nn.Module):
    """`block_sparse_moe.experts`: E SwiGLU experts as stacked weights w1, w3 [E, F, H] and w2 [E, H, F]
    (row e is expert e's nn.Linear weight).

    `state_dict()` emits, and `load_state_dict()` takes, the hub's per-expert keys `{e}.w1.weight` [F, H],
    `{e}.w2.weight` [H, F], `{e}.w3.weight` [F, H] (hooks), so layer files, the converter and DeepSpeed's
    layer checkpoints keep the per-expert layout. The emitted tensors are views of the stacked parameters,
    like any state_dict entry aliases its parameter; DeepSpeed's checkpoint engine clones each one before
    `torch.save`, so every file tensor owns exactly its storage (to safetensors yourself, clone them).

    LoRA (`models.lora.apply_lora` calls `add_lora` for the names of `lora_targets()` it is asked for):
    stacked adapters `{w}_lora_A` [E, r, in] and `{w}_lora_B` [E, out, r] per adapted weight, expert e's
    update scaling · B[e] A[e] as PEFT's per-expert `LoraLinear`; in files `{e}.{w}.lora_A` [r, in] and
    `{e}.{w}.lora_B` [out, r]. `merge_lora()` folds them into the weights.
    """

    def __init__(self, args: MixtralArgs, dtype: torch.dtype):
        super().__init__()
        e, h, f, std = args.num_experts, args.hidden_size, args.intermediate_size, args.initializer_range
        self.num_experts = e
        self.w1 = stacked_weight(e, f, h, std, dtype)
        self.w2 = stacked_weight(e, h, f, std, dtype)
        self.w3 = stacked_weight(e, f, h, std, dtype)
        self.lora_names: tuple[str, ...] = ()
        self.lora_scaling = 1.0
        self.lora_dropout: nn.Module = nn.Identity()
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stack_per_expert)

    def lora_targets(self) -> tuple[str, ...]:
        """The names `lora.target_modules` may use for these experts (`models.lora.valid_targets`)."""
        return EXPERT_WEIGHTS

    def add_lora(self, names, cfg: LoraConfig) -> None:
        """Adapters `{w}_lora_A` [E, r, in] (kaiming-uniform per expert) and `{w}_lora_B` [E, out, r] (zeros)
        for each w in `names`, in the weight's dtype and device; a weight that has one already keeps it.
        Freezing the base weights is `apply_lora`'s job."""
        unknown = [w for w in names if w not in EXPERT_WEIGHTS]
        if unknown:
            raise ModelError(f"lora.target_modules: {unknown} are not expert weights ({', '.join(EXPERT_WEIGHTS)})")
        if self.lora_names and (cfg.alpha / cfg.r != self.lora_scaling):
            raise ModelError("lora: these experts already have adapters with another alpha / r")
        for w in names:
            if w in self.lora_names:
                continue
            weight = getattr(self, w)
            e, n_out, n_in = weight.shape
            a = nn.Parameter(torch.empty(e, cfg.r, n_in, dtype=weight.dtype, device=weight.device))
            b = nn.Parameter(torch.empty(e, n_out, cfg.r, dtype=weight.dtype, device=weight.device))
            for i in range(e):
                init_lora_pair(a[i], b[i])  # per expert matrix: kaiming's fan-in is n_in, not r·n_in
            setattr(self, w + "_lora_A", a)
            setattr(self, w + "_lora_B", b)
            self.lora_names = tuple(n for n in EXPERT_WEIGHTS if n in (*self.lora_names, w))
        self.lora_scaling = cfg.alpha / cfg.r
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def adapters(self) -> ExpertAdapters | None:
        if not self.lora_names:
            return None
        pairs = {w: (getattr(self, w + "_lora_A"), getattr(self, w + "_lora_B")) for w in self.lora_names}
        return ExpertAdapters(pairs, self.lora_scaling, self.lora_dropout)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """In place: w[e] += scaling · B[e] A[e] for every adapted weight (fp32 math, stored in the weight's
        dtype), then the adapters are removed; the state_dict is the plain per-expert layout again."""
        for w in self.lora_names:
            weight = getattr(self, w)
            a, b = getattr(self, w + "_lora_A"), getattr(self, w + "_lora_B")
            weight.copy_(merged_weight(weight, a, b, self.lora_scaling))
            delattr(self, w + "_lora_A")
            delattr(self, w + "_lora_B")
        self.lora_names, self.lora_scaling, self.lora_dropout = (), 1.0, nn.Identity()

    def forward(self, x: torch.Tensor, ends: torch.Tensor, grouped: bool) -> torch.Tensor:
        """x [N, H] grouped by expert (expert e owns rows ends[e-1]:ends[e], ends [E] int32) -> [N, H].

        `grouped`: one grouped GEMM per weight (three more per adapted weight) where `grouped_mm_supported`
        takes every stacked tensor, else (and when False) the loop.
        """
        adapters = self.adapters()
        stacked = [self.w1] + ([t for pair in adapters.pairs.values() for t in pair] if adapters else [])
        use_grouped = grouped and all(grouped_mm_supported(x, t) for t in stacked)
        run = grouped_swiglu if use_grouped else looped_swiglu
        return run(x, self.w1, self.w2, self.w3, ends, adapters)


class SparseMoe(nn.Module):
    """`block_sparse_moe`: router `gate` (E x H, no bias) and E experts; each token goes to its top-k experts.

    Router as Mixtral: softmax over all E logits in fp32, top-k, the k weights renormalised to sum 1.
    With `router_jitter_noise` > 0 the input is multiplied by U(1-j, 1+j) noise in training (before both
    the router and the experts, as transformers does).
    Experts run on their tokens only: the (token, slot) pairs are sorted by expert id on device, gathered with
    one `index_select`, run through the experts (`grouped`: three grouped GEMMs over all experts, no host
    sync; else one matmul chain per expert over its contiguous slice), and the weighted results are summed
    back per token with one `index_add_`. Both paths use the same stacked weights and give every expert
    weight a gradient each step, zeros for an expert that received no token.
    """

    def __init__(self, args: MixtralArgs, dtype: torch.dtype, grouped: bool = True):
        super().__init__()
        self.num_experts, self.top_k, self.jitter = args.num_experts, args.top_k, args.router_jitter_noise
        self.grouped = grouped
        self.gate = make_linear(args.hidden_size, args.num_experts, False, args.initializer_range, dtype)
        self.experts = Experts(args, dtype)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, S, H] -> (tokens [T, H] (jittered in training), probs [T, E] fp32, top-k weights [T, k] fp32
        summing to 1, top-k ids [T, k] int64)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        tokens = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(tokens).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        return tokens, probs, weights / weights.sum(dim=-1, keepdim=True), ids

    def mix(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """tokens [T, H], weights [T, k] fp32, ids [T, k] -> Σ_j weights[t, j] · expert_{ids[t, j]}(tokens[t]),
        [T, H] in the tokens' dtype."""
        order, ends = sort_by_expert(ids, self.num_experts)
        token = order // self.top_k
        out = self.experts(tokens.index_select(0, token), ends, self.grouped)  # (T·k, H), by expert
        out = (out * weights.reshape(-1).index_select(0, order)[:, None]).to(tokens.dtype)
        return torch.zeros_like(tokens).index_add_(0, token, out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> (out [B, S, H], router probs [B·S, E] fp32, top-k expert ids [B·S, k])."""
        tokens, probs, weights, ids = self.route(x)
        return self.mix(tokens, weights, ids).view(x.shape), probs, ids


class MixtralEnter(EmbeddingEnter):
    """Enter layer: `(input_ids, position_ids)` -> `(hidden, position_ids, router_probs 0, routes 'none')`.

    `router_probs` starts as a leaf that requires grad (when grad is on): a first stage holding only this
    layer must still send a tensor DeepSpeed can call `backward` on.
    """

    def __init__(self, vocab_size: int, hidden_size: int, padding_idx: int | None, init_std: float,
                 num_layers: int, num_experts: int, top_k: int, dtype: torch.dtype = torch.float32):
        super().__init__(vocab_size, hidden_size, padding_idx, init_std, dtype)
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids = super().forward(inputs)
        b, s = position_ids.shape
        probs = torch.zeros(b, s, self.num_experts, dtype=torch.float32, device=hidden.device,
                            requires_grad=torch.is_grad_enabled())
        routes = torch.full((b, s, self.num_layers, self.top_k), self.num_experts,
                            dtype=routes_dtype(self.num_experts), device=hidden.device)
        return hidden, position_ids, probs, routes


class MixtralExit(NormHeadExit):
    """Exit layer: `(hidden, position_ids, router_probs, routes)` -> `(logits [B,S,V], router_probs, routes)`.

    Tied embeddings: returns the normalised hidden instead of logits, for `tied_moe_lm_head`.
    """

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return super().forward(inputs), inputs[2], inputs[3]


def tied_moe_lm_head(enter: MixtralEnter, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`forward_fn` of the trailing tied spec: (hidden, probs, routes) -> (hidden @ embed_tokensᵀ, probs, routes)."""
    return F.linear(inputs[0], enter.embed_tokens.weight), *inputs[1:]


def tied_moe_head_weight(enter: MixtralEnter, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """The same for a fused loss: (hidden, probs, routes) -> ((hidden, embed_tokens.weight), probs, routes)."""
    return (inputs[0], enter.embed_tokens.weight), *inputs[1:]


class MixtralBlock(nn.Module):
    """Block layer `layer_idx`: `(hidden, position_ids, router_probs, routes)` -> the same, updated.

    Attention as llama (RoPE from `position_ids`, causal, no mask for right padding), then the sparse MoE.
    Adds this block's router softmax to `router_probs` and writes its top-k ids into `routes[:, :, layer_idx]`.
    With `use_grad_ckpt` the block is recomputed in backward (same jitter noise: the RNG state is replayed).
    With `compile_blocks` everything but the experts runs through one `torch.compile`d function shared by
    all blocks (`_run_compiled_block`); `moe_grouped_gemm` picks the experts' grouped GEMM or their loop.
    """

    def __init__(self, args: MixtralArgs, opts: ModelOptions, layer_idx: int):
        super().__init__()
        self.layer_idx, self.sliding_window = layer_idx, args.sliding_window
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=opts.dtype)
        self.self_attn = LlamaAttention(args, opts.use_flash_attn, opts.dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=opts.dtype)
        self.block_sparse_moe = SparseMoe(args, opts.dtype, opts.moe_grouped_gemm)
        self.rotary = Rotary(args.rope)
        self.use_grad_ckpt, self.packed_sequences = opts.use_grad_ckpt, opts.packed_sequences
        self.compile_blocks = opts.compile_blocks

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, probs_sum, routes = inputs
        b, s, _ = hidden.shape
        if self.sliding_window is not None and s > self.sliding_window:
            raise ModelError(f"sequence length {s} exceeds config.json's sliding_window {self.sliding_window}; "
                             "sliding-window attention is not implemented (lower max_seq_len)")
        self.rotary.inv_freq_on(position_ids.device)  # no dict mutation inside a compiled/checkpointed region
        run = _run_compiled_block if self.compile_blocks else _run_block
        hidden, probs, ids = run(self, hidden, position_ids)
        probs_sum = probs_sum + probs.view(b, s, -1)
        routes = routes.clone()
        routes[:, :, self.layer_idx] = ids.view(b, s, -1).to(routes.dtype)
        return hidden, position_ids, probs_sum, routes

    def _attend(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, H] -> hidden + attention(input_layernorm(hidden)), [B, S, H]."""
        cos, sin = self.rotary.cos_sin(position_ids, hidden.dtype)
        docs = position_ids if self.packed_sequences else None
        return hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, docs)

    def _block(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden [B, S, H] -> (hidden [B, S, H], router probs [B·S, E] fp32, top-k ids [B·S, k])."""
        hidden = self._attend(hidden, position_ids)
        moe_out, probs, ids = self.block_sparse_moe(self.post_attention_layernorm(hidden))
        return hidden + moe_out, probs, ids

    def _attention_half(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block up to the experts: hidden [B, S, H] -> (hidden after the attention residual [B, S, H],
        then `SparseMoe.route` of its post-attention norm: tokens [T, H], probs [T, E], weights [T, k], ids [T, k])."""
        hidden = self._attend(hidden, position_ids)
        return hidden, *self.block_sparse_moe.route(self.post_attention_layernorm(hidden))


def _run_block(block: MixtralBlock, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Eager: the whole block, recomputed in backward with `use_grad_ckpt` (backward keeps only its input)."""
    return maybe_checkpoint(block, block._block, hidden, position_ids, enabled=block.use_grad_ckpt)


def _run_attention_half(block: MixtralBlock, hidden: torch.Tensor,
                        position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`block._attention_half`, recomputed in backward with `use_grad_ckpt`. Compiled, the checkpoint is traced
    inside the graph, as `common._run_block` does (a checkpointed compiled function fails recomputation)."""
    return maybe_checkpoint(block, block._attention_half, hidden, position_ids, enabled=block.use_grad_ckpt)


def _run_compiled_block(block: MixtralBlock, hidden: torch.Tensor,
                        position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`compile_blocks`: norms, attention, residual and router compiled (`compiled_attention_half`), the experts
    (`SparseMoe.mix`) eager: `grouped_mm` has no fp32 fake kernel to trace (torch's accepts bf16 only) and the
    loop path reads the group sizes on the host. With `use_grad_ckpt` each half is recomputed on its own, so
    backward keeps the block input and the experts' inputs (tokens [T, H], top-k weights and ids)."""
    hidden, tokens, probs, weights, ids = compiled_attention_half()(block, hidden, position_ids)
    moe_out = maybe_checkpoint(block, block.block_sparse_moe.mix, tokens, weights, ids, enabled=block.use_grad_ckpt)
    return hidden + moe_out.view_as(hidden), probs, ids


_COMPILED: list = []


def compiled_attention_half() -> Callable:
    """One compiled `_run_attention_half` for every block: the module is an input (its parameters become graph
    inputs), so the blocks of a stage share one graph, as `common.compiled_block`. Built on first use."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_run_attention_half))
    return _COMPILED[0]


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
# Loss


def valid_tokens(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, S] -> bool [B, S]: the tokens the load-balancing loss counts (transformers' attention_mask).

    Our batches are right-padded and padding is labelled -100, so a row's real tokens end at its last
    trained label; everything after it is padding. Neither input_ids (pad may equal eos) nor position_ids
    (they keep counting through padding) can tell. Consequences, by design: a row with no trained token
    counts no token, and untrained tokens after a row's last trained one (a sample cut inside an untrained
    segment) are excluded like padding. Rows that are trained up to their end count every position.
    """
    positions = torch.arange(labels.shape[-1], device=labels.device)
    last = torch.where(labels != IGNORE_INDEX, positions, -1).max(dim=-1, keepdim=True).values  # (B, 1), -1: none
    return positions <= last


def load_balancing_loss(router_probs: torch.Tensor, routes: torch.Tensor,
                        valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-style aux loss over the (layer, token) rows of non-padding tokens, as transformers computes it.

    router_probs [B,S,E] fp32 (sum over layers of the router softmax), routes [B,S,L,k] (top-k ids per layer,
    E = not run), valid [B,S] bool. With R = L · (non-padding tokens), f_e = (top-k assignments to e) / R
    and P_e = (router probability mass of e) / R, returns `(E · Σ_e f_e·P_e, counts [L, E])`, where counts
    are the per-layer top-k assignments (detached). The gradient flows through P only. No row -> 0.
    """
    b, s, num_layers, k = routes.shape
    num_experts = router_probs.shape[-1]
    v = valid.to(torch.float32)
    slots = routes.long() + (num_experts + 1) * torch.arange(num_layers, device=routes.device)[:, None]
    weights = v[:, :, None, None].expand(b, s, num_layers, k)
    counts = torch.zeros(num_layers * (num_experts + 1), dtype=torch.float32, device=routes.device)
    counts = counts.scatter_add_(0, slots.reshape(-1), weights.reshape(-1)).view(num_layers, -1)[:, :num_experts]
    rows = (v.sum() * num_layers).clamp(min=1.0)
    prob_mass = (router_probs * v[..., None]).sum(dim=(0, 1))  # (E,)
    aux = num_experts * torch.sum(counts.sum(dim=0) / rows * (prob_mass / rows))
    return aux, counts


class MoeCausalLMLoss:
    """Last-stage loss: `scale · CE (+ z-loss) + router_aux_loss_coef · aux`.

    outputs = `(logits [B,S,V], router_probs, routes)` from `MixtralExit`; labels [B,S] or `(labels, scale)`.
    The CE part is `CausalLMLoss` (mean over trained tokens, times the global-batch scale). The aux part is
    computed per micro-batch over its non-padding tokens (`valid_tokens`) and is not multiplied by the token
    scale: DeepSpeed's averaging then trains the mean of the micro-batch aux losses with weight `coef`, which
    is what transformers does per forward. It is always computed (coef 0 included), so `router_probs` gets
    a gradient tensor, which DeepSpeed requires of every float tensor it received.

    For logging, every call also adds the detached aux loss and the per-layer expert counts to totals that
    `expert_load_metrics` reads and resets.
    """
    __name__ = "moe_causal_lm_loss"

    def __init__(self, router_aux_loss_coef: float, z_loss_weight: float = 0.0):
        self.coef = float(router_aux_loss_coef)
        self.ce = CausalLMLoss(z_loss_weight)
        self.reset_metrics()

    def reset_metrics(self) -> None:
        self.aux_total = 0.0
        self.calls = 0
        self.expert_counts: torch.Tensor | None = None  # (L, E) top-k assignments of non-padding tokens

    def __call__(self, outputs: tuple[torch.Tensor, ...], labels) -> torch.Tensor:
        logits, router_probs, routes = outputs
        token_labels, _ = split_labels(labels)
        token_labels = token_labels.to(router_probs.device)
        aux, counts = load_balancing_loss(router_probs, routes, valid_tokens(token_labels))
        self._record(aux, counts)
        return self.ce(logits, labels) + self.coef * aux

    def _record(self, aux: torch.Tensor, counts: torch.Tensor) -> None:
        self.aux_total = aux.detach() + self.aux_total
        self.calls += 1
        counts = counts.detach()
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts


def moe_loss_fn(args: MixtralArgs, opts: ModelOptions) -> MoeCausalLMLoss:
    return MoeCausalLMLoss(args.router_aux_loss_coef, opts.aux_max_z_loss_weight)


def expert_load_metrics(loss_fn, reset: bool = True) -> dict:
    """Router health since the last call, from the last stage's loss object; {} for non-MoE losses.

    Keys: `moe_aux_loss` (mean of the micro-batches' aux loss before `coef`; k at perfect balance, up to
    E·k when one expert takes everything), `expert_load_min` / `expert_load_max` (per block, the smallest / largest
    share of that block's top-k assignments of non-padding tokens taken by one expert; balanced = 1/E).
    Counts cover this data-parallel replica's micro-batches only. Call it on every last-stage rank after
    each `train_batch` (it resets the totals), and log it from the reporting rank.
    """
    if not isinstance(loss_fn, MoeCausalLMLoss) or not loss_fn.calls:
        return {}
    counts = loss_fn.expert_counts.double().cpu()
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)
    row = {"moe_aux_loss": float(loss_fn.aux_total) / loss_fn.calls,
           "expert_load_min": [round(x, 5) for x in share.min(dim=1).values.tolist()],
           "expert_load_max": [round(x, 5) for x in share.max(dim=1).values.tolist()]}
    if reset:
        loss_fn.reset_metrics()
    return row


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
