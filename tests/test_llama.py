"""Llama pipeline layers vs transformers' LlamaForCausalLM: logits, loss, gradients (CPU, fp32)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from transformers import LlamaForCausalLM

import models
from models import ModelError, ModelOptions, get_family, load_sequential, parts_to_boundaries
from models.common import CausalLMLoss, read_rope_config, rope_inv_freq
from models.convert import WeightMapper, hg_to_pp
from tests.conftest import hf_name, perturb
from tests.conftest import token_batch as batch
from models.tiny import make_tiny_llama, tiny_llama_config

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}

# name -> (LlamaConfig overrides, rewrite config.json in the hub layout with these rope keys)
CASES = {
    "gqa": ({}, None),
    "mha_bias": ({"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}, None),
    "tied": ({"tie_word_embeddings": True}, None),
    "theta500k_v5_layout": ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, None),
    "llama3_hub_layout": ({"num_key_value_heads": 1},
                          {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}),
}


def to_hub_layout(model_dir: Path, rope_keys: dict) -> None:
    """Rewrite config.json as hub checkpoints have it: `rope_theta` (+ `rope_scaling`), no `rope_parameters`."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_keys)
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF reference model loaded from disk, pipeline dir converted from it)."""
    overrides, hub_rope = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = make_tiny_llama(root / "hf", tokenizer=False, **overrides)
    perturb(model)
    model.save_pretrained(root / "hf")
    if hub_rope is not None:
        to_hub_layout(root / "hf", hub_rope)
    hg_to_pp(root / "hf", root / "pp", log=lambda msg: None)
    reference = LlamaForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    return request.param, reference, root / "pp"


def test_logits_match_hf(case):
    _, reference, pp_dir = case
    ours = load_sequential(pp_dir).eval()
    input_ids, position_ids, _ = batch(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = ours(input_ids, position_ids)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_loss_and_grads_match_hf(case):
    _, reference, pp_dir = case
    ours = load_sequential(pp_dir).train()
    reference.train()
    input_ids, position_ids, labels = batch(reference.config.vocab_size, seed=1)
    reference.zero_grad()
    expected = reference(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
    expected.backward()
    actual = ours.loss(input_ids, labels, position_ids)
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

    mapper = WeightMapper(get_family("llama").weight_map)
    ref_params = dict(reference.named_parameters())
    names = set()
    for name, param in ours.named_parameters():
        ref = ref_params[hf_name(ours, mapper, name)]
        names.add(hf_name(ours, mapper, name))
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert names == set(ref_params)


def test_grad_checkpointing_same_loss_and_grads(case, monkeypatch):
    _, reference, pp_dir = case
    calls = []
    original = models.common.checkpoint
    monkeypatch.setattr(models.common, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    input_ids, position_ids, labels = batch(reference.config.vocab_size, seed=2)
    results = []
    for use_grad_ckpt in (False, True):
        model = load_sequential(pp_dir, opts=ModelOptions(use_grad_ckpt=use_grad_ckpt)).train()
        loss = model.loss(input_ids, labels, position_ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == reference.config.num_hidden_layers
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7)


def test_z_loss_and_scale():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 2] = -100
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    trained = shifted != -100
    ce = F.cross_entropy(logits.float()[trained], shifted[trained])
    z = (logits.float().max(-1).values[trained] ** 2).mean()

    torch.testing.assert_close(CausalLMLoss(0.0)(logits, labels), ce)
    torch.testing.assert_close(CausalLMLoss(0.25)(logits, labels), ce + 0.25 * z)
    scaled = CausalLMLoss(0.25)(logits, (labels, torch.tensor([0.5])))
    assert scaled.shape == ()
    torch.testing.assert_close(scaled, 0.5 * (ce + 0.25 * z))


def test_loss_with_no_trained_token_is_zero():
    loss = CausalLMLoss(0.1)(torch.randn(1, 4, 7, requires_grad=True), torch.full((1, 4), -100))
    assert loss.item() == 0.0


def test_z_loss_option_reaches_the_model_loss(case):
    _, reference, pp_dir = case
    input_ids, position_ids, labels = batch(reference.config.vocab_size)
    plain = load_sequential(pp_dir)
    with_z = load_sequential(pp_dir, opts=ModelOptions(aux_max_z_loss_weight=0.1))
    with torch.no_grad():
        logits = plain(input_ids, position_ids)
        expected = CausalLMLoss(0.1)(logits, labels)
        torch.testing.assert_close(with_z.loss(input_ids, labels, position_ids), expected)
        assert expected > plain.loss(input_ids, labels, position_ids)


def test_llama3_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny_llama_config(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                            rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    ours = rope_inv_freq(read_rope_config({"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}, 128))
    assert torch.equal(ours, expected)


def test_unknown_rope_type_is_refused():
    with pytest.raises(ModelError, match="rope scaling type 'yarn' is not supported"):
        read_rope_config({"rope_scaling": {"type": "yarn", "factor": 4.0}}, 64)


def test_spec_layout_untied_and_tied():
    base = tiny_llama_config().to_dict()
    specs = models.build_pipeline_layers(base)
    assert len(specs) == base["num_hidden_layers"] + 2
    assert all(type(s) is LayerSpec for s in specs)

    tied = models.build_pipeline_layers({**base, "tie_word_embeddings": True})
    assert len(tied) == base["num_hidden_layers"] + 3
    first, last = tied[0], tied[-1]
    assert isinstance(first, TiedLayerSpec) and isinstance(last, TiedLayerSpec)
    assert first.key == last.key == "embed" and first.forward_fn is None and last.forward_fn is not None
    assert last.tied_weight_attr == ["embed_tokens.weight"]
    assert parts_to_boundaries([3, 3], len(tied)) == [0, 3, 7]


def test_deepspeed_pipeline_module_saves_the_expected_layer_files(tmp_path, monkeypatch):
    """One-process PipelineModule (gloo): saves layer_00..layer_{L+1} (none for the tied head), which
    load_sequential reads; and it loads converted files with its own `load_state_dir`."""
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = tiny_llama_config(tie_word_embeddings=True).to_dict()
    opts = ModelOptions()
    module = PipelineModule(models.build_pipeline_layers(cfg, opts), num_stages=1,
                            loss_fn=models.build_loss_fn(cfg, opts), partition_method="uniform")
    module.checkpoint_parallel_write_pipeline = False
    module.save_state_dict(str(tmp_path), TorchCheckpointEngine())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    num_layers = cfg["num_hidden_layers"]
    assert sorted(p.name for p in tmp_path.glob("layer_*")) == [
        f"layer_{i:02d}-model_states.pt" for i in range(num_layers + 2)]

    ours = load_sequential(tmp_path).eval()
    input_ids = torch.randint(0, cfg["vocab_size"], (2, 8))
    position_ids = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), module((input_ids, position_ids)))

    reference = make_tiny_llama(tmp_path / "hf", tokenizer=False, tie_word_embeddings=True)
    hg_to_pp(tmp_path / "hf", tmp_path / "pp", log=lambda msg: None)
    module.load_state_dir(str(tmp_path / "pp"), TorchCheckpointEngine())
    with torch.no_grad():
        torch.testing.assert_close(module((input_ids, position_ids)), reference(input_ids).logits,
                                   rtol=1e-5, atol=1e-6)


def test_registry_and_parts():
    from models import REGISTRY

    supported = ", ".join(sorted(REGISTRY))
    assert "llama" in REGISTRY
    with pytest.raises(ModelError, match=rf"unsupported model_type 'gpt2' \(supported: {supported}\)"):
        get_family("gpt2")
    family = get_family("llama")
    assert family.default_parts(8) == [5, 4, 4, 4, 4, 4, 4, 5]
    assert family.default_parts(3, 4) == [2, 2, 2]
    assert sum(family.default_parts(5, 7)) == 9


def test_layer_flops_shape_and_head_cost():
    model = models.resolve(tiny_llama_config().to_dict())
    flops = model.layer_flops(128)
    assert len(flops) == model.num_blocks + 2
    assert flops[0] == 0 and len(set(flops[1:-1])) == 1 and flops[1] > 0
    assert flops[-1] >= 2 * 128 * model.hidden_size * model.vocab_size


@pytest.mark.skipif(models.common.flash_attn_available(), reason="flash-attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    with pytest.raises(ModelError, match="use_flash_attn: true but flash-attn is not installed"):
        models.build_pipeline_layers(tiny_llama_config().to_dict(), ModelOptions(use_flash_attn=True))


def test_bf16_layers_keep_fp32_rope_angles(tmp_path):
    """DeepSpeed casts whole modules to bf16; the RoPE frequencies must stay fp32."""
    make_tiny_llama(tmp_path / "hf", tokenizer=False)
    hg_to_pp(tmp_path / "hf", tmp_path / "pp", log=lambda msg: None)
    model = load_sequential(tmp_path / "pp", dtype=torch.bfloat16)
    block = model.layers["1"]
    assert block.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert block.rotary.inv_freq.dtype == torch.float32
    assert model(torch.randint(0, 512, (1, 8))).dtype == torch.bfloat16
    assert os.path.isfile(tmp_path / "pp" / "layer_05-model_states.pt")
