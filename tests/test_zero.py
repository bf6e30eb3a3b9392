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
    save.mkdir()
    if overrides.get("resume"):  # a pipeline checkpoint: not resumable by ZeRO (elsewhere a fresh save_path, so
        (save / "global_step2").mkdir(parents=True)  # the save_path ownership check does not answer first)
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

    from training import zero as train_ds_zero

    _, pp = tiny_llama_pp
    cfg = validate(zero_config(pp, tmp_path / "x"))
    with pytest.raises(ConfigError, match="pp_to_hg"):
        train_ds_zero.read_model_config(cfg, resuming=False)
    assert train_ds_zero.read_model_config(validate(zero_config(pp, tmp_path / "x", from_scratch=True)), False)


TINY_BLOOM = {"model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": 256, "hidden_size": 48,
              "n_layer": 2, "n_head": 4, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 3}


def from_scratch_config(hf_cfg: dict, tmp_path, **overrides) -> dict:
    """A config.json-only model dir, random init, synthetic data (no tokenizer), no `model_topo` at all."""
    model_dir = tmp_path / hf_cfg["model_type"]
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(hf_cfg))
    cfg = zero_config(model_dir, tmp_path / "out", from_scratch=True, synthetic_data=True, data_path=None,
                      max_steps=2, max_seq_len=32, save_final=False, **overrides)
    del cfg["model_topo"]
    return cfg


def test_bloom_from_scratch_falls_back_to_eager_attention_without_model_topo(tmp_path):
    """transformers' BLOOM has no SDPA path: one rank-prefixed line says so and the run trains with eager
    attention; `model_topo` is absent (optional here) and the pipeline-only defaults draw no note."""
    res = run_deepspeed("train_ds_zero.py", from_scratch_config(TINY_BLOOM, tmp_path), tmp_path, 2)
    assert_ok(res)
    notes = [line for line in res.stderr.splitlines() if "has no SDPA support" in line]
    assert len(notes) == 1 and notes[0].startswith("[rank 0] attention: BloomForCausalLM has no SDPA support in "
                                                   "transformers ") and notes[0].endswith("; using eager attention")
    assert "ZeRO stage 3 over 2 ranks, attention eager" in res.stderr
    assert "ignored" not in res.stderr and "pipeline layers only" not in res.stderr  # dims unset, compile_blocks auto
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 and r["tflops_per_gpu"] > 0
               for r in rows)


def test_attention_choice_names_the_class(tmp_path, capsys):
    from transformers import BloomForCausalLM, GlmForCausalLM, LlamaForCausalLM

    from training import zero as train_ds_zero
    from utils.config import ConfigError, validate

    raw = from_scratch_config(TINY_BLOOM, tmp_path)
    cfg = validate(raw)
    assert train_ds_zero.causal_lm_class(cfg, TINY_BLOOM) is BloomForCausalLM
    attn, note = train_ds_zero.choose_attention(cfg, BloomForCausalLM)
    assert attn == "eager" and note.startswith("attention: BloomForCausalLM has no SDPA support in transformers ")
    assert train_ds_zero.choose_attention(cfg, LlamaForCausalLM) == ("sdpa", None)
    assert train_ds_zero.choose_attention(cfg, GlmForCausalLM) == ("sdpa", None)
    assert train_ds_zero.choose_attention(cfg, None) == ("sdpa", None)  # remote code: decided while building
    flash = validate({**raw, "use_flash_attn": True})  # refused by the class, whether flash-attn is installed or not
    with pytest.raises(ConfigError, match="use_flash_attn: BloomForCausalLM has no flash-attention support"):
        train_ds_zero.choose_attention(flash, BloomForCausalLM)
    # a class only known while building (remote code) that refuses SDPA: rebuilt with eager, same note
    model = train_ds_zero.build_model(cfg, {"zero_optimization": {"stage": 0}}, from_weights=False, attn="sdpa")
    assert isinstance(model, BloomForCausalLM) and model.config._attn_implementation == "eager"
    assert "attention: BloomForCausalLM has no SDPA support in transformers " in capsys.readouterr().err


