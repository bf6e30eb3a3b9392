"""`python -m utils.plot SAVE_PATH`: loss (and eval loss), learning rate and throughput curves from
metrics.jsonl to PNG.

metrics.jsonl holds two kinds of rows: one per optimizer step (`loss`, `lr`, throughput, ...) and one per
evaluation (`{"step", "eval_loss", "eval_tokens"}`, training/evaluate.py). `read_metrics` returns the step rows
(what the benchmarks average), `read_evals` the evaluation rows."""
from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"), ("tflops_per_gpu", "TFLOP/s per GPU"))


def read_metrics(save_path: str, missing_ok: bool = False) -> list[dict]:
    """The step rows (those with a `loss`) of `save_path/metrics.jsonl`; see read_rows."""
    return [r for r in read_rows(save_path, missing_ok) if "loss" in r]


def read_evals(save_path: str, missing_ok: bool = False) -> list[dict]:
    """The evaluation rows (`step`, `eval_loss`, `eval_tokens`) of `save_path/metrics.jsonl`."""
    return [r for r in read_rows(save_path, missing_ok) if "eval_loss" in r]


def read_rows(save_path: str, missing_ok: bool = False) -> list[dict]:
    """All rows of `save_path/metrics.jsonl` (blank lines skipped). No file: FileNotFoundError, or [] with
    `missing_ok` (benchmarks read runs that may have died before their first step)."""
    path = os.path.join(save_path, "metrics.jsonl")
    if not os.path.isfile(path):
        if missing_ok:
            return []
        raise FileNotFoundError(f"no metrics.jsonl in {save_path}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def expert_load_series(rows: list[dict]) -> dict[str, list[list[float | None]]]:
    """Mixture-of-experts step rows -> {"max": per MoE block, its largest expert share at every step, "min": the
    smallest}; {} when no row has `expert_load_max` (dense families)."""
    rows = [r for r in rows if "loss" in r]
    width = max((len(r.get("expert_load_max") or []) for r in rows), default=0)
    if not width:
        return {}
    return {kind: [[(r.get(f"expert_load_{kind}") or [None] * width)[j] for r in rows] for j in range(width)]
            for kind in ("max", "min")}


def plot(rows: list[dict], out: str) -> None:
    """`rows` as in metrics.jsonl: step rows draw every panel; evaluation rows add `eval_loss` (markers) to the
    loss panel. Mixture-of-experts runs get one more panel: per MoE block, the largest (solid) and smallest
    (dotted) share of that block's top-k assignments taken by one expert (balanced: both at 1/E)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = expert_load_series(rows)
    panels = PANELS + ((("expert_load", "expert load share\n(max, min per block)"),) if experts else ())
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True)
    evals = [r for r in rows if "eval_loss" in r and r["eval_loss"] is not None]
    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        if key == "expert_load":
            colors = plt.cm.viridis([j / max(1, len(experts["max"]) - 1) for j in range(len(experts["max"]))])
            for color, high, low in zip(colors, experts["max"], experts["min"]):
                ax.plot(steps, high, lw=0.8, color=color)
                ax.plot(steps, low, lw=0.8, ls=":", color=color)
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            continue
        ax.plot(steps, [r.get(key) for r in rows], lw=1.2, label="train" if key == "loss" else None)
        if key == "loss" and evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=4, lw=1.0, label="eval")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("save_path")
    p.add_argument("--out", help="PNG path (default SAVE_PATH/metrics.png)")
    a = p.parse_args(argv)
    try:
        rows = read_rows(a.save_path)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = a.out or os.path.join(a.save_path, "metrics.png")
    plot(rows, out)
    evals = sum("eval_loss" in r for r in rows)
    print(f"wrote {out} ({len(rows) - evals} steps" + (f", {evals} evaluations)" if evals else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
