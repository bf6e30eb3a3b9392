"""The benchmark harness: CPU smoke run end to end, and its search/failure logic with fake runs.
Timings are never asserted."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from benchmarks import launch, report, run, workload
from tests.conftest import ROOT


def test_cpu_smoke_runs_both_trainers_and_writes_results(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/run.py", "--cpu-smoke", "--max-mbs", "1",
                          "--results-dir", str(tmp_path / "res"), "--work-dir", str(tmp_path / "work")],
                         cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-4000:]
    [json_path] = list((tmp_path / "res").glob("*.json"))
    result = json.loads(json_path.read_text())
    assert result["mode"] == "cpu-smoke" and result["device"]["matmul_tflops"] > 0
    assert result["versions"]["deepspeed"] and result["versions"]["torch"]
    runs = {r["trainer"]: r for r in result["runs"]}
    assert set(runs) == {"pipeline", "zero"}
    for trainer, script in (("pipeline", "train_ds.py"), ("zero", "train_ds_zero.py")):
        r = runs[trainer]
        assert r["status"] == "ok", r.get("error_tail")
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["steps_measured"] == 1
        assert "deepspeed" in r["command"] and "--num_gpus 2" in r["command"] and script in r["command"]
        assert "--train_micro_batch_size_per_gpu=1" in r["command"] and "DS_ACCELERATOR=cpu" in r["command"]
    assert len(runs["zero"]["peak_gib_per_gpu"]) == 2
    assert result["summary"]["64"]["ratio_pipeline_vs_best_zero"] > 0
    assert result["configs"]["zero"]["zero_optimization"]["stage"] == 3
    assert "### seq 64" in json_path.with_suffix(".md").read_text() and "pipeline / best ZeRO-3" in res.stdout
    assert not list((tmp_path / "work" / "runs").glob("*/checkpoint_final"))


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("code, status", [
    ("import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB', file=sys.stderr);"
     " sys.exit(1)", "OOM"),
    ("import sys; sys.exit(3)", "failed"),
    ("print('fine')", "ok"),
])
def test_launch_classifies_exit(tmp_path, code, status):
    got = launch.run_command(_py(code), dict(os.environ), str(tmp_path / "log.txt"), timeout_s=60)
    assert got.status == status
    assert (status == "ok") == (got.tail == "")


def test_launch_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    t0 = time.monotonic()
    got = launch.run_command(_py(code), dict(os.environ), str(tmp_path / "log.txt"), timeout_s=2)
    assert got.status == "timeout" and time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    time.sleep(0.5)
    status = f"/proc/{child}/status"
    assert not os.path.exists(status) or "\tZ" in open(status).read()  # gone, or a zombie awaiting its reaper


def fake_record(trainer, backend, seq, mbs, status="ok", sps=None):
    rec = {"trainer": trainer, "backend": backend, "seq": seq, "mbs": mbs, "status": status, "command": "x"}
    if status == "ok":
        rec.update(samples_per_s=sps, tokens_per_s=sps * seq, tflops_per_gpu=sps, mfu=0.5, mfu_datasheet=0.4,
                   peak_gib_per_gpu=[1.0, 2.0])
    return rec


class FakeRunner:
    """samples/s per (trainer, mbs); a missing entry means OOM."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, trainer, backend, seq, mbs):
        self.calls.append((trainer, backend, seq, mbs))
        sps = self.table.get((trainer, mbs))
        return fake_record(trainer, backend, seq, mbs, "ok" if sps else "OOM", sps)


def test_sweep_stops_at_oom_and_when_slower():
    runner = FakeRunner({("zero", 1): 5.0, ("zero", 2): 9.0, ("pipeline", 1): 20.0, ("pipeline", 2): 30.0,
                         ("pipeline", 4): 25.0, ("pipeline", 8): 40.0})
    zero = run.sweep(runner, "zero", "sdpa", 512, [1, 2, 4, 8], stop_below=0.05)
    assert [(r["mbs"], r["status"]) for r in zero] == [(1, "ok"), (2, "ok"), (4, "OOM")]
    pipe = run.sweep(runner, "pipeline", "sdpa", 512, [1, 2, 4, 8], stop_below=0.05)
    assert [r["mbs"] for r in pipe] == [1, 2, 4]  # 4 is >5 % slower than 2: stop
    exhaustive = run.sweep(runner, "pipeline", "sdpa", 512, [1, 2, 4, 8], stop_below=-1)
    assert [r["mbs"] for r in exhaustive] == [1, 2, 4, 8]
    summary = report.summarize(zero + pipe, [512])["512"]
    assert summary["zero_best"]["mbs"] == 2 and summary["pipeline_best"]["mbs"] == 2
    assert summary["ratio_pipeline_vs_best_zero"] == pytest.approx(30.0 / 9.0)
    assert summary["ratio_pipeline_vs_zero_mbs1"] == pytest.approx(20.0 / 5.0)


