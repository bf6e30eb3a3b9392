"""Config validation and stage partitioning: every user mistake gets one message naming the key."""
import glob

import pytest
import torch
import yaml

from models.family import parts_to_boundaries as spec_bounds
from training.partition import balanced_parts, resolve_parts
from utils.config import ConfigError, load_config, parse_overrides, resolve_batch, validate

BASE = {
    "model_path": "m", "save_path": "s", "data_path": "d.json", "max_seq_len": 128,
    "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"},
    "train_batch_size": 4, "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}, "no_wd_kws": ["norm"]},
}


def with_(**changes):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node, *path = raw, *dotted.split("__")
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return raw


def test_valid_config_splits_ours_and_deepspeed():
    cfg = validate(with_())
    assert cfg["model_path"] == "m" and cfg.dims == (2, 1)
    assert cfg["optimizer.no_wd_kws"] == ["norm"]
    assert cfg.ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3}}  # no_wd_kws is ours, not DeepSpeed's
    assert cfg["use_grad_ckpt"] is False and cfg["seed"] == 42  # defaults filled in


@pytest.mark.parametrize("raw, words", [
    (with_(model_pth="x"), ["model_pth", "did you mean 'model_path'"]),
    (with_(train_batch_sise=3), ["train_batch_sise", "train_batch_size"]),
    (with_(model_topo__partz=[1]), ["model_topo.partz"]),
    (with_(max_seq_len="long"), ["max_seq_len", "integer"]),
    (with_(use_grad_ckpt="yes"), ["use_grad_ckpt", "true/false"]),
    (with_(n_epoches=True), ["n_epoches", "integer"]),
    (with_(model_topo__parts=[1, 2, 3]), ["model_topo.parts", "3 entries", "2 pipeline stages"]),
    (with_(model_topo__parts="even"), ["model_topo.parts", "auto"]),
    (with_(model_topo__process_topology__dims=[2]), ["dims", "two positive integers"]),
    (with_(model_topo__process_topology__axes=["data", "pipe"]), ["axes", "[pipe, data]"]),
    (with_(train_micro_batch_size_per_gpu=0), ["train_micro_batch_size_per_gpu", "positive"]),
    ({k: v for k, v in BASE.items() if k != "model_path"}, ["model_path", "missing"]),
    ({k: v for k, v in BASE.items() if k != "data_path"}, ["data_path"]),
])
def test_bad_config_names_the_key(raw, words):
    with pytest.raises(ConfigError) as e:
        validate(raw)
    for w in words:
        assert w in str(e.value)


def test_batch_divisibility():
    assert resolve_batch({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2}, 2) == (8, 2, 2)
    assert resolve_batch({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 1) == (6, 2, 3)
    with pytest.raises(ConfigError, match="train_batch_size: 6 is not divisible .* 4 x 1"):
        resolve_batch({"train_batch_size": 6, "train_micro_batch_size_per_gpu": 4}, 1)
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_batch({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 1)


def test_overrides_beat_yaml(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(str(path), parse_overrides(["--max_seq_len=512", "--model_topo.parts=[3, 3]"]))
    assert cfg["max_seq_len"] == 512 and cfg["model_topo.parts"] == [3, 3]
    with pytest.raises(ConfigError, match="--key.sub=value"):
        parse_overrides(["max_seq_len"])


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yml")))
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert cfg.dims[0] >= 1


def test_balanced_parts_is_optimal_and_contiguous():
    costs = [0.0] + [1.0] * 32 + [1.5]  # embedding ~free, head ~1.5 blocks
    parts = balanced_parts(costs, 8)
    assert sum(parts) == 34 and len(parts) == 8 and min(parts) >= 1
    stage_costs, i = [], 0
    for p in parts:
        stage_costs.append(sum(costs[i:i + p]))
        i += p
    assert max(stage_costs) == 5.0  # 34 layers, 33.5 units over 8 stages: 5 is the best possible max
    assert balanced_parts([1, 1, 1, 1], 4) == [1, 1, 1, 1]


def test_parts_validation_and_spec_bounds():
    with pytest.raises(ConfigError, match="sums to 5.*has 6"):
        resolve_parts([2, 3], [1.0] * 6, 2)
    with pytest.raises(ConfigError, match="only 3 pipeline layers"):
        balanced_parts([1.0] * 3, 4)
    assert spec_bounds([3, 3], 6) == [0, 3, 6]
    assert spec_bounds([3, 3], 7) == [0, 3, 7]  # the tied head rides with the last stage


def test_model_topo_is_optional_until_the_pipeline_trainer_reads_dims():
    """train_ds_zero.py needs no `model_topo`; train_ds.py reads `cfg.dims` first thing and gets one line."""
    raw = {k: v for k, v in BASE.items() if k != "model_topo"}
    cfg = validate(raw)
    assert cfg["model_topo.process_topology.dims"] is None and cfg["model_topo.parts"] == "auto"
    with pytest.raises(ConfigError) as e:
        cfg.dims
    msg = str(e.value)
    assert "missing required key 'model_topo.process_topology.dims'" in msg and "train_ds.py" in msg
    assert "\n" not in msg
    assert validate({**raw, "model_topo": {"parts": [3, 3]}})["model_topo.parts"] == [3, 3]  # no dims to match
    with pytest.raises(ConfigError, match="dims: expected two positive integers"):
        validate(with_(model_topo__process_topology__dims=[0, 1]))
    assert cfg["compile_blocks"] == "auto" and cfg["moe_grouped_gemm"] is True


def test_compile_blocks_takes_true_false_or_auto(tmp_path):
    base = {"model_path": "m", "save_path": "s", "synthetic_data": True, "max_seq_len": 8, "train_batch_size": 2,
            "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [1, 1]}}}
    from utils.config import ConfigError, validate
    assert validate(dict(base))["compile_blocks"] == "auto"
    for value in (True, False, "auto"):
        assert validate({**base, "compile_blocks": value})["compile_blocks"] == value
    with pytest.raises(ConfigError, match="compile_blocks: expected true, false or auto"):
        validate({**base, "compile_blocks": "yes"})


def test_compile_blocks_auto_compiles_only_on_cuda(monkeypatch):
    from training import pipeline as train_ds
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_ds.resolve_compile_blocks("auto") is False
    assert train_ds.resolve_compile_blocks(True) is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert train_ds.resolve_compile_blocks("auto") is True
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert train_ds.resolve_compile_blocks("auto") is False
