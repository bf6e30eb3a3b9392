"""FP8 training (the `fp8:` section, torchao's Float8 through training/transforms.py), emulated on CPU.

One 2-stage FP8 run and the same run without FP8 (lr 1e-3, 12 steps); one warm process (tests/forked_runs.py) for
the single-process runs: the same FP8 run on one stage, FP8 with LoRA and activation checkpointing, and the ZeRO
trainer with FP8. Which linears convert, and what stays as it was, is checked in-process.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, launch_env, run_deepspeed, train_config

FP8 = {"recipe": "tensorwise", "emulate": True}
COMMON = {"n_epoches": 2, "optimizer.params.lr": 1e-3, "save_final": False}
STEPS = 12


def losses(save_path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (save_path / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def ok(res):
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def runs(tiny_llama_pp, tmp_path_factory):
    """2-stage runs with and without FP8, and the forked single-process runs."""
    hf, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("fp8")
    fp8 = ok(run_deepspeed("train_ds.py", train_config(pp, tmp / "fp8", fp8=dict(FP8), **COMMON), tmp, 2))
    ok(run_deepspeed("train_ds.py", train_config(pp, tmp / "bf", **COMMON), tmp, 2))
    jobs, names = [], []

    def job(name, trainer, cfg):
        path = tmp / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg))
        names.append(name)
        jobs.append(dict(trainer=trainer, config=str(path), log=str(tmp / f"{name}.log")))

    job("one", "train_ds", train_config(pp, tmp / "one", dims=(1, 1), fp8=dict(FP8), **COMMON))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]}
    job("lora", "train_ds", train_config(pp, tmp / "lora", dims=(1, 1), fp8={"recipe": "rowwise", "emulate": True},
                                         lora=lora, use_grad_ckpt=True, max_steps=3, **COMMON))
    job("lora_ref", "train_ds", train_config(pp, tmp / "lora_ref", dims=(1, 1), lora=lora, max_steps=3, **COMMON))
    job("zero", "train_ds_zero", train_config(hf, tmp / "zero", dims=(1, 1), fp8=dict(FP8), max_steps=2,
                                              **{**COMMON, "optimizer.params.torch_adam": True}))
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_runs.py"), str(tmp / "jobs.json"),
                          str(tmp / "results.json")], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = dict(zip(names, json.loads((tmp / "results.json").read_text())))
    for name, j in zip(names, jobs):
        results[name]["log"] = Path(j["log"]).read_text()
        assert results[name]["rc"] == 0, (name, results[name]["log"][-3000:])
    return tmp, fp8, results


def test_two_stage_fp8_follows_bf16_and_equals_one_process(runs):
    """Emulated FP8 at lr 1e-3: every step's loss within 3 % of the same run without FP8 (emulation stays much
    closer), not identical to it (FP8 really ran), and the 2-stage run equals the one-process run."""
    tmp, fp8_res, _ = runs
    fp8, ref, one = losses(tmp / "fp8"), losses(tmp / "bf"), losses(tmp / "one")
    assert sorted(fp8) == sorted(ref) == sorted(one) == list(range(1, STEPS + 1))
    for step in fp8:
        assert abs(fp8[step] - ref[step]) <= 0.03 * ref[step], (step, fp8[step], ref[step])
        assert abs(fp8[step] - one[step]) <= 1e-4 * abs(one[step]), (step, fp8[step], one[step])
    assert any(fp8[s] != ref[s] for s in fp8)
    assert fp8[STEPS] < fp8[1] - 0.05, fp8
    assert "fp8: tensorwise (emulated) on 28 of 28 linear layers of the blocks" in fp8_res.stderr


def test_fp8_with_lora_and_activation_checkpointing(runs):
    """LoRA + FP8 (rowwise): the adapters' frozen bases run in FP8, the first loss stays within 1 % of the plain LoRA
    run's (B = 0: the base model through FP8), and the loss falls."""
    tmp, _, results = runs
    got, ref = losses(tmp / "lora"), losses(tmp / "lora_ref")
    assert sorted(got) == [1, 2, 3]
    assert abs(got[1] - ref[1]) <= 0.01 * ref[1] and got[1] != ref[1], (got, ref)
    assert got[3] < got[1]
    assert "fp8: rowwise (emulated) on 28 of 28" in results["lora"]["log"]


