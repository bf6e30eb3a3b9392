"""What a trainer strategy is: the methods `training.loop.train`, `training.setup.plan_run`, the evaluator and the
checkpoint code call, implemented by `training.pipeline.PipelineTrainer` and `training.zero.ZeroTrainer`.

A new way to run the model (another DeepSpeed engine, another parallelism) is one class that satisfies `Trainer`;
the loop, the plan, checkpoints, eval and metrics come with it.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from training.ds.engine import EngineView
from utils.config import TrainConfig


@runtime_checkable
class Trainer(Protocol):
    name: str  # 'pipeline' or 'zero': written into every checkpoint; resume refuses another trainer's
    engine_view: EngineView | None  # after build: this step's lr, checkpoint save/load
    reporter: bool  # this rank writes metrics.jsonl and the progress bar (after build)
    stage: int  # pipeline stage of this rank (0 for ZeRO)
    dp_rank: int  # data-parallel rank

    # -- before any process group (training.setup.plan_run): every user error surfaces here
    def check(self, cfg: TrainConfig, world: int) -> None:
        """Refuse (ConfigError) what this trainer cannot run with `world` processes."""

    def dims(self, cfg: TrainConfig, world: int) -> list[int]:
        """`[pipeline stages, data-parallel replicas]`, product `world` (training.plan.plan takes it)."""

    def prepare_model(self, cfg: TrainConfig, resuming: bool) -> Any:
        """The model plan (resolved layers and partition, or the HF config and attention), checked on the
        meta device; it has `vocab_size` and `transform_lines`."""

    # -- the engine
    def build(self, cfg: TrainConfig, plan, device: torch.device, rank: int) -> None:
        """Build the model, hand `plan.ds` to `deepspeed.initialize`, set engine_view / reporter / stage / dp_rank."""

    def make_feeder(self, cfg: TrainConfig, plan, device):
        """Training micro-batches from `plan.dataset`, resumable at a step."""

    def make_eval_feeder(self, cfg: TrainConfig, plan, eval_plan, device):
        """Eval micro-batches of `plan.eval_dataset` (None on ranks that feed nothing)."""

    def flops_per_token(self, cfg: TrainConfig, plan) -> float:
        """Training FLOPs per token per GPU (for TFLOP/s in metrics.jsonl)."""

    # -- per optimizer step
    def step(self, feeder) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; the mean loss."""

    def eval_chunk(self, batches, k: int) -> float:
        """Summed eval loss of up to `k` micro-batches."""

    def step_metrics(self) -> dict:
        """Extra metrics.jsonl fields of this step (e.g. expert load)."""

    def grad_norm(self) -> float | None:
        """The global gradient norm of this step before clipping (None where unknown)."""

    # -- checkpoints
    def save_extras(self, cfg: TrainConfig, plan, tag_dir: str, final: bool) -> None:
        """Files beside DeepSpeed's in checkpoint `tag_dir` (model files; ZeRO's HF export in the final one)."""

    def checkpoint_info(self) -> dict:
        """What the COMPLETE marker records about this trainer's run."""
