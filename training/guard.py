"""Never train on NaN: measure the global gradient norm before every optimizer step, skip bad steps.

DeepSpeed's fp16 path has its own loss scaler (overflow -> skipped step, smaller scale); for bf16 and
DeepSpeed's bf16 optimizer skips a step whose gradient norm is not finite; for fp32 nothing stops a
NaN/Inf gradient from reaching the weights, so we wrap the optimizer's `step`. `BadStepCounter`
stops the run after `max_bad_steps` consecutive skipped steps in both cases.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite gradient norm: the run stops (exit 3)."""


class StepGuard:
    """Wraps `optimizer.step` of an fp32 pipeline: computes the gradient 2-norm over all pipeline stages
    (the data-parallel replicas hold identical gradients after the all-reduce), skips the step when it
    is not finite, and clips to `max_norm` by that global norm.

    DeepSpeed's own fp32 clipping counts only the first stage's gradients in a pipeline (parameters
    on other stages are not marked model-parallel), so the trainer turns it off and clips here.
    """

    def __init__(self, optimizer, params, pipe_group, max_norm: float = 0.0):
        self.params = [p for p in params if p.requires_grad and not getattr(p, "ds_pipe_replicated", False)]
        self.pipe_group, self.max_norm = pipe_group, max_norm
        self.optimizer = optimizer
        self.inner_step = optimizer.step
        self.last_norm: float | None = None
        optimizer.step = self.step

    def grad_norm(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        dev = grads[0].device if grads else torch.device("cpu")
        sq = torch.zeros(1, dtype=torch.float32, device=dev)
        for g in grads:
            sq += g.detach().float().pow(2).sum()
        dist.all_reduce(sq, group=self.pipe_group)
        return math.sqrt(sq.item())

    def step(self, *args, **kwargs):
        self.last_norm = self.grad_norm()
        if math.isfinite(self.last_norm):
            if self.max_norm > 0 and self.last_norm > self.max_norm:
                coef = self.max_norm / (self.last_norm + 1e-6)
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            return self.inner_step(*args, **kwargs)
        return None  # DeepSpeed zeroes the gradients after every step, applied or not


class BadStepCounter:
    """Counts consecutive steps whose gradient norm was not finite (and so were skipped)."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.in_a_row = 0
        self.total = 0

    def update(self, step: int, grad_norm: float | None) -> bool:
        """True when this step was bad; raises BadStepsError past the limit."""
        if grad_norm is None or math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.max_bad_steps:
            raise BadStepsError(f"step {step}: {self.in_a_row} consecutive steps with a non-finite gradient "
                                f"norm (max_bad_steps: {self.max_bad_steps}); stopped, none of them was applied")
        return True
