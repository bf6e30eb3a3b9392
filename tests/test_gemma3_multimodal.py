"""Gemma-3 beyond the dense-family loop (`tests/test_dense_families.py` covers gemma2 and gemma3_text):

- the multimodal `gemma3` (Gemma3ForConditionalGeneration): only its language model is trained; its logits, loss and
  gradients on text-only input equal transformers' full model, and the vision tower and projector come back from
  hg_to_pp -> pp_to_hg bit for bit, with config.json unchanged, in transformers 5's layout and in the hub's;
- the config readers: both RoPE layouts, the refused variants, the released config.json files;
- FlexAttention in compiled blocks (window + soft-cap, q/k norms, packed and unpacked) against the eager block, on
  CPU through the aot_eager graph recorder of `tests/test_bloom_fast.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models
from models import ModelOptions, load_sequential
from models import common
from models.common import ModelError
from models.convert import EXTRA_TENSORS, WeightMapper, hg_to_pp, pp_to_hg, verify
from models.family import RELEASED_DIR, released_config
from models.gemma3 import multimodal_debug_config
from models.llama import LlamaBlock
from tests.conftest import assert_same_tensors, hf_name, read_hf_tensors, token_batch
from tests.test_bloom_fast import GraphRecorder, assert_same_block_math, packed_positions
from tests.conftest import perturb

QUIET = {"log": lambda msg: None}
TEXT_VOCAB = 508  # below the image tokens (boi 508, eoi 509, image 510): text-only input


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """(reference Gemma3ForConditionalGeneration, its HF dir, the pipeline dir). transformers saves the hub's names
    (`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("gemma3-mm")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**multimodal_debug_config())).float()
    perturb(model)
    model.save_pretrained(root / "hf")
    reference = AutoModelForImageTextToText.from_pretrained(root / "hf", dtype=torch.float32,
                                                            attn_implementation="eager")
    hg_to_pp(root / "hf", root / "pp", **QUIET)
    return reference, root / "hf", root / "pp"


def test_checkpoint_holds_the_vision_tower_beside_the_language_model(multimodal):
    _, hf_dir, pp_dir = multimodal
    names = set(read_hf_tensors(hf_dir))
    assert any(n.startswith("vision_tower.") for n in names)
    assert any(n.startswith("multi_modal_projector.") for n in names)
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in names
    extra = read_hf_tensors_file(pp_dir / EXTRA_TENSORS)
    assert sorted(extra) == sorted(n for n in names if n.startswith(("vision_tower.", "multi_modal_projector.")))


def read_hf_tensors_file(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_language_model_logits_loss_and_grads_match_transformers(multimodal):
    reference, _, pp_dir = multimodal
    ours = load_sequential(pp_dir)
    input_ids, position_ids, labels = token_batch(TEXT_VOCAB, seed=1)
    with torch.no_grad():
        expected = reference.eval()(input_ids=input_ids, position_ids=position_ids).logits
        # the language model alone, as the brief of the multimodal model describes it
        hidden = reference.model.language_model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        alone = reference.lm_head(hidden)
        actual = ours.eval()(input_ids, position_ids)
    torch.testing.assert_close(alone, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    reference.train().zero_grad()
    ours.train()
    ref_loss = reference(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
    ref_loss.backward()
    loss = ours.loss(input_ids, labels, position_ids)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    mapper = WeightMapper(models.get_family("gemma3").weight_map)
    ref_params = dict(reference.named_parameters())
    seen = set()
    for name, param in ours.named_parameters():
        target = hf_name(ours, mapper, name)
        seen.add(target)
        torch.testing.assert_close(param.grad, ref_params[target].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    language = {n for n in ref_params if n.startswith("model.language_model.")}
    assert seen == language  # every language-model parameter (the head is the tied embedding), nothing else


def test_round_trip_gives_back_every_tensor_and_config(multimodal, tmp_path):
    _, hf_dir, pp_dir = multimodal
    pp_to_hg(pp_dir, tmp_path / "out", **QUIET)
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), read_hf_tensors(hf_dir))
    assert (tmp_path / "out" / "config.json").read_bytes() == (hf_dir / "config.json").read_bytes()
    assert verify(tmp_path / "out", pp_dir) < 1e-5


# hub names -> the module names of transformers 5's Gemma3ForConditionalGeneration
MODULE_NAMES = (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                ("multi_modal_projector.", "model.multi_modal_projector."))


@pytest.mark.parametrize("with_head", [False, True], ids=["tied", "tied-head-saved"])
def test_module_name_layout_round_trip_keeps_its_names(multimodal, tmp_path, with_head):
    """The same checkpoint under transformers 5's module names (`model.language_model.*`, `model.vision_tower.*`),
    optionally with the tied head saved: the same layer files, and the export keeps those names."""
    _, hf_dir, pp_dir = multimodal
    src = tmp_path / "src"
    src.mkdir()
    tensors = {}
    for name, tensor in read_hf_tensors(hf_dir).items():
        old, new = next(pair for pair in MODULE_NAMES if name.startswith(pair[0]))
        tensors[new + name.removeprefix(old)] = tensor
    if with_head:
        tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"].clone()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    hg_to_pp(src, tmp_path / "pp", **QUIET)
    for path in sorted(pp_dir.glob("layer_*")):
        assert_same_tensors(torch.load(tmp_path / "pp" / path.name, weights_only=True),
                            torch.load(path, weights_only=True))
    pp_to_hg(tmp_path / "pp", tmp_path / "out", **QUIET)
    tensors.pop("lm_head.weight", None)  # tied: dropped on import, as transformers does not save it
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), tensors)


def test_export_without_the_carried_tensors_is_refused(multimodal, tmp_path):
    _, _, pp_dir = multimodal
    copy = tmp_path / "pp"
    copy.mkdir()
    for path in pp_dir.iterdir():
        if path.name != EXTRA_TENSORS:
            (copy / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ModelError, match=EXTRA_TENSORS):
        pp_to_hg(copy, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_training_checkpoints_carry_the_extra_tensors(multimodal, tmp_path):
    """A checkpoint gets the model files the trainer copies (`utils.checkpoint.copy_model_files`) beside its layer
    files: that is enough for pp_to_hg to give back the vision tower."""
    from utils.checkpoint import copy_model_files

    _, hf_dir, pp_dir = multimodal
    tag = tmp_path / "global_step1"
    tag.mkdir()
    for path in pp_dir.glob("layer_*"):
        (tag / path.name).write_bytes(path.read_bytes())
    copy_model_files(str(pp_dir), str(tag))
    pp_to_hg(tag, tmp_path / "out", **QUIET)
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), read_hf_tensors(hf_dir))


# ----------------------------------------------------------------------------------------------
# Config readers


def gemma3_text(**overrides) -> dict:
    return models.get_family("gemma3_text").debug_config(**overrides)


def test_hub_and_transformers5_rope_layouts_read_the_same():
    hub = gemma3_text()
    saved = gemma3_text(rope_scaling=None, rope_theta=None, rope_local_base_freq=None, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    a, b = models.resolve(hub).args, models.resolve(saved).args
    assert a.layer_ropes == b.layer_ropes
    assert [r.kind for r in a.layer_ropes] == ["default", "default", "linear", "default"]
    assert [r.theta for r in a.layer_ropes] == [1e4, 1e4, 1e6, 1e4]
    assert a.layer_windows == (8, 8, None, 8)
    defaults = models.resolve(gemma3_text(rope_scaling=None, rope_theta=None, rope_local_base_freq=None,
                                          sliding_window_pattern=None, num_hidden_layers=12)).args
    assert [r.theta for r in defaults.layer_ropes] == [1e4] * 5 + [1e6] + [1e4] * 5 + [1e6]
    assert defaults.layer_windows.count(None) == 2


@pytest.mark.parametrize("overrides, key", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "yarn"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "rope_parameters"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
])
def test_unsupported_variants_are_one_line_errors_naming_the_key(overrides, key):
    for cfg in (gemma3_text(**overrides), multimodal_debug_config(**overrides)):
        with pytest.raises(ModelError, match=key) as err:
            models.resolve(cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="final_logit_softcapping"):
        models.resolve(multimodal_debug_config(final_logit_softcapping=30.0))
    with pytest.raises(ModelError, match="use_bidirectional_attention"):
        models.resolve(models.get_family("gemma2").debug_config(use_bidirectional_attention=True))


def test_gemma2_reads_hidden_activation_not_hidden_act():
    cfg = models.get_family("gemma2").debug_config(hidden_act="gelu")
    assert models.resolve(cfg).args.hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(ModelError, match="hidden_activation"):
        models.resolve(models.get_family("gemma2").debug_config(hidden_activation="gelu"))


@pytest.mark.parametrize("model_type", ["gemma3"])
def test_released_multimodal_configs_resolve(model_type):
    """The loop of tests/test_dense_families.py skips the multimodal family (its reference has a vision tower)."""
    family = models.get_family(model_type)
    if not family.released_configs:
        pytest.skip(f"{model_type}: no published config.json could be fetched yet (models/released/SOURCES.md)")
    for name, file_name in family.released_configs.items():
        assert (RELEASED_DIR / file_name).is_file(), f"{name}: models/released/{file_name} missing"
        model = models.resolve(released_config(file_name))
        args = model.args
        assert model.tied and args.qk_norm == "head" and args.attn_softcap is None
        assert args.layer_windows.count(None) == args.num_layers // 6
        assert {r.theta for r in args.layer_ropes} == {1e4, 1e6}


# ----------------------------------------------------------------------------------------------
# FlexAttention in compiled blocks


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """Compiled blocks through a fresh aot_eager `GraphRecorder`, FlexAttention allowed on CPU with grad."""
    import torch.nn.attention.flex_attention as flex_module

    from models import attention

    recorder = GraphRecorder()
    monkeypatch.setattr(common, "_COMPILED", [torch.compile(common._run_block, backend=recorder)])
    monkeypatch.setattr(flex_module, "_validate_device", lambda query, key, value: None)
    monkeypatch.setattr(attention, "NO_FLEX_BACKWARD", ())
    torch._dynamo.reset()
    yield recorder
    torch._dynamo.reset()


def gemma_blocks(model_type: str, packed: bool, ckpt: bool):
    """(eager, compiled) pairs of the debug config's first two blocks (layer 0 slides over 8 keys; gemma2's
    layer 1 is global, soft-capped), norms and all weights perturbed."""
    args = models.resolve(models.get_family(model_type).debug_config()).args
    pairs = []
    for layer in range(2):
        torch.manual_seed(layer)
        eager = LlamaBlock(args, ModelOptions(packed_sequences=packed, use_grad_ckpt=ckpt), layer)
        perturb(eager, seed=layer)
        compiled = LlamaBlock(args, ModelOptions(packed_sequences=packed, use_grad_ckpt=ckpt, compile_blocks=True),
                              layer)
        compiled.load_state_dict(eager.state_dict())
        pairs.append((eager.train(), compiled.train()))
    return pairs


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("packed, ckpt", [(False, False), (True, True)], ids=["causal", "packed-grad_ckpt"])
def test_compiled_flex_block_equals_eager_block(flex_on_cpu, model_type, packed, ckpt):
    """Windows of 8 and (gemma2) a soft-cap of 2 through FlexAttention's block mask and score_mod, rows of 40."""
    pairs = gemma_blocks(model_type, packed, ckpt)
    if packed:
        position_ids = packed_positions([[13, 20, 7], [30]], 40)
    else:
        position_ids = torch.stack([torch.arange(40), torch.arange(40) + 7])
    assert_same_block_math(pairs, position_ids)
    assert flex_on_cpu.uses_flex() and flex_on_cpu.has_op("checkpoint") == ckpt
