"""Mixture-of-experts pieces shared by the MoE families (mixtral, qwen2_moe, qwen3_moe, deepseek_v3): the router,
the stacked experts run as grouped GEMMs over the tokens sorted by expert, shared experts, the pipeline layers
that carry the load-balancing statistics between stages, the loss, the expert-load metrics and the
auxiliary-loss-free bias update.

A family describes its MoE layers with one `MoeConfig` (router kind, top-k, expert names, shared experts) and
builds its blocks on `MoeBlock` (attention, norms and RoPE are the family's; the feed-forward is a `SparseMoe` on
the layers its config makes sparse and a dense SwiGLU MLP elsewhere).

Experts: three stacked parameters per block, gate/up [E, F, H] and down [E, H, F] under the family's HF names
(mixtral `w1`/`w3`/`w2`, the qwen and deepseek families `gate_proj`/`up_proj`/`down_proj`), run by default as one
grouped GEMM per weight over the tokens sorted by expert (`grouped_swiglu`, `torch._grouped_mm`: no host sync in
forward or backward); `moe_grouped_gemm: false`, and CUDA dtypes other than bf16, loop over the experts instead.
On disk nothing is stacked: `state_dict()` / `load_state_dict()` use the hub's per-expert keys
`experts.{e}.{name}.weight`, so layer files, the converter and checkpoints keep that layout.

The tuple that crosses stage boundaries (fixed shapes, as DeepSpeed needs):

    hidden       [B, S, H]     compute dtype
    position_ids [B, S]        int64
    router_probs [B, S, E]     fp32, per token the sum over the MoE blocks run so far of the router probabilities
                               (softmax routers: the softmax; sigmoid routers: the scores normalised to sum 1)
    routes       [B, S, Lm, k] uint8 (int32 if E > 254), the top-k expert ids of every MoE block (Lm = number of
                               MoE blocks; dense blocks have no slot); E = not yet run
    seq_aux      [B]           fp32, only when the config asks for DeepSeek's sequence-wise balance loss: per
                               sequence, the sum over the MoE blocks run so far of Σ_e f_e·P_e (`sequence_balance`)

`router_probs` (and `seq_aux`) are float tensors, so DeepSpeed marks them as requiring grad on the receiving stage
and sends their gradients back: the load-balancing gradient reaches the routers of every stage. `routes` is an
integer tensor: no gradient (top-k is not differentiable, as in transformers) and cheap (Lm·k bytes per token).
The Switch/transformers aux loss `E · Σ_e f_e·P_e` over all (layer, token) rows is a function of per-expert
sums, and summing per token first (over layers) and over non-padding tokens last is the same sum. Keeping the
statistics per token (instead of per micro-batch) lets the last stage decide which tokens are padding from the
labels, which only it has; see `valid_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (IGNORE_INDEX, CausalLMLoss, EmbeddingEnter, ModelError, ModelOptions, NormHeadExit, RMSNorm,
                     make_linear, maybe_checkpoint, split_labels)
from .lora import LoraConfig, init_lora_pair, merged_weight

EXPERT_WEIGHTS = ("w1", "w2", "w3")  # mixtral's names: expert e computes w2(silu(w1 x) * w3 x)
PROJ_WEIGHTS = ("gate_proj", "down_proj", "up_proj")  # qwen/deepseek: down(silu(gate x) * up x)
ROUTERS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoeConfig:
    """What one family's sparse feed-forward computes (the MoE part of its args).

    router: 'softmax' (fp32 softmax over the E logits, top-k; mixtral, qwen) or 'sigmoid' (DeepSeek-V3: sigmoid
        scores, top-k chosen on scores + `e_score_correction_bias` within the best `topk_group` of `n_group` groups).
    norm_topk_prob: the k weights are renormalised to sum 1 (mixtral always).
    routed_scaling_factor: the k weights are multiplied by it (DeepSeek-V3 2.5).
    jitter: mixtral's `router_jitter_noise` (input times U(1-j, 1+j) in training).
    expert_names: the HF names of the (gate, down, up) expert weights.
    shared_size: intermediate size of the shared expert(s) run on every token (0: none), under `shared_name`;
        `shared_gate`: its output is scaled by `sigmoid(shared_expert_gate(x))` (Qwen2-MoE).
    seq_aux_alpha: weight of DeepSeek's sequence-wise balance loss (0: not computed, no `seq_aux` tensor).
    """
    num_experts: int
    top_k: int
    hidden_size: int
    expert_size: int
    init_std: float = 0.02
    router: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    jitter: float = 0.0
    expert_names: tuple[str, str, str] = EXPERT_WEIGHTS
    shared_size: int = 0
    shared_name: str = "shared_expert"
    shared_gate: bool = False
    seq_aux_alpha: float = 0.0


def moe_config(args: Any) -> MoeConfig:
    """A `MoeConfig`, or a family's args holding one as `.moe`."""
    return args if isinstance(args, MoeConfig) else args.moe


