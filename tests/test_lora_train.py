"""LoRA training in both trainers (the `lora:` section): frozen base, trained adapters, adapter-only checkpoints.

CPU, fp32 (bf16 for the tied head), the tiny random llama. Launches are shared: one 2-stage LoRA run (the
reference), one SIGKILLed 2-stage run and its resume, one 2-stage bf16 run of a tied-embedding model, and one
warm process (tests/forked_runs.py) for the single-process runs of both trainers. Config mistakes run
in-process, as `python train_ds.py --config X`, and stop before any process group.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train_ds
import train_ds_zero
from training.ds.safe_load import safe_load
from tests.conftest import ROOT, launch_background, launch_env, run_deepspeed, sigkill_after_rows, train_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 4, "alpha": 8, "target_modules": TARGETS}
STEPS = 12  # 26 samples, 4 per step: 6 steps per epoch x 2 epochs
COMMON = {"n_epoches": 2, "save_interval": 2, "keep_last_n": 2, "optimizer.params.lr": 3e-3}


def lora_run(pp, save_path, dims=(2, 1), **overrides) -> dict:
    return train_config(pp, save_path, dims=dims, **{"lora": dict(LORA), **COMMON, **overrides})


def losses(save_path: Path) -> dict[int, float]:
    """Loss by step from metrics.jsonl; a step logged twice (a crashed run's, then the resumed one) keeps the last."""
    return {r["step"]: r["loss"] for r in map(json.loads, (save_path / "metrics.jsonl").read_text().splitlines())}


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


def ok(res):
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def trained_numel(tag_dir: Path) -> dict[str, int]:
    """Tensors of the checkpoint's layer files by `layer file:name`, with their sizes."""
    out = {}
    for path in sorted(tag_dir.glob("layer_*-model_states.pt")):
        for name, tensor in torch.load(path, weights_only=True).items():
            out[f"{path.name}:{name}"] = tensor.numel()
    return out


def adam_state_numel(state: dict) -> int:
    """Elements of one optimizer state dict's exp_avg tensors (one per trained parameter)."""
    return sum(s["exp_avg"].numel() for s in state["state"].values())


# ----------------------------------------------------------------------------------------------
# Runs shared by the tests


@pytest.fixture(scope="module")
def two_stage(tiny_llama_pp, tmp_path_factory):
    """The reference: 2 pipeline stages, LoRA on every linear of the blocks, 12 steps, checkpoints every 2."""
    _, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("lora_two")
    res = ok(run_deepspeed("train_ds.py", lora_run(pp, tmp / "run"), tmp, 2))
    return tmp / "run", res


@pytest.fixture(scope="module")
def forked(tiny_llama_pp, tmp_path_factory):
    """Single-process runs in one warm process: the pipeline trainer with LoRA (same config as two_stage, one
    stage), without LoRA (one step), with LoRA and activation checkpointing (two steps); the ZeRO-3 trainer with
    LoRA (4 steps) and its resume from step 2; LoRA with packing and ZeRO-1 CPU offload (3 steps)."""
    hf, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("lora_forked")
    jobs, names = [], []

    def job(name, trainer, cfg, **extra):
        path = tmp / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg))
        names.append(name)
        jobs.append(dict(trainer=trainer, config=str(path), log=str(tmp / f"{name}.log"), **extra))

    job("one", "train_ds", lora_run(pp, tmp / "one", dims=(1, 1)))
    job("base", "train_ds", train_config(pp, tmp / "base", dims=(1, 1), max_steps=1, save_final=False,
                                         **{"optimizer.params.lr": 3e-3}))
    job("ckpt", "train_ds", lora_run(pp, tmp / "ckpt", dims=(1, 1), max_steps=2, save_interval=0, save_final=False,
                                     use_grad_ckpt=True))
    job("packed_offload", "train_ds", lora_run(pp, tmp / "packed_offload", dims=(1, 1), max_steps=3, packing=True,
                                               save_interval=0, zero_optimization={"stage": 1, "offload_optimizer":
                                                                                   {"device": "cpu"}}))
    zero = dict(max_steps=4, keep_last_n=5, **{"optimizer.params.torch_adam": True})
    job("zero", "train_ds_zero", lora_run(hf, tmp / "zero", dims=(1, 1), **zero))
    job("zero_resume", "train_ds_zero", lora_run(hf, tmp / "zero_resume", dims=(1, 1), resume=True, **zero),
        copy=[str(tmp / "zero"), str(tmp / "zero_resume")], exclude=["checkpoint_final", "global_step4",
                                                                     "metrics.jsonl"])
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_runs.py"), str(tmp / "jobs.json"),
                          str(tmp / "results.json")], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = dict(zip(names, json.loads((tmp / "results.json").read_text())))
    for name, j in zip(names, jobs):
        results[name]["log"] = Path(j["log"]).read_text()
        assert results[name]["rc"] == 0, (name, results[name]["log"][-3000:])
    return tmp, results


