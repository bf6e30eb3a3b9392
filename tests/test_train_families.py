"""Every family trains through train_ds.py in 2 pipeline stages on 2 CPU ranks, and the first step's
loss equals the same batch run through all layers in one process (`load_sequential`, same loss
function, same micro-batches and scales). Bloom's tied embedding spans the first and the last stage."""
import json

import pytest
import torch

from models.convert import hg_to_pp
from tests.conftest import run_deepspeed, train_config
from tests.test_families import make_baichuan, make_bloom, make_chatglm
from tests.test_dense_families import DENSE, family_config, save_reference
from tests.test_mixtral import make_tiny_mixtral

MAKERS = {
    "bloom_tied": lambda out: make_bloom(out, n_head=4, tied=True, hub_names=False),
    "baichuan": make_baichuan,
    "chatglm": lambda out: make_chatglm(out, groups=2, qkv_bias=True, rope_ratio=1.0),
    "mixtral": make_tiny_mixtral,
    # every dense registry family (qwen2, qwen3, mistral, gemma2, gemma3, phi3, ...): its debug config, windows
    # shorter than the rows
    **{mt: (lambda out, mt=mt: save_reference(family_config(mt, "base"), out)) for mt in DENSE},
}


def one_process_first_step_loss(pp, cfg) -> float:
    """What train_ds.py's first step computes, in one process: the mean over the step's micro-batches
    of `loss_fn(logits, (labels, scale))` (DeepSpeed averages the micro-batch losses)."""
    import models
    from data.batching import BatchPlan, PipeFeeder, SyntheticDataset

    args = models.resolve(models.read_hf_config(pp)).args
    model = models.load_sequential(pp)
    tbs, mbs = cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"]
    gas = tbs // mbs
    data = SyntheticDataset(cfg["max_steps"] * tbs, cfg["max_seq_len"], args.vocab_size, cfg["seed"])
    feeder = PipeFeeder(data, BatchPlan(len(data), tbs, mbs, gas, 0, 1, cfg["seed"]), 0, cfg["max_seq_len"],
                        pad_multiple=64)
    feeder.start_epoch(0)
    with torch.no_grad():
        losses = [model.loss(ids, labels, pos) for (ids, pos), labels in (next(feeder) for _ in range(gas))]
    return float(sum(losses) / gas)


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_family_trains_in_two_stages_like_one_process(family, tmp_path):
    hf, pp = tmp_path / "hf", tmp_path / "pp"
    MAKERS[family](hf)
    hg_to_pp(hf, pp, log=lambda msg: None)  # in-process (one process start less); the CLI: test_convert.py
    out = tmp_path / "out"
    cfg = train_config(pp, out, dims=(2, 1), synthetic_data=True, max_steps=4, max_seq_len=32,
                       data_path=None, save_final=family == "mixtral", **{"optimizer.params.lr": 1e-2})
    res = run_deepspeed("train_ds.py", cfg, tmp_path, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["grad_norm"] > 0 for r in rows)
    one = one_process_first_step_loss(pp, cfg)
    assert abs(rows[0]["loss"] - one) <= 1e-5 * abs(one), (rows[0]["loss"], one)
    if family == "mixtral":  # expert load reaches the metrics; routers on both stages were trained
        import models

        assert len(rows[0]["expert_load_min"]) == len(rows[0]["expert_load_max"]) > 0
        assert rows[0]["moe_aux_loss"] > 0
        start, final = models.load_sequential(pp), models.load_sequential(out / "checkpoint_final")
        for key in ("1", str(len(final.layers) - 2)):  # first and last block: one on each stage
            assert not torch.equal(final.layers[key].block_sparse_moe.gate.weight,
                                   start.layers[key].block_sparse_moe.gate.weight)