def check_moe_config(cfg: MoeConfig, experts_key: str = "num_experts") -> MoeConfig:
    """ModelErrors naming the config.json key for routing settings this implementation cannot compute."""
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise ModelError(f"config.json: num_experts_per_tok ({cfg.top_k}) must be between 1 and "
                         f"{experts_key} ({cfg.num_experts})")
    if cfg.router == "sigmoid":
        if cfg.n_group < 1 or cfg.num_experts % cfg.n_group:
            raise ModelError(f"config.json: n_group ({cfg.n_group}) must divide {experts_key} ({cfg.num_experts})")
        if not 1 <= cfg.topk_group <= cfg.n_group:
            raise ModelError(f"config.json: topk_group ({cfg.topk_group}) must be between 1 and n_group "
                             f"({cfg.n_group})")
        if cfg.num_experts // cfg.n_group < 2:
            raise ModelError(f"config.json: n_group ({cfg.n_group}) leaves fewer than 2 experts per group (the group "
                             "score is the sum of its top 2)")
        if cfg.top_k > cfg.topk_group * (cfg.num_experts // cfg.n_group):
            raise ModelError(f"config.json: num_experts_per_tok ({cfg.top_k}) exceeds the experts of topk_group "
                             f"({cfg.topk_group}) groups")
    return cfg


def routes_dtype(num_experts: int) -> torch.dtype:
    """Smallest dtype NCCL and gloo both send that holds expert ids 0..E (E = the 'not routed' mark)."""
    return torch.uint8 if num_experts < 255 else torch.int32


# ----------------------------------------------------------------------------------------------
# Experts: grouped GEMMs over the tokens sorted by expert


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


class SparseLayers:
    """What the args of an MoE family with dense and sparse layers share: `sparse` (per layer: whether its MLP is
    the MoE) and `moe` (its `MoeConfig`)."""
    sparse: tuple[bool, ...]
    moe: "MoeConfig"

    def moe_index(self, layer: int) -> int | None:
        """The layer's slot among the sparse layers (its column of `routes`), None for a dense layer."""
        return sum(self.sparse[:layer]) if self.sparse[layer] else None

    @property
    def num_moe_layers(self) -> int:
        return sum(self.sparse)

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def top_k(self) -> int:
        return self.moe.top_k


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
                   ends: torch.Tensor, adapters: ExpertAdapters | None = None,
                   names: tuple[str, str, str] = EXPERT_WEIGHTS) -> torch.Tensor:
    """All experts in three grouped GEMMs: x [N, H] grouped by expert (`ends` [E] int32), w1 (gate) / w3 (up)
    [E, F, H], w2 (down) [E, H, F] -> [N, H], rows of expert e = w2[e](silu(w1[e] x) * w3[e] x). `adapters`: LoRA
    on some of them (keyed by `names`, the (gate, down, up) names), two more grouped GEMMs per adapted weight
    (`grouped_linear`), still no host sync.

    No host sync forward or backward; experts with 0 rows are fine. Groups are not padded to 8 rows as
    torchtitan does: CUDA's kernel checks group sizes only where a group's start moves along a contiguous
    dimension. Here groups move along rows: forward and the input gradient are (row-major x [N, ·], 3D) GEMMs,
    and autograd computes the weight gradient, w being a transposed view, as grouped_mm(gradᵀ, x): a
    (column-major, row-major) 2D/2D GEMM that takes any group size, 0 included (`GroupMMCommon.cuh`).
    """
    gate, down, up = names
    h = F.silu(grouped_linear(x, w1, ends, gate, adapters)) * grouped_linear(x, w3, ends, up, adapters)
    return grouped_linear(h, w2, ends, down, adapters)


