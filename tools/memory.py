"""Memory planner: GPU (and host) memory per pipeline stage, before any GPU is booked.

    python -m tools.memory --config CFG.yml [--gpus N] [--gpu-gib 80] [--min-gpus] [--json] [--key.sub=value ...]

Reads the training YAML (same overrides as `train_ds.py`), the model's `config.json`, splits the layers as
the trainer does (`parts` or `auto` via `training.partition.resolve_parts` and the model's `layer_flops`) and
prints per stage: weights, gradients, optimizer state, activations and the total in GiB (2^30 bytes), and
whether the stage fits a `--gpu-gib` card. `--gpus N` re-plans for N GPUs: dims `[N // data, data]` when the
config's data-parallel size divides N, else `[N, 1]`. `--min-gpus` searches the smallest number of stages
(`parts: auto`, the config's data-parallel size) whose every stage fits.

The model, in bytes (P pipeline stages, stage s = 0..P-1, D data-parallel replicas, m micro-batch size,
S = max_seq_len, t = m*S tokens per micro-batch, gas micro-batches per step, h hidden size, V vocabulary,
lp = 2 for bf16/fp16 and 4 for fp32, k = optimizer state bytes per parameter: AdamW/Adam/LAMB 8, Lion 4,
Adagrad 4, SGD 4 with momentum else 0, all fp32).

Parameters: counted exactly per logical layer by building the family's layer specs on the meta device.
A stage holds its own layers' parameters; the tied head of a tied model (trailing `TiedLayerSpec`
repeating the embedding key) has no parameters of its own, but DeepSpeed builds a copy of the tied module
on the last stage, so the copy counts in that stage's memory ("resident" parameters).

Per resident parameter, read from DeepSpeed 0.19.8's code (`runtime/engine.py` `_do_optimizer_sanity_check`
picks the wrapper; then `bf16_optimizer.py`, `fp16/fused_optimizer.py`, `zero/stage_1_and_2.py`):
  * bf16, ZeRO 0 -> `BF16_Optimizer`: bf16 weights 2 + bf16 `.grad` 2 (zeroed, never freed) + the
    gradient accumulation buffer in `grad_accum_dtype`, which defaults to the model dtype: 2 bytes (bf16),
    4 only with `data_types: {grad_accum_dtype: fp32}` (an fp32 accumulator is not the default);
    fp32 master (4 + k) sharded over D (it partitions even at ZeRO 0). With the bf16 accumulator the step
    also makes an fp32 copy of the gradient partition: +4/D during `step()` only.
    bf16 + ZeRO-1 + fp32 accumulation (no offload) takes the same `BF16_Optimizer`.
  * fp16 (ZeRO 0): fp16 weights 2 + fp16 grads 2 + fp32 master 4 + k, not sharded. At the step an fp32
    copy of the gradients: `FP16_Optimizer` (DeepSpeed's FusedAdam: Adam/AdamW without `torch_adam`)
    builds the per-parameter fp32 copies and then flattens them, so both exist at once: +8, not +4;
    `FP16_UnfusedOptimizer` (Lion, LAMB, torch Adam) converts parameter by parameter, +4.
  * fp32 (ZeRO 0): the optimizer itself, weights 4 + grads 4 + k.
  * `optimizer.params.torch_adam: true` (torch's AdamW, foreach, as the naive baseline of
    performance.md ran): its step allocates sqrt(exp_avg_sq) for all parameters it updates, +4 (/D where
    sharded) during the step; DeepSpeed's FusedAdam/FusedLion update in place.
  * ZeRO-1 (`DeepSpeedZeroOptimizer`): weights lp + grads lp; fp32 master 4 + k sharded over D; at the
    step the averaged gradient partition (lp) and its fp32 copy (4), +(lp + 4)/D.
  * ZeRO-1, with or without offload, also keeps a gradient-reduction bucket per GPU: `reduce_bucket_size`
    (default 5e8) elements in lp plus an fp32 staging buffer of that size, 2.8 GiB in bf16 (counted in
    `grads`; `zero_bucket_bytes`).
  * ZeRO-1 with `offload_optimizer: {device: cpu}`: the GPU keeps weights lp + grads lp; the host keeps,
    per rank, fp32 master 4 + fp32 grads 4 + k + the lp staging copy of the partition lp (+ lp accumulation
    buffer when gas > 1), all over D (shown as the `host` column; the GPU's one-parameter bounce buffer is
    left out).
  Optimizer columns: `grads` = lp grads + accumulation buffer, `optim` = master + states (sharded where
  DeepSpeed shards), `step` = what exists only during `step()`, when activations are already freed.

LoRA (a `lora:` section: r, alpha, dropout, target_modules, modules_to_save; `models/lora.py`): the layer
specs are built on the meta device with `apply_lora`, which counts exactly the adapters it adds (r·(in+out)
per targeted linear, E·r·(in+out) per targeted stacked expert weight) and the `modules_to_save` parameters.
The trainer hands DeepSpeed only parameters that require grad (`training.setup.param_groups`), so a frozen
base parameter costs its weight bytes only (lp: no `.grad`, no accumulation buffer, no master, no state,
nothing at the step, nothing on the host); trained parameters (adapters, `modules_to_save`) cost the full
per-parameter bytes above. Activations are measured with the adapters in place (their [tokens, r]
intermediates are saved too, and a frozen weight no longer makes autograd keep what only its own gradient
needs). `lora.quantize: nf4` (QLoRA): the linears the trainer holds in NF4 (`models.nf4.nf4_linear_names`, found on
the meta-device layers before the adapters go on) cost `models.nf4.nf4_bytes` each (~0.52 B per weight: 4 bits, an
int8 absmax per 64, an fp32 factor per 256 absmaxes) instead of lp.

Activations, saved for backward per token, per logical layer kind (Enter, one block, Exit): measured, not
guessed. `measure_bytes_per_token` builds the model's Enter, one block and Exit (+ tied head) from its
layer specs at a scaled-down width (`models.ResolvedModel.shrunk_config`: hidden, MLP and head widths
divided by d, heads kept, vocab cut to 256), runs them on CPU with real tensors in the config's dtype (fp16
measured as bf16: same sizes) under `torch.autograd.graph.saved_tensors_hooks`, and sums each saved
tensor's storage once (deduplicated by `untyped_storage().data_ptr()`), parameters excluded. Attention is
accounted like a flash / memory-efficient kernel: during the measurement
`torch.nn.functional.scaled_dot_product_attention` (which every family's attention ends in:
`models.common.causal_attention`, or `alibi_causal_attention` with ALiBi) is replaced by an
autograd.Function that saves exactly q, k, v, the output (allocated [B, S, heads, hd] as those kernels do)
and an fp32 log-sum-exp per head per token, never an S x S matrix. Everything saved is linear in the
width, so two widths (d = 16 and 8 where the shapes allow) give a + b*width, extrapolated to the real
width; models of hidden <= 1024 are measured as they are. Cached per (config.json, dtype). Per-micro-batch constants (e.g. a NormHead's normalised head weight)
are not per-token and are left out.

Per stage, with n = min(P - s, gas) micro-batches in flight under 1F1B:
  * blocks: n * t * (blocks * A_block); with `use_grad_ckpt` only each block's input is kept,
    n * t * blocks * h * lp, plus one block's full set t * A_block while it is recomputed.
  * Enter (stage 0) and Exit (last stage): n * t * A_enter / A_exit.
  * boundary buffers: DeepSpeed keeps each in-flight micro-batch's received input (stages > 0) and its
    output until its gradient returns (stages < P-1), plus one receive buffer each way:
    t * B_boundary * (n * [s > 0] + n * [s < P-1] + [s > 0] + [s < P-1]), B_boundary = bytes per token
    of the tensors a block hands on (hidden in lp, position ids int64, an MoE's router statistics).
  * logits (last stage, one micro-batch): t * V * (lp + 4 fp32 upcast + 4 fp32 gradient), unless the
    config sets `fused_head_loss: true` (the default), whose head + loss keeps d loss / d logits in the
    compute dtype, t * V * lp, and one chunk (at most 1 GiB) of fp32 temporaries on the side.
  total = weights + grads + optim + max(activations, step). Not included: the CUDA context, NCCL buffers
  and allocator fragmentation (typically 1-3 GiB): lower `--gpu-gib` to keep a margin.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F

from utils.config import ConfigError, TrainConfig, load_config, parse_overrides

GIB = 2 ** 30
STATE_BYTES = {"adam": 8, "adamw": 8, "fusedadam": 8, "lamb": 8, "fusedlamb": 8, "onebitadam": 8,
               "lion": 4, "fusedlion": 4, "adagrad": 4}
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MEASURE_BATCH, MEASURE_SEQ, MEASURE_VOCAB = 2, 32, 256
EXACT_BELOW_HIDDEN = 1024  # measure small models at their real width


# ----------------------------------------------------------------------------------------------
# Setup: what the planner needs from the training config


@dataclass(frozen=True)
class Setup:
    precision: str  # bf16 / fp16 / fp32
    optimizer: str
    state_bytes: int
    zero_stage: int
    offload: bool
    grad_acc_fp32: bool
    pipe: int
    data: int
    micro_batch: int
    micro_batches: int  # gradient accumulation steps = micro-batches per step per replica
    seq: int
    grad_ckpt: bool
    fused_head_loss: bool
    parts: object  # 'auto' or a list
    torch_adam: bool = False  # optimizer.params.torch_adam: torch's foreach Adam(W) instead of FusedAdam
    reduce_bucket: int = 500_000_000  # zero_optimization.reduce_bucket_size (elements), ZeRO-1 only
    lora: dict | None = None  # the `lora:` section as `models.lora.LoraConfig.to_dict()`, None: full fine-tuning

    @property
    def lora_json(self) -> str:
        """A hashable key of the LoRA setting for the caches ('' without LoRA)."""
        return json.dumps(self.lora, sort_keys=True) if self.lora else ""


def optimizer_state_bytes(ds: dict) -> tuple[str, int]:
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ConfigError("optimizer.type: the planner needs the optimizer (AdamW, Lion, ...)")
    name = str(opt["type"])
    key = name.lower().replace("_", "")
    if key == "sgd":
        return name, 4 if float(opt.get("params", {}).get("momentum", 0) or 0) else 0
    if key not in STATE_BYTES:
        raise ConfigError(f"optimizer.type: {name} is not known to the planner "
                          f"(known: {', '.join(sorted(STATE_BYTES))}, sgd)")
    return name, STATE_BYTES[key]


def gpus_to_dims(gpus: int, data: int) -> tuple[int, int]:
    """`--gpus N`: keep the config's data-parallel size when it divides N, else N stages x 1 replica."""
    if gpus < 1:
        raise ConfigError(f"--gpus: expected a positive integer, got {gpus}")
    return (gpus // data, data) if gpus % data == 0 else (gpus, 1)


def setup_from_config(cfg: TrainConfig, gpus: int | None = None) -> Setup:
    """The planner's view of the run `training.plan.plan` derives from `cfg` (on `--gpus` GPUs when given)."""
    from training.plan import plan

    pipe, data = cfg.dims
    parts = cfg.topology.parts
    if gpus is not None:
        pipe, data = gpus_to_dims(gpus, data)
        if parts != "auto" and len(parts) != pipe:
            parts = "auto"  # the config's list was written for another stage count
    run = plan(cfg, (pipe, data))
    if run.zero_stage > 1:
        raise ConfigError(f"zero_optimization.stage: {run.zero_stage}; DeepSpeed's pipeline supports ZeRO 0 and 1")
    ds = run.ds
    acc = str((ds.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    name, state = optimizer_state_bytes(ds)
    torch_adam = bool((ds["optimizer"].get("params") or {}).get("torch_adam")) and name.lower() in ("adam", "adamw")
    zero = ds.get("zero_optimization") or {}
    return Setup(precision=run.precision, optimizer=name, state_bytes=state, zero_stage=run.zero_stage,
                 offload=run.offload_optimizer and run.zero_stage == 1,
                 grad_acc_fp32=acc in ("fp32", "float32", "float"),
                 pipe=pipe, data=data, micro_batch=run.mbs, micro_batches=run.gas, seq=cfg.data.max_seq_len,
                 grad_ckpt=cfg.model.use_grad_ckpt, fused_head_loss=cfg.model.fused_head_loss, parts=parts,
                 torch_adam=torch_adam, reduce_bucket=int(float(zero.get("reduce_bucket_size", 5e8))),
                 lora=run.lora.to_dict() if run.lora else None)


# ----------------------------------------------------------------------------------------------
# Bytes per parameter (DeepSpeed 0.19.8's optimizer wrappers; see the module docstring)


@dataclass(frozen=True)
class ParamBytes:
    wrapper: str
    weights: float
    grads: float
    optim: float
    step: float  # only during optimizer.step()
    host: float  # per rank, CPU memory


def param_bytes(s: Setup) -> ParamBytes:
    lp, k, d = PRECISION_BYTES[s.precision], s.state_bytes, s.data
    foreach = 4 if s.torch_adam else 0  # torch Adam(W) foreach step: a sqrt(exp_avg_sq) temporary
    if s.zero_stage == 1 and s.offload:
        host = (4 + 4 + k + lp + (lp if s.micro_batches > 1 else 0)) / d
        return ParamBytes("DeepSpeedZeroOptimizer, ZeRO-1 + CPU offload", lp, lp, 0, 0, host)
    if s.precision == "bf16" and (s.zero_stage == 0 or s.grad_acc_fp32):
        acc = 4 if s.grad_acc_fp32 else 2
        return ParamBytes(f"BF16_Optimizer (grad accumulation {'fp32' if acc == 4 else 'bf16'})",
                          2, 2 + acc, (4 + k) / d, ((0 if s.grad_acc_fp32 else 4) + foreach) / d, 0)
    if s.zero_stage == 1:
        return ParamBytes("DeepSpeedZeroOptimizer, ZeRO-1", lp, lp, (4 + k) / d, (lp + 4 + foreach) / d, 0)
    if s.precision == "fp16" and s.optimizer.lower() in ("adam", "adamw") and not s.torch_adam:
        return ParamBytes("FP16_Optimizer", 2, 2, 4 + k, 8, 0)
    if s.precision == "fp16":
        return ParamBytes("FP16_UnfusedOptimizer", 2, 2, 4 + k, 4 + foreach, 0)
    return ParamBytes("no wrapper (fp32)", 4, 4, k, foreach, 0)


# ----------------------------------------------------------------------------------------------
# Parameters per layer (exact, meta device)


def _cfg_key(hf_cfg: dict) -> str:
    return json.dumps(hf_cfg, sort_keys=True)


def _lora_cfg(lora_json: str):
    from models.lora import LoraConfig

    return LoraConfig.from_dict(json.loads(lora_json)) if lora_json else None


@functools.lru_cache(maxsize=None)
def _spec_counts(cfg_json: str, lora_json: str = "") -> tuple[tuple[tuple[int, int], ...], int]:
    """((params, trained params) of each spec's module, built on the meta device with LoRA applied when
    `lora_json`; all trained without), number of blocks."""
    import models
    from models.lora import apply_lora

    model = models.resolve(json.loads(cfg_json))
    lora = _lora_cfg(lora_json)
    counts = []
    with torch.device("meta"):
        for spec in model.specs():
            module = spec.build()
            if lora is not None:
                apply_lora(module, lora)
            params = list(module.parameters())
            counts.append((sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    return tuple(counts), model.num_blocks


@functools.lru_cache(maxsize=None)
def _spec_params(cfg_json: str, lora_json: str = "") -> tuple[tuple[int, ...], tuple[int, ...], int,
                                                             tuple[int, ...], tuple[int, ...]]:
    """(own params per spec, resident size of each spec's tied module (0 if untied), number of blocks, and
    the trained part of both: with LoRA, adapters and `modules_to_save`; without, all of it)."""
    import models

    counts, blocks = _spec_counts(cfg_json, lora_json)
    own, tied, own_trained, tied_trained, seen = [], [], [], [], set()
    for spec, (n, trained) in zip(models.resolve(json.loads(cfg_json)).specs(), counts):
        key = getattr(spec, "key", None)
        own.append(0 if key in seen else n)
        own_trained.append(0 if key in seen else trained)
        tied.append(n if key is not None else 0)
        tied_trained.append(trained if key is not None else 0)
        if key is not None:
            seen.add(key)
    return tuple(own), tuple(tied), blocks, tuple(own_trained), tuple(tied_trained)


@functools.lru_cache(maxsize=None)
def _spec_nf4(cfg_json: str, lora_json: str) -> tuple[tuple[int, float], ...]:
    """(weights held in NF4, their bytes) per spec under a `quantize: nf4` lora section (zeros otherwise)."""
    import models
    from models.nf4 import nf4_bytes, nf4_linear_names

    lora = _lora_cfg(lora_json)
    out = []
    with torch.device("meta"):
        for spec in models.resolve(json.loads(cfg_json)).specs():
            module = spec.build()
            if lora is None or lora.quantize != "nf4" or getattr(spec, "key", None) is not None:
                out.append((0, 0.0))
                continue
            numel = [module.get_submodule(n).weight.numel() for n in nf4_linear_names(module, lora)]
            out.append((sum(numel), float(sum(map(nf4_bytes, numel)))))
    return tuple(out)


def stage_nf4(hf_cfg: dict, parts: list[int], lora: dict | None) -> list[tuple[int, float]]:
    """(weights held in NF4, their bytes) per stage (QLoRA); zeros without `lora.quantize: nf4`."""
    if not lora or lora.get("quantize") != "nf4":
        return [(0, 0.0)] * len(parts)
    per_spec = _spec_nf4(_cfg_key(hf_cfg), json.dumps(lora, sort_keys=True))
    return [(sum(per_spec[i][0] for i in idx), sum(per_spec[i][1] for i in idx))
            for idx in stage_specs(parts, len(per_spec))]


def layer_params(hf_cfg: dict, lora: dict | None = None, trained: bool = False) -> list[int]:
    """Own parameters per spec (Enter, blocks, Exit[, tied head = 0]); their sum is the model's count.
    `trained`: only those that train under `lora` (a `LoraConfig.to_dict()`; adapters included)."""
    spec = _spec_params(_cfg_key(hf_cfg), json.dumps(lora, sort_keys=True) if lora else "")
    return list(spec[3] if trained else spec[0])


def stage_specs(parts: list[int], num_specs: int) -> list[range]:
    from models import parts_to_boundaries

    bounds = parts_to_boundaries(parts, num_specs)
    return [range(bounds[i], bounds[i + 1]) for i in range(len(parts))]


def resident_params(hf_cfg: dict, parts: list[int], lora: dict | None = None,
                    trained: bool = False) -> list[tuple[int, int]]:
    """(own, resident) parameters per stage: resident adds the tied modules DeepSpeed copies onto a stage.
    `lora` (a `LoraConfig.to_dict()`): the model with adapters; `trained`: count only trained parameters."""
    own, tied, _, own_trained, tied_trained = _spec_params(_cfg_key(hf_cfg),
                                                           json.dumps(lora, sort_keys=True) if lora else "")
    out = []
    for idx in stage_specs(parts, len(own)):
        count, copy_count = (own_trained, tied_trained) if trained else (own, tied)
        mine = sum(count[i] for i in idx)
        copies = sum(copy_count[i] for i in idx if own[i] == 0 and tied[i])
        out.append((mine, mine + copies))
    return out


# ----------------------------------------------------------------------------------------------
# Activations per token (measured on CPU)

_REAL_SDPA = F.scaled_dot_product_attention


class _FlashLikeAttention(torch.autograd.Function):
    """Saves what flash / memory-efficient SDPA kernels save: q, k, v, out [B,S,nh,hd], fp32 lse [B,nh,S]."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, gqa, scale):
        kw = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
        with torch.no_grad():
            out = _REAL_SDPA(q, k, v, **kw).transpose(1, 2).contiguous()
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw = kw
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _out, _lse = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = _REAL_SDPA(*leaves, **ctx.kw).transpose(1, 2)
            grads = torch.autograd.grad(out, leaves, grad_out)
        return (*grads, None, None, None, None)


def flash_like_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Drop-in for `F.scaled_dot_product_attention` (no dropout) with a flash kernel's saved tensors."""
    return _FlashLikeAttention.apply(q, k, v, attn_mask, is_causal, enable_gqa, scale).transpose(1, 2)


def saved_bytes(fn, exclude: list[torch.Tensor]):
    """(bytes of distinct storages autograd saves while running `fn()`, fn's result); `exclude` = params."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", flash_like_sdpa):
        result = fn()
    return total, result


def _tensors(x) -> list[torch.Tensor]:
    items = x if isinstance(x, (tuple, list)) else (x,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def _fresh_inputs(x):
    """A layer's outputs as the next layer's inputs: detached, floating tensors requiring grad."""
    items = x if isinstance(x, (tuple, list)) else (x,)
    out = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
                for t in items)
    return out if isinstance(x, (tuple, list)) else out[0]


def _run(spec, module, x):
    forward_fn = getattr(spec, "forward_fn", None)
    return forward_fn(module, x) if forward_fn is not None else module(x)


def measure_at_width(hf_cfg: dict, dtype: torch.dtype, lora_json: str = "") -> dict[str, float]:
    """Bytes per token saved for backward by Enter, one block and Exit, and handed on by a block; with
    `lora_json` (a `LoraConfig.to_dict()` as JSON) the modules carry adapters and frozen base weights."""
    import models
    from models.lora import apply_lora

    model = models.resolve(hf_cfg)
    specs = model.specs()
    specs = [specs[0], specs[1], *specs[model.num_blocks + 1:]]  # Enter, the first block, Exit (+ tied head)
    torch.manual_seed(0)
    modules = [spec.build().to(dtype).train() for spec in specs]
    lora = _lora_cfg(lora_json)
    if lora is not None:  # dropout as configured: its mask and dropped input are saved too
        for module in modules:
            apply_lora(module, lora)
    params = [p for m in modules for p in m.parameters()]
    ids = torch.randint(0, model.vocab_size, (MEASURE_BATCH, MEASURE_SEQ))
    pos = torch.arange(MEASURE_SEQ).expand(MEASURE_BATCH, MEASURE_SEQ).contiguous()
    enter, hidden = saved_bytes(lambda: _run(specs[0], modules[0], (ids, pos)), params)
    block_in = _fresh_inputs(hidden)
    block, block_out = saved_bytes(lambda: _run(specs[1], modules[1], block_in), params)
    x = _fresh_inputs(block_out)

    def run_exit():
        y = x
        for spec, module in zip(specs[2:], modules[2:]):
            y = _run(spec, module, y)
        return y

    exit_, _ = saved_bytes(run_exit, params)
    tokens = MEASURE_BATCH * MEASURE_SEQ
    boundary = sum(t.numel() * t.element_size() for t in _tensors(block_out))
    return {"enter": enter / tokens, "block": block / tokens, "exit": exit_ / tokens, "boundary": boundary / tokens}


def scaled_config(hf_cfg: dict, div: int) -> dict:
    """`hf_cfg` with its widths divided by `div` and a small vocabulary (layer count kept: only the specs
    measured are built, and per-layer router statistics keep their real size)."""
    import models

    return models.resolve(hf_cfg).shrunk_config(div, MEASURE_VOCAB)


def width_divisors(hf_cfg: dict) -> list[int]:
    """Two divisors that keep every width an integer and head_dim a multiple of 4 (>= 8); [1] if small."""
    import models

    model = models.resolve(hf_cfg)
    if model.hidden_size <= EXACT_BELOW_HIDDEN:
        return [1]
    ok = [d for d in (16, 8, 4, 2) if all(w % d == 0 for w in model.widths)
          and model.head_dim % (4 * d) == 0 and model.head_dim // d >= 8]
    return ok[:2] if len(ok) >= 2 else [1]


@functools.lru_cache(maxsize=None)
def _measure_cached(cfg_json: str, precision: str, lora_json: str = "") -> tuple[tuple[str, float], ...]:
    hf_cfg = json.loads(cfg_json)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    divs = width_divisors(hf_cfg)
    samples = [(1.0 / d, measure_at_width(scaled_config(hf_cfg, d), dtype, lora_json)) for d in divs]
    if len(samples) == 1:
        return tuple(samples[0][1].items())
    (f1, y1), (f2, y2) = samples
    fitted = {}
    for key in y1:  # y = a + b * f, evaluated at f = 1 (the real width)
        b = (y1[key] - y2[key]) / (f1 - f2)
        fitted[key] = y1[key] + b * (1.0 - f1)
    return tuple(fitted.items())


def measure_bytes_per_token(hf_cfg: dict, precision: str, lora: dict | None = None) -> dict[str, float]:
    """{'enter', 'block', 'exit', 'boundary'}: bytes per token at the model's real width (see docstring);
    `lora` (a `LoraConfig.to_dict()`): measured with the adapters in place."""
    return dict(_measure_cached(_cfg_key(hf_cfg), "fp32" if precision == "fp32" else "bf16",
                                json.dumps(lora, sort_keys=True) if lora else ""))


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class StagePlan:
    stage: int
    layers: tuple[int, int]  # first and last logical layer
    blocks: int
    params: int
    resident_params: int
    in_flight: int
    weights: float  # all memory figures in bytes
    grads: float
    optim: float
    activations: float
    step: float
    host: float
    total: float = 0.0
    fits: bool = False
    trained_params: int = 0  # resident parameters the optimizer updates (all of them without LoRA)


@dataclass
class Plan:
    setup: Setup
    wrapper: str
    gpu_gib: float
    model_type: str
    parts: list[int]
    bytes_per_token: dict[str, float]
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(st.fits for st in self.stages)

    @property
    def gpus(self) -> int:
        return self.setup.pipe * self.setup.data


def resolve_stage_parts(hf_cfg: dict, setup: Setup) -> list[int]:
    import models
    from training.partition import resolve_parts

    return resolve_parts(setup.parts, models.resolve(hf_cfg).layer_flops(setup.seq), setup.pipe)


def stage_activations(s: int, blocks: int, has_enter: bool, has_exit: bool, setup: Setup,
                      per_token: dict[str, float], hidden: int, vocab: int) -> tuple[int, float]:
    """(micro-batches in flight, activation bytes) of stage `s` (see the module docstring)."""
    p, lp = setup.pipe, PRECISION_BYTES[setup.precision]
    tokens = setup.micro_batch * setup.seq
    n = min(p - s, setup.micro_batches)
    if setup.grad_ckpt:
        kept = n * tokens * blocks * hidden * lp + (tokens * per_token["block"] if blocks else 0)
    else:
        kept = n * tokens * blocks * per_token["block"]
    ends = n * tokens * (per_token["enter"] * has_enter + per_token["exit"] * has_exit)
    first, last = s == 0, s == p - 1
    boundary = tokens * per_token["boundary"] * (n * (not first) + n * (not last) + (not first) + (not last))
    logits = 0 if not last else tokens * vocab * (lp if setup.fused_head_loss else lp + 4 + 4)
    return n, kept + ends + boundary + logits


def zero_bucket_bytes(setup: Setup) -> float:
    """ZeRO-1's gradient-reduction bucket, per GPU whatever the stage size (`stage_1_and_2.py`): with a
    pipeline and contiguous gradients, `reduce_bucket_size` elements in the model dtype at init, plus the
    fp32 staging buffer of the same size it reduces through (measured: see docs/memory.md)."""
    if setup.zero_stage != 1:
        return 0.0
    return setup.reduce_bucket * (PRECISION_BYTES[setup.precision] + 4)


def plan_memory(hf_cfg: dict, setup: Setup, gpu_gib: float = 80.0) -> Plan:
    import models

    model = models.resolve(hf_cfg)
    parts = resolve_stage_parts(hf_cfg, setup)
    per_param = param_bytes(setup)
    per_token = measure_bytes_per_token(hf_cfg, setup.precision, setup.lora)
    num_blocks = model.num_blocks
    plan = Plan(setup, per_param.wrapper, gpu_gib, model.model_type, parts, per_token)
    start = 0
    stages = zip(resident_params(hf_cfg, parts, setup.lora), resident_params(hf_cfg, parts, setup.lora, True), parts,
                 stage_nf4(hf_cfg, parts, setup.lora))
    for s, ((own, resident), (_, trained), count, (nf4_numel, nf4_weight_bytes)) in enumerate(stages):
        logical = range(start, start + count)
        blocks = sum(1 for i in logical if 1 <= i <= num_blocks)
        n, act = stage_activations(s, blocks, 0 in logical, num_blocks + 1 in logical, setup, per_token,
                                   model.hidden_size, model.vocab_size)
        # Every resident parameter holds its weights; only trained ones (all, without LoRA) have gradients,
        # master copies, optimizer state and step temporaries (the trainer gives DeepSpeed no frozen one).
        st = StagePlan(s, (start, start + count - 1), blocks, own, resident, n,
                       weights=(resident - nf4_numel) * per_param.weights + nf4_weight_bytes,
                       grads=trained * per_param.grads + zero_bucket_bytes(setup),
                       optim=trained * per_param.optim, activations=act, step=trained * per_param.step,
                       host=trained * per_param.host, trained_params=trained)
        st.total = st.weights + st.grads + st.optim + max(st.activations, st.step)
        st.fits = st.total <= gpu_gib * GIB
        plan.stages.append(st)
        start += count
    return plan


def min_gpus(hf_cfg: dict, setup: Setup, gpu_gib: float = 80.0) -> Plan | None:
    """The plan with the fewest pipeline stages (`parts: auto`, same data-parallel size) whose stages all
    fit `gpu_gib`; None if even one layer per stage does not fit. Micro-batches per step stay as set."""
    import models

    max_stages = models.resolve(hf_cfg).num_pipeline_layers
    for pipe in range(1, max_stages + 1):
        plan = plan_memory(hf_cfg, _replace(setup, pipe=pipe, parts="auto"), gpu_gib)
        if plan.fits:
            return plan
    return None


def _replace(setup: Setup, **changes) -> Setup:
    return Setup(**{**asdict(setup), **changes})


# ----------------------------------------------------------------------------------------------
# Output


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else str(n)


def columns(gpu_gib: float) -> list[tuple[str, callable]]:
    return [("stage", lambda st: str(st.stage)),
            ("layers", lambda st: f"{st.layers[0]}-{st.layers[1]}"),
            ("params", lambda st: _count(st.resident_params)),
            ("weights", lambda st: _gib(st.weights)),
            ("grads", lambda st: _gib(st.grads)),
            ("optim", lambda st: _gib(st.optim)),
            ("activ", lambda st: _gib(st.activations)),
            ("step", lambda st: _gib(st.step)),
            ("total GiB", lambda st: _gib(st.total)),
            (f"fits {gpu_gib:g} GiB", lambda st: "yes" if st.fits else "NO"),
            ("host GiB", lambda st: _gib(st.host))]


def format_plan(plan: Plan) -> str:
    cols = columns(plan.gpu_gib)
    rows = [[name for name, _ in cols]] + [[get(st) for _, get in cols] for st in plan.stages]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    s = plan.setup
    worst = max(plan.stages, key=lambda st: st.total)
    own = sum(st.params for st in plan.stages)
    lines.append(f"all stages: {own:,} parameters, {_gib(sum(st.total for st in plan.stages))} GiB on "
                 f"{plan.gpus} GPUs ({s.pipe} stages x {s.data} replicas), worst stage {worst.stage}: "
                 f"{_gib(worst.total)} GiB -> {'fits' if plan.fits else 'does NOT fit'} {plan.gpu_gib:g} GiB; "
                 f"host per rank up to {_gib(max(st.host for st in plan.stages))} GiB")
    if s.lora:
        trained = sum(st.trained_params for st in plan.stages)
        resident = sum(st.resident_params for st in plan.stages)
        lines.append(f"LoRA r={s.lora['r']} alpha={s.lora['alpha']:g} on {', '.join(s.lora['target_modules'])}"
                     + (f" (+ full {', '.join(s.lora['modules_to_save'])})" if s.lora["modules_to_save"] else "")
                     + f": {trained:,} trained of {resident:,} resident parameters; frozen ones cost weights only"
                     + ("; base linears in 4-bit NF4 (~0.52 B/weight)" if s.lora.get("quantize") == "nf4" else ""))
    lines.append(f"assumptions: {plan.model_type}, {s.precision}, {s.optimizer} ({s.state_bytes} B/param of "
                 f"state), ZeRO {s.zero_stage}{' + CPU offload' if s.offload else ''} -> {plan.wrapper}; "
                 f"micro-batch {s.micro_batch} x seq {s.seq}, {s.micro_batches} micro-batches/step (1F1B), "
                 f"grad ckpt {'on' if s.grad_ckpt else 'off'}, parts {plan.parts}, logits "
                 f"{'chunked (negligible)' if s.fused_head_loss else 'full, fp32 loss'}; activations "
                 f"{plan.bytes_per_token['block']:.0f} B/token/block (measured, flash-like attention); "
                 f"CUDA context and allocator slack not included")
    return "\n".join(lines)


def plan_dict(plan: Plan) -> dict:
    stages = []
    for st in plan.stages:
        row = asdict(st)
        for key in ("weights", "grads", "optim", "activations", "step", "host", "total"):
            row[f"{key}_gib"] = row.pop(key) / GIB
        stages.append(row)
    return {"model_type": plan.model_type, "gpus": plan.gpus, "gpu_gib": plan.gpu_gib, "fits": plan.fits,
            "wrapper": plan.wrapper, "parts": plan.parts, "setup": asdict(plan.setup),
            "bytes_per_token": plan.bytes_per_token, "stages": stages,
            "total_gib": [st["total_gib"] for st in stages]}


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (the one train_ds.py takes)")
    p.add_argument("--gpus", type=int, default=None, help="plan for N GPUs: dims [N // data, data] or [N, 1]")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    p.add_argument("--min-gpus", action="store_true", help="find the fewest stages whose every stage fits")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args, rest = p.parse_known_args(argv)
    return args, parse_overrides(rest)


def build_plan(args, overrides) -> Plan | None:
    import models

    cfg = load_config(args.config, overrides)
    setup = setup_from_config(cfg, args.gpus)
    try:
        hf_cfg = models.read_hf_config(cfg.model.path)
        models.resolve(hf_cfg)
    except (models.ModelError, FileNotFoundError) as e:
        raise ConfigError(f"model_path: {e}") from None
    return min_gpus(hf_cfg, setup, args.gpu_gib) if args.min_gpus else plan_memory(hf_cfg, setup, args.gpu_gib)


def main(argv=None) -> int:
    try:
        args, overrides = parse_args(argv)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import; keep it parseable
            plan = build_plan(args, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if plan is None:
        msg = f"does not fit {args.gpu_gib:g} GiB cards at any number of stages"
        print(json.dumps({"fits": False, "min_gpus": None}) if args.json else msg)
        return 1
    if args.json:
        out = plan_dict(plan)
        if args.min_gpus:
            out["min_gpus"] = plan.gpus
        print(json.dumps(out, indent=1))
        return 0
    if args.min_gpus:
        print(f"min GPUs: {plan.gpus} ({plan.setup.pipe} stages x {plan.setup.data} replicas, parts auto)")
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