def test_main_survives_failures_and_writes_every_run(tmp_path, monkeypatch, capsys):
    """The whole orchestration with fake runs: OOM everywhere for ZeRO at seq 4096, flash only where asked."""
    table = {("pipeline", 1): 10.0, ("pipeline", 2): 12.0, ("zero", 1): 3.0}

    class Runner(FakeRunner):
        def __init__(self, settings, config_paths, matmul_tflops):
            super().__init__(table)

        def __call__(self, trainer, backend, seq, mbs):
            if seq == 4096 and trainer == "zero":
                return fake_record(trainer, backend, seq, mbs, "OOM")
            return super().__call__(trainer, backend, seq, mbs)

    monkeypatch.setattr(run, "Runner", Runner)
    monkeypatch.setattr(run, "measure_device", lambda s: {"device_name": "fake", "matmul_tflops": 700.0,
                                                          "matmul_n": 8192, "matmul_dtype": "bf16"})
    rc = run.main(["--gpus", "4", "--seq", "512", "4096", "--backends", "sdpa", "flash", "--max-mbs", "4",
                   "--results-dir", str(tmp_path / "res"), "--work-dir", str(tmp_path / "work")])
    assert rc == 0
    result = json.loads(next((tmp_path / "res").glob("*.json")).read_text())
    backends = {(r["trainer"], r["backend"]) for r in result["runs"]}
    assert backends == {("pipeline", "sdpa"), ("pipeline", "flash"), ("zero", "sdpa")}
    zero_4096 = [r for r in result["runs"] if r["trainer"] == "zero" and r["seq"] == 4096]
    assert [(r["mbs"], r["status"]) for r in zero_4096] == [(1, "OOM")]
    assert result["summary"]["4096"]["ratio_pipeline_vs_best_zero"] is None
    out = capsys.readouterr().out
    assert "| OOM |" in out and "### seq 4096" in out
    cfg = result["configs"]["pipeline"]
    assert cfg["model_topo"]["process_topology"]["dims"] == [4, 1] and cfg["train_batch_size"] == 64
    assert cfg["bf16"]["enabled"] and cfg["synthetic_data"] and cfg["from_scratch"]
    model = json.loads((tmp_path / "work" / "model" / "config.json").read_text())
    assert model["hidden_size"] == 4096 and model["num_hidden_layers"] == 32 and model["vocab_size"] == 32000


def test_micro_batch_candidates_and_flops():
    assert workload.micro_batch_candidates("zero", 64, 4, 64) == [1, 2, 4, 8, 16]
    assert workload.micro_batch_candidates("pipeline", 64, 4, 64) == [1, 2, 4, 8, 16, 32, 64]
    assert workload.micro_batch_candidates("pipeline", 64, 4, 4) == [1, 2, 4]
    n = workload.params_no_embed(workload.LLAMA_7B)
    assert n == 6_738_415_616 - 32000 * 4096  # llama-7b minus its input embedding
    assert workload.flops_per_token(workload.LLAMA_7B, 2048) == 6.0 * n + 12.0 * 32 * 4096 * 2048


def test_throughput_leaves_out_warmup_steps():
    rows = [{"step": i, "step_time_s": t, "tokens_per_s": 1000 / t, "tflops_per_gpu": 1.0, "peak_mem_gib": 2.0}
            for i, t in ((1, 10.0), (2, 5.0), (3, 2.0), (4, 2.0))]
    tp = report.throughput(rows, warmup=2, global_batch=8)
    assert tp["steps_measured"] == 2 and tp["samples_per_s"] == pytest.approx(4.0)
    assert tp["tokens_per_s"] == pytest.approx(500.0)
    assert report.throughput(rows[:2], warmup=2, global_batch=8) is None


def test_trainer_specific_keys_and_fp16_reach_only_their_runs(tmp_path):
    """What the 8-GPU seed-table run needs: fp16, the seed's parts for the pipeline, ZeRO++ keys for ZeRO."""
    args = run.parse_args(["--gpus", "8", "--precision", "fp16", "--global-batch", "128", "--set", "use_grad_ckpt=false",
                           "--pipeline-set", "model_topo.parts=[5,4,4,4,4,4,4,5]", "--zero-set",
                           "zero_optimization.zero_quantized_weights=true", "--work-dir", str(tmp_path)])
    settings = run.settings_from_args(args)
    paths = run.write_configs(settings)
    pipe = run.build_command(settings, paths["pipeline"], "pipeline", "sdpa", 256, 1, str(tmp_path / "p"))
    zero = run.build_command(settings, paths["zero"], "zero", "sdpa", 256, 1, str(tmp_path / "z"))
    assert "--model_topo.parts=[5,4,4,4,4,4,4,5]" in pipe and "--use_grad_ckpt=false" in pipe
    assert not any("zero_quantized" in a for a in pipe)
    assert "--zero_optimization.zero_quantized_weights=true" in zero and not any("parts" in a for a in zero)
    for trainer in ("pipeline", "zero"):
        cfg = yaml.safe_load(open(paths[trainer]))
        assert cfg["fp16"]["enabled"] and "bf16" not in cfg and cfg["train_batch_size"] == 128
    # the pipeline's parts override is a valid value for the trainer's own config check
    from utils.config import parse_overrides
    assert parse_overrides(["--model_topo.parts=[5,4,4,4,4,4,4,5]"]) == {"model_topo.parts": [5, 4, 4, 4, 4, 4, 4, 5]}
