"""Pipeline training end to end on 2 CPU ranks with DeepSpeed's launcher (gloo)."""
import json

import pytest

from tests.conftest import run_cli, run_deepspeed, train_config


def metrics(save_path):
    return [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]


def assert_ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def two_stage_run(tiny_llama_pp, tmp_path_factory):
    _, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("pp2")
    cfg = train_config(pp, tmp / "out", dims=(2, 1), n_epoches=3,
                       csv_monitor={"enabled": True, "output_path": str(tmp / "csv"), "job_name": "tiny"})
    res = run_deepspeed("train_ds.py", cfg, tmp, 2)
    assert_ok(res)
    return tmp / "out", res


def test_two_stage_training_loss_falls_and_logs_every_step(two_stage_run):
    out, res = two_stage_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) == 18  # 26 samples // 4 x 3
    for key in ("epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "tflops_per_gpu",
                "step_time_s", "peak_mem_gib"):
        assert all(r[key] is not None for r in rows), key
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert "partition [" in res.stderr
    # DeepSpeed's own monitors work through the same YAML (csv_monitor here; tensorboard alike)
    csv = (out.parent / "csv" / "tiny" / "Train_Samples_train_loss.csv").read_text().splitlines()
    assert len(csv) == 1 + 18 and abs(float(csv[1].split(",")[1]) - rows[0]["loss"]) < 1e-5


def test_final_checkpoint_exports_to_hf_and_loads(two_stage_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = two_stage_run
    final = out / "checkpoint_final"
    assert (final / "COMPLETE").is_file() and (out / "latest").read_text() == "checkpoint_final"
    res = run_cli("convert_model.py", "pp_to_hg", "--input-path", str(final), "--save-path", str(tmp_path / "hf"))
    assert_ok(res)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok("### Human: Hello \n", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    res = run_cli("convert_model.py", "verify", "--hf-path", str(tmp_path / "hf"), "--pp-path", str(final))
    assert_ok(res)


def test_two_stages_equal_one_process(tiny_llama_pp, tmp_path, two_stage_run):
    """Same data, same weights: a 2-stage pipeline and a single process give the same losses."""
    _, pp = tiny_llama_pp
    cfg = train_config(pp, tmp_path / "one", dims=(1, 1), n_epoches=3, max_steps=5)
    assert_ok(run_deepspeed("train_ds.py", cfg, tmp_path, 1))
    one = [r["loss"] for r in metrics(tmp_path / "one")]
    two = [r["loss"] for r in metrics(two_stage_run[0])][:5]
    assert abs(one[0] - two[0]) <= 1e-5 * abs(one[0])
    # Later steps go through Adam, which amplifies last-bit differences; the issue allows 2e-3, but the
    # two graphs compute identically today (a per-stage gradient clipping bug showed up as 1e-3 here).
    for a, b in zip(one[1:], two[1:]):
        assert abs(a - b) <= 1e-4 * abs(a), (one, two)


def test_data_parallel_and_explicit_parts_run(tiny_llama_pp, tmp_path):
    _, pp = tiny_llama_pp
    dp = train_config(pp, tmp_path / "dp", dims=(1, 2), max_steps=3)
    assert_ok(run_deepspeed("train_ds.py", dp, tmp_path, 2))
    assert len(metrics(tmp_path / "dp")) == 3
    explicit = train_config(pp, tmp_path / "ex", dims=(2, 1), max_steps=3, **{"model_topo.parts": [2, 4]})
    res = run_deepspeed("train_ds.py", explicit, tmp_path, 2)
    assert_ok(res)
    assert "partition [2, 4]" in res.stderr
    # the 1-process run of the same data: the first loss agrees across topologies
    ref = metrics(tmp_path / "ex")[0]["loss"]
    assert abs(metrics(tmp_path / "dp")[0]["loss"] - ref) <= 1e-5 * abs(ref)


LAUNCH_ERRORS = [
    ((2, 2), {}, ["dims", "needs 4 processes", "2 were launched"]),
    ((2, 1), {"model_topo.parts": [1, 2]}, ["model_topo.parts", "sums to 3", "6 pipeline layers"]),
    ((2, 1), {"train_batch_size": 5, "train_micro_batch_size_per_gpu": 2}, ["train_batch_size", "not divisible"]),
    ((2, 1), {"data_path": "/nonexistent.json"}, ["data_path", "not found"]),
    ((2, 1), {"use_flash_attn": True}, ["flash"]),
    ((2, 1), {"bogus_key": 1}, ["unknown key 'bogus_key'"]),
    ((2, 1), {"model_path": "/nonexistent/model"}, ["model_path", "no config.json in /nonexistent/model"]),
]


def test_launch_error_through_deepspeed_is_one_clear_line(tiny_llama_pp, tmp_path):
    """Through the real launcher: every rank exits non-zero with one `error:` line, no traceback."""
    _, pp = tiny_llama_pp
    dims, overrides, words = LAUNCH_ERRORS[0]
    res = run_deepspeed("train_ds.py", train_config(pp, tmp_path / "err", dims=dims, **overrides), tmp_path, 2)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    err = [line for line in (res.stderr + res.stdout).splitlines() if line.startswith("error:")]
    assert err, res.stderr[-2000:]
    for w in words:
        assert w in err[0], err[0]
    assert not (tmp_path / "err").exists()


@pytest.mark.parametrize("dims, overrides, words", LAUNCH_ERRORS)
def test_user_errors_stop_before_any_process_group(tiny_llama_pp, tmp_path, monkeypatch, capsys, dims,
                                                   overrides, words):
    """Each mistake is caught before the first collective, so checking it in-process (as rank 0 of a
    2-process launch) is what the launcher would show on every rank."""
    import yaml

    import train_ds

    _, pp = tiny_llama_pp
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(train_config(pp, tmp_path / "err", dims=dims, **overrides)))
    assert train_ds.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w in err[0], err[0]
    assert not (tmp_path / "err").exists()


def test_plot_draws_png(two_stage_run, tmp_path):
    out, _ = two_stage_run
    res = run_cli("-m", "utils.plot", str(out), "--out", str(tmp_path / "m.png"))
    assert_ok(res)
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert run_cli("-m", "utils.plot", str(tmp_path / "nothing")).returncode == 2


def test_zero1_cpu_offload_and_lion_train_like_adamw(tiny_llama_pp, tmp_path, two_stage_run):
    """ZeRO-1 with the optimizer offloaded to CPU (DeepSpeed's CPU Adam) reproduces the plain run: same
    first loss and the same gradient norm over both stages; Lion (optimizer.type) trains too."""
    _, pp = tiny_llama_pp
    ref = metrics(two_stage_run[0])
    z1 = train_config(pp, tmp_path / "z1", dims=(2, 1), n_epoches=3, max_steps=3,
                      zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}})
    assert_ok(run_deepspeed("train_ds.py", z1, tmp_path, 2))
    rows = metrics(tmp_path / "z1")
    assert abs(rows[0]["loss"] - ref[0]["loss"]) <= 1e-5 * ref[0]["loss"]
    for got, want in zip(rows, ref[:3]):
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-4 * want["grad_norm"], (rows, ref[:3])
        assert abs(got["loss"] - want["loss"]) <= 1e-4 * want["loss"]
    lion = train_config(pp, tmp_path / "lion", dims=(2, 1), n_epoches=3, max_steps=6,
                        optimizer={"type": "Lion", "params": {"lr": 3e-4, "betas": [0.95, 0.98],
                                                              "weight_decay": 0.01}})
    assert_ok(run_deepspeed("train_ds.py", lion, tmp_path, 2))
    losses = [r["loss"] for r in metrics(tmp_path / "lion")]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


