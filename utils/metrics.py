"""Throughput accounting, one JSON line per optimizer step, and rank-prefixed logging."""
from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch


def log(msg: str, rank: int | None = None) -> None:
    """One line per event, prefixed with the global rank so interleaved ranks stay readable."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def flops_per_token(num_params_no_embed: float, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·h·s (attention counted causal-unaware, as usual)."""
    return 6.0 * num_params_no_embed + 12.0 * num_layers * hidden * seq_len


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_rank_stats(save_path: str, rank: int, stats: dict) -> None:
    """`save_path/rank_stats/rank{R}.json`: one file per rank (peak memory of every GPU / stage)."""
    from utils.checkpoint import atomic_write_text

    out = os.path.join(save_path, "rank_stats")
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, f"rank{rank}.json"), json.dumps(stats))


def drop_rows_after(path: str, step: int) -> int:
    """Before a run resumed at `step` appends to `path` (metrics.jsonl): rewrite it keeping only the rows of
    steps <= `step`, so that the steps the crashed run wrote after its checkpoint are not there twice.
    Rows without a `step` are kept; a line that is no JSON object (a row cut by the crash) is dropped. The
    new file replaces the old one atomically (temp file + os.replace). Returns how many lines were dropped."""
    from utils.checkpoint import atomic_write_text

    if not os.path.exists(path):
        return 0
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        row_step = row.get("step")
        if isinstance(row_step, (int, float)) and not isinstance(row_step, bool) and row_step > step:
            continue
        kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped or (text and not text.endswith("\n")):  # also a last row cut just before its newline
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsWriter:
    """Appends to `save_path/metrics.jsonl` (never truncates, so a resumed run continues the file; the
    resume drops the rows written after its checkpoint first: `drop_rows_after`)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f = open(path, "a", buffering=1)

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._f.close()


def step_row(step, epoch, loss, lr, norm, skipped, dt, feeder, tbs, dp, flops_per_token_per_gpu, peak_gib) -> dict:
    """One metrics.jsonl line, the same for both trainers. Token counts are this replica's times `dp`
    (replicas see equal shapes)."""
    tokens = feeder.last_step_tokens * dp
    return {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
            "grad_norm": norm if norm is not None and math.isfinite(norm) else None, "skipped": skipped,
            "samples_per_s": tbs / dt, "tokens_per_s": tokens / dt,
            "trained_tokens_per_s": feeder.last_step_trained * dp / dt,
            "tflops_per_gpu": flops_per_token_per_gpu * tokens / dt / 1e12, "step_time_s": dt,
            "peak_mem_gib": peak_gib}
