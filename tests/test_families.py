"""bloom, baichuan2-7b and chatglm3 pipeline layers vs transformers references (CPU, fp32).

Each case writes a tiny random checkpoint in the family's own layout from a transformers model whose math
is the reference: `BloomForCausalLM` itself; for the remote-code families a `LlamaForCausalLM` (baichuan:
q|k|v fused into `W_pack`, head rows normalised in the forward) and a `GlmForCausalLM` (chatglm: q|k|v
fused into `query_key_value`, gate|up into `dense_h_to_4h`). The fusing is written here, independently of
the converter, and reused to express the reference's gradients in checkpoint names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch.nn.utils import parametrize

import models
from models import ModelError, ModelOptions, get_family, load_sequential
from models.common import CausalLMLoss, alibi_slopes
from models.convert import WeightMapper, hg_to_pp, pp_to_hg, verify
from tests.conftest import assert_same_tensors, hf_name, perturb, read_hf_tensors, token_batch

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda msg: None}
VOCAB = 256


def write_checkpoint(out: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Tiny checkpoints: (reference model, checkpoint dir, reference grads -> checkpoint names)


def make_bloom(out: Path, n_head: int, tied: bool, hub_names: bool):
    """hub_names: save as the BigScience hub files are (no `transformer.` prefix, no tied lm_head)."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=3, n_head=n_head, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(config).float()
    perturb(model)
    if hub_names:
        config.save_pretrained(out)
        state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    else:
        model.save_pretrained(out)
    reference = BloomForCausalLM.from_pretrained(out, dtype=torch.float32)
    return reference, lambda grads: grads


