"""`python -m utils.plot SAVE_PATH`: loss, learning rate and throughput curves from metrics.jsonl to PNG."""
from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"), ("tflops_per_gpu", "TFLOP/s per GPU"))


def read_metrics(save_path: str, missing_ok: bool = False) -> list[dict]:
    """The rows of `save_path/metrics.jsonl` (blank lines skipped). No file: FileNotFoundError, or [] with
    `missing_ok` (benchmarks read runs that may have died before their first step)."""
    path = os.path.join(save_path, "metrics.jsonl")
    if not os.path.isfile(path):
        if missing_ok:
            return []
        raise FileNotFoundError(f"no metrics.jsonl in {save_path}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.4 * len(PANELS)), sharex=True)
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes, PANELS):
        ax.plot(steps, [r.get(key) for r in rows], lw=1.2)
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
        rows = read_metrics(a.save_path)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = a.out or os.path.join(a.save_path, "metrics.png")
    plot(rows, out)
    print(f"wrote {out} ({len(rows)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
