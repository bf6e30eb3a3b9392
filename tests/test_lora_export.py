"""LoRA checkpoints exported to Hugging Face: merged (`pp_to_hg`) and as a PEFT adapter (`pp_to_hg --adapter-only`).

For a tiny random model of every family, a LoRA checkpoint is written the way a LoRA run writes it (per-layer
files of the trained tensors only, as DeepSpeed's `save_checkpoint(exclude_frozen_parameters=True)` names them,
config files, LORA.json, MANIFEST.json, COMPLETE, `latest`), with random adapters ("trained": B != 0) and
perturbed `modules_to_save`. Then the logits of
  (a) our layers with the adapters,
  (b) the merged export loaded in transformers (the family's reference model for remote-code families), and
  (c) the base model in transformers + the `--adapter-only` export through `peft.PeftModel`
agree within 1e-5 (CPU, fp32).

(c) per family: llama, bloom and mixtral on transformers' own classes; chatglm with `--format glm` (base and
adapter both in transformers' `glm` names: `query_key_value`'s adapter split into q/k/v_proj); baichuan in the hub's
names (`W_pack`), loaded onto `BaichuanNamed` below: transformers' llama with Baichuan2's module names (a fused
`W_pack` and a `NormHead`), since the hub's remote code is not available offline.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convert_model
import demo
from models import get_family, load_sequential
from models.convert import hg_to_pp, pp_to_hg
from models.layout import layer_file_name
from models.lora import LoraConfig, apply_lora, is_lora_name
from models.tiny import make_tiny_llama
from tests.conftest import read_hf_tensors
from tests.test_families import BAICHUAN_CONFIG, make_baichuan, make_bloom, make_chatglm
from utils.checkpoint import copy_model_files, mark_complete, write_manifest
from utils.lora_ckpt import base_fingerprint, write_lora_meta

QUIET = {"log": lambda msg: None}
TOL = {"rtol": 1e-5, "atol": 1e-5}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOOM_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


# ----------------------------------------------------------------------------------------------
# A LoRA checkpoint as a LoRA run writes it


def write_lora_checkpoint(base_pp: Path, run: Path, cfg: LoraConfig, seed: int = 0, step: int = 3):
    """`run/global_step{step}` + `run/latest`: the base's layers with `cfg`'s adapters, B random (and
    modules_to_save perturbed); returns our model with those adapters (eval mode)."""
    ours = load_sequential(base_pp).eval()
    apply_lora(ours, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if is_lora_name(name) and "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
            elif param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    tag = run / f"global_step{step}"
    tag.mkdir(parents=True)
    for key, layer in ours.layers.items():
        frozen = {n for n, p in layer.named_parameters() if not p.requires_grad}
        # DeepSpeed's exclude_frozen_parameters: the layer's state_dict without its frozen parameters (buffers stay)
        state = {k: v.clone() for k, v in layer.state_dict().items() if k not in frozen}
        torch.save(state, tag / layer_file_name(int(key)))
    copy_model_files(str(base_pp), str(tag))
    model_type = json.loads((base_pp / "config.json").read_text())["model_type"]
    write_lora_meta(str(tag), cfg.to_dict(), str(base_pp), base_fingerprint(str(base_pp)), model_type)
    write_manifest(str(tag))
    mark_complete(str(run), tag.name, {"step": step, "epoch": 0})
    return ours


# ----------------------------------------------------------------------------------------------
# Baichuan2 under its hub module names, for PEFT


class NormHead(nn.Module):
    """Baichuan2's head: logits = x · normalize(weight)ᵀ (module name `lm_head`, parameter `weight`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=-1))


class _Rows(nn.Module):
    """q_proj/k_proj/v_proj of a `W_pack` attention: rows of `attn.W_pack(x)` (no parameters, no submodule)."""

    def __init__(self, attn: nn.Module, part: int):
        super().__init__()
        self.__dict__["attn"] = attn  # not a submodule: PEFT must find `W_pack` only once
        self.part = part

    def forward(self, x):
        return self.attn.W_pack(x).chunk(3, dim=-1)[self.part]