def looped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  ends: torch.Tensor, adapters: ExpertAdapters | None = None,
                  names: tuple[str, str, str] = EXPERT_WEIGHTS) -> torch.Tensor:
    """`grouped_swiglu` as one matmul chain per expert over its slice of x (reads `ends` on the host); an
    adapted weight adds scaling · F.linear(F.linear(dropout(x), A[e]), B[e]), as `LoraLinear`.

    `unbind` gives every expert its weight views in one op, so backward stacks the E gradients once (zeros
    for an expert with 0 rows) instead of summing E full-size [E, ...] gradients.
    """
    gate, down, up = names
    chunks = x.tensor_split(ends[:-1].tolist())
    per_expert = {} if adapters is None else {
        name: list(zip(a.unbind(0), b.unbind(0))) for name, (a, b) in adapters.pairs.items()}

    def linear(c: torch.Tensor, w: torch.Tensor, name: str, e: int) -> torch.Tensor:
        out = F.linear(c, w)
        if name not in per_expert:
            return out
        a, b = per_expert[name][e]
        return out + F.linear(F.linear(adapters.dropout(c), a), b) * adapters.scaling

    outs = [linear(F.silu(linear(c, a, gate, e)) * linear(c, b, up, e), d, down, e)
            for e, (c, a, d, b) in enumerate(zip(chunks, w1.unbind(0), w2.unbind(0), w3.unbind(0)))]
    return torch.cat(outs)


LORA_SUFFIXES = (("lora_A", "_lora_A"), ("lora_B", "_lora_B"))  # (per-expert file name, stacked attribute suffix)


def unstack_experts(tensors: dict, prefix: str, num_experts: int,
                    names: tuple[str, ...] = EXPERT_WEIGHTS) -> None:
    """In place: stacked `{prefix}w1` [E, ...] (each of `names`) -> the hub's `{prefix}{e}.w1.weight` = row e (a
    view), in the hub's order (expert 0's weights in `names` order, then expert 1's, ...). LoRA adapters
    `{prefix}w1_lora_A` [E, r, in] / `{prefix}w1_lora_B` [E, out, r], where present, likewise ->
    `{prefix}{e}.w1.lora_A` [r, in] / `{prefix}{e}.w1.lora_B` [out, r], right after that expert's weight (PEFT's
    per-linear names). A value of None (a frozen weight's gradient) stays None per expert."""
    stacked = {(w, "weight"): tensors.pop(prefix + w) for w in names}
    for w in names:
        for own, suffix in LORA_SUFFIXES:
            if prefix + w + suffix in tensors:
                stacked[w, own] = tensors.pop(prefix + w + suffix)
    for e in range(num_experts):
        for w in names:
            for own in ("weight", "lora_A", "lora_B"):
                if (w, own) in stacked:
                    value = stacked[w, own]
                    tensors[f"{prefix}{e}.{w}.{own}"] = None if value is None else value[e]