def to_baichuan(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM names -> Baichuan2 names: W_pack = [q; k; v]; the NormHead's raw weight as lm_head."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):
            prefix = name.removesuffix("q_proj.weight")
            out[prefix + "W_pack.weight"] = torch.cat([t, tensors[prefix + "k_proj.weight"],
                                                       tensors[prefix + "v_proj.weight"]])
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        else:
            out[name.replace("lm_head.parametrizations.weight.original", "lm_head.weight")] = t
    return out


class RowNormalize(torch.nn.Module):
    def forward(self, weight):
        return torch.nn.functional.normalize(weight, dim=1)


BAICHUAN_CONFIG = {
    "architectures": ["BaichuanForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                 "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
    "tokenizer_class": "BaichuanTokenizer", "model_type": "baichuan",
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "model_max_length": 4096, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    "z_loss_weight": 0, "_attn_implementation": "eager",
}


def make_baichuan(out: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = BAICHUAN_CONFIG
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_attention_heads"], rms_norm_eps=c["rms_norm_eps"], pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).float()
    perturb(reference)
    with torch.no_grad():  # rows far from unit norm, so the NormHead matters
        reference.lm_head.weight.mul_(torch.rand(VOCAB, 1) * 3 + 0.5)
    write_checkpoint(out, BAICHUAN_CONFIG, to_baichuan(dict(reference.state_dict())))
    parametrize.register_parametrization(reference.lm_head, "weight", RowNormalize())
    return reference, to_baichuan


def to_chatglm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GlmForCausalLM names -> ChatGLM names (q|k|v and gate|up fused)."""
    out = {}
    for name, t in tensors.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        new = (name.replace("model.embed_tokens.", "transformer.embedding.word_embeddings.")
               .replace("model.layers.", "transformer.encoder.layers.")
               .replace("model.norm.", "transformer.encoder.final_layernorm.")
               .replace("lm_head.", "transformer.output_layer.")
               .replace(".self_attn.o_proj.", ".self_attention.dense.")
               .replace(".mlp.gate_up_proj.", ".mlp.dense_h_to_4h.")
               .replace(".mlp.down_proj.", ".mlp.dense_4h_to_h."))
        if ".self_attn.q_proj." in name:
            k, v = tensors[name.replace("q_proj", "k_proj")], tensors[name.replace("q_proj", "v_proj")]
            new, t = new.replace(".self_attn.q_proj.", ".self_attention.query_key_value."), torch.cat([t, k, v])
        out[new] = t
    return out


def chatglm_config(groups: int, qkv_bias: bool, rope_ratio: float) -> dict:
    return {
        "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": qkv_bias, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 96,
        "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 64, "kv_channels": 16,
        "layernorm_epsilon": 1e-5, "multi_query_attention": groups < 4, "multi_query_group_num": groups,
        "num_attention_heads": 4, "num_layers": 3, "original_rope": True, "padded_vocab_size": VOCAB,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": 512, "use_cache": True, "torch_dtype": "float32",
        "transformers_version": "4.30.2", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
        "rope_ratio": rope_ratio,
    }


def make_chatglm(out: Path, groups: int, qkv_bias: bool, rope_ratio: float):
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    reference = GlmForCausalLM(GlmConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=groups, head_dim=16, rms_norm_eps=1e-5, attention_bias=qkv_bias,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * rope_ratio, "partial_rotary_factor": 0.5},
        pad_token_id=None, eos_token_id=2, tie_word_embeddings=False)).float()
    perturb(reference)
    tensors = to_chatglm(dict(reference.state_dict()))
    # the checkpoint's buffer (here bf16 and arbitrary): carried through conversion, never used by the math
    tensors["transformer.rotary_pos_emb.inv_freq"] = torch.rand(4).to(torch.bfloat16)
    write_checkpoint(out, chatglm_config(groups, qkv_bias, rope_ratio), tensors)
    return reference, to_chatglm


CASES: dict[str, Callable] = {
    "bloom_hub_tied_6heads": lambda out: make_bloom(out, n_head=6, tied=True, hub_names=True),
    "bloom_untied_4heads": lambda out: make_bloom(out, n_head=4, tied=False, hub_names=False),
    "baichuan2": make_baichuan,
    "chatglm3_mqa": lambda out: make_chatglm(out, groups=2, qkv_bias=True, rope_ratio=2.0),
    "chatglm_mha_nobias": lambda out: make_chatglm(out, groups=4, qkv_bias=False, rope_ratio=1.0),
}


@dataclass
class Case:
    name: str
    reference: torch.nn.Module
    hf_dir: Path
    pp_dir: Path
    ref_grads_as_hf: Callable[[dict], dict]

    @property
    def family(self):
        return get_family(json.loads((self.hf_dir / "config.json").read_text())["model_type"])

    def reference_logits(self, input_ids, position_ids, labels=None):
        kwargs = {"labels": labels} if labels is not None else {}
        if not self.name.startswith("bloom"):  # BLOOM takes no position ids (ALiBi is relative anyway)
            kwargs["position_ids"] = position_ids
        return self.reference(input_ids=input_ids, **kwargs)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp(request.param)
    reference, as_hf = CASES[request.param](root / "hf")
    hg_to_pp(root / "hf", root / "pp", **QUIET)
    return Case(request.param, reference, root / "hf", root / "pp", as_hf)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return token_batch(VOCAB, seed)


# ----------------------------------------------------------------------------------------------
# Parity, conversion, verify, checkpointing (every case)


def test_logits_match_reference(case):
    ours = load_sequential(case.pp_dir).eval()
    case.reference.eval()
    input_ids, position_ids, _ = batch()
    with torch.no_grad():
        expected = case.reference_logits(input_ids, position_ids).logits
        actual = ours(input_ids, position_ids)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_loss_and_grads_match_reference(case):
    ours = load_sequential(case.pp_dir).train()
    reference = case.reference.train()
    input_ids, position_ids, labels = batch(seed=1)
    reference.zero_grad()
    expected = case.reference_logits(input_ids, position_ids, labels).loss
    expected.backward()
    actual = ours.loss(input_ids, labels, position_ids)
    actual.backward()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

    ref_grads = case.ref_grads_as_hf({n: p.grad for n, p in reference.named_parameters()})
    mapper = WeightMapper(case.family.weight_map)
    seen = set()
    for name, param in ours.named_parameters():
        target = hf_name(ours, mapper, name)
        seen.add(target)
        torch.testing.assert_close(param.grad, ref_grads[target], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    assert seen == set(ref_grads)


def test_grad_checkpointing_same_loss_and_grads(case, monkeypatch):
    calls = []
    original = models.common.checkpoint
    monkeypatch.setattr(models.common, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    input_ids, position_ids, labels = batch(seed=2)
    results = []
    for use_grad_ckpt in (False, True):
        model = load_sequential(case.pp_dir, opts=ModelOptions(use_grad_ckpt=use_grad_ckpt)).train()
        loss = model.loss(input_ids, labels, position_ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == len(model.layers) - 2
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7)


def test_round_trip_is_bit_exact(case, tmp_path):
    pp_to_hg(case.pp_dir, tmp_path / "out", max_shard_size="30KB", **QUIET)
    source = read_hf_tensors(case.hf_dir)
    canonical = case.family.canonical_hf_name or (lambda n: n)
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), {canonical(k): v for k, v in source.items()})
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (case.hf_dir / "config.json").read_text())


def test_verify_passes(case):
    assert verify(case.hf_dir, case.pp_dir) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Family specifics


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 24, 32, 40, 112])
def test_alibi_slopes_match_transformers(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))


def test_bloom_tied_head_spans_first_and_last_stage(tmp_path, monkeypatch):
    """One-process PipelineModule (gloo): the tied head is a trailing spec sharing the embedding, files are
    layer_00..layer_{L+1}, and a 2-stage split puts Enter on stage 0 and Exit + tied head on stage 1."""
    import deepspeed
    from deepspeed.pipe import PipelineModule, TiedLayerSpec
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from transformers import BloomConfig

    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4).to_dict()
    specs = models.build_pipeline_layers(cfg)
    assert len(specs) == 2 + 3 and isinstance(specs[0], TiedLayerSpec) and isinstance(specs[-1], TiedLayerSpec)
    assert specs[0].key == specs[-1].key and specs[-1].forward_fn is not None
    assert models.parts_to_boundaries([1, 3], len(specs)) == [0, 1, 5]

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29519"}.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        module = PipelineModule(specs, num_stages=1, loss_fn=models.build_loss_fn(cfg), partition_method="uniform")
        module.checkpoint_parallel_write_pipeline = False
        module.save_state_dict(str(tmp_path), TorchCheckpointEngine())
    finally:  # later in-process trainer tests expect no process group
        torch.distributed.destroy_process_group()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert sorted(p.name for p in tmp_path.glob("layer_*")) == [f"layer_{i:02d}-model_states.pt" for i in range(4)]
    ours = load_sequential(tmp_path).eval()
    input_ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), module((input_ids, torch.arange(8).expand(2, 8))))


def test_baichuan2_13b_is_refused():
    cfg = {**BAICHUAN_CONFIG, "hidden_size": 5120, "intermediate_size": 13696, "num_hidden_layers": 40,
           "num_attention_heads": 40}
    with pytest.raises(ModelError, match="Baichuan2-13B, which uses ALiBi"):
        models.build_pipeline_layers(cfg)
    with pytest.raises(ModelError, match="Baichuan2-13B"):
        models.build_pipeline_layers({**BAICHUAN_CONFIG, "num_hidden_layers": 40})


@pytest.mark.parametrize("case", ["baichuan2"], indirect=True)
def test_baichuan_normhead_keeps_raw_weight_and_z_loss_from_config(case):
    model = load_sequential(case.pp_dir).eval()
    raw = model.layers[str(len(model.layers) - 1)].lm_head.weight.clone()
    with torch.no_grad():
        model(batch()[0])
    assert torch.equal(model.layers[str(len(model.layers) - 1)].lm_head.weight, raw)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(VOCAB))
    loss = models.build_loss_fn({**BAICHUAN_CONFIG, "z_loss_weight": 0.25})
    assert isinstance(loss, CausalLMLoss) and loss.z_loss_weight == 0.25
    assert models.build_loss_fn({**BAICHUAN_CONFIG, "z_loss_weight": 0.25},
                                ModelOptions(aux_max_z_loss_weight=0.1)).z_loss_weight == 0.1


@pytest.mark.parametrize("case", ["chatglm3_mqa", "chatglm_mha_nobias"], indirect=True)
def test_chatglm_inv_freq_is_carried_in_the_enter_file(case):
    enter = torch.load(case.pp_dir / "layer_00-model_states.pt", weights_only=True)
    expected = read_hf_tensors(case.hf_dir)["transformer.rotary_pos_emb.inv_freq"]
    assert enter["rotary_pos_emb.inv_freq"].dtype == torch.bfloat16
    assert torch.equal(enter["rotary_pos_emb.inv_freq"], expected)


@pytest.mark.parametrize("case", ["chatglm3_mqa", "chatglm_mha_nobias"], indirect=True)
def test_chatglm_export_as_native_glm(case, tmp_path):
    """`pp_to_hg --format glm`: a transformers `glm` checkpoint (no remote code) with the same logits."""
    from transformers import AutoModelForCausalLM

    import convert_model

    out = tmp_path / "glm"
    assert convert_model.main(["pp_to_hg", "--input-path", str(case.pp_dir), "--save-path", str(out),
                               "--format", "glm"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm" and "auto_map" not in cfg
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported).__name__ == "GlmForCausalLM"
    assert sorted(read_hf_tensors(out)) == sorted(case.reference.state_dict())
    input_ids, position_ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=input_ids, position_ids=position_ids).logits,
                                   case.reference(input_ids=input_ids, position_ids=position_ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert verify(out, case.pp_dir) <= 1e-5


def test_format_glm_is_refused_for_other_families(tmp_path):
    from models.tiny import make_tiny_llama

    make_tiny_llama(tmp_path / "hf", tokenizer=False)
    hg_to_pp(tmp_path / "hf", tmp_path / "pp", **QUIET)
    with pytest.raises(ModelError, match=r"--format glm is not available for model_type 'llama'"):
        pp_to_hg(tmp_path / "pp", tmp_path / "out", hf_format="glm", **QUIET)


@pytest.mark.parametrize("key, value", [("rmsnorm", False), ("add_bias_linear", True), ("post_layer_norm", False)])
def test_chatglm_unsupported_variants_are_refused(key, value):
    with pytest.raises(ModelError, match=f"chatglm with {key}={str(value).lower()}"):
        models.build_pipeline_layers({**chatglm_config(2, True, 1.0), key: value})


def test_default_parts_for_eight_stages():
    assert get_family("bloom").default_parts(8) == [1, 5, 5, 5, 5, 5, 5, 1]
    assert get_family("baichuan").default_parts(8) == [5, 4, 4, 4, 4, 4, 4, 5]
    assert get_family("chatglm").default_parts(8) == [3, 4, 4, 4, 4, 4, 4, 3]
    for family in ("bloom", "baichuan", "chatglm"):
        assert sum(get_family(family).default_parts(3, 4)) == 6


@pytest.mark.parametrize("name, parts", [("bloom", [1, 5, 5, 5, 5, 5, 5, 1]),
                                         ("baichuan2", [5, 4, 4, 4, 4, 4, 4, 5]),
                                         ("chatglm3", [3, 4, 4, 4, 4, 4, 4, 3])])
def test_family_yaml_configs_parse(name, parts):
    from utils.config import load_config

    cfg = load_config(str(ROOT / "configs" / f"ds_config_{name}.yml"))
    assert cfg["model_topo.parts"] == parts


def test_layer_flops_cover_every_layer():
    cfgs = {"bloom": {"model_type": "bloom", "vocab_size": VOCAB, "hidden_size": 48, "n_layer": 3, "n_head": 6},
            "baichuan": BAICHUAN_CONFIG, "chatglm": chatglm_config(2, True, 1.0)}
    for model_type, cfg in cfgs.items():
        model = models.resolve(cfg)
        assert model.model_type == model_type
        flops = model.layer_flops(64)
        assert len(flops) == model.num_blocks + 2 == 5
        assert flops[1] > 0 and flops[-1] > 2 * 64 * 48 * VOCAB


@pytest.mark.skipif(models.common.flash_attn_available(), reason="flash-attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    for cfg in ({"model_type": "bloom", "vocab_size": VOCAB, "hidden_size": 48, "n_layer": 1, "n_head": 6},
                BAICHUAN_CONFIG, chatglm_config(2, True, 1.0)):
        with pytest.raises(ModelError, match="use_flash_attn: true but flash-attn is not installed"):
            models.build_pipeline_layers(cfg, ModelOptions(use_flash_attn=True))