def baichuan_named(hf_dir: Path) -> nn.Module:
    """transformers' `LlamaForCausalLM` with Baichuan2-7B's math and module names (`self_attn.W_pack`, a
    `NormHead` lm_head), the hub checkpoint in `hf_dir` loaded by its own names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.baichuan import llama_config_dict

    model = LlamaForCausalLM(LlamaConfig(**llama_config_dict(BAICHUAN_CONFIG))).float()
    for layer in model.model.layers:
        attn = layer.self_attn
        hidden = attn.q_proj.in_features
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.W_pack = nn.Linear(hidden, 3 * hidden, bias=False)
        attn.q_proj, attn.k_proj, attn.v_proj = (_Rows(attn, i) for i in range(3))
    model.lm_head = NormHead(model.lm_head.weight)
    model.load_state_dict(read_hf_tensors(hf_dir), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Cases


@dataclass
class Spec:
    make: Callable[[Path], object]  # writes the HF base checkpoint
    lora: LoraConfig
    vocab: int
    hf_format: str | None = None  # the --format of (c)'s base and adapter


def hf_model(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tiny_mixtral(out: Path):
    from tests.test_mixtral import make_tiny_mixtral

    make_tiny_mixtral(out)


SPECS = {
    "llama": Spec(lambda out: make_tiny_llama(out, tokenizer=False),
                  LoraConfig(r=4, alpha=8, target_modules=LLAMA_LINEARS, modules_to_save=("lm_head",)), 512),
    "llama_tied": Spec(lambda out: make_tiny_llama(out, tokenizer=False, tie_word_embeddings=True),
                       LoraConfig(r=2, alpha=6, target_modules=("q_proj", "v_proj", "down_proj"),
                                  modules_to_save=("embed_tokens",)), 512),
    "bloom": Spec(lambda out: make_bloom(out, n_head=6, tied=True, hub_names=True),
                  LoraConfig(r=4, alpha=4, target_modules=BLOOM_LINEARS, modules_to_save=("norm", "embed_tokens")),
                  256),
    "baichuan": Spec(make_baichuan, LoraConfig(r=4, alpha=16, target_modules=("W_pack", "o_proj", "gate_proj",
                                                                               "up_proj", "down_proj"),
                                               modules_to_save=("lm_head",)), 256),
    "chatglm": Spec(lambda out: make_chatglm(out, groups=2, qkv_bias=True, rope_ratio=2.0),
                    LoraConfig(r=4, alpha=8, target_modules=BLOOM_LINEARS, modules_to_save=("lm_head",)), 256,
                    hf_format="glm"),
    "mixtral": Spec(tiny_mixtral, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                             modules_to_save=("norm",)), 512),
}


def dense_spec(model_type: str) -> Spec:
    """A registry dense family (tests/test_dense_families.py): its debug config with windows and every bias and
    norm perturbed; adapters on every linear of its blocks under the family's HF names (Phi-3's fused `qkv_proj`
    and `gate_up_proj` included), the final norm trained in full."""
    from models import resolve
    from models.lora import valid_targets
    from models.sequential import build_sequential
    from models.common import ModelOptions
    from tests.test_dense_families import family_config, save_reference

    cfg = family_config(model_type, "base")
    with torch.device("meta"):
        targets = tuple(valid_targets(build_sequential(cfg, ModelOptions())))
    return Spec(lambda out: save_reference(cfg, out), LoraConfig(r=4, alpha=8, target_modules=targets,
                                                                  modules_to_save=("norm",)),
                resolve(cfg).vocab_size)


SPECS.update({mt: dense_spec(mt) for mt in __import__("tests.test_dense_families", fromlist=["DENSE"]).DENSE})


@dataclass
class Case:
    name: str
    spec: Spec
    hf_dir: Path  # the HF base
    pp_dir: Path  # the pipeline base (hg_to_pp of hf_dir)
    run: Path  # the LoRA run's save_path
    ours: nn.Module

    def input_ids(self) -> torch.Tensor:
        return torch.randint(0, self.spec.vocab, (2, 16), generator=torch.Generator().manual_seed(5))

    def our_logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.ours(self.input_ids())


@pytest.fixture(scope="module", params=list(SPECS))
def case(request, tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    spec = SPECS[request.param]
    spec.make(root / "hf")
    hg_to_pp(root / "hf", root / "pp", **QUIET)
    ours = write_lora_checkpoint(root / "pp", root / "run", spec.lora)
    return Case(request.param, spec, root / "hf", root / "pp", root / "run", ours)


def merged_model(case: Case, path: Path) -> nn.Module:
    """The merged export in transformers: the family's reference model where it has one (remote code)."""
    family = get_family(json.loads((path / "config.json").read_text())["model_type"])
    return (family.reference_model(path).float() if family.reference_model else hf_model(path)).eval()


