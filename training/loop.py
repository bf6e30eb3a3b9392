"""The step loop of both trainers: plan, build, resume, then per optimizer step the trainer's `step`, the
bad-step guard, one metrics.jsonl row and the progress bar (on the reporting rank), a periodic checkpoint,
and a clean stop when any rank got SIGINT/SIGTERM; every `eval_interval` steps and after the last one the
eval loss (training/evaluate.py); at the end rank stats and the final checkpoint."""
from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING

from training import evaluate
from training.checkpoints import load_checkpoint, save_checkpoint
from training.setup import plan_run
from utils.config import TrainConfig
from utils.metrics import log

if TYPE_CHECKING:
    from training.strategy import Trainer


def train(cfg: TrainConfig, trainer: Trainer) -> int:
    import torch.distributed as dist

    from training.distributed import init_distributed
    from training.guard import BadStepCounter
    from utils import preempt
    from utils.run_fingerprint import DataWatch
    from utils.metrics import MetricsWriter, peak_mem_gib, step_row, write_rank_stats

    plan = plan_run(cfg, trainer)  # everything a user can get wrong, before the first collective
    device = init_distributed()
    rank = dist.get_rank()
    trainer.build(cfg, plan, device, rank)
    view = trainer.engine_view  # this step's lr, not the engine (training/ds/engine.py)
    fp16 = cfg.precision == "fp16"  # fp16's loss scaler skips an overflowed step itself: no bad step
    step = load_checkpoint(cfg, trainer, plan.resume_tag, rank) if cfg.checkpoint.resume else 0
    feeder = trainer.make_feeder(cfg, plan, device)
    flops_per_token_per_gpu = trainer.flops_per_token(cfg, plan) / plan.world
    evaluator = evaluate.Evaluator(cfg, plan, trainer, device) if plan.eval_dataset is not None else None
    shown_eval = {}  # the last eval loss, in the progress bar
    bad_steps = BadStepCounter(cfg.schedule.max_bad_steps)
    watch = DataWatch(list(plan.data_identity or {}), plan.data_identity)  # a data file rewritten mid-run
    metrics = bar = None
    if trainer.reporter:
        from tqdm import tqdm
        metrics = MetricsWriter(os.path.join(cfg.checkpoint.save_path, "metrics.jsonl"))
        bar = tqdm(total=plan.total_steps, initial=step, desc=f"[rank {rank}] train", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    spe, total_steps = plan.steps_per_epoch, plan.total_steps
    if rank == 0:
        log(f"{len(plan.dataset)} samples, {spe} steps/epoch x {cfg.schedule.n_epoches} epochs (global batch "
            f"{plan.tbs} = micro {plan.mbs} x accum {plan.gas} x dp {plan.dp}; {len(plan.dataset) - spe * plan.tbs} "
            f"samples/epoch left over); {total_steps} steps", rank)
        if evaluator is not None:
            log(f"eval: {len(plan.eval_dataset)} samples, {evaluator.plan.micro_batches} micro-batches per "
                f"data-parallel rank, every {cfg.eval.interval or total_steps} steps and at the end", rank)
    epoch = step // spe
    while step < total_steps:
        if feeder is not None:
            feeder.start_epoch(epoch, step - epoch * spe)
        for _ in range(step - epoch * spe, spe):
            lr = view.lr()  # this step's: DeepSpeed steps the scheduler after the optimizer
            t0 = time.perf_counter()
            if step + 1 == cfg.schedule.profile_step:
                from utils.profile import profile_call
                loss = profile_call(lambda: trainer.step(feeder), os.path.join(cfg.checkpoint.save_path, "profile"),
                                    rank, device, {"stage": trainer.stage, "step": step + 1})
            else:
                loss = trainer.step(feeder)
            dt = time.perf_counter() - t0
            extra = trainer.step_metrics()
            step += 1
            norm = trainer.grad_norm()
            skipped = not fp16 and norm is not None and not math.isfinite(norm)
            if skipped and rank == 0:
                log(f"step {step}: loss {loss}, gradient norm {norm}: optimizer step skipped", rank)
            if metrics is not None:
                row = step_row(step, epoch, loss, lr, norm, skipped, dt, feeder, plan.tbs, plan.dp,
                               flops_per_token_per_gpu, peak_mem_gib(device))
                row.update(extra)
                metrics.write(row)
                postfix = dict(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.2f}",
                               tps=f"{row['tokens_per_s']:.0f}", tflops=f"{row['tflops_per_gpu']:.1f}")
                bar.set_postfix(**postfix, **shown_eval)
                bar.update(1)
            if not fp16:
                bad_steps.update(step, norm)  # raises BadStepsError past max_bad_steps in a row
            if step < total_steps and (changed := watch.changed()):
                preempt.request(preempt.DATA_CHANGED, changed)
            stop = preempt.agreed(device) if step < total_steps else 0  # a signal on any rank: all stop now
            interval = cfg.checkpoint.save_interval
            if step < total_steps and (stop or interval and step % interval == 0):
                save_checkpoint(cfg, trainer, plan, f"global_step{step}", step, epoch)
            if stop:
                if bar is not None:
                    bar.close()
                raise preempt.Stopped(stop, step, os.path.join(cfg.checkpoint.save_path, f"global_step{step}"))
            if evaluator is not None and evaluate.due(cfg, step, total_steps):
                row = evaluator.run(step)
                if metrics is not None:
                    metrics.write(row)
                    shown_eval = {"eval_loss": "n/a" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"}
                    bar.set_postfix(**postfix, **shown_eval)
            if step >= total_steps:
                break
        else:
            epoch += 1
    if bar is not None:
        bar.close()
    write_rank_stats(cfg.checkpoint.save_path, rank, {"rank": rank, "stage": trainer.stage, "dp_rank": trainer.dp_rank,
                                              "steps": step, "peak_mem_gib": peak_mem_gib(device),
                                              "trainer": trainer.name})
    if cfg.checkpoint.save_final:
        save_checkpoint(cfg, trainer, plan, "checkpoint_final", step, epoch, final=True)
    if metrics is not None:
        metrics.close()
    final = f", final checkpoint {cfg.checkpoint.save_path}/checkpoint_final" if cfg.checkpoint.save_final else ""
    log(f"done: {step} steps{final}", rank)
    return 0
