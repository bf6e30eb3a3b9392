"""Issue 27's benchmark entries in CPU smoke mode: FP8 variants of benchmarks/families.py (emulated), the QLoRA variant
of benchmarks/lora.py, and benchmarks/fp8_parity.py; plus their names and plans without running anything."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, launch_env


def _run(*args: str, timeout: int = 500):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_names_and_plans():
    from benchmarks import families, lora

    assert all("fp8" in v for v in families.FP8_VARIANTS)
    for variant in families.FP8_VARIANTS:
        name, overrides = families.parse_variant(variant)
        assert name == variant and overrides == (variant,)
    plan = families.plan_runs(["llama3", "qwen3", "mistral"], ["default", *families.FP8_VARIANTS])
    assert len(plan) == 12 and {p.family for p in plan if "fp8" in p.variant} == {"llama3", "qwen3", "mistral"}
    steps = families.PLANS["fp8"]
    assert [s.seq for s in steps] == [2048, 8192] and all(set(s.families) == {"llama3", "qwen3", "mistral"}
                                                          for s in steps)
    assert lora.parse_variant("qlora-nf4-r16") == {"r": 16, "alpha": 32, "dropout": 0.0,
                                                   "target_modules": list(lora.LINEAR_NAMES), "quantize": "nf4"}
    assert lora.bf16_twin("qlora-nf4-r16") == "lora-r16" and lora.bf16_twin("lora-r16") is None
    cfg = families.family_config("llama3", released=True, blocks=80)
    cfg.update(lora.WIDTHS["llama-3-70b"][1])
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (8192, 28672, 80)


def test_fp8_variants_run_in_cpu_smoke(tmp_path):
    """An FP8 variant next to the default on CPU: emulated (the trainer's FP8 line is in the run's log)."""
    out = tmp_path / "fam.json"
    _run("benchmarks/families.py", "--cpu-smoke", "--families", "qwen3", "--variants", "default",
         "fp8.recipe=tensorwise", "--out", str(out), "--work-dir", str(tmp_path / "w"))
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["default"]["status"] == runs["fp8.recipe=tensorwise"]["status"] == "ok"
    assert "--fp8.emulate=true" in runs["fp8.recipe=tensorwise"]["command"]
    log = (tmp_path / "w" / "logs" / "qwen3-pipeline-fp8.recipe-tensorwise.log").read_text()
    assert "fp8: tensorwise (emulated) on" in log


def test_qlora_variant_runs_in_cpu_smoke(tmp_path):
    out = tmp_path / "lora.json"
    _run("benchmarks/lora.py", "--cpu-smoke", "--variants", "qlora-nf4-r16", "lora-r16", "--out", str(out),
         "--work-dir", str(tmp_path / "w"))
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["qlora-nf4-r16"]["status"] == "ok" and runs["qlora-nf4-r16"]["lora"]["quantize"] == "nf4"
    assert runs["qlora-nf4-r16"]["vs_bf16_lora_peak"] > 0
    assert "QLoRA" in out.with_suffix(".md").read_text()


def test_fp8_parity_runs_in_cpu_smoke(tmp_path):
    out = tmp_path / "parity.json"
    _run("benchmarks/fp8_parity.py", "--cpu-smoke", "--recipes", "tensorwise", "--steps", "3", "--out", str(out),
         "--work-dir", str(tmp_path / "w"))
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"bf16", "tensorwise"}
    c = result["runs"]["tensorwise"]["compare"]
    assert c["steps"] == 3 and abs(c["final_rel_diff"]) < 0.01
    assert result["inputs"]["samples"] > 0