def test_adapters_change_the_logits(case):
    base = load_sequential(case.pp_dir).eval()
    with torch.no_grad():
        assert (base(case.input_ids()) - case.our_logits()).abs().max() > 1e-2


def test_merged_export_matches_our_lora_model(case, tmp_path):
    assert convert_model.main(["pp_to_hg", "--input-path", str(case.run), "--save-path", str(tmp_path / "out")]) == 0
    merged = read_hf_tensors(tmp_path / "out")
    base = read_hf_tensors(case.hf_dir)
    canonical = get_family(json.loads((case.pp_dir / "config.json").read_text())["model_type"]).canonical_hf_name
    base = {(canonical or (lambda n: n))(k): v for k, v in base.items()}
    assert sorted(merged) == sorted(base)  # the base's names, shapes and dtypes
    assert all(merged[k].shape == v.shape and merged[k].dtype == v.dtype for k, v in base.items())
    with torch.no_grad():
        torch.testing.assert_close(merged_model(case, tmp_path / "out")(input_ids=case.input_ids()).logits,
                                   case.our_logits(), **TOL)


def peft_base(case: Case, tmp_path: Path) -> nn.Module:
    """(c)'s base model in transformers, in the names the adapter is exported in."""
    if case.name == "baichuan":
        return baichuan_named(case.hf_dir)
    if case.spec.hf_format is not None:
        pp_to_hg(case.pp_dir, tmp_path / "base", hf_format=case.spec.hf_format, **QUIET)
        return hf_model(tmp_path / "base")
    return hf_model(case.hf_dir)


def test_peft_adapter_on_the_base_matches_our_lora_model(case, tmp_path):
    from peft import PeftModel

    argv = ["pp_to_hg", "--input-path", str(case.run), "--save-path", str(tmp_path / "adapter"), "--adapter-only"]
    assert convert_model.main(argv + (["--format", case.spec.hf_format] if case.spec.hf_format else [])) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if not p.name.startswith("tokenizer")) == [
        "adapter_base.json", "adapter_config.json", "adapter_model.safetensors"]  # + the base's fingerprint (demo.py)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == case.spec.lora.r
    assert config["lora_alpha"] == case.spec.lora.alpha
    base = peft_base(case, tmp_path)
    with torch.no_grad():
        base_logits = base(input_ids=case.input_ids()).logits
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=case.input_ids()).logits, case.our_logits(), **TOL)
    assert (base_logits - case.our_logits()).abs().max() > 1e-2  # the adapter, not the base, made them agree


def test_deepspeed_written_lora_checkpoint_merges(tmp_path, monkeypatch):
    """The layer files as DeepSpeed's PipelineModule writes them with exclude_frozen_params (one process, gloo):
    a tied llama whose trained embedding is shared with the head."""
    import deepspeed

    from tests.conftest import free_port

    spec = SPECS["llama_tied"]
    spec.make(tmp_path / "hf")
    hg_to_pp(tmp_path / "hf", tmp_path / "pp", **QUIET)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        _save_and_export_pipeline_checkpoint(tmp_path, spec)
    finally:  # later tests run the trainers in this process: they expect no process group
        torch.distributed.destroy_process_group()


