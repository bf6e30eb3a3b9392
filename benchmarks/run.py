"""Pipeline (train_ds.py) vs ZeRO-3 (train_ds_zero.py) on the GPUs of one host: performance.md's workload.

    python benchmarks/run.py --gpus 4 --seq 512 1024 2048 4096
    python benchmarks/run.py --cpu-smoke          # whole orchestration on CPU: tiny model, 2 ranks, gloo

Measures the dense matmul rate first (8192³ bf16, in a child process), then for every sequence length runs
the pipeline (dims [N, 1]) with each attention backend present (sdpa; flash when flash_attn imports) and
ZeRO-3 (dims [1, N]) at micro-batch 1, 2, 4, ... until one runs out of memory, fails, times out or gets
slower than the best so far. Every run is `deepspeed --num_gpus N <trainer> --config <yaml> --key=value ...`
with its own time limit; its metrics.jsonl is averaged over the steps after the warm-up. Results go to
`benchmarks/results/<host>-<date>.json` (+ `.md`), rewritten after every run, and tables to stdout.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import launch, report, workload  # noqa: E402
from utils.plot import read_metrics  # noqa: E402

TRAINER_SCRIPT = {"pipeline": "train_ds.py", "zero": "train_ds_zero.py"}
DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16


@dataclass
class Settings:
    mode: str  # "gpu" | "cpu-smoke"
    gpus: int
    seqs: list[int]
    work: workload.Workload
    trainers: list[str]
    backends: list[str]  # pipeline attention backends
    zero_backends: list[str]
    max_mbs: int
    mbs_list: list[int] | None
    stop_below: float
    timeout_s: float
    results_dir: str
    work_dir: str
    keep_runs: bool
    datasheet_tflops: float | None
    overrides: list[str] = field(default_factory=list)  # extra `key=value` for every run
    trainer_overrides: dict = field(default_factory=dict)  # trainer -> extra `key=value` for its runs only
    label: str = ""  # names this variant in run names and tables (e.g. "compiled")
    profile_step: int = 0
    matmul: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=4, help="GPUs of this host to use (deepspeed --num_gpus)")
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="sequence lengths")
    p.add_argument("--global-batch", type=int, default=64, help="samples per optimizer step")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (max_steps)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    p.add_argument("--trainers", nargs="+", default=["pipeline", "zero"], choices=["pipeline", "zero"])
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "sdpa", "flash"],
                   help="pipeline attention backends; auto = sdpa, plus flash if flash_attn imports")
    p.add_argument("--zero-backends", nargs="+", default=["sdpa"], choices=["auto", "sdpa", "flash"])
    p.add_argument("--max-mbs", type=int, default=64, help="largest micro-batch the search tries")
    p.add_argument("--mbs", type=int, nargs="+", help="micro-batches to try instead of 1, 2, 4, ...")
    p.add_argument("--stop-below", type=float, default=0.05,
                   help="stop a search once samples/s falls this fraction below its best (negative: never)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    p.add_argument("--results-dir", default=None, help="default benchmarks/results (CPU smoke: <work-dir>/results)")
    p.add_argument("--work-dir", default=None, help="model config, YAMLs, run dirs, logs "
                                                    "(default benchmarks/work/<host>-<date>)")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's save_path (else only metrics)")
    p.add_argument("--datasheet-tflops", type=float, default=DATASHEET_TFLOPS)
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra trainer keys for every run, e.g. compile_blocks=true use_grad_ckpt=true")
    p.add_argument("--matmul-tflops", type=float, default=None,
                   help="use this dense matmul rate (from an earlier run on the same host) instead of measuring")
    p.add_argument("--pipeline-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra keys for the pipeline runs only, e.g. model_topo.parts=[5,4,4,4,4,4,4,5]")
    p.add_argument("--zero-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra keys for the ZeRO runs only, e.g. zero_optimization.zero_quantized_weights=true (ZeRO++)")
    p.add_argument("--precision", choices=["bf16", "fp16"], default="bf16", help="mixed precision of both trainers")
    p.add_argument("--label", default="", help="variant name added to run names and tables")
    p.add_argument("--profile-step", type=int, default=0,
                   help="profile this step of every run (train_ds.py profile_step; kept under the run dir)")
    p.add_argument("--cpu-smoke", "--dry-run", dest="cpu_smoke", action="store_true",
                   help="run the whole orchestration on CPU: tiny llama, 2 ranks, gloo, seq 64, micro-batch <= 2")
    return p.parse_args(argv)


def host_and_date() -> tuple[str, str]:
    return socket.gethostname().split(".")[0], dt.date.today().isoformat()


def available_backends(requested: list[str]) -> list[str]:
    if requested != ["auto"]:
        return [b for b in requested if b != "auto"]
    return ["sdpa"] + (["flash"] if importlib.util.find_spec("flash_attn") is not None else [])


def settings_from_args(args: argparse.Namespace) -> Settings:
    host, date = host_and_date()
    work_dir = args.work_dir or os.path.join(ROOT, "benchmarks", "work", f"{host}-{date}")
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false"}
    for item in args.overrides + args.pipeline_set + args.zero_set:
        if "=" not in item:
            raise SystemExit(f"--set/--pipeline-set/--zero-set: expected KEY=VALUE, got {item!r}")
    matmul_given = {"given_tflops": args.matmul_tflops} if args.matmul_tflops else {}
    common = dict(trainers=args.trainers, mbs_list=args.mbs, stop_below=args.stop_below, work_dir=work_dir,
                  keep_runs=args.keep_runs, overrides=list(args.overrides), label=args.label,
                  trainer_overrides={"pipeline": list(args.pipeline_set), "zero": list(args.zero_set)},
                  profile_step=args.profile_step)
    if args.cpu_smoke:
        return Settings(mode="cpu-smoke", gpus=2, seqs=[64], work=workload.tiny_workload(), backends=["sdpa"],
                        zero_backends=["sdpa"], max_mbs=min(args.max_mbs, 2), timeout_s=min(args.timeout, 300),
                        results_dir=args.results_dir or os.path.join(work_dir, "results"), datasheet_tflops=None,
                        matmul={"device": "cpu", "n": 256, "dtype": "fp32", "iters": 5},
                        env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, **common)
    return Settings(mode="gpu", gpus=args.gpus, seqs=args.seq,
                    work=workload.llama7b_workload(args.global_batch, args.steps, args.warmup, args.precision),
                    backends=available_backends(args.backends), zero_backends=available_backends(args.zero_backends),
                    max_mbs=args.max_mbs, timeout_s=args.timeout,
                    results_dir=args.results_dir or os.path.join(ROOT, "benchmarks", "results"),
                    datasheet_tflops=args.datasheet_tflops,
                    matmul={"device": "cuda", "n": 8192, "dtype": "bf16", **matmul_given},
                    env=env, **common)


def child_env(settings: Settings) -> dict:
    return {**os.environ, **settings.env}


def measure_device(settings: Settings) -> dict:
    """The matmul rate and device facts from benchmarks/matmul.py; an `error` entry instead of raising."""
    m = settings.matmul
    if "given_tflops" in m:
        return {"device_name": "given", "matmul_tflops": m["given_tflops"], "source": "--matmul-tflops"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "matmul.py"), "--device", m["device"], "--n",
           str(m["n"]), "--dtype", m["dtype"]] + (["--iters", str(m["iters"])] if "iters" in m else [])
    try:
        res = subprocess.run(cmd, env=child_env(settings), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"device_name": "unknown", "matmul_tflops": None, "error": "matmul timed out"}
    if res.returncode != 0:
        return {"device_name": "unknown", "matmul_tflops": None, "error": res.stderr.strip()[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "deepspeed", "flash_attn"):
        try:
            out[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            if pkg != "flash_attn":
                out[pkg] = None
    return out


# ----------------------------------------------------------------------------------------------
# One run


def write_configs(settings: Settings) -> dict[str, str]:
    """The model's config.json and one base YAML per trainer under the work dir; returns trainer -> YAML path."""
    model_dir = workload.write_model_dir(os.path.join(settings.work_dir, "model"), settings.work.model,
                                         max(settings.seqs))
    paths = {}
    for trainer in settings.trainers:
        path = os.path.join(settings.work_dir, f"{trainer}.yml")
        with open(path, "w") as f:
            yaml.safe_dump(workload.trainer_config(trainer, settings.work, model_dir, settings.gpus), f,
                           sort_keys=False)
        paths[trainer] = path
    return paths


