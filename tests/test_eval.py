"""Evaluation: eval_data_path / eval_ratio, every eval_interval steps and at the end, one metrics.jsonl row each.

Two launches: a 2-stage pipeline run (its final eval loss against the same weights evaluated in one process)
and a 2-replica ZeRO-3 run with eval_ratio (the held-out share, split over the replicas with padding, against
the HF export evaluated with transformers)."""
import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT, SAMPLE_DATA, run_cli, run_deepspeed, train_config
from utils.config import ConfigError, validate

EVAL_FILE = ROOT / "examples" / "data" / "sample.jsonl"  # 6 samples


def rows_of(save_path):
    return [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]


def assert_ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def token_weighted_ce(logits_of, samples) -> tuple[float, int]:
    """sum of per-token CE / trained tokens, each sample alone (no padding), in float64."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids, labels = s["input_ids"][None], s["labels"][None]
            logits = logits_of(ids).double()
            total += float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"))
            tokens += int((labels[0, 1:] != -100).sum())
    return total / tokens, tokens


def tokenizer_of(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


# ----------------------------------------------------------------------------------------------
# Pipeline: 2 stages, eval_data_path, eval_interval


@pytest.fixture(scope="module")
def pipeline_eval_run(tiny_llama_pp, tmp_path_factory):
    """5 steps (global batch 8 = micro 4 x accum 2), eval every 2 steps and at the end: steps 2, 4, 5. The 6 eval
    samples make 2 micro-batches of 4, the second with 2 empty padding samples."""
    _, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("pp_eval")
    cfg = train_config(pp, tmp / "out", dims=(2, 1), n_epoches=2, max_steps=5, train_batch_size=8,
                       train_micro_batch_size_per_gpu=4, eval_data_path=[str(EVAL_FILE)], eval_interval=2)
    res = run_deepspeed("train_ds.py", cfg, tmp, 2)
    assert_ok(res)
    return tmp / "out", res


def test_pipeline_writes_eval_rows_at_the_interval_and_at_the_end(pipeline_eval_run):
    out, res = pipeline_eval_run
    rows = rows_of(out)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [2, 4, 5] and all(set(r) == {"step", "eval_loss", "eval_tokens"}
                                                           for r in evals)
    assert len({r["eval_tokens"] for r in evals}) == 1 and evals[0]["eval_tokens"] > 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it trains on the same kind of text
    assert "eval: 6 samples, 2 micro-batches per data-parallel rank" in res.stderr


def test_pipeline_eval_loss_equals_one_process_eval_on_the_final_weights(pipeline_eval_run, tiny_llama_pp):
    from data import SFTDataset
    from models import load_sequential

    out, _ = pipeline_eval_run
    hf, _ = tiny_llama_pp
    last = [r for r in rows_of(out) if "eval_loss" in r][-1]
    model = load_sequential(out / "checkpoint_final").eval()
    samples = SFTDataset(EVAL_FILE, tokenizer_of(hf), 256, warn=None)
    want, tokens = token_weighted_ce(model, [samples[i] for i in range(len(samples))])
    assert last["eval_tokens"] == tokens
    assert abs(last["eval_loss"] - want) <= 1e-5 * want, (last["eval_loss"], want)


def test_plot_draws_the_eval_loss(pipeline_eval_run, tmp_path):
    from utils.plot import read_evals, read_metrics

    out, _ = pipeline_eval_run
    assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_evals(str(out))] == [2, 4, 5]
    res = run_cli("-m", "utils.plot", str(out), "--out", str(tmp_path / "m.png"))
    assert res.returncode == 0, res.stderr
    assert "(5 steps, 3 evaluations)" in res.stdout
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------
# ZeRO: eval_ratio, 2 data-parallel replicas


def test_zero_eval_ratio_holds_out_and_matches_the_hf_export(tiny_llama_pp, tmp_path):
    """26 samples, eval_ratio 0.25: 6 held out (never trained on), 3 per replica in 2 micro-batches of 2 (one
    padding sample each); the final eval loss equals transformers' on the exported weights."""
    from transformers import AutoModelForCausalLM

    from data import SFTDataset
    from training.setup import hold_out

    hf, _ = tiny_llama_pp
    cfg = train_config(hf, tmp_path / "out", max_steps=3, eval_ratio=0.25, train_micro_batch_size_per_gpu=2,
                       **{"optimizer.params.torch_adam": True})
    res = run_deepspeed("train_ds_zero.py", cfg, tmp_path, 2)
    assert_ok(res)
    assert "20 samples, 5 steps/epoch" in res.stderr
    assert "eval: 6 samples, 2 micro-batches per data-parallel rank" in res.stderr
    evals = [r for r in rows_of(tmp_path / "out") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "checkpoint_final")).eval()
    _, held = hold_out(SFTDataset(SAMPLE_DATA, tokenizer_of(hf), 256, warn=None), 0.25, 7)
    want, tokens = token_weighted_ce(lambda ids: model(input_ids=ids).logits, [held[i] for i in range(len(held))])
    assert evals[0]["eval_tokens"] == tokens
    assert abs(evals[0]["eval_loss"] - want) <= 1e-5 * want, (evals[0]["eval_loss"], want)


