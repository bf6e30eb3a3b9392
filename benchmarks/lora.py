"""LoRA against full fine-tuning: tokens/s and peak GiB of the pipeline trainer on the same GPUs.

    python benchmarks/lora.py --gpus 1                        # llama-7b shape, 32 blocks, one GPU: lora-r16, full
    python benchmarks/lora.py --gpus 1 --blocks 16            # a depth at which full fine-tuning fits one GPU
    python benchmarks/lora.py --gpus 4                        # the pipeline, dims [4, 1]
    python benchmarks/lora.py --cpu-smoke                     # the whole orchestration on CPU (tiny llama, 2 ranks)
    python benchmarks/lora.py --gpus 1 --width llama-3-8b --variants qlora-nf4-r16 lora-r16   # QLoRA vs bf16 LoRA
    python benchmarks/lora.py --gpus 1 --width llama-3-70b --blocks 80 --grad-ckpt --variants qlora-nf4-r16  # 70B, 1 GPU
    python benchmarks/lora.py --report-only benchmarks/results/lora-HOST-DATE.json

Workload (issue 18): llama-7b shape (hidden 4096, intermediate 11008, 32 heads, vocab 32000; 32 blocks, or
`--blocks N`), bf16, seq 2048, micro-batch 2, global batch 16 per GPU, torch AdamW, clipping 1.0, synthetic
full-length samples; `train_ds.py` with dims [gpus, 1] and the shipped defaults. Variants: `full` (every
parameter trains) and `lora-rN` (r = N, alpha = 2N, dropout 0, adapters on all seven linear layers: q, k, v,
o, gate, up, down). A LoRA run needs base weights on disk (the trainer refuses `from_scratch` with a `lora:`
section), so random layer files of the model are written once into the work dir (~13.5 GB at 32 blocks,
filled from a random pool: the speed of a GEMM does not depend on the values); both variants load them.
Full fine-tuning of all 32 blocks needs ~163 GiB on one GPU (tools/memory.py), so on one H200 it is recorded
as OOM: that is the result, and `--blocks 16` gives a like-for-like pair.

Each run is one `deepspeed` command (benchmarks/families.py's `execute`): tokens/s and TFLOP/s per GPU are
what the trainer wrote to metrics.jsonl after the warm-up steps, peak GiB the largest rank's
`torch.cuda.max_memory_allocated`; next to it the planner's prediction (`tools.memory`). Runs are keyed by
(GPUs, blocks, variant): a later call replaces the runs it repeats and keeps the others, so one JSON (+ .md)
collects one GPU and the pipeline, 32 and 16 blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import families, workload  # noqa: E402
from benchmarks import run as pairs  # noqa: E402  (host_and_date, versions)

FAMILY = "llama2"  # families.py's llama-2-7b: the issue's llama-7b shape
FULL_BLOCKS = 32
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("lora-r16", "full")  # the run that must fit first
PER_GPU_BATCH = 16
POOL_ELEMENTS = 1 << 24  # random values the weight files are tiled from
OOM_RE = re.compile(r"CUDA out of memory\. Tried to allocate (?:.*?memory in use\.|[^\n]{0,40})")


# Widths (`--width`): families.py's family and config overrides. llama-3-70b is llama-3-8b's family at 70B's width.
WIDTHS = {
    "llama-2-7b": ("llama2", {}),
    "llama-3-8b": ("llama3", {}),
    "llama-3-70b": ("llama3", dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                   num_key_value_heads=8)),
}
DEFAULT_WIDTH = "llama-2-7b"


def parse_variant(name: str) -> dict | None:
    """'full' -> None (no lora section); 'lora-rN' -> the `lora:` section (alpha 2N, all linear layers);
    'qlora-nf4-rN' -> the same with `quantize: nf4` (QLoRA: base linears in 4-bit NF4)."""
    if name == "full":
        return None
    for prefix, extra in (("lora-r", {}), ("qlora-nf4-r", {"quantize": "nf4"})):
        if name.startswith(prefix) and name[len(prefix):].isdigit() and int(name[len(prefix):]) > 0:
            r = int(name[len(prefix):])
            return {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": list(LINEAR_NAMES), **extra}
    raise SystemExit(f"--variants: expected full, lora-rN or qlora-nf4-rN (e.g. lora-r16), got {name!r}")


def bf16_twin(variant: str) -> str | None:
    """The bf16 LoRA variant a QLoRA variant is compared with ('qlora-nf4-r16' -> 'lora-r16')."""
    return "lora-r" + variant[len("qlora-nf4-r"):] if variant.startswith("qlora-nf4-r") else None


@dataclass
class Settings(families.Settings):
    depth: int = FULL_BLOCKS  # blocks of the model
    variants: list = field(default_factory=lambda: list(VARIANTS))
    from_scratch: bool = False  # random init instead of weight files (only if the trainer accepts it with lora)
    width: str = DEFAULT_WIDTH  # WIDTHS key
    grad_ckpt: bool = False  # use_grad_ckpt in every run (the 70B width fits one GPU only with it)

    def blocks(self, family: str = FAMILY) -> int:
        return self.depth


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="full, lora-rN and/or qlora-nf4-rN "
                                                                          f"(default: {' '.join(VARIANTS)})")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="activation checkpointing in every run (llama-3-70b QLoRA on one GPU: 48 GiB planned with it, "
                        "153 without)")
    p.add_argument("--width", choices=sorted(WIDTHS), default=DEFAULT_WIDTH,
                   help=f"model width (default {DEFAULT_WIDTH}); another width writes its own results JSON")
    p.add_argument("--gpus", type=int, default=None, help="GPUs = pipeline stages, dims [N, 1] (default: all visible)")
    p.add_argument("--blocks", type=int, default=None, help=f"transformer blocks (default {FULL_BLOCKS}; CPU smoke 2)")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the averages")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; CPU smoke 64)")
    p.add_argument("--mbs", type=int, default=None, help="micro-batch per GPU (default 2)")
    p.add_argument("--global-batch", type=int, default=None,
                   help=f"samples per optimizer step (default {PER_GPU_BATCH} x GPUs; CPU smoke 4)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run before it is killed")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds for this whole call (0: none): no run is started that the longest run so far "
                        "says will not finish, and the last one gets what is left")
    p.add_argument("--matmul-tflops", type=float, default=None,
                   help="dense bf16 matmul rate to use (else the --out file's, else measured)")
    p.add_argument("--from-scratch", action="store_true",
                   help="random init in the trainer instead of weight files (needs a trainer that allows it with "
                        "lora; this build refuses)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/lora-<host>-<date>.json; "
                                               "an existing file is merged into)")
    p.add_argument("--work-dir", default=None, help="model, configs, logs, run dirs (default "
                                                    "benchmarks/work/lora-<host>-<date>)")
    p.add_argument("--report-only", metavar="JSON", default=None, help="rewrite the .md of this JSON; no runs")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the whole orchestration on CPU: tiny llama, fp32, 2 ranks (gloo; --gpus N ranks), seq 64, "
                        "1 measured step")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    host, date = pairs.host_and_date()
    for v in args.variants:
        parse_variant(v)
    work_dir = args.work_dir or os.path.join(ROOT, "benchmarks", "work", f"lora-{host}-{date}")
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false"}
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(ROOT, "benchmarks", "work", "torchinductor-cache")
    if args.cpu_smoke:
        gpus, seq, mbs, gb = args.gpus or 2, args.seq or 64, args.mbs or 2, args.global_batch or 4
        mode, released, precision, depth = "cpu-smoke", False, "fp32", args.blocks or families.SMOKE_BLOCKS
        warmup, steps, timeout = min(args.warmup, 1), min(args.steps, 1), min(args.timeout, 300)
        out = args.out or os.path.join(work_dir, "results", f"lora-{host}-{date}-cpu-smoke.json")
        matmul = {"device": "cpu", "n": 256, "dtype": "fp32", "iters": 5}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    else:
        gpus = args.gpus or families.visible_gpus()
        if gpus < 1:
            raise SystemExit("no GPU visible: pass --gpus N on a GPU host, or --cpu-smoke")
        seq, mbs, gb = args.seq or 2048, args.mbs or 2, args.global_batch or PER_GPU_BATCH * gpus
        mode, released, precision, depth = "gpu", True, "bf16", args.blocks or FULL_BLOCKS
        warmup, steps, timeout = args.warmup, args.steps, args.timeout
        tag = "" if args.width == DEFAULT_WIDTH else f"{args.width}-"
        out = args.out or os.path.join(ROOT, "benchmarks", "results", f"lora-{tag}{host}-{date}.json")
        matmul = {"device": "cuda", "n": 8192, "dtype": "bf16"}
    if args.matmul_tflops:
        matmul["given_tflops"] = args.matmul_tflops
    if steps < 1 or warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if depth < 1 or gpus > depth + 2:
        raise SystemExit(f"--blocks {depth} on {gpus} GPUs: every stage needs a layer (blocks + 2 >= GPUs)")
    if gb % mbs:
        raise SystemExit(f"--global-batch {gb} is not a multiple of micro-batch {mbs}")
    return Settings(mode=mode, gpus=gpus, families=[FAMILY], plan=[], order="defaults-first", seq=seq, mbs=mbs,
                    global_batch=gb, warmup=warmup, steps=steps, precision=precision, released=released,
                    timeout_s=timeout, budget_s=args.budget, skip_done=False, out=os.path.abspath(out),
                    work_dir=os.path.abspath(work_dir), matmul=matmul, env=env, depth=depth,
                    variants=list(dict.fromkeys(args.variants)), from_scratch=args.from_scratch, width=args.width,
                    grad_ckpt=args.grad_ckpt)


# ----------------------------------------------------------------------------------------------
# Inputs: the model (config.json + random layer files) and one YAML per variant


def write_weights(model_dir: str, cfg: dict, precision: str) -> dict:
    """Random `layer_XX-model_states.pt` files of `cfg` (the keys and shapes the trainer loads strictly), in the
    run's dtype: 1-D tensors (norm weights) ones, the others tiled from N(0, 0.02) values. Skipped when a
    `weights.json` written for the same config and dtype is there. Returns that record."""
    import torch

    import models
    from models.layout import layer_file_name
    from models.sequential import SequentialModel

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    stamp = {"config": cfg, "dtype": str(dtype), "pool": POOL_ELEMENTS, "layout": "rows of one pool"}
    marker = os.path.join(model_dir, "weights.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            old = json.load(f)
        if old.get("stamp") == stamp:
            return {**old, "reused": True}
    t0 = time.monotonic()
    resolved = models.resolve(cfg)
    with torch.device("meta"):
        model = SequentialModel(resolved.specs(models.ModelOptions(dtype=dtype)), None)
    pool = (torch.randn(POOL_ELEMENTS, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    total = 0
    for key, module in model.layers.items():
        state = {}
        for name, meta in module.state_dict().items():
            n = meta.numel()
            if meta.dim() == 1:
                state[name] = torch.ones(meta.shape, dtype=meta.dtype)
                continue
            # Every row the same pool values: an expanded view of one row, which torch.save stores as that row
            # alone (a 70B-width layer file is kilobytes, not 1.7 GB); the trainer copies it into its parameters.
            row = meta.shape[-1]
            if row <= POOL_ELEMENTS:
                state[name] = pool[:row].to(meta.dtype).clone().expand(meta.shape)
            else:
                flat = torch.empty(n, dtype=meta.dtype)
                for start in range(0, n, POOL_ELEMENTS):
                    stop = min(n, start + POOL_ELEMENTS)
                    flat[start:stop] = pool[:stop - start].to(meta.dtype)
                state[name] = flat.view(meta.shape)
            total += n
        torch.save(state, os.path.join(model_dir, layer_file_name(int(key))))
    record = {"stamp": stamp, "elements": total, "seconds": round(time.monotonic() - t0, 1)}
    families.atomic_write(marker, json.dumps(record))
    return record


def write_inputs(s: Settings) -> dict:
    """config.json (+ layer files) under work/model-<blocks>, one YAML per variant under work/configs/.
    Returns {"flops_per_token", "blocks", "model_dir", "weights", "variants": {name: entry}} where each entry
    has what families.execute reads (yaml_path, dims, model_type) plus the YAML and the lora section."""
    family, width = WIDTHS[s.width]
    cfg = families.family_config(family if s.released else FAMILY, released=s.released, blocks=s.depth, seq=s.seq)
    if s.released:
        cfg.update(width)
    model_dir = os.path.join(s.work_dir, f"model-{s.depth}" if s.width == DEFAULT_WIDTH
                             else f"model-{s.width}-{s.depth}")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    weights = None if s.from_scratch else write_weights(model_dir, cfg, s.precision)
    if weights is not None:
        print(f"[lora] base weights: {model_dir} ({'reused' if weights.get('reused') else 'written'}, "
              f"{weights['elements'] / 1e9:.2f} B elements, {weights['seconds']} s)", flush=True)
    work = workload.Workload("lora", {}, s.global_batch, bf16=s.precision == "bf16", steps=s.max_steps,
                             warmup=s.warmup, lr=1e-5 if s.released else 1e-3)
    dims = [s.gpus, 1]
    entries = {}
    for variant in s.variants:
        ycfg = workload.trainer_config("pipeline", work, model_dir, s.gpus, dims=dims)
        ycfg.update(max_seq_len=s.seq, train_micro_batch_size_per_gpu=s.mbs, from_scratch=s.from_scratch)
        if s.grad_ckpt:
            ycfg["use_grad_ckpt"] = True
        lora = parse_variant(variant)
        if lora is not None:
            ycfg["lora"] = lora
        width = "" if s.width == DEFAULT_WIDTH else f"{s.width}-"
        ckpt = "-ckpt" if s.grad_ckpt else ""
        yml = os.path.join(s.work_dir, "configs", f"{width}{variant}-{s.depth}b-{s.gpus}g{ckpt}.yml")
        os.makedirs(os.path.dirname(yml), exist_ok=True)
        with open(yml, "w") as f:
            yaml.safe_dump(ycfg, f, sort_keys=False)
        entries[variant] = {"yaml_path": yml, "yaml": ycfg, "dims": dims, "model_type": cfg["model_type"],
                            "lora": lora}
    return {"flops_per_token": families.pipeline_flops_per_token(cfg, s.seq), "blocks": s.depth,
            "model_dir": model_dir, "model_config": cfg, "weights": weights, "variants": entries}


def work_flops_per_token(cfg: dict, seq: int, adapter_params: int | None) -> float:
    """Training FLOPs per token actually computed: the trainer's 6·N + 12·L·h·s for full fine-tuning; with
    adapters (`adapter_params` T, nothing else trained) the frozen weights skip their weight-gradient GEMM,
    2·N, and the adapters add 6·T: 4·N + 6·T + 12·L·h·s."""
    import models

    resolved = models.resolve(cfg)
    reported = resolved.flops_per_token(seq)
    if adapter_params is None:
        return reported
    n = sum(resolved.layer_flops(1)) / 2  # N, as models.ResolvedModel.flops_per_token takes it
    return reported - 2.0 * n + 6.0 * adapter_params


def planned(yml: str, gpu_gib: float = 141.0) -> dict:
    """tools.memory's plan for the run's YAML: the largest stage's total and its parts, trained parameters;
    an `error` entry instead of raising (the benchmark never fails on the planner)."""
    try:
        import models
        from tools import memory

        cfg = memory.load_config(yml)
        setup = memory.setup_from_config(cfg)
        plan = memory.plan_memory(models.read_hf_config(cfg.model.path), setup, gpu_gib)
        worst = max(plan.stages, key=lambda st: st.total)
        return {"planned_gib": round(worst.total / memory.GIB, 4),
                "planned_parts_gib": {k: round(getattr(worst, k) / memory.GIB, 4)
                                      for k in ("weights", "grads", "optim", "activations", "step")},
                "trained_params": sum(st.trained_params for st in plan.stages),
                "params": sum(st.resident_params for st in plan.stages)}
    except Exception as e:  # noqa: BLE001
        return {"planned_gib": None, "plan_error": f"{type(e).__name__}: {e}"[:300]}


# ----------------------------------------------------------------------------------------------
# Records


def run_key(rec: dict) -> tuple[int, int, str]:
    return rec["gpus"], rec["blocks"], rec["variant"]


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
    return families.merge_runs(old, new, key=run_key)


def derive(runs: list[dict], matmul_tflops: float | None) -> list[dict]:
    """mfu, and each LoRA run's ratios to the full fine-tuning run of the same GPUs and blocks."""
    ok = {run_key(r): r for r in runs if r.get("status") == "ok" and r.get("tokens_per_s")}
    for r in runs:
        for k in ("mfu", "vs_full_tokens", "vs_full_peak", "tflops_per_gpu_done", "mfu_done"):
            r.pop(k, None)
        r["mfu"] = (r["tflops_per_gpu"] / matmul_tflops if matmul_tflops and r.get("tflops_per_gpu") is not None
                    else None)
        if r.get("tokens_per_s") and r.get("flops_per_token_done"):
            r["tflops_per_gpu_done"] = r["tokens_per_s"] * r["flops_per_token_done"] / r["gpus"] / 1e12
            r["mfu_done"] = r["tflops_per_gpu_done"] / matmul_tflops if matmul_tflops else None
        for k in ("vs_bf16_lora_tokens", "vs_bf16_lora_peak"):
            r.pop(k, None)
        twin = ok.get((r["gpus"], r["blocks"], bf16_twin(r["variant"]) or ""))
        if twin is not None and run_key(r) in ok:  # QLoRA against bf16 LoRA of the same rank (target: peak <= 0.6x)
            r["vs_bf16_lora_tokens"] = r["tokens_per_s"] / twin["tokens_per_s"]
            if r.get("peak_gib") and twin.get("peak_gib"):
                r["vs_bf16_lora_peak"] = r["peak_gib"] / twin["peak_gib"]
        full = ok.get((r["gpus"], r["blocks"], "full"))
        if r["variant"] != "full" and run_key(r) in ok and full is not None:
            r["vs_full_tokens"] = r["tokens_per_s"] / full["tokens_per_s"]
            if r.get("peak_gib") and full.get("peak_gib"):
                r["vs_full_peak"] = r["peak_gib"] / full["peak_gib"]
    return runs


