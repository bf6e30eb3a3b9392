"""Where one optimizer step's time goes on this rank: `profile_step: N` in the YAML.

The step runs under `torch.profiler`; the rank writes `save_path/profile/rank{R}.txt` (the top operators
and kernels) and `rank{R}.json`: the step's wall time and the GPU time split into matmuls, attention,
communication (NCCL), other kernels, and idle (wall time with no kernel running on any stream: the
pipeline bubble, waiting for a peer, host overhead), plus the host time spent outside any kernel launch.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch

# Kernel name fragments -> category (first match wins); lower-case.
KERNEL_KINDS = (
    ("nccl", "comm"),
    ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"), ("sdpa", "attention"),
    ("gemm", "matmul"), ("nvjet", "matmul"), ("cutlass", "matmul"), ("xmma", "matmul"), ("matmul", "matmul"),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for frag, kind in KERNEL_KINDS if frag in low), "other")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(kernels: list[tuple[str, float, float]], wall_us: float) -> dict[str, Any]:
    """kernels: (name, start_us, end_us) of every device kernel in the step -> time split in ms."""
    by_kind: dict[str, float] = {}
    for name, a, b in kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + (b - a)
    busy = union_length([(a, b) for _, a, b in kernels])
    compute = union_length([(a, b) for name, a, b in kernels if kernel_kind(name) != "comm"])
    return {"wall_ms": wall_us / 1e3, "kernels_ms": {k: v / 1e3 for k, v in sorted(by_kind.items())},
            "busy_ms": busy / 1e3, "compute_busy_ms": compute / 1e3, "idle_ms": max(wall_us - busy, 0.0) / 1e3,
            "compute_share": compute / wall_us if wall_us else 0.0, "num_kernels": len(kernels)}


def profile_call(fn: Callable[[], Any], out_dir: str, rank: int, device: torch.device, extra: dict | None = None):
    """Run `fn()` under the profiler, write rank{R}.txt/.json under `out_dir`, return fn's result."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if cuda and e.device_type == torch.autograd.DeviceType.CUDA]
    summary = {"rank": rank, **(extra or {}), **summarize(kernels, wall_us)}
    os.makedirs(out_dir, exist_ok=True)
    sort_by = "cuda_time_total" if cuda else "cpu_time_total"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(json.dumps(summary, indent=1) + "\n\n")
        f.write(prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=60))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)
    return result
