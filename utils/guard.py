"""Never train on NaN: measure the global gradient norm before every optimizer step, skip bad steps.

DeepSpeed's fp16 path has its own loss scaler (overflow -> skipped step, smaller scale); for bf16 and
fp32 nothing stops a NaN/Inf gradient from reaching the weights, so we wrap the optimizer's `step`.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class BadStepsError(RuntimeError):
    pass


class StepGuard:
    """Wraps `optimizer.step`: computes the gradient 2-norm over all pipeline stages (the data-parallel
    replicas hold identical gradients after the all-reduce), skips the step when it is not finite and
    raises `BadStepsError` after `max_bad_steps` consecutive skipped steps."""

    def __init__(self, optimizer, params, pipe_group, max_bad_steps: int):
        self.params = [p for p in params if p.requires_grad and not getattr(p, "ds_pipe_replicated", False)]
        self.pipe_group, self.max_bad_steps = pipe_group, max_bad_steps
        self.optimizer = optimizer
        self.inner_step = optimizer.step
        self.last_norm: float | None = None
        self.bad_in_a_row = 0
        self.skipped = 0
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
            self.bad_in_a_row = 0
            return self.inner_step(*args, **kwargs)
        self.bad_in_a_row += 1
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_in_a_row > self.max_bad_steps:
            raise BadStepsError(f"{self.bad_in_a_row} consecutive steps with a non-finite gradient norm "
                                f"(max_bad_steps: {self.max_bad_steps}); stopping without applying them")
        return None