# ----------------------------------------------------------------------------------------------
# The pipeline trainer


def test_two_stages_match_one_process_and_the_base_model(two_stage, forked):
    """Adapters start at B = 0: the first loss is the base model's; the 2-stage run and the one-process run
    agree (the adapters are seeded per layer, whatever the partition); the loss falls."""
    run, res = two_stage
    tmp, _ = forked
    two, one, base = losses(run), losses(tmp / "one"), losses(tmp / "base")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    assert close(two[1], base[1]) and close(one[1], base[1]), (two[1], one[1], base[1])
    for step in two:
        assert close(two[step], one[step], 1e-4), (step, two[step], one[step])
    assert two[STEPS] < two[1] - 0.05, two
    assert "lora: r=4 alpha=8 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: 28 modules, " in res.stderr


def test_checkpoint_holds_adapters_and_their_optimizer_state_only(two_stage, tiny_llama_pp):
    """Layer files: only `.lora_A`/`.lora_B` (DeepSpeed's exclude_frozen_parameters); the optimizer state covers
    exactly those elements; LORA.json names the base and its fingerprint."""
    from utils.lora_ckpt import base_fingerprint, read_lora_meta

    _, pp = tiny_llama_pp
    run, _ = two_stage
    tag = run / "checkpoint_final"
    tensors = trained_numel(tag)
    assert tensors and all(k.endswith((".lora_A", ".lora_B")) for k in tensors), sorted(tensors)
    assert {k.split(":")[0] for k in tensors} == {f"layer_0{i}-model_states.pt" for i in range(1, 5)}
    assert len(tensors) == 4 * len(TARGETS) * 2
    for empty in ("layer_00-model_states.pt", "layer_05-model_states.pt"):  # embedding, norm + head: frozen
        assert torch.load(tag / empty, weights_only=True) == {}
    state_numel = 0
    for stage_file in sorted(tag.glob("mp_rank_*_model_states.pt")):  # fp32 pipeline: the optimizer per stage
        ckpt = safe_load(stage_file)
        assert ckpt["module"] is None  # the pipeline's weights live in the layer files
        state_numel += adam_state_numel(ckpt["optimizer"])
    assert state_numel == sum(tensors.values())
    meta = read_lora_meta(str(tag))
    assert meta["lora"]["target_modules"] == TARGETS and meta["lora"]["r"] == 4 and meta["model_type"] == "llama"
    assert meta["base_model_path"] == str(pp) and meta["base_fingerprint"] == base_fingerprint(str(pp))
    assert "LORA.json" in json.loads((tag / "MANIFEST.json").read_text())["files"]


def test_sigkill_then_resume_reproduces_the_losses(two_stage, tiny_llama_pp, tmp_path):
    """As tests/test_resume.py for full training: kill every rank after the step-6 checkpoint, resume (base
    weights from model_path, adapters and their optimizer state from the checkpoint), same losses. The base
    weights never change in training: the resumed run starts from model_path's and still follows the
    reference."""
    _, pp = tiny_llama_pp
    ref = losses(two_stage[0])
    out = tmp_path / "crash"
    cfg = lora_run(pp, out)
    proc = launch_background(cfg, tmp_path, "crash")
    sigkill_after_rows(proc, out, 7)
    assert not (out / "checkpoint_final").exists(), "run finished before the kill; the test proves nothing"
    assert list(out.glob("global_step*")), "no periodic checkpoint was written before the kill"

    cfg["resume"] = True
    res = ok(run_deepspeed("train_ds.py", cfg, tmp_path, 2))
    assert "resumed from" in res.stderr
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert close(got[step], ref[step]), (step, got[step], ref[step])


def test_activation_checkpointing_gives_the_same_losses(forked):
    """use_grad_ckpt: same first loss and, through the first step's gradients, the same second loss."""
    tmp, _ = forked
    one, ckpt = losses(tmp / "one"), losses(tmp / "ckpt")
    assert sorted(ckpt) == [1, 2]
    for step in (1, 2):
        assert close(ckpt[step], one[step]), (step, ckpt[step], one[step])


