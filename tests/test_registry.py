"""`models.resolve` and the registry: one entry point from config.json to everything about a model, and a new
family is one file plus one registry line (proved with a throwaway family assembled from llama's parts)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import models
from models import Family, ModelError, ModelOptions, load_sequential
from models import llama
from models.convert import hg_to_pp, pp_to_hg
from models.mixtral import debug_config
from utils.metrics import flops_per_token
from models.tiny import make_tiny_llama, tiny_llama_config

QUIET = {"log": lambda msg: None}
CLONE = "tiny_llama_clone"


def test_resolve_matches_the_family_record():
    cfgs = [tiny_llama_config().to_dict(), tiny_llama_config(tie_word_embeddings=True).to_dict(), debug_config(),
            debug_config(tie_word_embeddings=True),
            {"model_type": "bloom", "vocab_size": 256, "hidden_size": 48, "n_layer": 3, "n_head": 6}]
    for cfg in cfgs:
        model = models.resolve(cfg)
        family, args = models.get_family(cfg["model_type"]), model.args
        assert model.family is family and model.model_type == cfg["model_type"] and model.hf_config == cfg
        assert model.num_blocks == family.num_layers(args) == args.num_layers
        assert model.num_pipeline_layers == model.num_blocks + 2
        assert model.tied is bool(cfg.get("tie_word_embeddings", cfg["model_type"] == "bloom"))
        assert (model.vocab_size, model.hidden_size) == (args.vocab_size, args.hidden_size)
        specs = model.specs(ModelOptions())
        assert len(specs) == model.num_specs == model.num_pipeline_layers + model.tied
        assert len(models.build_pipeline_layers(cfg)) == len(specs)
        assert model.stage_bounds([1, model.num_pipeline_layers - 1]) == [0, 1, len(specs)]
        assert model.layer_flops(64) == family.layer_flops(args, 64)
        # active parameters outside the input embedding = half the forward FLOPs of one token at seq 1
        assert model.flops_per_token(256) == flops_per_token(sum(family.layer_flops(args, 1)) / 2, args.num_layers,
                                                             args.hidden_size, 256)
        assert model.default_parts(2) == family.default_parts(2, model.num_blocks)
        assert type(model.loss_fn(ModelOptions())) is type(models.build_loss_fn(cfg))


def test_resolve_errors_are_model_errors():
    with pytest.raises(ModelError, match="unsupported model_type 'gpt2'"):
        models.resolve({"model_type": "gpt2"})
    with pytest.raises(ModelError, match="config.json: missing required key 'hidden_size'"):
        models.resolve({"model_type": "llama"})
    with pytest.raises(ModelError, match="/x/config.json: missing required key 'hidden_size'"):
        models.resolve({"model_type": "llama"}, source="/x/config.json")
    with pytest.raises(ModelError, match="must be an object"):
        models.resolve(["llama"])


def test_step_metrics_are_the_families_own():
    """mixtral: expert load read and reset from the loss object; any other family: {}."""
    model = models.resolve(debug_config())
    seq = model.loss_fn()
    net = models.SequentialModel(model.specs(), seq).eval()
    ids = torch.randint(0, model.vocab_size, (2, 8))
    with torch.no_grad():
        net.loss(ids, ids)
    row = model.step_metrics(seq)
    assert set(row) == {"moe_aux_loss", "expert_load_min", "expert_load_max"}
    assert model.step_metrics(seq) == {}  # reset by the first read
    llama_model = models.resolve(tiny_llama_config().to_dict())
    assert llama_model.family.step_metrics is None and llama_model.step_metrics(llama_model.loss_fn()) == {}


def test_shrunk_config_uses_the_familys_spellings():
    glm = {"model_type": "chatglm", "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
           "num_attention_heads": 32, "num_layers": 2, "padded_vocab_size": 65024, "multi_query_attention": True,
           "multi_query_group_num": 2, "eos_token_id": 2, "pad_token_id": 60000}
    small = models.resolve(glm).shrunk_config(16, 256)
    assert (small["hidden_size"], small["ffn_hidden_size"], small["kv_channels"]) == (256, 856, 8)
    assert small["padded_vocab_size"] == 256 and small["pad_token_id"] is None and small["eos_token_id"] == 2
    assert models.resolve(small).hidden_size == 256
    bloom = {"model_type": "bloom", "n_embed": 1024, "n_head": 16, "n_layer": 2, "vocab_size": 250880}
    assert models.resolve(bloom).widths == [1024] and models.resolve(bloom).shrunk_config(8, 256)["n_embed"] == 128


def test_family_modules_never_import_the_converter():
    """Families read HF files through models/hf_files.py; models/convert.py (which needs the registry) is never
    imported by a family module, not even inside a function."""
    for name in models.registry.FAMILY_MODULES:
        tree = ast.parse((Path(models.__file__).parent / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        upward = [m for m in imported if m and m.split(".")[-1] in ("convert", "registry", "resolved")]
        assert not upward, (name, upward)


@pytest.fixture
def clone_family():
    """A throwaway family: llama's parts under another model_type, every optional field left at its default."""
    family = Family(model_type=CLONE, read_config=llama.read_config, build_layers=llama.build_layers,
                    weight_map=llama.LLAMA_WEIGHT_MAP, layer_flops=llama.layer_flops)
    models.register(family)
    try:
        yield family
    finally:
        models.unregister(CLONE)


def test_a_new_family_is_one_record_and_one_registration(clone_family, tmp_path):
    reference = make_tiny_llama(tmp_path / "hf", seed=3, tokenizer=False).eval()
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": CLONE}))

    model = models.resolve(models.read_hf_config(tmp_path / "hf"))
    assert model.family is clone_family and model.num_blocks == 4 and not model.tied
    assert model.default_parts(4) == [2, 1, 1, 2] and model.step_metrics(model.loss_fn()) == {}
    assert model.flops_per_token(128) == models.resolve(tiny_llama_config().to_dict()).flops_per_token(128)

    hg_to_pp(tmp_path / "hf", tmp_path / "pp", **QUIET)
    seq = load_sequential(tmp_path / "pp").eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(seq(ids), reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    pp_to_hg(tmp_path / "pp", tmp_path / "back", **QUIET)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == CLONE

    with pytest.raises(ModelError, match=f"model_type '{CLONE}' is already registered"):
        models.register(Family(model_type=CLONE, read_config=llama.read_config, build_layers=llama.build_layers,
                               weight_map=(), layer_flops=llama.layer_flops))
    assert models.unregister(CLONE) is clone_family
    with pytest.raises(ModelError, match=f"unsupported model_type '{CLONE}'"):
        models.resolve(models.read_hf_config(tmp_path / "hf"))


def test_family_knowledge_lives_in_models_only_and_the_trainers_are_thin():
    """No module outside models/ names a registered family (or a format a family exports); the two entry
    scripts stay thin and share the loop in training/ instead of importing each other."""
    import re

    from tests.conftest import ROOT

    names = set(models.REGISTRY) | {fmt for f in models.REGISTRY.values() for fmt in f.hf_formats}
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")", re.IGNORECASE)
    sources = [p for d in ("training", "utils", "data") for p in sorted((ROOT / d).rglob("*.py"))]
    sources += [ROOT / n for n in ("train_ds.py", "train_ds_zero.py", "convert_model.py", "demo.py")]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sources
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == [], "\n".join(hits)
    for script, other in (("train_ds.py", "train_ds_zero"), ("train_ds_zero.py", "train_ds")):
        text = (ROOT / script).read_text()
        assert len(text.splitlines()) < 150 and not re.search(rf"^(from|import) {other}\b", text, re.M), script