def _per_expert_state(module: Experts, state: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook of `Experts`: write the per-expert keys of the files (see `unstack_experts`)."""
    unstack_experts(state, prefix, module.num_experts, module.names)


def _stack_per_expert(module: Experts, state: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook of `Experts`: `{prefix}{e}.w1.weight` for e = 0..E-1 -> stacked `{prefix}w1`,
    and `{prefix}{e}.w1.lora_A` / `lora_B` -> stacked `{prefix}w1_lora_A` / `{prefix}w1_lora_B`.

    A tensor with any expert missing is left as it is, so strict loading names the keys that do not fit.
    """
    for w in module.names:
        for own, attr in (("weight", w), *((own, w + suffix) for own, suffix in LORA_SUFFIXES)):
            names = [f"{prefix}{e}.{w}.{own}" for e in range(module.num_experts)]
            if all(name in state for name in names):
                state[prefix + attr] = torch.stack([state.pop(name) for name in names])


def stacked_weight(num_experts: int, n_out: int, n_in: int, std: float, dtype: torch.dtype) -> nn.Parameter:
    """[E, n_out, n_in] ~ N(0, std): E nn.Linear(n_in, n_out) weights, initialised as `make_linear`."""
    return nn.Parameter(nn.init.normal_(torch.empty(num_experts, n_out, n_in, dtype=dtype), std=std))


class Experts(nn.Module):
    """`experts`: E SwiGLU experts as stacked weights gate/up [E, F, H] and down [E, H, F] under the family's names
    (`MoeConfig.expert_names`, (gate, down, up): mixtral w1, w2, w3; row e is expert e's nn.Linear weight).

    `state_dict()` emits, and `load_state_dict()` takes, the hub's per-expert keys `{e}.{gate}.weight` [F, H],
    `{e}.{down}.weight` [H, F], `{e}.{up}.weight` [F, H] (hooks), so layer files, the converter and DeepSpeed's
    layer checkpoints keep the per-expert layout. The emitted tensors are views of the stacked parameters,
    like any state_dict entry aliases its parameter; DeepSpeed's checkpoint engine clones each one before
    `torch.save`, so every file tensor owns exactly its storage (to safetensors yourself, clone them).

    LoRA (`models.lora.apply_lora` calls `add_lora` for the names of `lora_targets()` it is asked for):
    stacked adapters `{w}_lora_A` [E, r, in] and `{w}_lora_B` [E, out, r] per adapted weight, expert e's
    update scaling · B[e] A[e] as PEFT's per-expert `LoraLinear`; in files `{e}.{w}.lora_A` [r, in] and
    `{e}.{w}.lora_B` [out, r]. `merge_lora()` folds them into the weights.
    """

    def __init__(self, args: Any, dtype: torch.dtype):
        super().__init__()
        cfg = moe_config(args)
        e, h, f, std = cfg.num_experts, cfg.hidden_size, cfg.expert_size, cfg.init_std
        self.num_experts = e
        self.names = tuple(cfg.expert_names)
        gate, down, up = self.names
        setattr(self, gate, stacked_weight(e, f, h, std, dtype))
        setattr(self, down, stacked_weight(e, h, f, std, dtype))
        setattr(self, up, stacked_weight(e, f, h, std, dtype))
        self.lora_names: tuple[str, ...] = ()
        self.lora_scaling = 1.0
        self.lora_dropout: nn.Module = nn.Identity()
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stack_per_expert)

    def lora_targets(self) -> tuple[str, ...]:
        """The names `lora.target_modules` may use for these experts (`models.lora.valid_targets`)."""
        return self.names

    def add_lora(self, names, cfg: LoraConfig) -> None:
        """Adapters `{w}_lora_A` [E, r, in] (kaiming-uniform per expert) and `{w}_lora_B` [E, out, r] (zeros)
        for each w in `names`, in the weight's dtype and device; a weight that has one already keeps it.
        Freezing the base weights is `apply_lora`'s job."""
        unknown = [w for w in names if w not in self.names]
        if unknown:
            raise ModelError(f"lora.target_modules: {unknown} are not expert weights ({', '.join(self.names)})")
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
            self.lora_names = tuple(n for n in self.names if n in (*self.lora_names, w))
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
        gate, down, up = self.names
        adapters = self.adapters()
        w_gate = getattr(self, gate)
        stacked = [w_gate] + ([t for pair in adapters.pairs.values() for t in pair] if adapters else [])
        use_grouped = grouped and all(grouped_mm_supported(x, t) for t in stacked)
        run = grouped_swiglu if use_grouped else looped_swiglu
        return run(x, w_gate, getattr(self, down), getattr(self, up), ends, adapters, self.names)