def test_padding_to_the_longest_sample_gives_the_same_losses(tiny_llama_pp, tmp_path, two_stage_run):
    """Micro-batches padded to their longest sample (dynamic shapes between stages, the default) and
    to max_seq_len (fixed shapes) train identically: padding is never attended to nor trained."""
    _, pp = tiny_llama_pp
    cfg = train_config(pp, tmp_path / "fixed", dims=(2, 1), n_epoches=3, max_steps=4, pad_to_multiple_of=0)
    assert_ok(run_deepspeed("train_ds.py", cfg, tmp_path, 2))
    fixed = [r for r in metrics(tmp_path / "fixed")]
    dynamic = metrics(two_stage_run[0])[:4]
    for a, b in zip(fixed, dynamic):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (fixed, dynamic)
    # fixed shapes process max_seq_len tokens per sample; dynamic ones only up to the longest sample
    assert sum(a["tokens_per_s"] * a["step_time_s"] for a in fixed) > sum(
        b["tokens_per_s"] * b["step_time_s"] for b in dynamic)


def packed_first_step_loss(pp, data_path, seq, tbs, seed) -> float:
    """The first step's loss of a packed run, computed in one process from the same rows and weights."""
    import torch

    from data import SFTDataset, load_tokenizer, pad_id_of
    from models import ModelOptions, load_sequential
    from data.batching import BatchPlan, PackedDataset, PipeFeeder

    tok = load_tokenizer(pp)
    packed = PackedDataset(SFTDataset(data_path, tok, seq), seq, seed=seed)
    feeder = PipeFeeder(packed, BatchPlan(len(packed), tbs, 1, tbs, 0, 1, seed), pad_id_of(tok), seq)
    feeder.start_epoch(0)
    model = load_sequential(pp, opts=ModelOptions(packed_sequences=True))
    total = 0.0
    for _ in range(tbs):
        (ids, pos), labels = next(feeder)
        with torch.no_grad():
            total += float(model.loss(ids, labels, pos)) / tbs
    return total


def test_packed_pipeline_trains_equals_one_process_and_profiles(tiny_llama_pp, tmp_path):
    """packing: true through 2 stages: first loss = the packed rows' loss in one process (1e-5), loss
    falls, rows are counted, and profile_step leaves a per-rank time split."""
    from tests.conftest import SAMPLE_DATA

    _, pp = tiny_llama_pp
    cfg = train_config(pp, tmp_path / "packed", dims=(2, 1), n_epoches=8, packing=True, profile_step=2,
                       max_steps=8)
    res = run_deepspeed("train_ds.py", cfg, tmp_path, 2)
    assert_ok(res)
    assert "packing: 26 samples ->" in res.stderr
    rows = metrics(tmp_path / "packed")
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]
    expected = packed_first_step_loss(pp, SAMPLE_DATA, 256, 4, 7)
    assert abs(rows[0]["loss"] - expected) <= 1e-5 * expected, (rows[0]["loss"], expected)
    for rank in (0, 1):
        prof = json.loads((tmp_path / "packed" / "profile" / f"rank{rank}.json").read_text())
        assert prof["stage"] == rank and prof["step"] == 2 and prof["wall_ms"] > 0
