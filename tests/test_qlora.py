"""QLoRA (`lora: {..., quantize: nf4}`): LoRA adapters on base linears held in 4-bit NF4 (torchao's NF4Tensor), CPU.

Launches: one 2-stage QLoRA run (the reference, checkpoints every 2 steps), one SIGKILLed copy and its resume; one warm
process (tests/forked_runs.py) for the full fine-tuning run of the NF4-dequantized base (its first loss is what B = 0
must give). The export, the gradients and the memory planner are checked in-process.
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

from tests.conftest import (ROOT, launch_background, launch_env, run_cli, run_deepspeed, sigkill_after_rows,
                            train_config)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QLORA = {"r": 4, "alpha": 8, "target_modules": TARGETS, "quantize": "nf4"}
STEPS = 12
COMMON = {"n_epoches": 2, "save_interval": 2, "keep_last_n": 2, "optimizer.params.lr": 3e-3}


def qlora_run(pp, save_path, dims=(2, 1), **overrides) -> dict:
    return train_config(pp, save_path, dims=dims, **{"lora": dict(QLORA), **COMMON, **overrides})


def losses(save_path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (save_path / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


def ok(res):
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def dequantized_base(pp: Path, out: Path) -> Path:
    """A copy of pipeline dir `pp` whose NF4-held linears are replaced by dequant(NF4(W)): the model QLoRA trains."""
    from models import resolve_dir
    from models.lora import LoraConfig
    from models.nf4 import nf4_linear_names, nf4_roundtrip

    shutil.copytree(pp, out)
    specs = resolve_dir(str(pp)).specs()
    lcfg = LoraConfig.from_dict(QLORA)
    for idx, spec in enumerate(specs):
        path = out / f"layer_{idx:02d}-model_states.pt"
        if not path.exists():
            continue
        with torch.device("meta"):
            names = nf4_linear_names(spec.build(), lcfg)
        state = torch.load(path, weights_only=True)
        for name in names:
            state[f"{name}.weight"] = nf4_roundtrip(state[f"{name}.weight"]).to(state[f"{name}.weight"].dtype)
        torch.save(state, path)
    return out


@pytest.fixture(scope="module")
def two_stage(tiny_llama_pp, tmp_path_factory):
    _, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("qlora_two")
    res = ok(run_deepspeed("train_ds.py", qlora_run(pp, tmp / "run"), tmp, 2))
    return tmp / "run", res


@pytest.fixture(scope="module")
def forked(tiny_llama_pp, tmp_path_factory):
    """One step of full fine-tuning of the NF4-dequantized base (its loss before any update is the base's)."""
    _, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("qlora_forked")
    deq = dequantized_base(pp, tmp / "deq")
    jobs = []
    for name, cfg in (("deq", train_config(deq, tmp / "deq_run", dims=(1, 1), max_steps=1, save_final=False)),
                      ("orig", train_config(pp, tmp / "orig_run", dims=(1, 1), max_steps=1, save_final=False))):
        (tmp / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        jobs.append(dict(trainer="train_ds", config=str(tmp / f"{name}.yml"), log=str(tmp / f"{name}.log")))
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_runs.py"), str(tmp / "jobs.json"),
                          str(tmp / "results.json")], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    for r, j in zip(results, jobs):
        assert r["rc"] == 0, Path(j["log"]).read_text()[-3000:]
    return tmp


def test_first_loss_is_the_dequantized_base_and_the_loss_falls(two_stage, forked):
    """B = 0: the first QLoRA loss equals the loss of the NF4-dequantized base model (and not the original base's,
    which differs by the quantization error); training lowers it."""
    run, res = two_stage
    got, deq, orig = losses(run), losses(forked / "deq_run"), losses(forked / "orig_run")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert close(got[1], deq[1]), (got[1], deq[1])
    assert not close(got[1], orig[1], 1e-4), (got[1], orig[1])  # the 4-bit base really is what trains
    assert got[STEPS] < got[1] - 0.05, got
    assert "; base in 4-bit NF4: 28 linear layers" in res.stderr


def test_checkpoint_holds_adapters_and_their_optimizer_state_only(two_stage):
    from training.ds.safe_load import safe_load

    run, _ = two_stage
    tag = run / "checkpoint_final"
    tensors = {}
    for path in sorted(tag.glob("layer_*-model_states.pt")):
        for name, tensor in torch.load(path, weights_only=True).items():
            tensors[f"{path.name}:{name}"] = tensor.numel()
    assert len(tensors) == 4 * len(TARGETS) * 2 and all(k.endswith((".lora_A", ".lora_B")) for k in tensors)
    state = sum(sum(s["exp_avg"].numel() for s in safe_load(f)["optimizer"]["state"].values())
                for f in sorted(tag.glob("mp_rank_*_model_states.pt")))
    assert state == sum(tensors.values())
    meta = json.loads((tag / "LORA.json").read_text())
    assert meta["lora"]["quantize"] == "nf4"


def test_sigkill_then_resume_reproduces_the_losses(two_stage, tiny_llama_pp, tmp_path):
    _, pp = tiny_llama_pp
    ref = losses(two_stage[0])
    out = tmp_path / "crash"
    cfg = qlora_run(pp, out)
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


def test_merged_export_is_the_dequantized_base_plus_the_adapters(two_stage, tiny_llama_pp, tmp_path):
    """pp_to_hg of the QLoRA checkpoint: every NF4-held linear is dequant(NF4(W)) + alpha/r · B A (1e-5), every other
    tensor the base's; the log says the base was dequantized."""
    from models import load_sequential
    from models.nf4 import nf4_roundtrip
    from tests.conftest import read_hf_tensors

    hf, pp = tiny_llama_pp
    run, _ = two_stage
    res = run_cli("convert_model.py", "pp_to_hg", "--input-path", str(run / "checkpoint_final"), "--save-path",
                  str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr
    assert "NF4-dequantized base" in res.stdout + res.stderr
    merged, base = read_hf_tensors(tmp_path / "merged"), read_hf_tensors(hf)
    assert sorted(merged) == sorted(base)
    tag = run / "checkpoint_final"
    for block in range(4):
        state = torch.load(tag / f"layer_{block + 1:02d}-model_states.pt", weights_only=True)
        for local, tensor in state.items():
            if not local.endswith(".lora_A"):
                continue
            stem = local[: -len(".lora_A")]
            name = f"model.layers.{block}.{stem}.weight"
            want = nf4_roundtrip(base[name]) + 2.0 * state[f"{stem}.lora_B"].float() @ tensor.float()
            torch.testing.assert_close(merged[name].float(), want.to(base[name].dtype).float(), rtol=1e-5, atol=1e-6)
    for name in base:
        if "layers." not in name or not name.endswith("proj.weight"):
            assert torch.equal(merged[name], base[name]), name


def test_peft_adapter_loads(two_stage, tiny_llama_pp, tmp_path):
    """--adapter-only: a PEFT adapter that `PeftModel.from_pretrained` loads onto the HF base, its adapters equal to
    the checkpoint's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf, _ = tiny_llama_pp
    run, _ = two_stage
    res = run_cli("convert_model.py", "pp_to_hg", "--input-path", str(run / "checkpoint_final"), "--save-path",
                  str(tmp_path / "adapter"), "--adapter-only")
    assert res.returncode == 0, res.stderr
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf), tmp_path / "adapter")
    state = torch.load(run / "checkpoint_final" / "layer_01-model_states.pt", weights_only=True)
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(a, state["self_attn.q_proj.lora_A"].to(a.dtype))


# ----------------------------------------------------------------------------------------------
# In-process


def test_only_adapters_get_gradients(tiny_llama_pp):
    """The trainer's layer hook (NF4 as each layer is built and loaded, then the adapters): the NF4 weights are
    neither parameters nor state_dict entries, B = 0 gives the dequantized base's loss exactly, and with B made
    non-zero only the adapters get gradients."""
    from models import load_sequential
    from models.lora import LoraConfig, apply_lora, is_lora_name
    from models.nf4 import Nf4Linear, nf4_roundtrip, quantize_frozen_linears
    from tests.conftest import token_batch

    _, pp = tiny_llama_pp
    lcfg = LoraConfig.from_dict(QLORA)
    deq = load_sequential(pp)
    model = load_sequential(pp)
    for key, layer in model.layers.items():
        names = quantize_frozen_linears(layer, lcfg)
        for name in names:
            sub = deq.layers[key].get_submodule(name)
            sub.weight.data = nf4_roundtrip(sub.weight)
        apply_lora(layer, lcfg)
    assert sum(isinstance(m, Nf4Linear) for m in model.modules()) == 0  # wrapped by the adapters
    assert not any("weight" in k and "proj" in k for k in model.state_dict())
    ids, pos, labels = token_batch(512)
    with torch.no_grad():
        torch.testing.assert_close(model.loss(ids, labels, pos), deq.loss(ids, labels, pos), rtol=1e-6, atol=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.1)
    model.loss(ids, labels, pos).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got and all(map(is_lora_name, got)) and len(got) == 4 * 7 * 2


def test_memory_planner_counts_4_bit_weights():
    """tools.memory: a QLoRA stage's weights are ~0.52 B per NF4-held weight instead of 2 (bf16)."""
    from tools import memory

    hf_cfg = json.loads((ROOT / "models" / "released" / "qwen3-8b.json").read_text())
    lora = {"r": 16, "alpha": 16.0, "dropout": 0.0, "target_modules": TARGETS, "modules_to_save": [],
            "quantize": None}
    setup = memory.Setup(precision="bf16", optimizer="adamw", state_bytes=8, zero_stage=0, offload=False,
                         grad_acc_fp32=True, pipe=1, data=1, micro_batch=1, micro_batches=1, seq=2048, grad_ckpt=True,
                         fused_head_loss=True, parts="auto", torch_adam=False, reduce_bucket=int(5e8), lora=lora)
    bf16 = memory.plan_memory(hf_cfg, setup).stages[0].weights
    q = memory.plan_memory(hf_cfg, memory._replace(setup, lora={**lora, "quantize": "nf4"})).stages[0].weights
    assert 0.25 * bf16 < q < 0.45 * bf16, (q / 2**30, bf16 / 2**30)  # embedding and head stay bf16
    assert "4-bit NF4" in memory.format_plan(memory.plan_memory(hf_cfg, memory._replace(
        setup, lora={**lora, "quantize": "nf4"})))


def test_refusals_are_one_line(tiny_llama_pp, tmp_path, capsys):
    """The ZeRO trainer and stacked MoE experts are refused with one line (no process group); the meta-model check
    names the experts."""
    import torch.distributed as dist

    import models
    import train_ds_zero
    from models.nf4 import check_nf4
    from models.sequential import SequentialModel

    hf, _ = tiny_llama_pp
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(qlora_run(hf, tmp_path / "run", dims=(1, 1))))
    assert train_ds_zero.main(["--config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "lora.quantize: nf4 runs in train_ds.py" in errors[0], errors
    assert not dist.is_initialized()
    from models.mixtral import debug_config

    resolved = models.resolve(debug_config())
    with torch.device("meta"):
        moe = SequentialModel(resolved.specs(), None)
    with pytest.raises(models.ModelError, match="stacked experts"):
        check_nf4(moe, "mixtral")
