"""ZeRO-3 training of the whole HF model on 2 CPU ranks (gloo), against the pipeline trainer."""
import json

import pytest
import torch

from tests.conftest import run_deepspeed, train_config


def metrics(save_path):
    return [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]


def assert_ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def zero_config(hf_dir, save_path, **overrides) -> dict:
    """The pipeline tests' config, pointed at the HF dir; `model_topo` stays as it is (ignored by ZeRO).
    torch's AdamW: DeepSpeed's CPU FusedAdam spends seconds probing the CPU at every launch."""
    return train_config(hf_dir, save_path, dims=(2, 1), **{"optimizer.params.torch_adam": True, **overrides})


@pytest.fixture(scope="module")
def zero_run(tiny_llama_pp, tmp_path_factory):
    """12 steps of ZeRO-3 on 2 ranks, stopped after 6 and resumed from the final checkpoint of step 6."""
    hf, _ = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("zero3")
    first = run_deepspeed("train_ds_zero.py", zero_config(hf, tmp / "out", n_epoches=2, max_steps=6, profile_step=2,
                                                          compile_blocks=True), tmp, 2)
    assert_ok(first)
    resumed = run_deepspeed("train_ds_zero.py", zero_config(hf, tmp / "out", n_epoches=2, resume=True), tmp, 2)
    assert_ok(resumed)
    return tmp / "out", first, resumed


@pytest.fixture(scope="module")
def pipeline_reference(tiny_llama_pp, tmp_path_factory):
    """The same 12 steps from train_ds.py on the converted pipeline dir, one stage, one process."""
    _, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("pp_ref")
    cfg = train_config(pp, tmp / "pp", dims=(1, 1), n_epoches=2, save_final=False,
                       **{"optimizer.params.torch_adam": True})
    assert_ok(run_deepspeed("train_ds.py", cfg, tmp, 1))
    return metrics(tmp / "pp")


def test_zero3_loss_falls_and_logs_every_step(zero_run):
    out, first, _ = zero_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))  # 26 samples // 4 x 2 epochs, over two launches
    for key in ("epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "trained_tokens_per_s",
                "tflops_per_gpu", "step_time_s", "peak_mem_gib"):
        assert all(r[key] is not None for r in rows), key
    first3 = sum(r["loss"] for r in rows[:3]) / 3
    last3 = sum(r["loss"] for r in rows[-3:]) / 3
    assert last3 < first3 - 0.3, (first3, last3)
    assert "ZeRO stage 3 over 2 ranks" in first.stderr
    assert "dims [2, 1] ignored" in first.stderr
    assert "compile_blocks: apply to train_ds.py's pipeline layers only" in first.stderr
    for rank in (0, 1):  # profile_step works here too
        assert json.loads((out / "profile" / f"rank{rank}.json").read_text())["step"] == 2
    stats = sorted((out / "rank_stats").glob("rank*.json"))
    assert [json.loads(p.read_text())["rank"] for p in stats] == [0, 1]


def test_zero3_final_export_loads_with_transformers(zero_run, tiny_llama_pp):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = zero_run
    hf, _ = tiny_llama_pp
    final = out / "checkpoint_final"
    assert (final / "COMPLETE").is_file() and (out / "latest").read_text() == "checkpoint_final"
    info = json.loads((final / "COMPLETE").read_text())
    assert info["step"] == 12 and info["dims"] == [1, 2] and info["trainer"] == "zero"
    assert (final / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    start = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("### Human: Hello \n", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    trained = dict(model.named_parameters())
    for name, prm in start.named_parameters():
        assert trained[name].shape == prm.shape, name
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], start.get_parameter(
        "model.layers.0.mlp.up_proj.weight")), "export holds the initial weights"


def test_first_step_loss_equals_pipeline_trainer(zero_run, pipeline_reference):
    """Same data, same weights: ZeRO-3 (2 replicas) and the pipeline trainer agree on the first loss."""
    got, ref = metrics(zero_run[0])[0]["loss"], pipeline_reference[0]["loss"]
    assert abs(got - ref) <= 1e-5 * abs(ref), (got, ref)


def test_resumed_run_follows_the_pipeline_trajectory(zero_run, pipeline_reference):
    """Every step, the 6 after the resume included (weights, Adam state and data order restored),
    tracks the single-process pipeline run of the same steps."""
    _, _, resumed = zero_run
    assert "resumed from" in resumed.stderr and "checkpoint_final at step 6" in resumed.stderr
    zero = [r["loss"] for r in metrics(zero_run[0])]
    ref = [r["loss"] for r in pipeline_reference]
    assert len(zero) == len(ref) == 12
    for step, (a, b) in enumerate(zip(zero, ref), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), (step, zero, ref)


@pytest.mark.parametrize("overrides, words", [
    ({"use_flash_attn": True}, ["flash"]),
    ({"packing": True}, ["packing", "train_ds.py", "attend"]),
    ({"train_batch_size": 5}, ["train_batch_size", "not divisible"]),
    ({"resume": True}, ["resume", "trainer 'pipeline'", "dims [1, 2]"]),
])
def test_errors_before_launching_collectives_are_one_line(tiny_llama_pp, tmp_path, monkeypatch, capsys,
                                                          overrides, words):
    """Checked in-process: the trainer fails before its first collective, so no launcher is needed."""
    import yaml

    import train_ds_zero

    hf, _ = tiny_llama_pp
    save = tmp_path / "err"
    (save / "global_step2").mkdir(parents=True)  # a pipeline checkpoint: not resumable by ZeRO
    (save / "global_step2" / "COMPLETE").write_text(json.dumps({"step": 2, "dims": [2, 1]}))
    cfg_path = tmp_path / "cfg.yml"
    cfg_path.write_text(yaml.safe_dump(zero_config(hf, save, **overrides)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_ds_zero.main(["--config", str(cfg_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err and all(w in err[0] for w in words), (err, words)
    assert not (save / "checkpoint_final").exists()


def test_pipeline_dir_is_refused_with_a_hint(tiny_llama_pp, tmp_path):
    from utils.config import ConfigError, validate

    import train_ds_zero

    _, pp = tiny_llama_pp
    cfg = validate(zero_config(pp, tmp_path / "x"))
    with pytest.raises(ConfigError, match="pp_to_hg"):
        train_ds_zero.read_model_config(cfg, resuming=False)
    assert train_ds_zero.read_model_config(validate(zero_config(pp, tmp_path / "x", from_scratch=True)), False)