def test_zero_trainer_with_fp8(runs):
    tmp, _, results = runs
    got = losses(tmp / "zero")
    assert sorted(got) == [1, 2] and all(v == v for v in got.values())
    assert "fp8: tensorwise (emulated) on 28 of 28 linear layers" in results["zero"]["log"]


# ----------------------------------------------------------------------------------------------
# What converts


def test_what_converts_and_what_stays(tiny_llama_pp):
    """Block linears become Float8Linear with the same parameters (state_dict keys, dtypes and values unchanged);
    the embedding and the head do not; a LoRA-wrapped linear keeps its adapters in high precision and gets an FP8
    base; the logits stay close to the model without FP8."""
    from torchao.float8.float8_linear import Float8Linear

    from models import load_sequential
    from models.fp8 import convert_fp8
    from models.lora import LoraConfig, LoraLinear, apply_lora
    from tests.conftest import token_batch

    _, pp = tiny_llama_pp
    ref = load_sequential(pp)
    model = load_sequential(pp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = [m for k, m in model.layers.items() if 1 <= int(k) <= 4]
    apply_lora(blocks[0], LoraConfig(r=4, alpha=8, target_modules=("q_proj",)))
    names = [n for b in blocks for n in convert_fp8(b, "tensorwise", emulate=True)]
    assert len(names) == 4 * 7
    assert not any(isinstance(m, Float8Linear) for k, m in model.layers.items() if int(k) in (0, 5))
    q = blocks[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and isinstance(q.base_linear, Float8Linear) and q.base_linear.weight is q.weight
    assert isinstance(blocks[1].self_attn.q_proj, Float8Linear)
    after = model.state_dict()
    assert set(after) - {k for k in after if "lora_" in k} == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    ids, pos, _ = token_batch(512)
    with torch.no_grad():
        got, want = model(ids, pos), ref(ids, pos)
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < 0.1, rel


def test_shape_filter():
    """Dims not multiples of 16, the router and the head never convert; on hardware, torchao's size thresholds
    per recipe apply (tensorwise: llama-3-8b's k_proj [1024, 4096] stays, q_proj converts; rowwise: stricter)."""
    import torch.nn as nn

    from models.fp8 import eligible

    def lin(n_in, n_out):
        with torch.device("meta"):
            return nn.Linear(n_in, n_out, bias=False)

    assert eligible("self_attn.q_proj", lin(4096, 4096), "tensorwise", False)
    assert not eligible("self_attn.k_proj", lin(4096, 1024), "tensorwise", False)
    assert eligible("self_attn.k_proj", lin(4096, 1024), "tensorwise", True)
    assert not eligible("mlp.up_proj", lin(2048, 4096), "rowwise", False)
    assert eligible("mlp.up_proj", lin(4096, 14336), "rowwise_with_gw_hp", False)
    assert not eligible("x.q_proj", lin(4104, 4096), "tensorwise", True)
    assert not eligible("block_sparse_moe.gate", lin(4096, 16), "tensorwise", True)
    assert not eligible("lm_head", lin(4096, 128256), "tensorwise", False)


# ----------------------------------------------------------------------------------------------
# Mistakes: one line before any process group


@pytest.mark.parametrize("fp8, words", [
    ({}, ["fp8: missing required key 'fp8.recipe'", "tensorwise"]),
    ({"emulate": True}, ["fp8.recipe", "fp8.emulate"]),
    ({"recipe": "delayed"}, ["fp8.recipe", "tensorwise, rowwise, rowwise_with_gw_hp", "'delayed'"]),
    ({"recipe": "rowwise", "emulte": True}, ["unknown key 'fp8.emulte'", "fp8.emulate"]),
    ({"recipe": "rowwise"}, ["fp8:", "compute capability >= 8.9", "fp8.emulate: true"]),
])
def test_bad_fp8_sections_are_one_line(fp8, words, tiny_llama_pp, tmp_path, capsys):
    import torch.distributed as dist

    import train_ds

    _, pp = tiny_llama_pp
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(train_config(pp, tmp_path / "run", dims=(1, 1), fp8=fp8)))
    code = train_ds.main(["--config", str(path)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert all(w in errors[0] for w in words), errors[0]
    assert not dist.is_initialized()