def test_glm_from_scratch_builds_and_trains_a_step_in_process(tmp_path):
    """chatglm3's transformers equivalent (`glm`, as `pp_to_hg --format glm` writes it): planned, built with
    SDPA and one forward/backward the way the trainer runs it (ZeRO-3 on 2 ranks is checked by hand: a
    launch per family would double this file's time). Not in our registry: FLOPs from the parameter count."""
    from transformers import GlmForCausalLM

    from training import zero as train_ds_zero
    from models.chatglm import glm_config
    from models.common import CausalLMLoss
    from tests.test_families import chatglm_config
    from training.setup import plan_run
    from utils.config import validate

    glm = glm_config(chatglm_config(groups=2, qkv_bias=True, rope_ratio=1.0))
    cfg = validate(from_scratch_config(glm, tmp_path))
    plan = plan_run(cfg, train_ds_zero.ZeroTrainer())
    assert (plan.model.attn, plan.model.attn_note) == ("sdpa", None)
    model = train_ds_zero.build_model(cfg, {"zero_optimization": {"stage": 0}}, from_weights=False,
                                      attn=plan.model.attn)
    assert isinstance(model, GlmForCausalLM) and model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, glm["vocab_size"], (2, 32))
    out = model(input_ids=ids, position_ids=torch.arange(32).expand(2, 32), use_cache=False)
    loss = CausalLMLoss()(out.logits, ids)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for p in model.parameters())
    assert train_ds_zero.model_flops_per_token(model, glm, 32) == train_ds_zero.param_flops_per_token(model, glm, 32)


def test_flops_per_token_counts_active_experts_like_the_pipeline_trainer(tiny_llama_pp):
    """Registered model types use train_ds.py's count (models.resolve(...).flops_per_token): for mixtral
    the idle experts drop out; for llama it matches the all-parameter count to within the norms."""
    from transformers import AutoModelForCausalLM

    import models
    from training import zero as train_ds_zero
    from models.mixtral import debug_config
    from tests.test_mixtral import make_model
    from utils.metrics import flops_per_token

    seq = 256

    def pipeline_trainer(hf_cfg):  # the pipeline trainer's count, spelled out
        model = models.resolve(hf_cfg)
        active_params = sum(model.layer_flops(1)) / 2
        return flops_per_token(active_params, model.num_blocks, model.hidden_size, seq)

    mix_cfg = debug_config()
    mixtral = make_model()
    got = train_ds_zero.model_flops_per_token(mixtral, mix_cfg, seq)
    all_params = train_ds_zero.param_flops_per_token(mixtral, mix_cfg, seq)
    assert got == pipeline_trainer(mix_cfg)
    idle = 6.0 * mix_cfg["num_hidden_layers"] * (mix_cfg["num_local_experts"] - mix_cfg["num_experts_per_tok"]) \
        * 3 * mix_cfg["hidden_size"] * mix_cfg["intermediate_size"]
    assert got < all_params and abs((all_params - got) - idle) <= 0.01 * idle, (got, all_params, idle)

    hf, _ = tiny_llama_pp
    llama_cfg = json.loads((hf / "config.json").read_text())
    llama = AutoModelForCausalLM.from_pretrained(hf)
    got = train_ds_zero.model_flops_per_token(llama, llama_cfg, seq)
    assert got == pipeline_trainer(llama_cfg)
    today = train_ds_zero.param_flops_per_token(llama, llama_cfg, seq)
    assert abs(got - today) <= 1e-3 * today, (got, today)


def test_model_topo_is_optional_here_but_train_ds_names_it(tiny_llama_pp, tmp_path, monkeypatch, capsys):
    """In-process: without `model_topo` the ZeRO trainer plans its run; train_ds.py stops with one line
    naming the key (exit 2, no traceback) before any process group exists."""
    import yaml

    import train_ds
    from training import zero as train_ds_zero
    from training.setup import plan_run
    from utils.config import validate

    hf, pp = tiny_llama_pp
    raw = zero_config(hf, tmp_path / "zero")
    del raw["model_topo"]
    cfg = validate(raw)
    train_ds_zero.note_ignored_topology(cfg, 2, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert plan_run(cfg, train_ds_zero.ZeroTrainer()).world == 2
    assert "ignored" not in capsys.readouterr().err
    pipe = train_config(pp, tmp_path / "pp", dims=(1, 1))
    del pipe["model_topo"]
    path = tmp_path / "pp.yml"
    path.write_text(yaml.safe_dump(pipe))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train_ds.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing required key 'model_topo.process_topology.dims'" in errors[0] \
        and "train_ds.py" in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "pp").exists()


def test_random_init_runs_on_the_gpu_below_zero3(monkeypatch):
    import torch
    from training import zero as z
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert z.init_device({"zero_optimization": {"stage": 1}}) == torch.device("cuda", 1)
    assert z.init_device({"zero_optimization": {"stage": 3}}).type == "cpu"  # partitioned while building
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert z.init_device({"zero_optimization": {"stage": 0}}).type == "cpu"
