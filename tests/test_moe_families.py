"""The MoE families on `models/moe.py` (qwen3_moe, qwen2_moe, deepseek_v3) vs transformers' own models (CPU, fp32,
eager attention), looped over the registry: every family with a `debug_config` built on `models.moe.MoeBlock`
(mixtral has its own tests/test_mixtral.py).

Each case saves a tiny random transformers model built from the family's `debug_config` (every parameter
perturbed, routers sharpened so top-k is far from ties, DeepSeek's correction biases random) in both expert
layouts (the hub's per-expert names; transformers 5's fused 3-D tensors), converts both with `hg_to_pp`, and
checks logits, CE + aux loss (padding excluded) and every gradient within 1e-5 relative, the loss and gradients
of the other execution paths (expert loop, fused head, activation checkpointing), a two-stage split exchanging
tensors as DeepSpeed does, packed rows, `pp_to_hg` bit for bit in both layouts, LoRA on attention and experts,
the released config.json files and one-line refusals; a real 2-stage DeepSpeed run's first loss equals one
process's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from models import ModelOptions, load_sequential
from models.convert import WeightMapper, hg_to_pp, pp_to_hg
from models.family import RELEASED_DIR, released_config
from models.moe import Experts, MoeBlock, SparseMoe, load_balancing_loss, unstack_experts, valid_tokens
from models.moe_layout import fused_experts_to_hub
from tests.conftest import assert_packed_rows_equal_documents_alone, assert_same_tensors, read_hf_tensors

QUIET = {"log": lambda msg: None}
MOE = sorted(mt for mt, f in models.REGISTRY.items() if f.debug_config is not None and mt != "mixtral"
             and any(isinstance(s.typename, type) and issubclass(s.typename, MoeBlock)
                     for s in models.resolve(f.debug_config()).specs()))
VARIANTS = {mt: {"base": {}} for mt in MOE}
for _mt, _extra in {
    "qwen3_moe": {"tied": {"tie_word_embeddings": True}, "not_renormalised": {"norm_topk_prob": False}},
    "qwen2_moe": {"no_window": {"use_sliding_window": False}},
    "deepseek_v3": {"q_proj": {"q_lora_rank": None}, "plain_rope": {"rope_interleave": False},
                    "yarn": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                              "mscale_all_dim": 0.707}}},
}.items():
    if _mt in VARIANTS:
        VARIANTS[_mt].update(_extra)
CASES = [(mt, v) for mt in MOE for v in VARIANTS[mt]]


def family_config(model_type: str, variant: str = "base") -> dict:
    return models.get_family(model_type).debug_config(**VARIANTS[model_type][variant])


def make_reference(cfg: dict, seed: int = 0):
    """A random transformers model of `cfg`: every parameter perturbed, routers sharpened (x20), DeepSeek's
    `e_score_correction_bias` random (so it changes the choice)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(20.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
    return model


def save_reference(cfg: dict, out: Path, fused: bool = False):
    """`make_reference(cfg)` saved to `out` (hub layout, or transformers 5's fused one), reloaded in fp32."""
    from transformers import AutoModelForCausalLM

    model = make_reference(cfg)
    model.save_pretrained(out, save_original_format=not fused)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")


@pytest.fixture(scope="module", params=CASES, ids=[f"{mt}-{v}" for mt, v in CASES])
def case(request, tmp_path_factory):
    """(model_type, HF reference, root dir with hub/ v5/ pp_hub/ pp_v5/)."""
    model_type, variant = request.param
    root = tmp_path_factory.mktemp(f"{model_type}-{variant}")
    cfg = family_config(model_type, variant)
    reference = save_reference(cfg, root / "hub")
    save_reference(cfg, root / "v5", fused=True)
    for layout in ("hub", "v5"):
        hg_to_pp(root / layout, root / f"pp_{layout}", **QUIET)
    return model_type, reference, root


def batch(vocab: int, seed: int = 0, padded: bool = True):
    """input_ids [2, 24], position_ids (second row offset), labels with a masked prompt and right padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 24), generator=g)
    position_ids = torch.stack([torch.arange(24), torch.arange(24) + 7])
    labels = input_ids.clone()
    labels[0, :5] = -100
    if padded:
        labels[1, 18:] = -100
    return input_ids, position_ids, labels


def hf_grads_by_hub_name(model, args) -> dict[str, torch.Tensor]:
    """The reference's gradients under the hub's per-expert names (its fused expert gradients split)."""
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        out.update(fused_experts_to_hub(args, name, grad))
    return out


def our_grads_by_hub_name(model, family, args) -> dict[str, torch.Tensor]:
    """Our gradients under the HF names of the weight map (stacked expert gradients split per expert)."""
    grads = {name: param.grad for name, param in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            unstack_experts(grads, f"{name}.", module.num_experts, module.names)
    mapper = WeightMapper(family.weight_map)
    out = {}
    for name, grad in grads.items():
        _, idx, local = name.split(".", 2)
        idx = int(idx)
        kind, block = ("enter", None) if idx == 0 else ("exit", None) if idx == args.num_layers + 1 else ("block", idx - 1)
        out[mapper.to_hf(kind, block, local)] = grad
    return out


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rtol: float = 1e-5) -> None:
    """Within `rtol` of `expected`, elementwise with an absolute floor of rtol · max|expected|."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


def reference_loss(reference, input_ids, position_ids, labels, padded: bool):
    """transformers' loss with the aux term (where the family has one), padding excluded via the attention mask
    our `valid_tokens` derives from the labels."""
    mask = valid_tokens(labels).long() if padded else None
    kw = {"output_router_logits": True} if hasattr(reference.config, "router_aux_loss_coef") else {}
    return reference(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, labels=labels, **kw)


@pytest.mark.parametrize("layout", ["hub", "v5"])
@pytest.mark.parametrize("padded", [True, False])
def test_logits_loss_and_grads_match_transformers(case, layout, padded):
    model_type, reference, root = case
    family = models.get_family(model_type)
    ours = load_sequential(root / f"pp_{layout}")
    args = models.resolve_dir(root / f"pp_{layout}").args
    input_ids, position_ids, labels = batch(reference.config.vocab_size, seed=1, padded=padded)
    with torch.no_grad():
        expected_logits = reference.eval()(input_ids=input_ids, position_ids=position_ids).logits
        logits, probs, routes, *_ = ours.eval().outputs(input_ids, position_ids)
    assert_rel_close(logits, expected_logits, "logits")
    assert routes.shape == (2, 24, sum(args.sparse), args.moe.top_k) and int(routes.max()) < args.moe.num_experts

    reference.train().zero_grad()
    ours.train()
    out = reference_loss(reference, input_ids, position_ids, labels, padded)
    out.loss.backward()
    actual = ours.loss(input_ids, labels, position_ids)
    actual.backward()
    assert_rel_close(actual, out.loss, "loss")
    if getattr(out, "aux_loss", None) is not None:
        assert out.aux_loss > args.moe.top_k + 0.1  # far from balanced: the aux term matters to the comparison
    expected = hf_grads_by_hub_name(reference, args)
    grads = our_grads_by_hub_name(ours, family, args)
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        assert_rel_close(grad, expected[name], name)


def test_aux_loss_alone_reaches_every_router(case):
    """The load-balancing term on its own: its gradient reaches every sparse block's router as in transformers."""
    model_type, reference, root = case
    if not hasattr(reference.config, "router_aux_loss_coef"):
        pytest.skip(f"{model_type}: transformers computes no aux loss")
    ours = load_sequential(root / "pp_hub").train()
    reference.train().zero_grad()
    input_ids, position_ids, labels = batch(reference.config.vocab_size, seed=2)
    mask = valid_tokens(labels)
    out = reference(input_ids=input_ids, position_ids=position_ids, attention_mask=mask.long(),
                    output_router_logits=True)
    out.aux_loss.backward()
    _, probs, routes, *_ = ours.outputs(input_ids, position_ids)
    aux, _ = load_balancing_loss(probs, routes, mask)
    aux.backward()
    assert_rel_close(aux, out.aux_loss, "aux")
    routers = 0
    for i, layer in enumerate(reference.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue
        routers += 1
        assert gate.weight.grad.abs().max() > 0
        assert_rel_close(ours.layers[str(i + 1)].mlp.gate.weight.grad, gate.weight.grad, f"router {i}")
    assert routers == sum(models.resolve_dir(root / "pp_hub").args.sparse)


def test_other_paths_give_the_same_loss_and_grads(case):
    """The expert loop, the fused head + loss and activation checkpointing against the plain grouped path."""
    _, reference, root = case
    input_ids, position_ids, labels = batch(reference.config.vocab_size, seed=3)
    results = []
    for opts in (ModelOptions(), ModelOptions(moe_grouped_gemm=False),
                 ModelOptions(fused_head_loss=True, use_grad_ckpt=True)):
        model = load_sequential(root / "pp_hub", opts=opts).train()
        loss = model.loss(input_ids, labels, position_ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), *others = results
    for loss_b, grads_b in others:
        assert_rel_close(loss_b, loss_a, "loss", rtol=1e-6)
        for name in grads_a:
            assert_rel_close(grads_b[name], grads_a[name], name)


def run_split_like_deepspeed(model, split: int, input_ids, position_ids, labels) -> torch.Tensor:
    """Forward/backward through two stages exactly as DeepSpeed's PipelineEngine exchanges tensors: the
    receiver gets detached clones with `requires_grad = is_floating_point()`, every received float tensor
    must end up with a grad, and the sender calls `backward(grad)` on each of its float outputs in turn."""
    from functools import partial

    steps = [partial(fn, model.layers[key]) if fn is not None else model.layers[key] for key, fn in model._steps]
    sent = (input_ids, position_ids)
    for step in steps[:split]:
        sent = step(sent)
    received = tuple(t.clone().detach().requires_grad_(t.is_floating_point()) for t in sent)
    x = received
    for step in steps[split:]:
        x = step(x)
    loss = model.loss_fn(x, labels)
    loss.backward()
    floats = [(out, recv) for out, recv in zip(sent, received) if recv.is_floating_point()]
    for i, (out, recv) in enumerate(floats):
        assert recv.grad is not None
        out.backward(gradient=recv.grad, retain_graph=i < len(floats) - 1)
    return loss.detach()


@pytest.mark.parametrize("split", [1, 2, 4])
def test_two_stage_split_equals_one_process(case, split):
    """Split after Enter, after a block, before Exit: same loss and grads (router statistics cross the boundary)."""
    _, reference, root = case
    input_ids, position_ids, labels = batch(reference.config.vocab_size, seed=6)
    whole = load_sequential(root / "pp_hub").train()
    expected = whole.loss(input_ids, labels, position_ids)
    expected.backward()
    parted = load_sequential(root / "pp_hub").train()
    torch.testing.assert_close(run_split_like_deepspeed(parted, split, input_ids, position_ids, labels),
                               expected.detach(), rtol=0, atol=0)
    grads = dict(whole.named_parameters())
    for name, param in parted.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_packed_rows_equal_their_documents_alone(case):
    _, reference, root = case
    assert_packed_rows_equal_documents_alone(root / "pp_hub", reference.config.vocab_size)


@pytest.mark.parametrize("source", ["hub", "v5"])
def test_round_trips_are_bit_exact_in_both_layouts(case, source, tmp_path):
    """Either source layout -> pipeline -> the hub layout (default) and transformers 5's fused one
    (`--format transformers5`), each equal to the file of that layout bit for bit; the fused export loads in
    transformers."""
    _, reference, root = case
    pp_to_hg(root / f"pp_{source}", tmp_path / "hub", max_shard_size="200KB", **QUIET)
    assert_same_tensors(read_hf_tensors(tmp_path / "hub"), read_hf_tensors(root / "hub"))
    pp_to_hg(root / f"pp_{source}", tmp_path / "v5", hf_format="transformers5", **QUIET)
    fused = read_hf_tensors(tmp_path / "v5")
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in fused)
    assert_same_tensors(fused, read_hf_tensors(root / "v5"))
    assert models.convert.verify(tmp_path / "v5", root / f"pp_{source}") < 1e-5


def test_v5_layout_wrong_expert_shape_is_a_clear_error(case, tmp_path):
    from safetensors.torch import save_file

    model_type, _, root = case
    src = tmp_path / "src"
    src.mkdir()
    tensors = read_hf_tensors(root / "v5")
    name = next(n for n in tensors if n.endswith("mlp.experts.down_proj"))
    tensors[name] = tensors[name][:3]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text((root / "v5" / "config.json").read_text())
    with pytest.raises(models.ModelError, match=rf"'{name}' has shape \(3, "):
        hg_to_pp(src, tmp_path / "pp", **QUIET)


def test_state_dict_is_the_hub_layout(case):
    """A sparse block's state_dict holds the hub's names and values (experts per expert), and loads back."""
    _, _, root = case
    ours = load_sequential(root / "pp_hub")
    hub = read_hf_tensors(root / "hub")
    args = models.resolve_dir(root / "pp_hub").args
    layer = args.sparse.index(True)
    state = ours.layers[str(layer + 1)].state_dict()
    prefix = f"model.layers.{layer}."
    expected = {n.removeprefix(prefix): t for n, t in hub.items() if n.startswith(prefix)}
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_lora_on_attention_and_experts_merges_exactly(case):
    """LoRA on q_proj and on the stacked experts: grouped == looped, and merging gives the same logits."""
    from models.lora import LoraConfig, apply_lora, merge_lora

    _, reference, root = case
    cfg = LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    input_ids, position_ids, labels = batch(reference.config.vocab_size, seed=8)
    outs = {}
    for grouped in (True, False):
        model = load_sequential(root / "pp_hub", opts=ModelOptions(moe_grouped_gemm=grouped)).train()
        torch.manual_seed(0)
        wrapped = apply_lora(model, cfg)
        assert any(name.endswith(".experts") for name in wrapped)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.05)
        loss = model.loss(input_ids, labels, position_ids)
        loss.backward()
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n for n in trained)
        outs[grouped] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model
    (loss_g, grads_g, model), (loss_l, grads_l, _) = outs[True], outs[False]
    assert_rel_close(loss_l, loss_g, "loss", rtol=1e-6)
    for n in grads_g:
        assert_rel_close(grads_l[n], grads_g[n], n)
    model.eval()
    with torch.no_grad():
        before = model(input_ids, position_ids)
        merge_lora(model)
        assert not any("lora_" in n for n, _ in model.named_parameters())
        assert_rel_close(model(input_ids, position_ids), before, "merged logits")


