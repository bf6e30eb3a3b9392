"""The dense families built on the llama block with flags (qwen2, qwen3, mistral, gemma2, gemma3, phi3, ...) vs
transformers' own models (CPU, fp32, eager attention), looped over the registry: every family with a
`debug_config` whose layers are `LlamaBlock`s.

Each case saves a tiny random transformers model built from the family's `debug_config` (windows shorter than the
24-token rows, every norm and bias perturbed), converts it with `hg_to_pp`, and checks logits, loss and every
gradient (within 1e-5 relative), activation checkpointing, the `pp_to_hg` round trip bit for bit, packed rows
against their documents run alone, and the real released config.json files through `models.resolve`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from models import ModelOptions, load_sequential
from models import llama
from models.convert import WeightMapper, hg_to_pp, pp_to_hg
from models.family import RELEASED_DIR, released_config
from tests.conftest import (assert_packed_rows_equal_documents_alone, assert_same_tensors, hf_name, perturb,
                            read_hf_tensors, token_batch)

QUIET = {"log": lambda msg: None}
DENSE = sorted(mt for mt, f in models.REGISTRY.items() if f.debug_config is not None
               and f.build_layers is llama.build_layers)
# extra variants per family: name -> debug_config overrides
VARIANTS = {mt: {"base": {}, "tied": {"tie_word_embeddings": True}} for mt in DENSE}
for _mt, _extra in {
    "phi3": {"longrope": {"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 4.0],
                                           "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 19.0]},
                          "original_max_position_embeddings": 16, "max_position_embeddings": 64},
             "partial": {"partial_rotary_factor": 0.5}},
    "qwen2": {"no_window": {"use_sliding_window": False}},
    "gemma2": {"no_softcap": {"attn_logit_softcapping": None, "final_logit_softcapping": None}},
    "gemma3_text": {"unscaled_rope": {"rope_scaling": None}, "final_softcap": {"final_logit_softcapping": 1.0}},
}.items():
    if _mt in VARIANTS:
        VARIANTS[_mt].update(_extra)
CASES = [(mt, v) for mt in DENSE for v in VARIANTS[mt]]


def family_config(model_type: str, variant: str) -> dict:
    return models.get_family(model_type).debug_config(**VARIANTS[model_type][variant])


def save_reference(cfg: dict, out: Path):
    """A random transformers model of `cfg` saved to `out` (fp32 safetensors), reloaded with eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config).float()
    perturb(model)
    model.save_pretrained(out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")


@pytest.fixture(scope="module", params=CASES, ids=[f"{mt}-{v}" for mt, v in CASES])
def case(request, tmp_path_factory):
    """(model_type, HF reference model, HF dir, pipeline dir converted from it)."""
    model_type, variant = request.param
    root = tmp_path_factory.mktemp(f"{model_type}-{variant}")
    reference = save_reference(family_config(model_type, variant), root / "hf")
    hg_to_pp(root / "hf", root / "pp", **QUIET)
    return model_type, reference, root / "hf", root / "pp"


def test_logits_loss_and_grads_match_transformers(case):
    model_type, reference, _, pp_dir = case
    ours = load_sequential(pp_dir)
    input_ids, position_ids, labels = token_batch(reference.config.vocab_size, seed=1)
    with torch.no_grad():
        expected_logits = reference.eval()(input_ids=input_ids, position_ids=position_ids).logits
        actual_logits = ours.eval()(input_ids, position_ids)
    torch.testing.assert_close(actual_logits, expected_logits, rtol=1e-5, atol=1e-5)

    reference.train().zero_grad()
    ours.train()
    expected = reference(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
    expected.backward()
    actual = ours.loss(input_ids, labels, position_ids)
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    mapper = WeightMapper(models.get_family(model_type).weight_map)
    ref_params = dict(reference.named_parameters())
    seen = set()
    for name, param in ours.named_parameters():
        target = hf_name(ours, mapper, name)
        seen.add(target)
        torch.testing.assert_close(param.grad, ref_params[target].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    assert seen == set(ref_params)


def test_fused_head_and_checkpointing_give_the_same_loss_and_grads(case):
    """The trainer's fused head + loss (with any final soft-cap inside it) and activation checkpointing against
    the plain head: same loss, same gradients."""
    _, reference, _, pp_dir = case
    input_ids, position_ids, labels = token_batch(reference.config.vocab_size, seed=2)
    results = []
    for opts in (ModelOptions(), ModelOptions(fused_head_loss=True, use_grad_ckpt=True)):
        model = load_sequential(pp_dir, opts=opts).train()
        loss = model.loss(input_ids, labels, position_ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_round_trip_is_bit_exact(case, tmp_path):
    _, _, hf_dir, pp_dir = case
    pp_to_hg(pp_dir, tmp_path / "out", **QUIET)
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), read_hf_tensors(hf_dir))


def test_packed_rows_equal_their_documents_alone(case):
    """Two documents longer than any window in one packed row: each document's logits equal a run of it alone."""
    model_type, reference, _, pp_dir = case
    if models.resolve_dir(pp_dir).args.rope.kind == "longrope":
        pytest.skip("LongRoPE picks its factors from the longest row of the batch (as transformers does), so a "
                    "document packed beside a longer one is rotated differently from the document alone")
    assert_packed_rows_equal_documents_alone(pp_dir, reference.config.vocab_size)


@pytest.mark.parametrize("model_type", DENSE)
def test_released_configs_resolve(model_type):
    """Every committed real config.json of the family resolves, with the family's math switched as released."""
    family = models.get_family(model_type)
    if not family.released_configs:
        pytest.skip(f"{model_type}: no published config.json could be fetched yet (models/released/SOURCES.md)")
    for name, file_name in family.released_configs.items():
        assert (RELEASED_DIR / file_name).is_file(), f"{name}: models/released/{file_name} missing"
        model = models.resolve(released_config(file_name))
        assert model.model_type == model_type or model.family is family
        assert model.num_blocks > 0 and model.hidden_size > 0


@pytest.mark.parametrize("model_type", DENSE)
def test_example_yaml_config_fits_the_released_width(model_type):
    """configs/ds_config_<family>.yml (where the family has one) splits the pipeline layers of a released
    checkpoint of that family over its stages."""
    from utils.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"ds_config_{model_type}.yml"
    if not path.is_file():
        pytest.skip(f"no configs/{path.name}")
    cfg = load_config(str(path))
    family = models.get_family(model_type)
    blocks = {models.resolve(released_config(f)).num_blocks for f in family.released_configs.values()}
    parts = cfg["model_topo.parts"]
    assert len(parts) == cfg["model_topo.process_topology.dims"][0]
    assert sum(parts) - 2 in blocks, (parts, blocks)


@pytest.mark.parametrize("model_type, overrides, message", [
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for qwen2"),
    ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
    ("mistral", {"attention_dropout": 0.1}, "attention_dropout 0.1 is not supported"),
    ("qwen2", {"layer_types": ["full_attention"]}, "'layer_types' must list one of"),
    ("phi3", {"partial_rotary_factor": 1.5}, "'partial_rotary_factor' must be in"),
    ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "'short_factor' must be a list of 8 numbers"),
])
def test_unsupported_variants_are_one_line_errors(model_type, overrides, message):
    if model_type not in DENSE:
        pytest.skip(f"{model_type} not registered")
    with pytest.raises(models.ModelError, match=message):
        models.resolve(models.get_family(model_type).debug_config(**overrides))
