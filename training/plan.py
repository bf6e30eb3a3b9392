"""The run plan: what a run is, derived once from the validated config and its process grid, reading no file.

`plan(cfg, dims)` is pure: the same config and `[pipe, data]` give the same `RunPlan` on every rank, in the
trainers (`training.setup.plan_run` wraps it with what needs files: tokenizer, data, resume point), in the
memory planner (`tools/memory.py`) and in the benchmarks. Batch geometry, the DeepSpeed dict handed to
`deepspeed.initialize` and LoRA are decided here (precision: `TrainConfig.precision`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from utils.config import TrainConfig, resolve_batch


DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # of `TrainConfig.precision`


@dataclass(frozen=True)
class RunPlan:
    """A run's shape. `ds` is a new dict (never the config's): the config's DeepSpeed keys with the batch sizes
    resolved into them and the speed defaults the user left unset (`speed_defaults`, as `key: value` strings);
    `total_num_steps: auto` is filled once the data is counted (`training.setup.fill_scheduler_steps`)."""
    pipe: int  # pipeline stages (1 for the ZeRO trainer)
    dp: int  # data-parallel replicas
    tbs: int  # samples (rows when packing) per optimizer step, all replicas
    mbs: int  # micro-batch per replica
    gas: int  # micro-batches per optimizer step per replica
    precision: str  # 'bf16', 'fp16' or 'fp32'
    ds: Mapping[str, Any]
    speed_defaults: tuple[str, ...]
    lora: Any  # models.lora.LoraConfig, None: full fine-tuning
    zero_stage: int
    offload_optimizer: bool  # zero_optimization.offload_optimizer.device is set (not none)


def plan(cfg: TrainConfig, dims: tuple[int, int] | list[int]) -> RunPlan:
    """The plan of `cfg` on a `[pipe, data]` grid (`trainer.dims(cfg, world)`; the memory planner's `--gpus`)."""
    pipe, dp = dims
    ds = copy.deepcopy(dict(cfg.ds))
    applied = tuple(speed_defaults(ds))
    tbs, mbs, gas = resolve_batch(ds, dp)
    zero = ds.get("zero_optimization") or {}
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower() not in ("none", "")
    return RunPlan(pipe=pipe, dp=dp, tbs=tbs, mbs=mbs, gas=gas, precision=cfg.precision, ds=ds,
                   speed_defaults=applied, lora=lora_config(cfg), zero_stage=int(zero.get("stage", 0) or 0),
                   offload_optimizer=offload)


def lora_config(cfg: TrainConfig):
    """The run's `models.lora.LoraConfig`, or None for full fine-tuning (no `lora:` section)."""
    if not cfg.lora.enabled:
        return None
    from models.lora import LoraConfig

    lora = cfg.lora
    alpha = lora.alpha if lora.alpha is not None else lora.r
    return LoraConfig.from_dict({"r": lora.r, "alpha": alpha, "dropout": lora.dropout,
                                 "target_modules": lora.target_modules, "modules_to_save": lora.modules_to_save,
                                 "quantize": lora.quantize})


def speed_defaults(ds: dict) -> list[str]:
    """DeepSpeed settings we change where the user left them unset; returns the `key: value` strings set.

    `bf16.immediate_grad_update: true`: each bf16 gradient goes into its fp32 buffer as soon as backward makes
    it, and is freed. DeepSpeed's default (false) zeroes the bf16 gradients at the start of every backward and
    lets autograd add into them: slower (one H200, 8x7B MoE width: 7 % of the step), and it zeroes the
    LM head's gradient after the fused head loss has written it (`PipelineTrainer.check` refuses that pair).
    """
    applied = []
    bf16 = ds.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") and "immediate_grad_update" not in bf16:
        bf16["immediate_grad_update"] = True
        applied.append("bf16.immediate_grad_update: true")
    return applied