@pytest.mark.parametrize("model_type", MOE)
def test_released_configs_resolve(model_type):
    family = models.get_family(model_type)
    if not family.released_configs:
        pytest.skip(f"{model_type}: no published config.json committed yet (models/released/SOURCES.md)")
    for name, file_name in family.released_configs.items():
        assert (RELEASED_DIR / file_name).is_file(), f"{name}: models/released/{file_name} missing"
        model = models.resolve(released_config(file_name))
        assert model.model_type == model_type and model.num_blocks > 0
        assert 0 < model.flops_per_token(4096) < 6 * 1e12


def test_qwen3_30b_a3b_is_read_as_released():
    args = models.resolve(released_config("qwen3-30b-a3b.json")).args
    moe = args.moe
    assert (moe.num_experts, moe.top_k, moe.expert_size, moe.norm_topk_prob) == (128, 8, 768, True)
    assert all(args.sparse) and len(args.sparse) == 48 and args.qk_norm == "head" and args.head_dim == 128
    assert args.router_aux_loss_coef == 0.001 and not args.layer_windows


@pytest.mark.parametrize("model_type, overrides, message", [
    ("qwen3_moe", {"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) must be between 1 and num_experts \(8\)"),
    ("qwen3_moe", {"mlp_only_layers": [0, 1, 2, 3]}, "no layer is sparse"),
    ("qwen3_moe", {"mlp_only_layers": "1"}, "'mlp_only_layers' must be a list"),
    ("qwen3_moe", {"attention_dropout": 0.1}, "attention_dropout 0.1 is not supported"),
    ("qwen2_moe", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for qwen2_moe"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "'decoder_sparse_step' must be >= 1"),
    ("deepseek_v3", {"n_group": 3}, r"n_group \(3\) must divide n_routed_experts"),
    ("deepseek_v3", {"topk_group": 5}, r"topk_group \(5\) must be between 1 and n_group"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
    ("deepseek_v3", {"aux_loss_alpha": 0.01, "seq_aux": False}, "seq_aux false"),
])
def test_unsupported_variants_are_one_line_errors(model_type, overrides, message):
    if model_type not in MOE:
        pytest.skip(f"{model_type} not registered")
    with pytest.raises(models.ModelError, match=message) as err:
        models.resolve(models.get_family(model_type).debug_config(**overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_type", MOE)
def test_family_trains_in_two_stages_like_one_process(model_type, tmp_path):
    """train_ds.py, 2 pipeline stages on 2 CPU ranks: the first step's loss equals one process's; expert load
    per MoE block reaches metrics.jsonl; the routers of both stages were trained."""
    from tests.conftest import run_deepspeed, train_config
    from tests.test_train_families import one_process_first_step_loss

    hf, pp, out = tmp_path / "hf", tmp_path / "pp", tmp_path / "out"
    make_reference(family_config(model_type)).save_pretrained(hf)
    hg_to_pp(hf, pp, **QUIET)  # in-process (one process start less); the CLI: test_convert.py
    rate = {"moe_bias_update_rate": 0.01} if model_type == "deepseek_v3" else {}
    cfg = train_config(pp, out, dims=(2, 1), synthetic_data=True, max_steps=3, max_seq_len=32, data_path=None,
                       save_final=True, **{"optimizer.params.lr": 1e-2, **rate})
    res = run_deepspeed("train_ds.py", cfg, tmp_path, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["grad_norm"] > 0 for r in rows)
    one = one_process_first_step_loss(pp, cfg)
    assert abs(rows[0]["loss"] - one) <= 1e-5 * abs(one), (rows[0]["loss"], one)
    args = models.resolve_dir(pp).args
    assert len(rows[0]["expert_load_min"]) == len(rows[0]["expert_load_max"]) == sum(args.sparse)
    from utils.plot import expert_load_series, plot

    series = expert_load_series(rows)  # the plot's expert-load panel: one max and one min line per MoE block
    assert len(series["max"]) == sum(args.sparse) and [len(x) for x in series["min"]] == [3] * sum(args.sparse)
    assert all(lo <= 1 / args.moe.num_experts <= hi for r in rows
               for lo, hi in zip(r["expert_load_min"], r["expert_load_max"]))
    plot(rows, str(tmp_path / "metrics.png"))
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert expert_load_series([{"step": 1, "loss": 1.0}]) == {}
    start, final = load_sequential(pp), load_sequential(out / "checkpoint_final")
    sparse = [i + 1 for i, s in enumerate(args.sparse) if s]
    for key in (str(sparse[0]), str(sparse[-1])):  # a router on each stage
        assert not torch.equal(final.layers[key].mlp.gate.weight, start.layers[key].mlp.gate.weight)
        if rate:  # 3 steps of ±0.01 (or 0) per expert: the biases moved on both stages, by whole steps
            moved = (final.layers[key].mlp.gate.e_score_correction_bias
                     - start.layers[key].mlp.gate.e_score_correction_bias) / 0.01
            assert moved.abs().max() > 0.5 and torch.allclose(moved, moved.round(), atol=1e-3), moved
            assert moved.abs().max() <= 3 + 1e-3


# ----------------------------------------------------------------------------------------------
# DeepSeek-V3 balancing: the auxiliary-loss-free bias update and the sequence-wise aux loss


def test_bias_update_rule_against_a_hand_computation():
    """update_expert_bias: b_e += rate · sign(mean load - load_e) from the top-k assignments recorded in training
    forwards (counts summed over forwards), then the counts are dropped; rate 0 leaves the bias as it was."""
    from models.moe import update_expert_bias

    if "deepseek_v3" not in MOE:
        pytest.skip("deepseek_v3 not registered")
    args = models.resolve(family_config("deepseek_v3")).args
    moe = SparseMoe(args, torch.float32).train()
    bias = moe.gate.e_score_correction_bias
    bias.copy_(torch.tensor([0.5, -0.25, 0.0, 0.125, 1.0, -1.0, 0.75, 0.0]))
    start = bias.clone()
    moe.record_load(torch.tensor([[0, 1, 2], [0, 1, 3], [0, 4, 5]]))  # loads 3 2 1 1 1 1 0 0, over 3 tokens
    moe.record_load(torch.tensor([[0, 6, 7]]))  # + 1 0 0 0 0 0 1 1 -> 4 2 1 1 1 1 1 1, mean 1.5
    # hand: mean 1.5 -> expert 0 (4) and 1 (2) overloaded: -rate; the six others (1) underloaded: +rate
    assert update_expert_bias(moe, 0.01) == 1
    want = start + torch.tensor([-0.01, -0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    torch.testing.assert_close(bias, want, rtol=0, atol=0)
    assert bias.dtype == torch.float32 and moe.load is None
    moe.record_load(torch.tensor([[0, 1, 2]]))
    assert update_expert_bias(moe, 0.0) == 0 and torch.equal(bias, want) and moe.load is None
    moe.record_load(torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 2, 3]]))  # 2 2 2 2 1 1 1 1, mean 1.5
    update_expert_bias(moe, 0.5)
    torch.testing.assert_close(bias, want + torch.tensor([-0.5] * 4 + [0.5] * 4), rtol=0, atol=0)
    moe.to(torch.bfloat16)  # the bias stays fp32 under a module cast (a bf16 one could not take 1e-3 steps)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32 and moe.gate.weight.dtype == torch.bfloat16


def test_bias_is_recorded_in_training_only_and_moves_the_choice():
    """The load is counted in training forwards only (eval and no-grad forwards do not count), once per forward
    even with activation checkpointing; a large bias on one expert makes every token choose it."""
    if "deepseek_v3" not in MOE:
        pytest.skip("deepseek_v3 not registered")
    from models.sequential import build_sequential

    torch.manual_seed(0)
    model = build_sequential(family_config("deepseek_v3"), ModelOptions(use_grad_ckpt=True))
    ids = torch.randint(0, 512, (2, 10))
    moes = [m for m in model.modules() if isinstance(m, SparseMoe)]
    with torch.no_grad():
        model.eval()(ids)
    assert all(m.load is None for m in moes)
    model.train().loss(ids, ids).backward()
    k = moes[0].top_k
    assert all(m.load.sum().item() == 2 * 10 * k for m in moes)
    moes[0].gate.e_score_correction_bias[5] = 100.0
    with torch.no_grad():
        _, _, routes, *_ = model.eval().outputs(ids)
    assert (routes[:, :, 0] == 5).any(dim=-1).all()


def test_sequence_wise_aux_loss_as_deepseek_computes_it(tmp_path):
    """aux_loss_alpha > 0: loss = CE + alpha · Σ_layers mean_b Σ_e f_be·P_be, with DeepSeek's MoEGate formula
    (f = counts / (S·k / E) per sequence, P = the sequence's mean normalised scores), its gradient reaching the
    routers; it crosses a stage boundary as the float `seq_aux` [B] and a 2-stage split equals one process."""
    import shutil

    if "deepseek_v3" not in MOE:
        pytest.skip("deepseek_v3 not registered")
    hf, pp = tmp_path / "hf", tmp_path / "pp"
    make_reference(family_config("deepseek_v3")).save_pretrained(hf)
    hg_to_pp(hf, pp, **QUIET)
    shutil.copytree(pp, tmp_path / "pp_aux")
    cfg = json.loads((pp / "config.json").read_text())
    (tmp_path / "pp_aux" / "config.json").write_text(json.dumps({**cfg, "aux_loss_alpha": 0.1, "seq_aux": True}))
    plain, ours = load_sequential(pp).train(), load_sequential(tmp_path / "pp_aux").train()
    input_ids, position_ids, labels = batch(512, seed=9)

    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append((out[1], out[2])))
             for m in ours.modules() if isinstance(m, SparseMoe)]
    outputs = ours.outputs(input_ids, position_ids)
    for h in hooks:
        h.remove()
    assert len(outputs) == 4 and outputs[3].shape == (2,)
    b, s, e, k = 2, 24, 8, 3
    expected = 0.0
    for scores, ids in captured:  # DeepSeek-V2 MoEGate, seq_aux branch (per layer; summed over layers)
        ce = torch.zeros(b, e).scatter_add_(1, ids.view(b, -1), torch.ones(b, s * k)).div_(s * k / e)
        expected = expected + (ce * scores.view(b, s, e).mean(dim=1)).sum(dim=1).mean()
    loss = ours.loss_fn(outputs, labels)
    with torch.no_grad():
        ce_only = plain.loss(input_ids, labels, position_ids)
    assert_rel_close(loss.detach() - ce_only, 0.1 * expected.detach(), "alpha · seq aux")
    loss.backward()
    aux_grads = {n: p.grad.clone() for n, p in ours.named_parameters() if n.endswith("mlp.gate.weight")}
    plain.loss(input_ids, labels, position_ids).backward()
    for n, g in aux_grads.items():
        assert not torch.allclose(g, dict(plain.named_parameters())[n].grad), n  # the aux term trains the routers

    whole = load_sequential(tmp_path / "pp_aux").train()
    want = whole.loss(input_ids, labels, position_ids)
    want.backward()
    parted = load_sequential(tmp_path / "pp_aux").train()
    torch.testing.assert_close(run_split_like_deepspeed(parted, 2, input_ids, position_ids, labels), want.detach(),
                               rtol=0, atol=0)
    grads = dict(whole.named_parameters())
    for name, param in parted.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# LoRA checkpoints: merged export, PEFT where PEFT has a form


@pytest.fixture(scope="module", params=MOE)
def lora_run(request, tmp_path_factory):
    """A LoRA checkpoint as a LoRA run writes it (tests/test_lora_export.py), adapters on the attention and on the
    stacked experts (`gate_proj`, `up_proj`, `down_proj`: also the dense layers' and shared experts' linears), the
    final norm trained in full; and one with attention adapters only."""
    from tests.test_lora_export import write_lora_checkpoint
    from models.lora import LoraConfig

    model_type = request.param
    root = tmp_path_factory.mktemp(f"lora_{model_type}")
    make_reference(family_config(model_type)).save_pretrained(root / "hf")
    hg_to_pp(root / "hf", root / "pp", **QUIET)
    attention = ("q_b_proj", "kv_b_proj", "o_proj") if model_type == "deepseek_v3" else ("q_proj", "v_proj", "o_proj")
    experts = LoraConfig(r=4, alpha=8, target_modules=(*attention, "gate_proj", "up_proj", "down_proj"),
                         modules_to_save=("norm",))
    ours = write_lora_checkpoint(root / "pp", root / "run", experts)
    ours_attn = write_lora_checkpoint(root / "pp", root / "run_attn", LoraConfig(r=4, alpha=8, target_modules=attention))
    return model_type, root, ours, ours_attn


def test_lora_merged_export_matches_in_both_layouts(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    model_type, root, ours, _ = lora_run
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ours(input_ids)
        assert (load_sequential(root / "pp").eval()(input_ids) - expected).abs().max() > 1e-2
    for fmt in (None, "transformers5"):
        out = tmp_path / (fmt or "hub")
        pp_to_hg(root / "run", out, hf_format=fmt, **QUIET)
        assert any(n.endswith("experts.gate_up_proj" if fmt else "experts.3.up_proj.weight")
                   for n in read_hf_tensors(out))
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_peft_export_attention_only_and_expert_refusal(lora_run, tmp_path, capsys):
    """Attention adapters: a PEFT adapter that transformers + peft load onto the base with our logits. Adapters on
    the stacked experts have no PEFT form on transformers 5's fused experts: one line, nothing written."""
    import convert_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_type, root, _, ours_attn = lora_run
    pp_to_hg(root / "run_attn", tmp_path / "adapter", adapter_only=True, **QUIET)
    base = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, ours_attn(input_ids), rtol=1e-5, atol=1e-5)
    argv = ["pp_to_hg", "--input-path", str(root / "run"), "--save-path", str(tmp_path / "a"), "--adapter-only"]
    capsys.readouterr()  # transformers' progress bars so far
    assert convert_model.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "mlp.experts.0." in err[0], err
    assert "export the merged model instead (without --adapter-only)" in err[0]
    assert not (tmp_path / "a").exists()


def test_benchmark_knows_the_moe_families():
    """benchmarks/families.py: every MoE family at its benchmark width with few blocks (real config.json files
    only: a width whose file is not committed yet is refused in GPU mode, naming the file) and in CPU smoke mode."""
    from benchmarks import families

    for model_type in MOE:
        assert model_type in families.FAMILIES and families.BLOCKS[model_type] <= 4
        assert families.HF_MODEL_TYPE[model_type] == model_type  # the hf run is transformers' own model
        assert families.applies(model_type, "pipeline", ("moe_grouped_gemm=false",))
        smoke = families.family_config(model_type, released=False)
        assert models.resolve(smoke).num_blocks == families.SMOKE_BLOCKS
        if not (RELEASED_DIR / families.REGISTRY_RELEASED[model_type]).is_file():
            with pytest.raises(SystemExit, match=families.REGISTRY_RELEASED[model_type]):
                families.family_config(model_type)
            continue
        cfg = families.family_config(model_type)
        model = models.resolve(cfg)
        assert model.num_blocks == families.BLOCKS[model_type]
    cfg = families.family_config("qwen3_moe")  # Qwen3-30B-A3B's width, 4 blocks
    args = models.resolve(cfg).args
    assert (args.hidden_size, args.moe.num_experts, args.moe.top_k, args.num_layers) == (2048, 128, 8, 4)


def test_bias_update_rate_is_checked_and_noted_where_ignored(tmp_path, capsys):
    """A negative moe_bias_update_rate is a one-line config error of the pipeline trainer; the ZeRO trainer (which
    trains transformers' own model) says it ignores the key."""
    from training import zero as train_ds_zero
    from training.pipeline import PipelineTrainer
    from training.setup import ConfigError
    from utils.config import validate
    from tests.conftest import train_config

    hf, pp = tmp_path / "hf", tmp_path / "pp"
    make_reference(family_config(MOE[0])).save_pretrained(hf)
    hg_to_pp(hf, pp, **QUIET)
    raw = train_config(pp, tmp_path / "out", dims=(1, 1), synthetic_data=True, data_path=None,
                       moe_bias_update_rate=-0.1)
    with pytest.raises(ConfigError, match=r"^moe_bias_update_rate: must be >= 0, got -0.1$"):
        PipelineTrainer().prepare_model(validate(raw), False)
    del raw["model_topo"]
    train_ds_zero.note_ignored_topology(validate({**raw, "moe_bias_update_rate": 0.01}), 1, 0)
    assert "moe_bias_update_rate: apply to train_ds.py's pipeline layers only" in capsys.readouterr().err


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("model_type", MOE)
def test_compiled_blocks_equal_eager_blocks(model_type, ckpt):
    """compile_blocks (what GPU runs default to): the attention half and the router compiled, experts eager ==
    eager, in loss and every gradient (fp32), with and without activation checkpointing; the MoE blocks share one
    graph per attention kind (windowed or not)."""
    from tests.test_fast_paths import assert_close, loss_and_grads, twin_models

    plain, compiled = twin_models(family_config(model_type), compile_blocks=True, use_grad_ckpt=ckpt)
    plain.train(), compiled.train()
    ids = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    ref_loss, ref_grads = loss_and_grads(plain, ids, labels)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    loss, grads = loss_and_grads(compiled, ids, labels)
    assert_close(loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n])
    specs = {m.self_attn.spec for m in compiled.modules() if isinstance(m, MoeBlock) and m.moe_index is not None}
    assert counters["stats"]["unique_graphs"] == len(specs), dict(counters["stats"])  # one per attention kind