def test_only_adapters_get_gradients_with_and_without_activation_checkpointing(tiny_llama_pp):
    """In-process, the trainer's own `training.lora.apply_to_layers` on all layers in one process, B made
    non-zero: the gradients are exactly the adapters', all of them, and recomputing the blocks in backward
    (use_grad_ckpt) changes neither the loss nor a gradient."""
    from models import load_sequential
    from models.common import ModelOptions
    from models.lora import is_lora_name
    from tests.conftest import token_batch
    from training.lora import apply_to_layers
    from training.plan import lora_config
    from utils.config import validate

    _, pp = tiny_llama_pp
    lcfg = lora_config(validate(lora_run(pp, "unused", dims=(1, 1))))

    def grads(ckpt: bool):
        model = load_sequential(pp, opts=ModelOptions(use_grad_ckpt=ckpt)).train()
        assert apply_to_layers(((int(k), layer) for k, layer in model.layers.items()), lcfg, seed=7) == 4 * 7
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        ids, pos, labels = token_batch(512)
        loss = model.loss(ids, labels, pos)
        loss.backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, trainable

    loss, got, trainable = grads(False)
    assert sorted(got) == sorted(trainable) and len(got) == 4 * 7 * 2 and all(map(is_lora_name, got))
    assert all(g.abs().sum() > 0 for g in got.values())
    loss_ckpt, got_ckpt, _ = grads(True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    assert sorted(got_ckpt) == sorted(got)
    for name in got:
        torch.testing.assert_close(got_ckpt[name], got[name], rtol=1e-5, atol=1e-7)


def test_tied_embedding_in_bf16_over_two_stages(tmp_path):
    """A tied head over 2 stages in bf16: DeepSpeed all-reduces the tied weight's gradient between the stages
    (reading `_hp_grad` under its bf16 optimizer), which the frozen embedding does not have."""
    from models.convert import hg_to_pp
    from models.tiny import make_tiny_llama

    make_tiny_llama(tmp_path / "hf", seed=1, tie_word_embeddings=True)
    hg_to_pp(tmp_path / "hf", tmp_path / "pp", log=lambda msg: None)
    cfg = lora_run(tmp_path / "pp", tmp_path / "run", max_steps=3, save_interval=0,
                   **{"bf16": {"enabled": True}, "optimizer.params.torch_adam": True, "lora.target_modules":
                      ["q_proj", "v_proj"]})
    ok(run_deepspeed("train_ds.py", cfg, tmp_path, 2))
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3] and all(v == v for v in got.values()) and got[3] < got[1], got
    tensors = trained_numel(tmp_path / "run" / "checkpoint_final")
    assert len(tensors) == 4 * 2 * 2 and all(k.endswith((".lora_A", ".lora_B")) for k in tensors)


# ----------------------------------------------------------------------------------------------
# The ZeRO trainer


def test_zero_trainer_trains_adapters_only_and_resumes(forked, two_stage, tiny_llama_pp):
    """ZeRO-3 on transformers' model: first loss = the pipeline's (same data, B = 0); the checkpoint holds the
    adapters and an fp32 optimizer partition of exactly their size; resume from step 2 gives the same losses; the
    final HF export has the adapters merged (W + alpha/r * B A) and nothing else changed."""
    from tests.conftest import read_hf_tensors

    tmp, _ = forked
    zero, pipe = losses(tmp / "zero"), losses(two_stage[0])
    assert sorted(zero) == [1, 2, 3, 4] and close(zero[1], pipe[1]), (zero, pipe[1])
    resumed = losses(tmp / "zero_resume")
    assert sorted(resumed) == [3, 4] and all(close(resumed[s], zero[s]) for s in (3, 4)), (resumed, zero)

    tag = tmp / "zero" / "checkpoint_final"
    module = safe_load(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    names = list(module["module"])
    assert len(names) == 4 * len(TARGETS) * 2 and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    optim = safe_load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    shapes = [s for group in module["param_shapes"] for s in group.values()]
    assert sum(t.numel() for t in optim["fp32_flat_groups"]) == sum(s.numel() for s in shapes)
    assert len(shapes) == len(names)

    base = read_hf_tensors(tiny_llama_pp[0])
    merged = read_hf_tensors(tag)
    assert sorted(merged) == sorted(base)  # no adapter keys in the export
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(tuple(f"{t}.weight" for t in TARGETS)) for k in changed), sorted(changed)


# ----------------------------------------------------------------------------------------------
# Mistakes: one line, exit code 2, before any process group