def _save_and_export_pipeline_checkpoint(tmp_path, spec):
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    import models

    cfg = json.loads((tmp_path / "pp" / "config.json").read_text())
    module = PipelineModule(models.build_pipeline_layers(cfg), num_stages=1, loss_fn=models.build_loss_fn(cfg),
                            partition_method="uniform")
    module.checkpoint_parallel_write_pipeline = False
    torch.manual_seed(0)
    for idx, layer in enumerate(module.forward_funcs[:-1]):  # the last spec is the tied head (no module)
        layer.load_state_dict(torch.load(tmp_path / "pp" / layer_file_name(idx), weights_only=True))
        apply_lora(layer, spec.lora)
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if "lora_B" in name or (param.requires_grad and not is_lora_name(name)):
                    param.add_(torch.randn_like(param) * 0.1)
    tag = tmp_path / "run" / "global_step1"
    module.save_state_dict(str(tag), TorchCheckpointEngine(), exclude_frozen_params=True)
    assert set(torch.load(tag / layer_file_name(0), weights_only=True)) == {"embed_tokens.weight"}
    assert torch.load(tag / layer_file_name(5), weights_only=True) == {}
    copy_model_files(str(tmp_path / "pp"), str(tag))
    write_lora_meta(str(tag), spec.lora.to_dict(), str(tmp_path / "pp"), base_fingerprint(str(tmp_path / "pp")),
                    "llama")
    write_manifest(str(tag))
    mark_complete(str(tmp_path / "run"), tag.name, {"step": 1, "epoch": 0})
    pp_to_hg(tmp_path / "run", tmp_path / "out", **QUIET)
    input_ids = torch.randint(0, spec.vocab, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = module((input_ids, torch.arange(16).expand(2, 16)))
        torch.testing.assert_close(hf_model(tmp_path / "out")(input_ids=input_ids).logits, expected, **TOL)


# ----------------------------------------------------------------------------------------------
# Names written


@pytest.mark.parametrize("case", ["chatglm"], indirect=True)
def test_chatglm_adapter_in_hub_names_and_split_for_glm(case, tmp_path):
    """Default: the hub's names (`query_key_value` as one module); --format glm: q/k/v_proj with A shared and
    B's rows split as the weight's, `dense` -> `o_proj`, `dense_h_to_4h` -> `gate_up_proj`."""
    pp_to_hg(case.run, tmp_path / "hub", adapter_only=True, **QUIET)
    pp_to_hg(case.run, tmp_path / "glm", adapter_only=True, hf_format="glm", **QUIET)
    hub, glm = read_hf_tensors(tmp_path / "hub"), read_hf_tensors(tmp_path / "glm")
    prefix = "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value"
    a, b = hub[f"{prefix}.lora_A.weight"], hub[f"{prefix}.lora_B.weight"]
    glm_prefix = "base_model.model.model.layers.1.self_attn"
    for part, rows in zip("qkv", b.split([64, 32, 32])):
        assert torch.equal(glm[f"{glm_prefix}.{part}_proj.lora_A.weight"], a)
        assert torch.equal(glm[f"{glm_prefix}.{part}_proj.lora_B.weight"], rows)
    hub_cfg = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    glm_cfg = json.loads((tmp_path / "glm" / "adapter_config.json").read_text())
    assert hub_cfg["target_modules"] == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert hub_cfg["modules_to_save"] == ["transformer.output_layer"]
    assert glm_cfg["target_modules"] == ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert glm_cfg["modules_to_save"] == ["lm_head"]
    assert "base_model.model.transformer.output_layer.weight" in hub


@pytest.mark.parametrize("case", ["bloom", "llama_tied"], indirect=True)
def test_tied_trained_embedding_is_saved_as_the_head_too(case, tmp_path):
    """Full module names in modules_to_save (PEFT matches them by suffix: bloom's `norm` must not take every
    `input_layernorm`); the trained embedding also as the tied head, with `ensure_weight_tying`."""
    pp_to_hg(case.run, tmp_path / "adapter", adapter_only=True, **QUIET)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = read_hf_tensors(tmp_path / "adapter")
    embed = "transformer.word_embeddings" if case.name == "bloom" else "model.embed_tokens"
    assert torch.equal(tensors[f"base_model.model.{embed}.weight"], tensors["base_model.model.lm_head.weight"])
    if case.name == "bloom":
        assert config["modules_to_save"] == ["lm_head", "transformer.ln_f", "transformer.word_embeddings",
                                             "transformer.word_embeddings_layernorm"]
    else:
        assert config["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    assert config["ensure_weight_tying"] is True


# ----------------------------------------------------------------------------------------------
# Mixtral experts: merged only


@pytest.fixture(scope="module")
def mixtral_expert_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_mixtral_experts")
    tiny_mixtral(root / "hf")
    hg_to_pp(root / "hf", root / "pp", **QUIET)
    cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "w1", "w2", "w3"))
    ours = write_lora_checkpoint(root / "pp", root / "run", cfg)
    return root, ours