def run_name(trainer: str, backend: str, seq: int, mbs: int, label: str = "") -> str:
    return f"{trainer}-{backend}{'-' + label if label else ''}-seq{seq}-mbs{mbs}"


def build_command(settings: Settings, config_path: str, trainer: str, backend: str, seq: int, mbs: int,
                  save_path: str) -> list[str]:
    return [launch.deepspeed_bin(), "--num_gpus", str(settings.gpus), "--master_port", str(launch.free_port()),
            os.path.join(ROOT, TRAINER_SCRIPT[trainer]), "--config", config_path, f"--save_path={save_path}",
            f"--max_seq_len={seq}", f"--train_micro_batch_size_per_gpu={mbs}",
            f"--use_flash_attn={'true' if backend == 'flash' else 'false'}",
            *(f"--{item}" for item in settings.overrides + settings.trainer_overrides.get(trainer, [])),
            *([f"--profile_step={settings.profile_step}"] if settings.profile_step else [])]


def shown_command(settings: Settings, cmd: list[str]) -> str:
    """The command as one shell line, with the environment it adds."""
    extra = {k: v for k, v in settings.env.items() if k != "PYTHONPATH"}
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()) + (" " if extra else "") + shlex.join(cmd)


def tidy_run_dir(save_path: str) -> None:
    """Keep metrics.jsonl and rank_stats/, drop checkpoints (a 7B checkpoint is ~100 GB)."""
    if not os.path.isdir(save_path):
        return
    for name in os.listdir(save_path):
        if name not in ("metrics.jsonl", "rank_stats", "profile"):
            path = os.path.join(save_path, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


class Runner:
    """Launches one (trainer, backend, seq, micro-batch) configuration and turns its files into a record."""

    def __init__(self, settings: Settings, config_paths: dict[str, str], matmul_tflops: float | None):
        self.settings, self.config_paths, self.matmul_tflops = settings, config_paths, matmul_tflops

    def __call__(self, trainer: str, backend: str, seq: int, mbs: int) -> dict:
        s = self.settings
        name = run_name(trainer, backend, seq, mbs, s.label)
        save_path = os.path.join(s.work_dir, "runs", name)
        shutil.rmtree(save_path, ignore_errors=True)
        cmd = build_command(s, self.config_paths[trainer], trainer, backend, seq, mbs, save_path)
        print(f"[bench] {name}: running (limit {s.timeout_s:.0f} s)", file=sys.stderr, flush=True)
        result = launch.run_command(cmd, child_env(s), os.path.join(s.work_dir, "logs", f"{name}.log"),
                                    s.timeout_s, gpus=s.gpus if s.mode == "gpu" else 0, cwd=ROOT)
        record = {"trainer": trainer, "backend": backend, "label": s.label,
                  "overrides": s.overrides + s.trainer_overrides.get(trainer, []),
                  "seq": seq, "mbs": mbs, "status": result.status,
                  "returncode": result.returncode, "elapsed_s": round(result.elapsed_s, 1),
                  "command": shown_command(s, cmd), "log": result.log_path, "smi_peak_gib": result.smi_peak_gib}
        record.update(self.measurements(save_path, seq, result.status))
        if record["status"] != "ok":
            record["error_tail"] = launch.read_tail(result.log_path, 2000)
        if not s.keep_runs:
            tidy_run_dir(save_path)
        print(f"[bench] {name}: {describe(record)}", file=sys.stderr, flush=True)
        return record

    def measurements(self, save_path: str, seq: int, status: str) -> dict:
        s = self.settings
        rows = read_metrics(save_path, missing_ok=True)
        tp = report.throughput(rows, s.work.warmup, s.work.global_batch)
        if tp is None:
            return {"status": "failed" if status == "ok" else status, "steps_logged": len(rows)}
        eff = report.efficiency(tp["tokens_per_s"], workload.flops_per_token(s.work.model, seq), s.gpus,
                                self.matmul_tflops, s.datasheet_tflops)
        return {**tp, **eff, "steps_logged": len(rows), "peak_gib_per_gpu": report.read_rank_peaks(save_path),
                "profile": report.read_profiles(save_path)}


def describe(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']} after {record['elapsed_s']} s"
    return (f"{record['samples_per_s']:.2f} samples/s, {record['tflops_per_gpu']:.1f} TFLOP/s/GPU "
            f"({record['elapsed_s']} s)")


# ----------------------------------------------------------------------------------------------
# Searches and the whole benchmark


def sweep(runner, trainer: str, backend: str, seq: int, candidates: list[int], stop_below: float) -> list[dict]:
    """Micro-batches in order; stop at the first run that is not ok (OOM, timeout, failure: bigger ones
    will not do better) or that is more than `stop_below` slower than the best so far."""
    records, best = [], None
    for mbs in candidates:
        rec = runner(trainer, backend, seq, mbs)
        records.append(rec)
        if rec["status"] != "ok":
            break
        if best is None or rec["samples_per_s"] > best:
            best = rec["samples_per_s"]
        elif stop_below >= 0 and rec["samples_per_s"] < best * (1 - stop_below):
            break
    return records


def configurations(settings: Settings) -> list[tuple[str, str]]:
    out = []
    for trainer in settings.trainers:
        for backend in (settings.backends if trainer == "pipeline" else settings.zero_backends):
            out.append((trainer, backend))
    return out


def candidates_for(settings: Settings, trainer: str) -> list[int]:
    allowed = workload.micro_batch_candidates(trainer, settings.work.global_batch, settings.gpus,
                                              max(settings.mbs_list or [settings.max_mbs]))
    return [m for m in allowed if m in settings.mbs_list] if settings.mbs_list else allowed


def run_all(settings: Settings, runner, on_record=None) -> list[dict]:
    records = []
    for seq in settings.seqs:
        for trainer, backend in configurations(settings):
            for rec in sweep(runner, trainer, backend, seq, candidates_for(settings, trainer), settings.stop_below):
                records.append(rec)
                if on_record is not None:
                    on_record(records)
    return records


def results_paths(results_dir: str, host: str, date: str) -> tuple[str, str]:
    """`<host>-<date>.json` (and `.md`); a second run the same day gets `-2`, `-3`, ..."""
    os.makedirs(results_dir, exist_ok=True)
    stem, n = os.path.join(results_dir, f"{host}-{date}"), 1
    while os.path.exists((stem if n == 1 else f"{stem}-{n}") + ".json"):
        n += 1
    base = stem if n == 1 else f"{stem}-{n}"
    return base + ".json", base + ".md"


def assemble(settings: Settings, device: dict, records: list[dict], config_paths: dict[str, str]) -> dict:
    host, date = host_and_date()
    configs = {}
    for trainer, path in config_paths.items():
        with open(path) as f:
            configs[trainer] = yaml.safe_load(f)
    return {"host": host, "date": date, "mode": settings.mode, "gpus": settings.gpus, "seqs": settings.seqs,
            "device": device, "versions": versions(), "datasheet_tflops": settings.datasheet_tflops,
            "workload": settings.work.to_json(),
            "flops_per_token": {str(s): workload.flops_per_token(settings.work.model, s) for s in settings.seqs},
            "settings": {k: v for k, v in asdict(settings).items() if k not in ("work",)},
            "configs": configs, "harness_command": shlex.join([sys.executable] + sys.argv),
            "runs": records, "summary": report.summarize(records, settings.seqs)}


def write_results(result: dict, json_path: str, md_path: str) -> None:
    for path, text in ((json_path, json.dumps(result, indent=2)), (md_path, report.markdown(result) + "\n")):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def main(argv=None) -> int:
    settings = settings_from_args(parse_args(argv))
    os.makedirs(settings.work_dir, exist_ok=True)
    config_paths = write_configs(settings)
    device = measure_device(settings)
    print(f"[bench] {device.get('device_name')}: dense {settings.matmul['dtype']} matmul "
          f"{device.get('matmul_tflops')} TFLOP/s" + (f" ({device['error']})" if "error" in device else ""),
          file=sys.stderr, flush=True)
    json_path, md_path = results_paths(settings.results_dir, *host_and_date())

    def save(records):
        write_results(assemble(settings, device, records, config_paths), json_path, md_path)

    records = run_all(settings, Runner(settings, config_paths, device.get("matmul_tflops")), on_record=save)
    result = assemble(settings, device, records, config_paths)
    write_results(result, json_path, md_path)
    print(report.markdown(result))
    print(f"[bench] results: {json_path} and {md_path}", file=sys.stderr)
    return 0 if report.ok(records) else 1


if __name__ == "__main__":
    sys.exit(main())