# ----------------------------------------------------------------------------------------------
# In process: the held-out split, the per-rank plan, config errors, metrics readers


def test_eval_ratio_split_is_seeded_disjoint_and_never_trained(tiny_llama_pp):
    from training.setup import build_datasets

    hf, pp = tiny_llama_pp
    tok = tokenizer_of(hf)

    def split(seed):
        cfg = validate(train_config(pp, "/tmp/unused", eval_ratio=0.25, seed=seed))
        train, held = build_datasets(cfg, tok, len(tok), 4)
        return train.indices, held.indices

    train, held = split(7)
    assert len(held) == 6 and len(train) == 20 and not set(train) & set(held)
    assert sorted(train + held) == list(range(26))
    assert split(7) == (train, held) and split(8)[1] != held
    no_eval = validate(train_config(pp, "/tmp/unused"))
    assert build_datasets(no_eval, tok, len(tok), 4)[1] is None


@pytest.mark.parametrize("n, mbs, dp", [(6, 4, 1), (6, 2, 2), (7, 2, 3), (1, 4, 2)])
def test_eval_plan_runs_every_sample_once_with_equal_micro_batches(n, mbs, dp):
    from data.batching import EvalPlan

    plans = [EvalPlan(n, mbs, r, dp, chunk=2) for r in range(dp)]
    batches = [p.batches() for p in plans]
    assert len({len(b) for b in batches}) == 1 and all(len(mb) == mbs for b in batches for mb in b)
    assert sorted(i for b in batches for mb in b for i in mb if i >= 0) == list(range(n))
    assert sum(plans[0].chunks()) == plans[0].micro_batches == len(batches[0])


@pytest.mark.parametrize("overrides, words", [
    ({"eval_ratio": 0.1, "eval_data_path": "x.jsonl"}, "eval_data_path and eval_ratio: both set"),
    ({"eval_ratio": 1.0}, "eval_ratio: must be in [0, 1)"),
    ({"eval_ratio": -0.1}, "eval_ratio: must be in [0, 1)"),
    ({"eval_interval": 5}, "eval_interval: 5 but no eval set"),
    ({"eval_interval": -1, "eval_ratio": 0.1}, "eval_interval: must be >= 0"),
    ({"eval_data_path": 3}, "eval_data_path: expected"),
    ({"eval_data_path": []}, "eval_data_path: expected a path or a list of paths"),
    ({"eval_ratio": 0.1, "synthetic_data": True}, "synthetic_data has no held-out set"),
])
def test_eval_config_errors_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        validate(train_config(ROOT, "/tmp/unused", **overrides))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_metrics_readers_skip_eval_rows(tmp_path):
    from benchmarks.report import throughput
    from utils.metrics import drop_rows_after
    from utils.plot import plot

    step = {"loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "tflops_per_gpu": 0.1, "step_time_s": 1.0,
            "peak_mem_gib": 1.0}
    rows = [{"step": 1, **step}, {"step": 2, **step}, {"step": 2, "eval_loss": 1.9, "eval_tokens": 50},
            {"step": 3, **step}, {"step": 3, "eval_loss": 1.8, "eval_tokens": 50}]
    assert throughput(rows, 0, 4)["steps_measured"] == 3
    plot(rows, str(tmp_path / "m.png"))
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert drop_rows_after(str(path), 2) == 2 and len(path.read_text().splitlines()) == 3


def test_eval_loss_is_cross_entropy_alone():
    """The z-loss and the MoE load-balancing term are training regularisers: eval_loss_fn leaves them out, for
    plain and fused-head outputs and for a loss that wraps the CE (the MoE loss: outputs led by the logits)."""
    from models.common import CausalLMLoss
    from models.mixtral import MoeCausalLMLoss
    from training.evaluate import eval_loss_fn

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    scale = torch.tensor([0.5])
    want = 0.5 * F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    plain = eval_loss_fn(CausalLMLoss(z_loss_weight=0.1))
    assert torch.allclose(plain(logits, (labels, scale)), want)
    hidden, weight = torch.randn(2, 5, 4, generator=g), torch.randn(11, 4, generator=g)
    assert torch.allclose(plain((hidden, weight), (labels, scale)),
                          CausalLMLoss()(hidden @ weight.T, (labels, scale)), rtol=1e-5)
    moe_loss = MoeCausalLMLoss(router_aux_loss_coef=0.5, z_loss_weight=0.1)
    moe = eval_loss_fn(moe_loss)
    assert torch.allclose(moe((logits, None, None), (labels, scale)), want) and moe_loss.calls == 0