def run_main(main, cfg: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    path = tmp_path / "user.yml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["--config", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    import torch.distributed as dist

    assert not dist.is_initialized()
    return code, errors[0]


@pytest.mark.parametrize("lora, words", [
    ({"r": 0}, ["lora.r", ">= 1"]),
    ({"alpha": -1}, ["lora.alpha", "> 0"]),
    ({"dropout": 1.0}, ["lora.dropout", "[0, 1)"]),
    ({"target_modules": []}, ["lora.target_modules", "non-empty list"]),
    ({"target_modules": "q_proj"}, ["lora.target_modules", "expected list"]),
    ({"quantize": "int4"}, ["lora.quantize", "expected nf4", "'int4'"]),
    ({"r": None}, ["missing required key 'lora.r'"]),
    ({"rank": 8}, ["unknown key 'lora.rank'", "did you mean 'lora.r'"]),
    ({"modules_to_save": ["self_attn"]}, ["lora.modules_to_save", "self_attn", "q_proj"]),
])
def test_bad_lora_values_are_one_line(lora, words, tiny_llama_pp, tmp_path, capsys):
    _, pp = tiny_llama_pp
    cfg = lora_run(pp, tmp_path / "run", dims=(1, 1))
    cfg["lora"].update(lora)
    cfg["lora"] = {k: v for k, v in cfg["lora"].items() if v is not None}
    code, line = run_main(train_ds.main, cfg, tmp_path, capsys)
    assert code == 2 and all(w in line for w in words), line


def test_lora_section_from_yaml_and_command_line():
    """`--lora.r=8` adds to the section, `--lora=null` switches LoRA off; alpha defaults to r."""
    from training.plan import lora_config
    from utils.config import load_config

    path = Path(ROOT / "configs" / "tiny_llama_cpu.yml")
    assert lora_config(load_config(str(path))) is None
    cfg = load_config(str(path), {"lora.r": 8, "lora.target_modules": ["q_proj"]})
    assert lora_config(cfg).to_dict() == {"r": 8, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj"],
                                          "modules_to_save": [], "quantize": None}
    assert lora_config(load_config(str(path), {"lora.r": 8, "lora.target_modules": ["q_proj"], "lora": None})) is None


@pytest.mark.parametrize("main", [train_ds.main, train_ds_zero.main], ids=["pipeline", "zero"])
def test_unknown_target_lists_the_valid_names(main, tiny_llama_pp, tmp_path, capsys):
    hf, pp = tiny_llama_pp
    cfg = lora_run(pp if main is train_ds.main else hf, tmp_path / "run", dims=(1, 1),
                   **{"lora.target_modules": ["q_proj", "query_key_value"]})
    code, line = run_main(main, cfg, tmp_path, capsys)
    assert code == 2 and "'query_key_value' not in llama" in line, line
    assert "valid names: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in line, line


def test_a_stage_with_nothing_to_train_is_refused(tiny_llama_pp, tmp_path, capsys, monkeypatch):
    """parts [1, 5]: the first stage holds the frozen embedding alone."""
    _, pp = tiny_llama_pp
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = lora_run(pp, tmp_path / "run", **{"model_topo.parts": [1, 5]})
    code, line = run_main(train_ds.main, cfg, tmp_path, capsys)
    assert code == 2 and "lora: pipeline stage 0 (layers 0..0" in line and "modules_to_save" in line, line


def test_resume_refuses_another_base_or_lora_section(two_stage, tiny_llama_pp, tmp_path, capsys, monkeypatch):
    """A base dir whose weights differ (one layer file altered), another lora section, no lora section: each is
    one line naming what differs, before any process group."""
    _, pp = tiny_llama_pp
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    shutil.copytree(two_stage[0], run)
    other = tmp_path / "other_base"
    shutil.copytree(pp, other)
    state = torch.load(other / "layer_02-model_states.pt", weights_only=True)
    state["mlp.up_proj.weight"][0, 0] += 1.0
    torch.save(state, other / "layer_02-model_states.pt")

    code, line = run_main(train_ds.main, lora_run(other, run, resume=True), tmp_path, capsys)
    assert code == 2 and f"model_path {other}: its weights differ" in line and str(pp) in line, line
    code, line = run_main(train_ds.main, lora_run(pp, run, resume=True, **{"lora.r": 8}), tmp_path, capsys)
    assert code == 2 and "'r': 4" in line and "'r': 8" in line and "same lora section" in line, line
    cfg = lora_run(pp, run, resume=True)
    del cfg["lora"]
    code, line = run_main(train_ds.main, cfg, tmp_path, capsys)
    assert code == 2 and "holds LoRA adapters" in line, line


def test_packing_and_zero1_cpu_offload_train_the_adapters_only(forked):
    """LoRA with packed rows and ZeRO-1 whose optimizer lives in CPU memory (DeepSpeed's CPU Adam): it trains,
    and the final checkpoint's layer files hold the adapters only."""
    tmp, results = forked
    assert "packing:" in results["packed_offload"]["log"]
    rows = losses(tmp / "packed_offload")
    assert sorted(rows) == [1, 2, 3] and all(v == v and v < 20 for v in rows.values()), rows
    tensors = trained_numel(tmp / "packed_offload" / "checkpoint_final")
    assert tensors and all(k.endswith((".lora_A", ".lora_B")) for k in tensors), sorted(tensors)