def _ratio(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def runs_table(result: dict) -> str:
    lines = ["| GPUs | dims | blocks | variant | status | tokens/s | TFLOP/s/GPU (reported) | % of matmul "
             "| TFLOP/s/GPU done (% of matmul) | peak GiB | planned GiB | trained params | LoRA / full tokens/s "
             "| LoRA / full peak | run s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(result["runs"], key=lambda r: (r["gpus"], -r["blocks"], r["variant"] != "full", r["variant"]))
    for r in order:
        trained = r.get("trained_params")
        lines.append(f"| {r['gpus']} | {r.get('dims')} | {r['blocks']} | `{r['variant']}` | {r['status']} | "
                     f"{families.fmt_tokens(r.get('tokens_per_s'))} | {families.fmt_tflops(r.get('tflops_per_gpu'))} | "
                     f"{families.fmt_pct(r.get('mfu'))} | {done_cell(r)} | {families._num(r.get('peak_gib'), '.1f')} | "
                     f"{families._num(r.get('planned_gib'), '.1f')} | "
                     f"{'—' if trained is None else _count(trained)} | {_ratio(r.get('vs_full_tokens'))} | "
                     f"{_ratio(r.get('vs_full_peak'))} | "
                     f"{families._num(r.get('elapsed_s'), '.0f')} |")
    return "\n".join(lines)


def done_cell(r: dict) -> str:
    if r.get("tflops_per_gpu_done") is None:
        return "—"
    pct = "" if r.get("mfu_done") is None else f" ({families.fmt_pct(r['mfu_done'])})"
    return families.fmt_tflops(r["tflops_per_gpu_done"]) + pct


def error_line(r: dict) -> str:
    """The last error line; for an OOM the allocator's own sentence (what it tried to allocate, what was free)."""
    match = OOM_RE.search(r.get("error_tail") or "")
    return match.group(0).strip() if r["status"] == "OOM" and match else (r.get("error") or "?")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else str(n)


def markdown(result: dict) -> str:
    dev, w = result.get("device") or {}, result["workload"]
    lines = [f"# LoRA vs full fine-tuning {result['host']} {result['date']} ({result['mode']})", "",
             f"{result.get('device_name')}; dense {dev.get('matmul_dtype', 'bf16')} matmul "
             f"{dev.get('matmul_n', 8192)}³: {result.get('matmul_tflops')} TFLOP/s (the % of matmul denominator). "
             f"Workload: {w['name']}, {w['precision']}, seq {w['seq']}, micro-batch {w['mbs']}, global batch "
             f"{w['global_batch_per_gpu']} per GPU, torch AdamW, clipping 1.0, synthetic full-length samples; "
             f"{w['measured_steps']} measured steps after {w['warmup_steps']} warm-up steps. `train_ds.py`, dims "
             f"[GPUs, 1], shipped defaults. `lora-rN`: r = N, alpha = 2N, adapters on {', '.join(LINEAR_NAMES)}; "
             f"`full`: every parameter trains. Base weights: random layer files (both variants load them).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in (result.get("versions") or {}).items()), "",
             runs_table(result), "",
             "TFLOP/s per GPU (reported): what the trainer logs, 6·N + 12·L·h·s per token for both variants. "
             "A LoRA step does less: the backward skips the weight-gradient GEMMs of the frozen weights "
             "(2·N of the 6·N), and the adapters add 6·T (T adapter parameters, r·(in+out) per linear), so the reported figure "
             "overstates its work; `done` counts 4·N + 6·T + 12·L·h·s for LoRA (6·N + 12·L·h·s for full). "
             "Tokens/s is the figure to compare. Peak GiB: the largest rank's "
             "`torch.cuda.max_memory_allocated`; planned GiB: tools/memory.py's largest stage for the same YAML "
             "(CUDA context and allocator slack not included). A status (OOM, timeout, failed) stands where a run "
             "did not finish: full fine-tuning of 32 blocks does not fit one 141 GB GPU (planned ~163 GiB).", ""]
    qlora = [r for r in result["runs"] if r.get("vs_bf16_lora_peak") is not None]
    if qlora:
        lines += ["QLoRA (`qlora-nf4-rN`: the same adapters on base linears held in 4-bit NF4) against bf16 LoRA of "
                  "the same rank (target: peak <= 0.6x):", ""]
        lines += [f"- {r['gpus']} GPUs, {r['blocks']} blocks, `{r['variant']}`: peak {_ratio(r['vs_bf16_lora_peak'])}"
                  f", tokens/s {_ratio(r.get('vs_bf16_lora_tokens'))} of `{bf16_twin(r['variant'])}`" for r in qlora]
        lines.append("")
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["Not finished (last error line; the full tail is in the JSON's `error_tail`):", ""]
        lines += [f"- {r['gpus']} GPUs, {r['blocks']} blocks, `{r['variant']}`: {r['status']}: {error_line(r)}"
                  for r in failed]
        lines.append("")
    lines.append("Each run's exact command line is its `command` in the JSON; its YAML is under `configs`.")
    return "\n".join(lines)


def write_outputs(result: dict, json_path: str) -> None:
    derive(result["runs"], result.get("matmul_tflops"))
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    families.atomic_write(json_path, json.dumps(result, indent=2))
    families.atomic_write(os.path.splitext(json_path)[0] + ".md", markdown(result) + "\n")


def load_existing(s: Settings) -> dict | None:
    if not os.path.isfile(s.out):
        return None
    with open(s.out) as f:
        old = json.load(f)
    if old.get("mode") != s.mode:
        raise SystemExit(f"--out {s.out} holds a {old.get('mode')} benchmark; this one is {s.mode}: pick another --out")
    return old


def workload_json(s: Settings) -> dict:
    return {"name": (("llama-7b shape (hidden 4096, intermediate 11008, vocab 32000)" if s.width == DEFAULT_WIDTH
                      else f"{s.width} width") if s.released else "tiny llama (CPU smoke)"),
            "seq": s.seq, "mbs": s.mbs, "global_batch_per_gpu": s.global_batch // s.gpus, "precision": s.precision,
            "warmup_steps": s.warmup, "measured_steps": s.steps, "max_steps": s.max_steps,
            "optimizer": "torch AdamW (torch_adam: true)", "gradient_clipping": 1.0,
            "lora": {"alpha": "2r", "dropout": 0.0, "target_modules": list(LINEAR_NAMES)},
            "width": s.width, "use_grad_ckpt": s.grad_ckpt}


def assemble(s: Settings, device: dict, inputs: dict, old: dict | None) -> dict:
    host, date = pairs.host_and_date()
    session = {"host": host, "date": date, "harness_command": shlex.join([sys.executable] + sys.argv),
               "gpus": s.gpus, "blocks": s.depth, "matmul_tflops": device.get("matmul_tflops"),
               "weights": inputs.get("weights")}
    configs = dict((old or {}).get("configs", {}))
    for variant, e in inputs["variants"].items():
        configs[f"{variant} {s.depth} blocks {s.gpus} GPUs"] = {"yaml": e["yaml"], "lora": e["lora"]}
    return {"kind": "lora", "host": host, "date": date, "mode": s.mode, "device_name": device.get("device_name"),
            "matmul_tflops": device.get("matmul_tflops"), "device": device, "versions": pairs.versions(),
            "workload": workload_json(s), "sessions": list((old or {}).get("sessions", [])) + [session],
            "configs": configs, "runs": list((old or {}).get("runs", []))}


def execute(s: Settings, variant: str, inputs: dict, timeout_s: float) -> dict:
    """One run through families.execute (launch, metrics, peaks, error tail), keyed by GPUs and blocks."""
    entry = inputs["variants"][variant]
    spec = families.RunSpec(FAMILY, "pipeline", variant)
    fam_inputs = {FAMILY: {"flops_per_token": inputs["flops_per_token"], "blocks": inputs["blocks"],
                           "pipeline": entry}}
    sub = Settings(**{**asdict(s), "plan": [], "work_dir": os.path.join(s.work_dir, f"{s.depth}b-{s.gpus}g")})
    rec = families.execute(sub, spec, fam_inputs, timeout_s)
    rec.update(planned(entry["yaml_path"]))
    rec["lora"] = entry["lora"]
    rec["flops_per_token"] = inputs["flops_per_token"]
    if rec.get("trained_params") is not None:
        rec["flops_per_token_done"] = work_flops_per_token(inputs["model_config"], s.seq, None if entry["lora"] is None
                                                           else rec["trained_params"])
    return rec


def progress(i: int, n: int, rec: dict) -> str:
    head = f"[lora] {i}/{n} {rec['variant']} ({rec['blocks']} blocks, {rec['gpus']} GPUs): {rec['status']}"
    if rec.get("tokens_per_s") is not None:
        head += (f" {families.fmt_tokens(rec['tokens_per_s'])} tok/s {families.fmt_tflops(rec['tflops_per_gpu'])} "
                 f"TFLOP/s peak {families._num(rec.get('peak_gib'), '.1f')} GiB")
    head += f" (planned {families._num(rec.get('planned_gib'), '.1f')} GiB), {rec['elapsed_s']:.0f} s"
    if rec["status"] != "ok" and rec.get("error"):
        head += f" ({rec['error'][:160]})"
    return head


def report_only(path: str) -> int:
    with open(path) as f:
        result = json.load(f)
    write_outputs(result, path)
    print(markdown(result))
    return 0


def main(argv=None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    if args.report_only:
        return report_only(args.report_only)
    s = settings_from_args(args)
    old = load_existing(s)
    os.makedirs(s.work_dir, exist_ok=True)
    inputs = write_inputs(s)
    device = families.device_facts(s, old)
    print(f"[lora] {device.get('device_name')} x {s.gpus}: dense {s.matmul['dtype']} matmul "
          f"{device.get('matmul_tflops')} TFLOP/s ({device.get('source', 'measured')})", flush=True)
    result = assemble(s, device, inputs, old)
    write_outputs(result, s.out)
    signal.signal(signal.SIGTERM, families._on_sigterm)  # a killed call stops its running job's process group
    elapsed, ok_here, left_out = [], 0, []
    try:
        for i, variant in enumerate(s.variants, 1):
            limit = s.timeout_s
            if s.budget_s:
                used = time.monotonic() - t0
                if used + max(elapsed or [0.0]) > s.budget_s or s.budget_s - used < 5:
                    left_out = s.variants[i - 1:]
                    break
                limit = min(limit, s.budget_s - used)
            print(f"[lora] {i}/{len(s.variants)} {variant}: running (limit {limit:.0f} s)", flush=True)
            rec = execute(s, variant, inputs, limit)
            elapsed.append(rec["elapsed_s"])
            ok_here += rec["status"] == "ok"
            result["runs"] = merge_runs(result["runs"], [rec])
            write_outputs(result, s.out)
            print(progress(i, len(s.variants), rec), flush=True)
    except KeyboardInterrupt:
        print(f"[lora] interrupted; the runs finished so far are in {s.out}", file=sys.stderr, flush=True)
        return 130
    print(markdown(result))
    print(f"[lora] results: {s.out}, {os.path.splitext(s.out)[0]}.md", file=sys.stderr, flush=True)
    if left_out:
        print(f"[lora] --budget {s.budget_s:.0f} s: not run: {', '.join(left_out)}", flush=True)
        return 3
    return 0 if ok_here else 1


if __name__ == "__main__":
    sys.exit(main())