class SwigluMlp(nn.Module):
    """`down_proj(silu(gate_proj x) * up_proj x)`, [..., H] -> [..., H]: a dense layer's MLP and the shared
    experts (HF's `*MLP` classes; nn.Linears, so LoRA targets them by these names)."""

    def __init__(self, hidden: int, intermediate: int, std: float, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = make_linear(hidden, intermediate, False, std, dtype)
        self.up_proj = make_linear(hidden, intermediate, False, std, dtype)
        self.down_proj = make_linear(intermediate, hidden, False, std, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------
# Routers


class SigmoidGate(nn.Linear):
    """DeepSeek-V3's router `gate`: weight [E, H] and the buffer `e_score_correction_bias` [E] (in checkpoints),
    which shifts the scores that choose the experts but not the weights that mix them. The bias is not trained by
    gradient: `update_expert_bias` moves it from the expert load (auxiliary-loss-free balancing). It stays fp32
    whatever dtype the module is cast to (a bf16 bias could not take steps of 1e-3 near 1)."""

    def __init__(self, hidden: int, num_experts: int, std: float, dtype: torch.dtype):
        super().__init__(hidden, num_experts, bias=False, dtype=dtype)
        nn.init.normal_(self.weight, std=std)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        kept = self._buffers["e_score_correction_bias"]
        out = super()._apply(fn, recurse)
        moved = self._buffers["e_score_correction_bias"]
        if moved.dtype != torch.float32 and kept.device.type != "meta":
            self._buffers["e_score_correction_bias"] = kept.to(device=moved.device, dtype=torch.float32)
        return out


def softmax_topk(logits: torch.Tensor, k: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (probs [T, E] fp32 softmax, top-k weights [T, k] (renormalised to sum 1 with `norm`),
    ids [T, k])."""
    probs = F.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, ids


def sigmoid_group_topk(logits: torch.Tensor, bias: torch.Tensor, cfg: MoeConfig
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing, as transformers' `DeepseekV3TopkRouter`: logits [T, E] fp32 -> (scores normalised to
    sum 1 [T, E] (the balance statistics), weights [T, k], ids [T, k]).

    scores = sigmoid(logits); choice = scores + bias; a group's score is the sum of its 2 best choices; the
    `topk_group` best of `n_group` groups stay; top-k of their choices. Weights are the plain scores of the chosen
    experts, renormalised (`norm_topk_prob`) and times `routed_scaling_factor`.
    """
    e, g = cfg.num_experts, cfg.n_group
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
    group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=cfg.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    return scores / scores.sum(dim=-1, keepdim=True), weights, ids


class SparseMoe(nn.Module):
    """The sparse feed-forward (mixtral `block_sparse_moe`, the others `mlp`): router `gate` (E x H, no bias), E
    experts, and the shared expert(s) where the family has them; each token goes to its top-k experts.

    Routers: softmax (mixtral, qwen: fp32 softmax over all E logits, top-k, the k weights renormalised with
    `norm_topk_prob`) or sigmoid (DeepSeek-V3, `sigmoid_group_topk`). With `jitter` > 0 the input is multiplied
    by U(1-j, 1+j) noise in training (before both the router and the experts, as transformers' mixtral does).
    Experts run on their tokens only: the (token, slot) pairs are sorted by expert id on device, gathered with
    one `index_select`, run through the experts (`grouped`: three grouped GEMMs over all experts, no host
    sync; else one matmul chain per expert over its contiguous slice), and the weighted results are summed
    back per token with one `index_add_`. Both paths use the same stacked weights and give every expert
    weight a gradient each step, zeros for an expert that received no token. Shared experts (a dense SwiGLU on
    every token; Qwen2-MoE's scaled by `sigmoid(shared_expert_gate(x))`) are added to the routed output.
    """

    def __init__(self, args: Any, dtype: torch.dtype, grouped: bool = True):
        super().__init__()
        cfg = moe_config(args)
        self.cfg = cfg
        self.num_experts, self.top_k, self.jitter = cfg.num_experts, cfg.top_k, cfg.jitter
        self.grouped = grouped
        if cfg.router == "sigmoid":
            self.gate = SigmoidGate(cfg.hidden_size, cfg.num_experts, cfg.init_std, dtype)
        else:
            self.gate = make_linear(cfg.hidden_size, cfg.num_experts, False, cfg.init_std, dtype)
        self.experts = Experts(cfg, dtype)
        if cfg.shared_size:
            setattr(self, cfg.shared_name, SwigluMlp(cfg.hidden_size, cfg.shared_size, cfg.init_std, dtype))
            if cfg.shared_gate:
                self.shared_expert_gate = make_linear(cfg.hidden_size, 1, False, cfg.init_std, dtype)
        self.load: torch.Tensor | None = None  # top-k assignments per expert since the last bias update (training)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, S, H] -> (tokens [T, H] (jittered in training), probs [T, E] fp32 (summing to 1 per token), top-k
        weights [T, k] fp32, top-k ids [T, k] int64)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        tokens = x.reshape(-1, x.shape[-1])
        if self.cfg.router == "sigmoid":
            logits = F.linear(tokens.float(), self.gate.weight.float())
            probs, weights, ids = sigmoid_group_topk(logits, self.gate.e_score_correction_bias, self.cfg)
            return tokens, probs, weights, ids
        probs, weights, ids = softmax_topk(self.gate(tokens), self.top_k, self.cfg.norm_topk_prob)
        return tokens, probs, weights, ids

    def mix(self, tokens: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """tokens [T, H], weights [T, k] fp32, ids [T, k] -> Σ_j weights[t, j] · expert_{ids[t, j]}(tokens[t])
        (+ the shared experts of tokens[t]), [T, H] in the tokens' dtype."""
        order, ends = sort_by_expert(ids, self.num_experts)
        token = order // self.top_k
        out = self.experts(tokens.index_select(0, token), ends, self.grouped)  # (T·k, H), by expert
        out = (out * weights.reshape(-1).index_select(0, order)[:, None]).to(tokens.dtype)
        out = torch.zeros_like(tokens).index_add_(0, token, out)
        if not self.cfg.shared_size:
            return out
        shared = getattr(self, self.cfg.shared_name)(tokens)
        if self.cfg.shared_gate:
            shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
        return out + shared

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> (out [B, S, H], router probs [B·S, E] fp32, top-k expert ids [B·S, k])."""
        tokens, probs, weights, ids = self.route(x)
        return self.mix(tokens, weights, ids).view(x.shape), probs, ids

    @torch.no_grad()
    def record_load(self, ids: torch.Tensor) -> None:
        """Add this forward's top-k assignments per expert (ids [T, k], every position of the micro-batch) to
        `load` [E] fp32, on device without a host sync; read by `update_expert_bias`."""
        counts = torch.zeros(self.num_experts, dtype=torch.float32, device=ids.device)
        counts.scatter_add_(0, ids.reshape(-1).long(), torch.ones(ids.numel(), dtype=torch.float32, device=ids.device))
        self.load = counts if self.load is None else self.load + counts


def sequence_balance(probs: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """DeepSeek's sequence-wise balance statistic of one MoE layer: probs [B, S, E] (normalised scores), ids
    [B, S, k] -> [B], per sequence Σ_e f_e·P_e with f_e = E / (k·S) · (top-k assignments to e) and
    P_e = mean over the sequence of probs[..., e]. Every position of the row counts, as in DeepSeek's own
    `MoEGate` (padding included: only the last stage knows where a row's padding starts). Gradient through P."""
    b, s, k = ids.shape
    counts = torch.zeros(b, num_experts, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids.reshape(b, -1).long(), torch.ones(b, s * k, dtype=torch.float32, device=ids.device))
    f = counts * (num_experts / (s * k))
    return (f * probs.mean(dim=1)).sum(dim=-1)


@torch.no_grad()
def update_expert_bias(module: nn.Module, rate: float, group: Any = None) -> int:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2), after an optimizer step: for every sigmoid router in
    `module`, `e_score_correction_bias += rate · sign(mean load - load_e)` per expert, the load being the top-k
    assignments of the training forwards since the last call (every position of the micro-batches), summed over
    `group` (the data-parallel replicas, so every replica moves its biases alike). Overloaded experts are pushed
    down, underloaded ones up, by `rate` each step. `rate` 0: the biases stay as loaded (frozen); the counts are
    dropped either way. Returns the number of routers updated."""
    updated = 0
    for moe in module.modules():
        if not isinstance(moe, SparseMoe) or not isinstance(moe.gate, SigmoidGate) or moe.load is None:
            continue
        load, moe.load = moe.load, None
        if rate == 0:
            continue
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(load, group=group)
        bias = moe.gate.e_score_correction_bias
        bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=rate)
        updated += 1
    return updated


# ----------------------------------------------------------------------------------------------
# Pipeline layers


class MoeEnter(EmbeddingEnter):
    """Enter layer: `(input_ids, position_ids)` -> `(hidden, position_ids, router_probs 0, routes 'none'[, seq_aux 0])`.

    `router_probs` (and `seq_aux`) start as leaves that require grad (when grad is on): a first stage holding only
    this layer must still send a tensor DeepSpeed can call `backward` on. `num_layers` is the number of MoE blocks.
    """

    def __init__(self, vocab_size: int, hidden_size: int, padding_idx: int | None, init_std: float,
                 num_layers: int, num_experts: int, top_k: int, dtype: torch.dtype = torch.float32,
                 seq_aux: bool = False):
        super().__init__(vocab_size, hidden_size, padding_idx, init_std, dtype)
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.seq_aux = seq_aux

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids = super().forward(inputs)
        b, s = position_ids.shape
        grad = torch.is_grad_enabled()
        probs = torch.zeros(b, s, self.num_experts, dtype=torch.float32, device=hidden.device, requires_grad=grad)
        routes = torch.full((b, s, self.num_layers, self.top_k), self.num_experts,
                            dtype=routes_dtype(self.num_experts), device=hidden.device)
        if not self.seq_aux:
            return hidden, position_ids, probs, routes
        return hidden, position_ids, probs, routes, torch.zeros(b, dtype=torch.float32, device=hidden.device,
                                                                requires_grad=grad)


class MoeExit(NormHeadExit):
    """Exit layer: `(hidden, position_ids, router_probs, routes[, seq_aux])` -> `(logits [B,S,V], router_probs,
    routes[, seq_aux])`. Tied embeddings: returns the normalised hidden instead of logits, for `tied_moe_lm_head`."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return super().forward(inputs), *inputs[2:]


def tied_moe_lm_head(enter: MoeEnter, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`forward_fn` of the trailing tied spec: (hidden, probs, routes, ...) -> (hidden @ embed_tokensᵀ, probs, ...)."""
    return F.linear(inputs[0], enter.embed_tokens.weight), *inputs[1:]


def tied_moe_head_weight(enter: MoeEnter, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """The same for a fused loss: (hidden, probs, routes, ...) -> ((hidden, embed_tokens.weight), probs, ...)."""
    return (inputs[0], enter.embed_tokens.weight), *inputs[1:]


class MoeBlock(nn.Module):
    """Block layer `layer_idx`: `(hidden, position_ids, router_probs, routes[, seq_aux])` -> the same, updated.

    Pre-norm residual block: `input_layernorm`, the family's attention under `self_attn` (RoPE from
    `position_ids`, causal, no mask for right padding), `post_attention_layernorm`, then the feed-forward under
    `moe_name`: a `SparseMoe` on MoE layers (`moe_index` = this block's slot in `routes`), the family's dense MLP
    elsewhere (the statistics pass through). A MoE block adds its router probabilities to `router_probs`, writes its
    top-k ids into `routes[:, :, moe_index]` (and its `sequence_balance` into `seq_aux`).
    With `use_grad_ckpt` the block is recomputed in backward (same jitter noise: the RNG state is replayed).
    With `compile_blocks` everything but the experts runs through one `torch.compile`d function shared by
    all blocks (`_run_compiled_block`); `moe_grouped_gemm` picks the experts' grouped GEMM or their loop.

    Subclasses set the modules (`init_modules`) in HF's order and `moe_name`.
    """
    moe_name = "mlp"
    sliding_window: int | None = None

    def init_modules(self, hidden: int, eps: float, attention: nn.Module, rotary: Any, feed_forward: nn.Module,
                     opts: ModelOptions, layer_idx: int, moe_index: int | None) -> None:
        self.layer_idx, self.moe_index = layer_idx, moe_index
        self.input_layernorm = RMSNorm(hidden, eps, dtype=opts.dtype)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype=opts.dtype)
        setattr(self, self.moe_name, feed_forward)
        self.rotary = rotary
        self.use_grad_ckpt, self.packed_sequences = opts.use_grad_ckpt, opts.packed_sequences
        self.compile_blocks = opts.compile_blocks

    @property
    def moe(self) -> nn.Module:
        return getattr(self, self.moe_name)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, probs_sum, routes, *seq_aux = inputs
        b, s, _ = hidden.shape
        if self.sliding_window is not None and s > self.sliding_window:
            raise ModelError(f"sequence length {s} exceeds config.json's sliding_window {self.sliding_window}; "
                             "sliding-window attention is not implemented (lower max_seq_len)")
        self.rotary.inv_freq_on(position_ids.device)  # no dict mutation inside a compiled/checkpointed region
        if self.moe_index is None:
            hidden = maybe_checkpoint(self, self._dense_block, hidden, position_ids, enabled=self.use_grad_ckpt)
            return hidden, position_ids, probs_sum, routes, *seq_aux
        run = _run_compiled_block if self.compile_blocks else _run_block
        hidden, probs, ids = run(self, hidden, position_ids)
        if self.training and isinstance(self.moe.gate, SigmoidGate) and torch.is_grad_enabled():
            self.moe.record_load(ids)
        probs_sum = probs_sum + probs.view(b, s, -1)
        if seq_aux:
            seq_aux = [seq_aux[0] + sequence_balance(probs.view(b, s, -1), ids.view(b, s, -1), self.moe.num_experts)]
        routes = routes.clone()
        routes[:, :, self.moe_index] = ids.view(b, s, -1).to(routes.dtype)
        return hidden, position_ids, probs_sum, routes, *seq_aux

    def _attend(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, H] -> hidden + attention(input_layernorm(hidden)), [B, S, H]."""
        cos, sin = self.rotary.cos_sin(position_ids, hidden.dtype)
        docs = position_ids if self.packed_sequences else None
        return hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, docs)

    def _dense_block(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self._attend(hidden, position_ids)
        return hidden + self.moe(self.post_attention_layernorm(hidden))

    def _block(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden [B, S, H] -> (hidden [B, S, H], router probs [B·S, E] fp32, top-k ids [B·S, k])."""
        hidden = self._attend(hidden, position_ids)
        moe_out, probs, ids = self.moe(self.post_attention_layernorm(hidden))
        return hidden + moe_out, probs, ids

    def _attention_half(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block up to the experts: hidden [B, S, H] -> (hidden after the attention residual [B, S, H],
        then `SparseMoe.route` of its post-attention norm: tokens [T, H], probs [T, E], weights [T, k], ids [T, k])."""
        hidden = self._attend(hidden, position_ids)
        return hidden, *self.moe.route(self.post_attention_layernorm(hidden))


def _run_block(block: MoeBlock, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Eager: the whole block, recomputed in backward with `use_grad_ckpt` (backward keeps only its input)."""
    return maybe_checkpoint(block, block._block, hidden, position_ids, enabled=block.use_grad_ckpt)


def _run_attention_half(block: MoeBlock, hidden: torch.Tensor,
                        position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`block._attention_half`, recomputed in backward with `use_grad_ckpt`. Compiled, the checkpoint is traced
    inside the graph, as `common._run_block` does (a checkpointed compiled function fails recomputation)."""
    return maybe_checkpoint(block, block._attention_half, hidden, position_ids, enabled=block.use_grad_ckpt)


def _run_compiled_block(block: MoeBlock, hidden: torch.Tensor,
                        position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`compile_blocks`: norms, attention, residual and router compiled (`compiled_attention_half`), the experts
    (`SparseMoe.mix`) eager: `grouped_mm` has no fp32 fake kernel to trace (torch's accepts bf16 only) and the
    loop path reads the group sizes on the host. With `use_grad_ckpt` each half is recomputed on its own, so
    backward keeps the block input and the experts' inputs (tokens [T, H], top-k weights and ids)."""
    hidden, tokens, probs, weights, ids = compiled_attention_half()(block, hidden, position_ids)
    moe_out = maybe_checkpoint(block, block.moe.mix, tokens, weights, ids, enabled=block.use_grad_ckpt)
    return hidden + moe_out.view_as(hidden), probs, ids


_COMPILED: list = []


def compiled_attention_half() -> Callable:
    """One compiled `_run_attention_half` for every block: the module is an input (its parameters become graph
    inputs), so the blocks of a stage share one graph, as `common.compiled_block`. Built on first use."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_run_attention_half))
    return _COMPILED[0]


# ----------------------------------------------------------------------------------------------
# Loss and metrics


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
    """Last-stage loss: `scale · CE (+ z-loss) + router_aux_loss_coef · aux (+ seq_aux_alpha · seq_aux)`.

    outputs = `(logits [B,S,V], router_probs, routes[, seq_aux [B]])` from `MoeExit`; labels [B,S] or
    `(labels, scale)`. The CE part is `CausalLMLoss` (mean over trained tokens, times the global-batch scale). The
    aux part is computed per micro-batch over its non-padding tokens (`valid_tokens`) and is not multiplied by the
    token scale: DeepSpeed's averaging then trains the mean of the micro-batch aux losses with weight `coef`, which
    is what transformers does per forward. It is always computed (coef 0 included), so `router_probs` gets
    a gradient tensor, which DeepSpeed requires of every float tensor it received. `seq_aux` (DeepSeek's
    sequence-wise balance loss, summed over the MoE layers) enters as `seq_aux_alpha · mean over the sequences`.

    For logging, every call also adds the detached aux loss and the per-layer expert counts to totals that
    `expert_load_metrics` reads and resets.
    """
    __name__ = "moe_causal_lm_loss"

    def __init__(self, router_aux_loss_coef: float, z_loss_weight: float = 0.0, seq_aux_alpha: float = 0.0):
        self.coef = float(router_aux_loss_coef)
        self.seq_aux_alpha = float(seq_aux_alpha)
        self.ce = CausalLMLoss(z_loss_weight)
        self.reset_metrics()

    def reset_metrics(self) -> None:
        self.aux_total = 0.0
        self.calls = 0
        self.expert_counts: torch.Tensor | None = None  # (L, E) top-k assignments of non-padding tokens

    def __call__(self, outputs: tuple[torch.Tensor, ...], labels) -> torch.Tensor:
        logits, router_probs, routes, *seq_aux = outputs
        token_labels, _ = split_labels(labels)
        token_labels = token_labels.to(router_probs.device)
        aux, counts = load_balancing_loss(router_probs, routes, valid_tokens(token_labels))
        self._record(aux, counts)
        loss = self.ce(logits, labels) + self.coef * aux
        if seq_aux:
            loss = loss + self.seq_aux_alpha * seq_aux[0].mean()
        return loss

    def _record(self, aux: torch.Tensor, counts: torch.Tensor) -> None:
        self.aux_total = aux.detach() + self.aux_total
        self.calls += 1
        counts = counts.detach()
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts


def moe_loss_fn(args: Any, opts: ModelOptions) -> MoeCausalLMLoss:
    """`Family.loss_fn` of the MoE families: the args' `router_aux_loss_coef` and `moe.seq_aux_alpha`."""
    return MoeCausalLMLoss(args.router_aux_loss_coef, opts.aux_max_z_loss_weight, moe_config(args).seq_aux_alpha)


def expert_load_metrics(loss_fn, reset: bool = True) -> dict:
    """Router health since the last call, from the last stage's loss object; {} for non-MoE losses.

    Keys: `moe_aux_loss` (mean of the micro-batches' aux loss before `coef`; k at perfect balance, up to
    E·k when one expert takes everything), `expert_load_min` / `expert_load_max` (per MoE block, the smallest /
    largest share of that block's top-k assignments of non-padding tokens taken by one expert; balanced = 1/E).
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
