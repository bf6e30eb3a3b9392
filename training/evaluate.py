"""Held-out loss: `eval_data_path` (or the `eval_ratio` share of `data_path`) every `eval_interval` steps and at
the end, one metrics.jsonl row `{"step", "eval_loss", "eval_tokens"}` per evaluation on the reporting rank.

The eval loss is the token-weighted mean cross entropy over the whole eval set: sum of per-token CE over
every eval sample exactly once (split over the data-parallel replicas, data.batching.EvalPlan) divided by
the number of trained tokens. It is CE alone: the z-loss (`aux_max_z_loss.weight`) and a mixture-of-experts
load-balancing term are training regularisers and are left out, so the figure compares with any other
evaluation of the same model (e.g. `models.load_sequential` + cross entropy). The trainers' `eval_chunk`
runs the forward passes: the pipeline through `PipelineEngine.eval_batch`, ZeRO under `torch.no_grad`.
"""
from __future__ import annotations

from utils.config import TrainConfig


def eval_loss_fn(loss_fn):
    """The CE-only loss for the outputs that `loss_fn` (a family's training loss) receives.

    `CausalLMLoss` takes logits or the fused `(hidden, head weight)`; a loss that wraps one as `.ce` (the
    MoE loss) receives a tuple led by what its `.ce` takes. Any other loss is used as trained."""
    from models.common import CausalLMLoss

    ce = CausalLMLoss(0.0)
    if isinstance(loss_fn, CausalLMLoss):
        return ce
    if isinstance(getattr(loss_fn, "ce", None), CausalLMLoss):
        def wrapped_ce(outputs, labels):
            return ce(outputs[0], labels)
        wrapped_ce.__name__ = "eval_ce"
        return wrapped_ce
    return loss_fn


def due(cfg: TrainConfig, step: int, total_steps: int) -> bool:
    """Evaluate after this step: every `eval_interval` steps (0: never in between) and after the last one."""
    return step >= total_steps or bool(cfg.eval.interval) and step % cfg.eval.interval == 0


class Evaluator:
    """Runs one evaluation on every rank; `run(step)` returns the metrics row (valid on the reporting rank)."""

    def __init__(self, cfg: TrainConfig, plan, trainer, device):
        from data.batching import EvalPlan

        self.trainer = trainer
        self.plan = EvalPlan(len(plan.eval_dataset), plan.mbs, trainer.dp_rank, plan.dp)
        self.feeder = trainer.make_eval_feeder(cfg, plan, self.plan, device)

    def run(self, step: int) -> dict:
        """Every rank calls it at the same step. Sum over calls of (call loss x call tokens) / tokens; `eval_loss`
        None when no eval sample has a trained token (all truncated away)."""
        weighted, tokens = 0.0, 0
        if self.feeder is not None:
            self.feeder.start()
        for k in self.plan.chunks():
            batches = self.feeder.chunk(k) if self.feeder is not None else None
            loss = self.trainer.eval_chunk(batches, k)
            n = self.feeder.tokens if self.feeder is not None else 0
            weighted += loss * n
            tokens += n
        return {"step": step, "eval_loss": weighted / tokens if tokens else None, "eval_tokens": tokens}