def test_mixtral_expert_adapters_merge(mixtral_expert_run, tmp_path):
    root, ours = mixtral_expert_run
    pp_to_hg(root / "run", tmp_path / "out", **QUIET)
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path / "out")(input_ids=input_ids).logits, ours(input_ids), **TOL)


def cli_error(capsys, *argv: str) -> str:
    """convert_model.main in-process: exit 2 and exactly one `error:` line; returns it."""
    assert convert_model.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_mixtral_expert_adapters_have_no_peft_form(mixtral_expert_run, tmp_path, capsys):
    root, _ = mixtral_expert_run
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(root / "run"), "--save-path", str(tmp_path / "a"),
                    "--adapter-only")
    assert "block_sparse_moe.experts.0.w1" in msg and "MixtralForCausalLM" in msg
    assert "export the merged model instead (without --adapter-only)" in msg
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))


# ----------------------------------------------------------------------------------------------
# User errors


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A LoRA run on a private copy of a tiny llama base (tests may damage or move the base)."""
    root = tmp_path_factory.mktemp("lora_llama_errors")
    make_tiny_llama(root / "hf")
    hg_to_pp(root / "hf", root / "pp", **QUIET)
    shutil.copytree(root / "pp", root / "base")
    cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",))
    ours = write_lora_checkpoint(root / "base", root / "run", cfg)
    return root, ours


def test_full_fine_tuning_checkpoint_has_no_adapter(llama_run, tmp_path, capsys):
    root, _ = llama_run
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(root / "pp"), "--save-path", str(tmp_path / "a"),
                    "--adapter-only")
    assert "is not a LoRA checkpoint (no LORA.json" in msg and "without --adapter-only" in msg
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(root / "pp"), "--save-path", str(tmp_path / "a"),
                    "--base-path", str(root / "pp"))
    assert "--base-path" in msg and "not a LoRA checkpoint" in msg


def test_changed_or_moved_base_is_refused_and_base_path_overrides(llama_run, tmp_path, capsys):
    root, ours = llama_run
    base = root / "base"
    moved = tmp_path / "moved"
    shutil.move(base, moved)
    try:
        msg = cli_error(capsys, "pp_to_hg", "--input-path", str(root / "run"), "--save-path", str(tmp_path / "o"))
        assert str(base) in msg and "does not exist" in msg and "--base-path" in msg
        assert convert_model.main(["pp_to_hg", "--input-path", str(root / "run"), "--save-path",
                                   str(tmp_path / "o"), "--base-path", str(moved)]) == 0
        changed = tmp_path / "changed"
        shutil.copytree(moved, changed)
        state = torch.load(changed / "layer_01-model_states.pt", weights_only=True)
        state["mlp.up_proj.weight"][0, 0] += 1.0
        torch.save(state, changed / "layer_01-model_states.pt")
        msg = cli_error(capsys, "pp_to_hg", "--input-path", str(root / "run"), "--save-path", str(tmp_path / "o2"),
                        "--base-path", str(changed))
        assert "its weights differ from the base this LoRA checkpoint was trained on" in msg
        assert not (tmp_path / "o2").exists()
    finally:
        shutil.move(moved, base)
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path / "o")(input_ids=input_ids).logits, ours(input_ids), **TOL)


def test_missing_adapter_tensor_is_named(llama_run, tmp_path, capsys):
    root, _ = llama_run
    run = Path(shutil.copytree(root / "run", tmp_path / "run"))
    tag = run / "global_step3"
    state = torch.load(tag / "layer_02-model_states.pt", weights_only=True)
    del state["self_attn.v_proj.lora_B"]
    torch.save(state, tag / "layer_02-model_states.pt")
    write_manifest(str(tag))
    for extra in ([], ["--adapter-only"]):
        msg = cli_error(capsys, "pp_to_hg", "--input-path", str(run), "--save-path", str(tmp_path / "o"), *extra)
        assert "layer_02-model_states.pt: missing adapter tensor 'self_attn.v_proj.lora_B'" in msg


def test_adapter_output_is_replaced_only_with_overwrite(llama_run, tmp_path, capsys):
    root, _ = llama_run
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(root / "run"), "--save-path", str(out), "--adapter-only")
    assert "exists and is not empty (pass --overwrite to replace it)" in msg and (out / "keep.txt").is_file()
    assert convert_model.main(["pp_to_hg", "--input-path", str(root / "run"), "--save-path", str(out),
                               "--adapter-only", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "config.json").exists()


# ----------------------------------------------------------------------------------------------
# demo.py --adapter


@pytest.fixture(scope="module")
def llama_adapter(llama_run, tmp_path_factory):
    root, _ = llama_run
    out = tmp_path_factory.mktemp("llama_adapter")
    pp_to_hg(root / "run", out / "adapter", adapter_only=True, **QUIET)
    pp_to_hg(root / "run", out / "merged", **QUIET)
    return root / "hf", out / "adapter", out / "merged"


@pytest.mark.parametrize("with_peft", [True, False])
def test_demo_applies_the_adapter_with_or_without_peft(llama_run, llama_adapter, with_peft, monkeypatch):
    _, ours = llama_run
    base_dir, adapter_dir, _ = llama_adapter
    if not with_peft:
        monkeypatch.setitem(__import__("sys").modules, "peft", None)  # `import peft` raises ImportError
    model = demo.apply_adapter(demo.load_model(base_dir, torch.float32, False), demo.check_adapter_dir(adapter_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, ours(input_ids), **TOL)


@pytest.mark.parametrize("with_peft", [True, False])
@pytest.mark.parametrize("case", ["llama_tied", "bloom", "mixtral"], indirect=True)
def test_demo_merges_adapters_of_other_families(case, with_peft, tmp_path, monkeypatch):
    """Tied heads following a trained embedding, bloom's fused qkv, mixtral's attention: peft or our own merge."""
    pp_to_hg(case.run, tmp_path / "adapter", adapter_only=True, **QUIET)
    if not with_peft:
        monkeypatch.setitem(__import__("sys").modules, "peft", None)
    model = demo.apply_adapter(hf_model(case.hf_dir), demo.check_adapter_dir(str(tmp_path / "adapter")))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=case.input_ids()).logits, case.our_logits(), **TOL)


def test_demo_with_adapter_answers_as_the_merged_model(llama_adapter, monkeypatch, capsys):
    base_dir, adapter_dir, merged_dir = llama_adapter
    argv = ["--instruct", "Say hi", "--temperature", "0", "--max-new-tokens", "8"]
    answers = []
    for extra in (["--model-path", str(base_dir), "--adapter", str(adapter_dir)], ["--model-path", str(merged_dir)]):
        assert demo.main(extra + argv) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_demo_adapter_errors(llama_run, llama_adapter, tmp_path, capsys):
    root, _ = llama_run
    base_dir, adapter_dir, _ = llama_adapter
    cases = [(root / "run", "is a training checkpoint; export its adapter first"),
             (tmp_path / "nope", "no such directory"),
             (base_dir, "not a PEFT adapter directory (no adapter_config.json)")]
    for path, expected in cases:
        assert demo.main(["--model-path", str(base_dir), "--adapter", str(path), "--instruct", "x"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
