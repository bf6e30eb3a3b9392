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


# ----------------------------------------------------------------------------------------------
# benchmarks/families.py: every family at its released width through both trainers, A/B variants

from benchmarks import families  # noqa: E402

CONTRACT = ("family", "trainer", "variant", "seq", "mbs", "status", "tokens_per_s", "tflops_per_gpu", "peak_gib",
            "command")


def _families(*args: str, timeout: int = 400):
    return subprocess.run([sys.executable, "benchmarks/families.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_families_cpu_smoke_both_trainers_a_variant_merge_and_report_only(tmp_path):
    """The whole orchestration on 2 CPU ranks: mixtral's default, hf and one A/B variant, then a second call
    (llama2) merged into the same JSON, then --report-only. Four DeepSpeed launches."""
    out, work = tmp_path / "res" / "fam.json", str(tmp_path / "work")
    res = _families("--cpu-smoke", "--families", "mixtral", "--variants", "default", "hf", "fused_head_loss=false",
                    "--out", str(out), "--work-dir", work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[families] 1/3 mixtral pipeline default: ok " in res.stdout and " tok/s " in res.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-smoke" and result["matmul_tflops"] > 0 and result["versions"]["deepspeed"]
    assert result["workload"]["seq"] == 64 and result["workload"]["measured_steps"] == 1
    runs = {(r["trainer"], r["variant"]): r for r in result["runs"]}
    assert list(runs) == [("pipeline", "default"), ("hf", "default"), ("pipeline", "fused_head_loss=false")]
    for (trainer, variant), r in runs.items():
        assert all(k in r for k in CONTRACT), sorted(r)
        assert r["status"] == "ok", r.get("error_tail")
        assert r["family"] == "mixtral" and r["seq"] == 64 and r["mbs"] == 2
        assert r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0 and r["peak_gib"] > 0 and r["mfu"] > 0
        script = "train_ds_zero.py" if trainer == "hf" else "train_ds.py"
        assert script in r["command"] and "--num_gpus 2" in r["command"] and "DS_ACCELERATOR=cpu" in r["command"]
        assert ("--fused_head_loss=false" in r["command"]) == (variant == "fused_head_loss=false")
    assert runs[("pipeline", "default")]["vs_hf_tokens"] > 0 and runs[("pipeline", "fused_head_loss=false")][
        "default_speedup"] > 0
    assert runs[("hf", "default")]["dims"] == [1, 2] and runs[("pipeline", "default")]["dims"] == [2, 1]
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    assert "| mixtral (tiny, 2 blocks) |" in md.read_text() and "`fused_head_loss=false` TFLOP/s/GPU" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = _families("--cpu-smoke", "--families", "llama2", "--variants", "default", "--out", str(out), "--work-dir", work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert [(r["family"], r["trainer"], r["variant"]) for r in merged["runs"]] == [
        ("mixtral", "pipeline", "default"), ("mixtral", "hf", "default"), ("mixtral", "pipeline", "fused_head_loss=false"),
        ("llama2", "pipeline", "default")]
    assert merged["runs"][0]["command"] == result["runs"][0]["command"]  # the first call's runs are kept as they were
    assert merged["matmul_tflops"] == result["matmul_tflops"] and len(merged["sessions"]) == 2  # one denominator

    md.unlink()
    png.unlink()
    res = _families("--report-only", str(out), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| llama2 (tiny, 2 blocks) |" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"


def _fake_record(spec, tokens, status="ok", elapsed=10.0):
    rec = {"family": spec.family, "trainer": spec.trainer, "variant": spec.variant, "seq": 2048, "mbs": 2,
           "status": status, "tokens_per_s": None, "tflops_per_gpu": None, "peak_gib": None,
           "command": f"fake {spec.name}", "elapsed_s": elapsed, "dims": [1, 1], "blocks": 8,
           "released": families.RELEASED_NAME[spec.family]}
    if status == "ok":
        rec.update(tokens_per_s=tokens, tflops_per_gpu=tokens / 100, peak_gib=40.0,
                   tflops_per_gpu_pipeline_count=tokens / 100)
    return rec


def test_families_merge_replaces_reruns_skip_done_and_budget(tmp_path, monkeypatch, capsys):
    """GPU mode with fake runs: a second call replaces the runs it repeats and keeps the others; --skip-done
    runs nothing twice; --budget stops before a run the longest one so far says will not fit."""
    rates = {("llama2", "pipeline", "default"): 1000.0, ("llama2", "hf", "default"): 500.0,
             ("bloom", "pipeline", "default"): 800.0}
    calls = []

    def fake_execute(s, spec, inputs, timeout_s):
        calls.append(spec.key)
        status = "OOM" if spec.key == ("bloom", "hf", "default") else "ok"
        return _fake_record(spec, rates.get(spec.key, 400.0), status, elapsed=200.0 if spec.family == "baichuan" else 10)

    monkeypatch.setattr(families, "execute", fake_execute)
    out, work = tmp_path / "fam.json", tmp_path / "work"
    base = ["--gpus", "1", "--matmul-tflops", "800", "--out", str(out), "--work-dir", str(work)]
    assert families.main(["--families", "llama2", "bloom", "--variants", "default", "hf", *base]) == 0
    first = json.loads(out.read_text())
    assert calls == [("llama2", "pipeline", "default"), ("bloom", "pipeline", "default"),
                     ("llama2", "hf", "default"), ("bloom", "hf", "default")]
    assert first["runs"][0]["vs_hf_tokens"] == pytest.approx(2.0) and first["runs"][0]["mfu"] == pytest.approx(10 / 800)
    assert "[families] 4/4 bloom hf default: OOM" in capsys.readouterr().out
    # the inputs it wrote: released widths, the workload, ZeRO-1 for hf, shipped defaults for the pipeline
    pipe = yaml.safe_load((work / "configs" / "llama2-pipeline.yml").read_text())
    hf = yaml.safe_load((work / "configs" / "llama2-hf.yml").read_text())
    assert pipe["train_batch_size"] == 16 and pipe["max_steps"] == 5 and pipe["bf16"]["enabled"]
    assert pipe["optimizer"]["params"]["torch_adam"] and pipe["gradient_clipping"] == 1.0
    assert pipe["from_scratch"] and pipe["synthetic_data"] and "compile_blocks" not in pipe
    assert hf["zero_optimization"]["stage"] == 1 and hf["model_topo"]["process_topology"]["dims"] == [1, 1]
    assert json.loads((work / "models" / "bloom-pipeline" / "config.json").read_text())["vocab_size"] == 250880

    rates[("llama2", "pipeline", "default")] = 1500.0
    calls.clear()
    assert families.main(["--families", "llama2", "--variants", "default", "compile_blocks=false", *base]) == 0
    second = json.loads(out.read_text())
    keys = [(r["family"], r["trainer"], r["variant"]) for r in second["runs"]]
    assert keys == [k for k in (families.run_key(r) for r in first["runs"])] + [
        ("llama2", "pipeline", "compile_blocks=false")]
    by = {families.run_key(r): r for r in second["runs"]}
    assert by[("llama2", "pipeline", "default")]["tokens_per_s"] == 1500.0  # replaced
    assert by[("llama2", "pipeline", "default")]["vs_hf_tokens"] == pytest.approx(3.0)  # re-derived
    assert by[("llama2", "pipeline", "compile_blocks=false")]["default_speedup"] == pytest.approx(1500 / 400)
    assert by[("bloom", "pipeline", "default")] == {**first["runs"][1], "mfu": pytest.approx(8 / 800)}  # kept
    md = out.with_suffix(".md").read_text()
    assert "| llama2 (llama-2-7b, 8 blocks) | 15 (2 %) | 4 | 3.75× | 500 | 3.00× |" in md
    assert "| bloom (bloom-7b1, 8 blocks) | 8 (1 %) | — | — | OOM | — |" in md

    calls.clear()
    rc = families.main(["--families", "llama2", "bloom", "--variants", "default", "hf", "--skip-done", *base])
    assert rc == 1 and calls == [("bloom", "hf", "default")]  # the only one not ok, and still not ok

    calls.clear()
    rc = families.main(["--families", "baichuan", "--variants", "default", "fused_head_loss=false", "--budget", "150",
                        *base])
    assert rc == 3 and calls == [("baichuan", "pipeline", "default")]
    assert "1 runs not done: baichuan pipeline fused_head_loss=false" in capsys.readouterr().out


def test_families_config_writers_at_released_widths():
    """Each family's config.json is accepted by its read_config at the issue's widths; the hf ones by
    transformers' own config classes (no download); baichuan has no native class."""
    from transformers import AutoConfig

    import models

    expect = {  # family: (hidden, heads, kv heads, vocab, intermediate, blocks, rope theta)
        "llama2": (4096, 32, 32, 32000, 11008, 8, 1e4), "llama3": (4096, 32, 8, 128256, 14336, 8, 5e5),
        "bloom": (4096, 32, 32, 250880, None, 8, None), "baichuan": (4096, 32, 32, 125696, 11008, 8, 1e4),
        "chatglm": (4096, 32, 2, 65024, 13696, 8, 1e4), "mixtral": (4096, 32, 8, 32000, 14336, 2, 1e6),
    }
    for fam, (hidden, heads, kv, vocab, inter, blocks, theta) in expect.items():
        cfg = families.family_config(fam, seq=2048)
        model = models.resolve(cfg)
        args = model.args
        assert (args.hidden_size, args.num_heads, args.vocab_size, model.num_blocks) == (hidden, heads, vocab,
                                                                                        blocks), fam
        assert getattr(args, "num_kv_heads", getattr(args, "num_kv_groups", heads)) == kv, fam
        assert getattr(args, "intermediate_size", getattr(args, "ffn_hidden_size", None)) == inter, fam
        if theta is not None:
            rope = args.rope
            assert rope.theta == theta, fam
        models.resolve(families.family_config(fam, released=False))  # the CPU smoke's tiny config too
        hf = families.hf_config(fam, cfg)
        if fam == "baichuan":
            assert hf is None
            continue
        hc = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
        assert type(hc).__name__ == {"llama2": "LlamaConfig", "llama3": "LlamaConfig", "bloom": "BloomConfig",
                                     "chatglm": "GlmConfig", "mixtral": "MixtralConfig"}[fam]
        assert (hc.hidden_size, hc.num_attention_heads, hc.vocab_size, hc.num_hidden_layers) == (hidden, heads, vocab,
                                                                                                 blocks), fam
        if fam != "bloom":
            assert (hc.num_key_value_heads, hc.intermediate_size, hc.rope_parameters["rope_theta"]) == (kv, inter,
                                                                                                       theta), fam
    assert families.family_config("bloom")["tie_word_embeddings"] is True
    glm = families.hf_config("chatglm", families.family_config("chatglm"))
    assert glm["head_dim"] == 128 and glm["partial_rotary_factor"] == 0.5 and glm["attention_bias"] is True
    moe = models.resolve(families.family_config("mixtral")).args
    assert (moe.num_experts, moe.top_k) == (8, 2)
    assert json.loads(json.dumps(families.family_config("llama3")))  # plain JSON


def test_families_plan_order_and_variant_names():
    plan = families.plan_runs(list(families.SEED_FAMILIES), list(families.VARIANTS))
    assert len(plan) == 6 + 5 + 6 + 6 + 1
    assert [(p.family, p.trainer) for p in plan[:6]] == [(f, "pipeline") for f in families.SEED_FAMILIES]
    assert all(p.variant == "default" for p in plan[:6]) and {p.trainer for p in plan[6:11]} == {"hf"}
    assert "baichuan" not in {p.family for p in plan if p.trainer == "hf"}
    assert [p.family for p in plan if p.variant == "moe_grouped_gemm=false"] == ["mixtral"]
    by_family = families.plan_runs(["bloom", "mixtral"], ["compile_blocks=false", "hf", "default"], order="family")
    assert [(p.family, p.trainer, p.variant) for p in by_family] == [
        ("bloom", "pipeline", "default"), ("bloom", "hf", "default"), ("bloom", "pipeline", "compile_blocks=false"),
        ("mixtral", "pipeline", "default"), ("mixtral", "hf", "default"),
        ("mixtral", "pipeline", "compile_blocks=false")]
    [combo] = families.plan_runs(["llama3"], ["fused_head_loss=false, compile_blocks=false"])
    assert combo.variant == "compile_blocks=false,fused_head_loss=false"
    assert combo.overrides == ("compile_blocks=false", "fused_head_loss=false")
    for bad in ("fused_head_loss", "no_such_key=1", "a=1,a=2"):
        with pytest.raises(SystemExit):
            families.parse_variant(bad)
    assert families.pipeline_dims(1, 8) == [1, 1] and families.pipeline_dims(8, 8) == [8, 1]
    assert families.pipeline_dims(8, 2) == [4, 2]  # mixtral's 4 layers cannot fill 8 stages


# ----------------------------------------------------------------------------------------------
# benchmarks/lora.py: LoRA against full fine-tuning, llama-7b shape, pipeline trainer

from benchmarks import lora  # noqa: E402


def test_lora_cpu_smoke_full_and_lora_then_report_only(tmp_path):
    """Both variants on CPU (one rank: the two launches stay well under a minute): the trainer really trains
    adapters in the lora run (its summary line), the results carry tokens/s, peak GiB, the planner's figures
    and the LoRA / full ratios; --report-only rewrites the .md."""
    out, work = tmp_path / "res" / "lora.json", tmp_path / "work"
    res = subprocess.run([sys.executable, "benchmarks/lora.py", "--cpu-smoke", "--gpus", "1", "--matmul-tflops", "0.02",
                          "--out", str(out), "--work-dir", str(work)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[lora] 1/2 lora-r16 (2 blocks, 1 GPUs): ok " in res.stdout
    result = json.loads(out.read_text())
    assert result["kind"] == "lora" and result["mode"] == "cpu-smoke" and result["workload"]["seq"] == 64
    runs = {r["variant"]: r for r in result["runs"]}
    assert list(runs) == ["lora-r16", "full"]
    for variant, r in runs.items():
        assert r["status"] == "ok", r.get("error_tail")
        assert (r["gpus"], r["blocks"], r["dims"], r["mbs"]) == (1, 2, [1, 1], 2)
        assert r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0 and r["peak_gib"] > 0 and r["planned_gib"] > 0
        assert "train_ds.py" in r["command"] and "DS_ACCELERATOR=cpu" in r["command"]
    log = open(runs["lora-r16"]["log"]).read()
    assert "lora: r=16 alpha=32 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in log
    assert "lora: r=" not in open(runs["full"]["log"]).read()
    h, inter, kv, blocks = 64, 128, 32, 2  # families' tiny llama: 4 heads, 2 kv heads
    per_block = 16 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + inter) + (inter + h))
    assert runs["lora-r16"]["trained_params"] == blocks * per_block
    assert runs["full"]["trained_params"] == runs["full"]["params"] == runs["lora-r16"]["params"] - blocks * per_block
    assert runs["lora-r16"]["vs_full_tokens"] > 0 and runs["lora-r16"]["vs_full_peak"] > 0
    assert runs["full"]["flops_per_token_done"] == runs["full"]["flops_per_token"]  # 6N + attention: all done
    n = (runs["full"]["flops_per_token"] - 12 * blocks * h * 64) / 6  # the LoRA run skips 2N, adds 6T
    done = 4 * n + 6 * blocks * per_block + 12 * blocks * h * 64
    assert runs["lora-r16"]["flops_per_token_done"] == pytest.approx(done)
    cfgs = {k.split()[0]: v for k, v in result["configs"].items()}
    assert cfgs["lora-r16"]["yaml"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0,
                                                 "target_modules": list(lora.LINEAR_NAMES)}
    assert "lora" not in cfgs["full"]["yaml"] and not cfgs["full"]["yaml"]["from_scratch"]
    assert sorted(p.name for p in (work / "model-2").glob("layer_*")) == [f"layer_0{i}-model_states.pt"
                                                                         for i in range(4)]
    md = out.with_suffix(".md")
    assert "| 1 | [1, 1] | 2 | `lora-r16` | ok |" in md.read_text() and "weight-gradient GEMMs" in md.read_text()
    md.unlink()
    assert lora.main(["--report-only", str(out)]) == 0 and "`full` | ok" in md.read_text()


def test_lora_runs_merge_by_gpus_and_blocks_with_oom_and_plans(tmp_path, monkeypatch, capsys):
    """GPU mode with fake runs (no weights written): 32 blocks with full fine-tuning OOM, then 16 blocks; the
    second call keeps the first call's runs; ratios only within the same GPUs and blocks. The planner, on the
    YAMLs written, puts LoRA of the 7B shape well inside one GPU and full fine-tuning outside."""
    written = []
    monkeypatch.setattr(lora, "write_weights", lambda d, cfg, p: written.append(cfg["num_hidden_layers"]) or
                        {"elements": 0, "seconds": 0.0})

    def fake_execute(s, variant, inputs, timeout_s):
        entry = inputs["variants"][variant]
        oom = variant == "full" and s.depth == 32
        rec = {"family": "llama2", "trainer": "pipeline", "variant": variant, "seq": s.seq, "mbs": s.mbs,
               "gpus": s.gpus, "blocks": s.depth, "dims": entry["dims"], "status": "OOM" if oom else "ok",
               "tokens_per_s": None if oom else (4000.0 if variant == "full" else 6000.0) * 32 / s.depth,
               "tflops_per_gpu": None if oom else 400.0, "peak_gib": None if oom else (100.0 if variant == "full"
                                                                                        else 30.0),
               "command": "fake", "elapsed_s": 60.0, "error": "CUDA out of memory" if oom else None}
        rec.update(plan_of.setdefault((variant, s.depth), lora.planned(entry["yaml_path"])))
        return rec

    plan_of = {}
    monkeypatch.setattr(lora, "execute", fake_execute)
    out, work = tmp_path / "lora.json", tmp_path / "work"
    base = ["--gpus", "1", "--matmul-tflops", "800", "--out", str(out), "--work-dir", str(work)]
    assert lora.main(base) == 0
    assert lora.main([*base, "--blocks", "16"]) == 0
    assert written == [32, 16]
    result = json.loads(out.read_text())
    assert [(r["blocks"], r["variant"], r["status"]) for r in result["runs"]] == [
        (32, "lora-r16", "ok"), (32, "full", "OOM"), (16, "lora-r16", "ok"), (16, "full", "ok")]
    by = {(r["blocks"], r["variant"]): r for r in result["runs"]}
    assert "vs_full_tokens" not in by[32, "lora-r16"]  # no full run to compare with at 32 blocks
    assert by[16, "lora-r16"]["vs_full_tokens"] == pytest.approx(1.5)
    assert by[16, "lora-r16"]["vs_full_peak"] == pytest.approx(0.3) and by[16, "full"]["mfu"] == pytest.approx(0.5)
    assert by[32, "lora-r16"]["trained_params"] == 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))
    assert by[32, "lora-r16"]["planned_gib"] < 40 < 141 < by[32, "full"]["planned_gib"]
    yml = yaml.safe_load(open(work / "configs" / "lora-r16-32b-1g.yml"))
    assert yml["max_seq_len"] == 2048 and yml["train_micro_batch_size_per_gpu"] == 2 and yml["train_batch_size"] == 16
    assert yml["bf16"]["enabled"] and yml["lora"]["r"] == 16 and yml["model_topo"]["process_topology"]["dims"] == [1, 1]
    md = out.with_suffix(".md").read_text()
    assert "| 1 | [1, 1] | 32 | `full` | OOM |" in md and "| 1 | [1, 1] | 16 | `lora-r16` | ok | 12.0k |" in md
    assert "1.50×" in md and "CUDA out of memory" in md
    capsys.readouterr()
    for bad in (["--variants", "lora"], ["--variants", "lora-r0"]):
        with pytest.raises(SystemExit):
            lora.main([*base, *bad])


def test_families_plan_new_runs_what_is_left_and_counts_the_calls(tmp_path, monkeypatch, capsys):
    """--plan new with fake runs: every step's runs, each step into its own --out (seq 8192 suffixed), --skip-done
    across calls, and the count of runs and 10-minute calls left."""
    calls, failing = [], {("phi3", "hf", "default")}

    def fake_execute(s, spec, inputs, timeout_s):
        calls.append((*spec.key, s.seq))
        rec = _fake_record(spec, 1000.0, "error" if spec.key in failing else "ok", elapsed=120.0)
        rec["seq"] = s.seq
        return rec

    monkeypatch.setattr(families, "execute", fake_execute)
    out, work = tmp_path / "fam.json", tmp_path / "work"
    base = ["--plan", "new", "--gpus", "1", "--matmul-tflops", "800", "--out", str(out), "--work-dir", str(work)]
    new = [f for f in families.PLANS["new"][0].families if f in families.FAMILIES]
    assert {"qwen2", "qwen3", "mistral", "phi3"} <= set(new)
    assert families.main(base) == 3  # one run failed: still left
    assert [c for c in calls if c[3] == 2048] == [(f, "pipeline", "default", 2048) for f in new] + [
        (f, "hf", "default", 2048) for f in new]
    windowed = [c for c in calls if c[3] == 8192]
    assert windowed == ([("gemma2", "pipeline", "default", 8192), ("gemma2", "hf", "default", 8192)]
                        if "gemma2" in families.FAMILIES else [])
    assert (tmp_path / "fam-seq8192.json").is_file() == bool(windowed)
    printed = capsys.readouterr().out
    assert "plan new: 1 runs left, ~2 min, about 1 more 10-minute calls" in printed

    calls.clear()
    failing.clear()
    assert families.main(base) == 0
    assert calls == [("phi3", "hf", "default", 2048)]  # only what was not ok
    assert "plan new: 0 runs left" in capsys.readouterr().out
    assert families.main([*base, "--plan-left"]) == 0
