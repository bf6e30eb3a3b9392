"""FP8 loss parity: the same real-text training run in bf16 and with each FP8 recipe, per-step losses compared.

    python benchmarks/fp8_parity.py --gpus 1                          # llama-3-8b width, 4 blocks, 300 steps
    python benchmarks/fp8_parity.py --gpus 1 --recipes tensorwise      # one 10-minute call: bf16 + one recipe;
    python benchmarks/fp8_parity.py --gpus 1 --recipes rowwise         #   a later call reuses the bf16 run
    python benchmarks/fp8_parity.py --cpu-smoke                       # the whole orchestration on CPU (emulated FP8)

Text: whatever real text the host has, no download: the source files (docstrings and comments included) of an
installed Python package (`--text-package`, default transformers; `.py`, `.md`, `.rst`, `.txt`), cut into pieces of
`--chars` characters as `pretrain` samples (a JSONL in the work dir), a byte-level BPE tokenizer trained on them
(`--vocab`). Model: the llama-3-8b width (hidden 4096, intermediate 14336, GQA 32/8 heads) with `--blocks` blocks, the
tokenizer's vocabulary, random init (`from_scratch`), bf16, seq `--seq`, global batch `--global-batch`, AdamW lr
`--lr` with 20 warm-up steps, `train_ds.py` with dims [gpus, 1]. Runs: `bf16` (no fp8 section), then one per recipe
(`fp8: {recipe: R}`; CPU smoke adds `emulate: true`). Reported per FP8 run: final loss (mean of the last 20 steps)
against bf16's (target within 1 %), the largest per-step relative difference, and tokens/s against bf16's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import families, launch, workload  # noqa: E402
from benchmarks import run as pairs  # noqa: E402

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt")
TAIL = 20  # steps averaged for the final loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="GPUs = pipeline stages (default: all visible)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; CPU smoke 4)")
    p.add_argument("--blocks", type=int, default=None, help="blocks (default 4; CPU smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; CPU smoke 64)")
    p.add_argument("--global-batch", type=int, default=None, help="samples per step (default 16; CPU smoke 4)")
    p.add_argument("--mbs", type=int, default=None, help="micro-batch per GPU (default 2)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default 16384; CPU smoke 512)")
    p.add_argument("--chars", type=int, default=None, help="characters per sample (default 8000; CPU smoke 400)")
    p.add_argument("--text-package", default="transformers", help="installed package whose files are the text")
    p.add_argument("--max-text-mb", type=float, default=60.0, help="stop collecting text after this many MB")
    p.add_argument("--timeout", type=float, default=560, help="seconds per run before it is killed")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/fp8-parity-HOST-DATE.json)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny width, fp32, 2 CPU ranks, emulated FP8")
    return p.parse_args(argv)


def collect_text(package: str, max_bytes: float, chars: int, limit: int | None = None) -> list[str]:
    """Pieces of `chars` characters of the package's text files, in path order (deterministic)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--text-package: {package} is not an installed package")
    root = list(spec.submodule_search_locations)[0]
    pieces, total = [], 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(TEXT_SUFFIXES):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            for start in range(0, len(text) - chars // 4, chars):
                pieces.append(text[start:start + chars])
            total += len(text)
            if total >= max_bytes or (limit and len(pieces) >= limit):
                return pieces[:limit] if limit else pieces
    return pieces


def write_inputs(args, smoke: bool, work_dir: str) -> dict:
    from models.tiny import train_tiny_tokenizer

    chars = args.chars or (400 if smoke else 8000)
    pieces = collect_text(args.text_package, args.max_text_mb * 1e6, chars, limit=64 if smoke else None)
    data = os.path.join(work_dir, "text.jsonl")
    with open(data, "w") as f:
        for piece in pieces:
            f.write(json.dumps({"type": "pretrain", "text": piece}) + "\n")
    model_dir = os.path.join(work_dir, "model")
    vocab = args.vocab or (512 if smoke else 16384)
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        train_tiny_tokenizer(model_dir, vocab_size=vocab, texts=pieces[:1000])  # (repeated 4x inside)
    blocks = args.blocks or (2 if smoke else 4)
    cfg = families.family_config("llama3", released=not smoke, blocks=blocks, seq=args.seq or (64 if smoke else 2048))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return {"data": data, "samples": len(pieces), "chars": chars, "model_dir": model_dir, "model_config": cfg,
            "package": args.text_package}


def run_yaml(args, smoke: bool, inputs: dict, gpus: int, recipe: str | None, work_dir: str) -> str:
    steps = args.steps or (4 if smoke else 300)
    gb = args.global_batch or (4 if smoke else 16)
    work = workload.Workload("fp8-parity", {}, gb, bf16=not smoke, steps=steps, warmup=0, lr=args.lr)
    cfg = workload.trainer_config("pipeline", work, inputs["model_dir"], gpus, dims=[gpus, 1])
    cfg.update(synthetic_data=False, data_path=inputs["data"], max_seq_len=args.seq or (64 if smoke else 2048),
               train_micro_batch_size_per_gpu=args.mbs or 2, n_epoches=100, num_workers=2,
               save_path=os.path.join(work_dir, "runs", recipe or "bf16"))
    cfg["scheduler"] = {"type": "WarmupCosineLR", "params": {"warmup_num_steps": min(20, max(steps // 5, 1)),
                                                             "total_num_steps": "auto"}}
    if recipe:
        cfg["fp8"] = {"recipe": recipe, **({"emulate": True} if smoke else {})}
    path = os.path.join(work_dir, "configs", f"{recipe or 'bf16'}.yml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def read_losses(save_path: str) -> list[dict]:
    path = os.path.join(save_path, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def compare(ref: list[dict], got: list[dict]) -> dict:
    """Final loss (mean of the last TAIL steps) of `got` relative to `ref`, the largest per-step relative difference,
    and the tokens/s ratio over the steps after the first 5."""
    n = min(len(ref), len(got))
    if not n:
        return {}
    tail = min(TAIL, n)
    final_ref = sum(r["loss"] for r in ref[n - tail:n]) / tail
    final_got = sum(r["loss"] for r in got[n - tail:n]) / tail
    per_step = max(abs(g["loss"] - r["loss"]) / abs(r["loss"]) for r, g in zip(ref[:n], got[:n]))

    def tps(rows):
        rows = rows[5:n] or rows[:n]
        return sum(r.get("tokens_per_s", 0.0) for r in rows) / len(rows)

    return {"steps": n, "final_loss_bf16": final_ref, "final_loss": final_got,
            "final_rel_diff": (final_got - final_ref) / final_ref, "max_step_rel_diff": per_step,
            "tokens_per_s_ratio": tps(got) / tps(ref) if tps(ref) else None, "within_1pct": abs(final_got - final_ref)
            <= 0.01 * final_ref}


def markdown(result: dict) -> str:
    lines = [f"# FP8 loss parity {result['host']} {result['date']} ({result['mode']})", "",
             f"Text: {result['inputs']['samples']} pieces of {result['inputs']['chars']} characters of the "
             f"`{result['inputs']['package']}` package's files; model: "
             f"{'llama-3-8b width' if result['mode'] == 'gpu' else 'tiny llama'}, "
             f"{result['inputs']['model_config'].get('num_hidden_layers')} blocks, random init; "
             f"{result['steps']} steps.", "",
             "| run | status | final loss (last 20) | vs bf16 | max per-step diff | tokens/s vs bf16 |",
             "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        c = r.get("compare") or {}
        if name == "bf16" and r.get("losses"):
            tail = r["losses"][-TAIL:]
            c = {"final_loss": sum(tail) / len(tail)}
        lines.append(f"| {name} | {r['status']} | {families._num(c.get('final_loss'), '.4f')} | "
                     f"{families._num(100 * c['final_rel_diff'] if 'final_rel_diff' in c else None, '+.2f')} % | "
                     f"{families._num(100 * c['max_step_rel_diff'] if 'max_step_rel_diff' in c else None, '.2f')} % | "
                     f"{families._num(c.get('tokens_per_s_ratio'), '.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    host, date = pairs.host_and_date()
    smoke = args.cpu_smoke
    work_dir = os.path.abspath(args.work_dir or os.path.join(ROOT, "benchmarks", "work", f"fp8-parity-{host}-{date}"))
    os.makedirs(work_dir, exist_ok=True)
    gpus = args.gpus or (2 if smoke else families.visible_gpus())
    if gpus < 1:
        raise SystemExit("no GPU visible: pass --gpus N on a GPU host, or --cpu-smoke")
    out = os.path.abspath(args.out or (os.path.join(work_dir, "results", f"fp8-parity-{host}-{date}-cpu-smoke.json")
                                       if smoke else os.path.join(ROOT, "benchmarks", "results",
                                                                  f"fp8-parity-{host}-{date}.json")))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    if smoke:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    inputs = write_inputs(args, smoke, work_dir)
    print(f"[fp8-parity] {inputs['samples']} text pieces from {args.text_package} ({time.monotonic() - t0:.0f} s)",
          flush=True)
    result = {"kind": "fp8-parity", "host": host, "date": date, "mode": "cpu-smoke" if smoke else "gpu",
              "versions": pairs.versions(), "inputs": inputs, "steps": args.steps or (4 if smoke else 300),
              "runs": {}}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.isfile(out):  # an earlier call's runs (e.g. bf16 + tensorwise), kept unless run again
        with open(out) as f:
            result["runs"] = {k: v for k, v in json.load(f).get("runs", {}).items()}
    for recipe in [None, *args.recipes]:
        name = recipe or "bf16"
        yml = run_yaml(args, smoke, inputs, gpus, recipe, work_dir)
        save_path = os.path.join(work_dir, "runs", name)
        if recipe is None and result["runs"].get(name, {}).get("status") == "ok" \
                and len(read_losses(save_path)) >= result["steps"]:
            print("[fp8-parity] bf16: reusing the finished run of an earlier call", flush=True)
            continue
        cmd = [launch.deepspeed_bin(), "--num_gpus", str(gpus), "--master_port", str(launch.free_port()),
               os.path.join(ROOT, "train_ds.py"), "--config", yml, "--overwrite=true"]
        print(f"[fp8-parity] {name}: running", flush=True)
        res = launch.run_command(cmd, env, os.path.join(work_dir, "logs", f"{name}.log"), args.timeout, gpus=0,
                                 cwd=ROOT)
        rows = read_losses(save_path)
        rec = {"status": res.status, "elapsed_s": round(res.elapsed_s, 1), "losses": [r["loss"] for r in rows],
               "command": " ".join(cmd), "error_tail": res.tail[-2000:] if res.status != "ok" else ""}
        if recipe:
            rec["compare"] = compare(read_losses(os.path.join(work_dir, "runs", "bf16")), rows)
        result["runs"][name] = rec
        families.atomic_write(out, json.dumps(result, indent=2))
        families.atomic_write(os.path.splitext(out)[0] + ".md", markdown(result) + "\n")
        print(f"[fp8-parity] {name}: {res.status} in {res.elapsed_s:.0f} s"
              + (f", final loss {rec['compare'].get('final_loss', float('nan')):.4f} vs bf16 "
                 f"{rec['compare'].get('final_loss_bf16', float('nan')):.4f}" if rec.get("compare") else ""),
              flush=True)
    print(markdown(result))
    return 0 if all(r["status"] == "ok" for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
