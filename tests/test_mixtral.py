"""Mixtral pipeline layers vs transformers' MixtralForCausalLM: logits, CE + load-balancing loss, gradients,
both checkpoint layouts, and a real 2-stage DeepSpeed run (CPU, fp32, tiny model: 4 experts, top-2)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import models
from models import ModelError, ModelOptions, get_family, load_sequential
from models.convert import WeightMapper, hg_to_pp, pp_to_hg
from models.mixtral import (EXPERT_WEIGHTS, Experts, MoeCausalLMLoss, SparseMoe, debug_config, expert_load_metrics,
                            from_v5_layout, load_balancing_loss, unstack_experts, valid_tokens)
from tests.conftest import read_hf_tensors, run_cli

QUIET = {"log": lambda msg: None}
FAMILY = get_family("mixtral")


def mixtral_args(**overrides):
    """The parsed args of `debug_config(**overrides)`."""
    return models.resolve(debug_config(**overrides)).args


def hf_config(**overrides) -> MixtralConfig:
    cfg = debug_config(**overrides)
    cfg.pop("model_type")
    return MixtralConfig(**cfg)


def make_model(seed: int = 0, **overrides) -> MixtralForCausalLM:
    """Tiny random mixtral with every parameter perturbed and sharp routers (so top-k is far from ties)."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(hf_config(**overrides)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(20.0)
    return model


def make_tiny_mixtral(out_dir: Path, seed: int = 0, **overrides) -> MixtralForCausalLM:
    """Save `make_model(...)` to `out_dir` in the hub layout (for family tables in other test files)."""
    model = make_model(seed, **overrides)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One model saved in both layouts (hub: save_pretrained's default; v5: save_original_format=False),
    each converted with hg_to_pp."""
    root = tmp_path_factory.mktemp("mixtral")
    model = make_model()
    model.save_pretrained(root / "hub")
    model.save_pretrained(root / "v5", save_original_format=False)
    for layout in ("hub", "v5"):
        hg_to_pp(root / layout, root / f"pp_{layout}", **QUIET)
    return root


@pytest.fixture(scope="module")
def reference(dirs):
    return MixtralForCausalLM.from_pretrained(dirs / "hub", dtype=torch.float32)


def batch(seed: int = 0, padded: bool = True):
    """input_ids [2, 24], position_ids (second row offset), labels with a masked prompt and right padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 512, (2, 24), generator=g)
    position_ids = torch.stack([torch.arange(24), torch.arange(24) + 7])
    labels = input_ids.clone()
    labels[0, :5] = -100
    if padded:
        labels[1, 18:] = -100
    return input_ids, position_ids, labels


def hf_grads_by_pp_name(model: MixtralForCausalLM) -> dict[str, torch.Tensor]:
    """HF gradients keyed like `SequentialModel.named_parameters()`, via the converter's own tables."""
    mapper = WeightMapper(FAMILY.weight_map)
    args = mixtral_args()
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        for hub_name, tensor in from_v5_layout(args, name, grad).items():
            kind, block, local = mapper.to_pp(hub_name)
            idx = 0 if kind == "enter" else block + 1 if kind == "block" else args.num_layers + 1
            out[f"layers.{idx}.{local}"] = tensor
    return out


def grads_by_file_name(model) -> dict[str, torch.Tensor]:
    """Our gradients keyed like the layer files (`state_dict()`): the stacked expert gradients split per expert."""
    grads = {name: param.grad for name, param in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            unstack_experts(grads, f"{name}.", module.num_experts)
    return grads


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_logits_match_hf(dirs, reference, layout):
    ours = load_sequential(dirs / f"pp_{layout}").eval()
    input_ids, position_ids, _ = batch()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        logits, probs, routes = ours.outputs(input_ids, position_ids)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert probs.shape == (2, 24, 4) and routes.shape == (2, 24, 4, 2) and routes.dtype == torch.uint8
    torch.testing.assert_close(probs.sum(-1), torch.full((2, 24), 4.0))  # one softmax per block
    assert routes.max() < 4  # every block routed every token


@pytest.mark.parametrize("padded", [True, False])
def test_loss_and_grads_match_hf(dirs, reference, padded):
    """CE + coef·aux with padding excluded (HF given the equivalent attention_mask), and every gradient."""
    ours = load_sequential(dirs / "pp_hub").train()
    reference.train()
    reference.zero_grad()
    input_ids, position_ids, labels = batch(seed=1, padded=padded)
    mask = valid_tokens(labels).long() if padded else None
    if padded:
        assert mask[1].tolist() == [1] * 18 + [0] * 6 and mask[0].all()
    out = reference(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, labels=labels,
                    output_router_logits=True)
    out.loss.backward()
    actual = ours.loss(input_ids, labels, position_ids)
    actual.backward()
    torch.testing.assert_close(actual, out.loss, rtol=1e-5, atol=0)
    assert out.aux_loss > 2.0  # top-2 balance is exactly 2: the routers are far from balanced

    expected = hf_grads_by_pp_name(reference)
    grads = grads_by_file_name(ours)
    for name, grad in grads.items():
        # 1e-5 relative to the tensor's scale (as tests/test_fast_paths.py): an absolute 1e-7 failed on the
        # embedding gradient's near-zero entries, whose summation order differs from transformers'.
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-5 * expected[name].abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    assert set(grads) == set(expected)


def test_router_gradients_of_the_aux_loss_alone_match_hf(dirs, reference):
    """The load-balancing term on its own (no CE): its gradient reaches every block's router as in HF."""
    ours = load_sequential(dirs / "pp_hub").train()
    reference.train()
    reference.zero_grad()
    input_ids, position_ids, labels = batch(seed=2)
    mask = valid_tokens(labels)
    out = reference(input_ids=input_ids, position_ids=position_ids, attention_mask=mask.long(),
                    output_router_logits=True)
    out.aux_loss.backward()
    _, probs, routes = ours.outputs(input_ids, position_ids)
    aux, _ = load_balancing_loss(probs, routes, mask)
    aux.backward()
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-5, atol=0)
    for i, layer in enumerate(reference.model.layers):
        ours_grad = ours.layers[str(i + 1)].block_sparse_moe.gate.weight.grad
        assert layer.mlp.gate.weight.grad.abs().max() > 0
        torch.testing.assert_close(ours_grad, layer.mlp.gate.weight.grad, rtol=1e-5, atol=1e-8)


def run_split_like_deepspeed(model, split: int, input_ids, position_ids, labels) -> torch.Tensor:
    """Forward/backward through two stages exactly as DeepSpeed's PipelineEngine exchanges tensors: the
    receiver gets detached clones with `requires_grad = is_floating_point()`, every received float tensor
    must end up with a grad, and the sender calls `backward(grad)` on each of its float outputs in turn."""
    layers = [model.layers[str(i)] for i in range(len(model.layers))]
    sent = (input_ids, position_ids)
    for layer in layers[:split]:
        sent = layer(sent)
    received = tuple(t.clone().detach().requires_grad_(t.is_floating_point()) for t in sent)
    x = received
    for layer in layers[split:]:
        x = layer(x)
    loss = model.loss_fn(x, labels)
    loss.backward()
    floats = [(out, recv) for out, recv in zip(sent, received) if recv.is_floating_point()]
    assert len(floats) == 2  # hidden and router_probs; position_ids and routes are integers
    for i, (out, recv) in enumerate(floats):
        assert recv.grad is not None
        out.backward(gradient=recv.grad, retain_graph=i < len(floats) - 1)
    return loss.detach()


@pytest.mark.parametrize("split", [1, 3, 5])
def test_pipeline_boundary_passes_router_gradients(dirs, split):
    """Split after Enter only, mid-model, and before Exit: same loss and grads as one process."""
    input_ids, position_ids, labels = batch(seed=6)
    whole = load_sequential(dirs / "pp_hub").train()
    expected = whole.loss(input_ids, labels, position_ids)
    expected.backward()
    parted = load_sequential(dirs / "pp_hub").train()
    torch.testing.assert_close(run_split_like_deepspeed(parted, split, input_ids, position_ids, labels),
                               expected.detach(), rtol=0, atol=0)
    grads = dict(whole.named_parameters())
    for name, param in parted.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_aux_loss_statistics_equal_transformers_formula():
    """Per-token sums over layers, masked at the end == transformers' concatenation over (layers x tokens)."""
    torch.manual_seed(0)
    b, s, num_layers, e, k = 3, 7, 5, 6, 2
    logits = [torch.randn(b * s, e, dtype=torch.float64) for _ in range(num_layers)]
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    expected = load_balancing_loss_func(tuple(logits), e, k, mask)
    probs = sum(torch.softmax(x, -1) for x in logits).view(b, s, e).float()
    routes = torch.stack([torch.topk(torch.softmax(x, -1), k).indices.view(b, s, k) for x in logits], dim=2)
    aux, counts = load_balancing_loss(probs, routes.to(torch.uint8), mask.bool())
    torch.testing.assert_close(aux.double(), expected.double(), rtol=1e-6, atol=0)
    assert counts.shape == (num_layers, e) and counts.sum().item() == mask.sum().item() * num_layers * k
    unmasked, _ = load_balancing_loss(probs, routes.to(torch.uint8), torch.ones(b, s, dtype=torch.bool))
    torch.testing.assert_close(unmasked.double(), load_balancing_loss_func(tuple(logits), e, k).double(),
                               rtol=1e-6, atol=0)


def test_valid_tokens_rule():
    labels = torch.tensor([[-100, 5, 6, -100, 7, -100, -100],   # padding after the last trained label
                           [-100, -100, -100, -100, -100, -100, -100],   # nothing trained: no token counts
                           [1, 2, 3, 4, 5, 6, 7]])   # full row
    assert valid_tokens(labels).long().tolist() == [[1, 1, 1, 1, 1, 0, 0], [0] * 7, [1] * 7]


def test_jitter_noise_in_training_only_as_transformers(tmp_path):
    """router_jitter_noise multiplies the MoE input by U(1-j, 1+j) in training: same RNG stream as HF."""
    model = make_model(router_jitter_noise=0.3)
    model.save_pretrained(tmp_path / "hf")
    hg_to_pp(tmp_path / "hf", tmp_path / "pp", **QUIET)
    ours = load_sequential(tmp_path / "pp")
    input_ids, position_ids, labels = batch(seed=3, padded=False)
    losses = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        ours.train(mode == "train")
        torch.manual_seed(11)
        expected = model(input_ids=input_ids, position_ids=position_ids, labels=labels, output_router_logits=True)
        torch.manual_seed(11)
        losses[mode] = ours.loss(input_ids, labels, position_ids)
        torch.testing.assert_close(losses[mode], expected.loss, rtol=1e-5, atol=0)
    assert abs(losses["train"].item() - losses["eval"].item()) > 1e-4


def test_grad_checkpointing_same_loss_and_grads(dirs):
    input_ids, position_ids, labels = batch(seed=4)
    results = []
    for use_grad_ckpt in (False, True):
        model = load_sequential(dirs / "pp_hub", opts=ModelOptions(use_grad_ckpt=use_grad_ckpt)).train()
        loss = model.loss(input_ids, labels, position_ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-8)


def test_loss_scale_applies_to_ce_only_and_metrics_reset(dirs):
    model = load_sequential(dirs / "pp_hub").eval()
    input_ids, position_ids, labels = batch(seed=5)
    loss_fn = model.loss_fn
    assert isinstance(loss_fn, MoeCausalLMLoss) and loss_fn.coef == 0.02
    with torch.no_grad():
        outputs = model.outputs(input_ids, position_ids)
        plain = loss_fn(outputs, labels)
        scaled = loss_fn(outputs, (labels, torch.tensor([0.5])))
        aux, counts = load_balancing_loss(outputs[1], outputs[2], valid_tokens(labels))
    torch.testing.assert_close(scaled, 0.5 * (plain - 0.02 * aux) + 0.02 * aux)
    row = expert_load_metrics(loss_fn)
    assert set(row) == {"moe_aux_loss", "expert_load_min", "expert_load_max"}
    assert abs(row["moe_aux_loss"] - aux.item()) < 1e-5
    share = counts / counts.sum(1, keepdim=True)
    assert row["expert_load_max"] == pytest.approx(share.max(1).values.tolist(), abs=1e-5)
    assert all(lo <= 0.25 <= hi for lo, hi in zip(row["expert_load_min"], row["expert_load_max"]))
    assert expert_load_metrics(loss_fn) == {}  # reset
    assert expert_load_metrics(models.common.CausalLMLoss()) == {}


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_round_trip_writes_the_hub_layout_bit_exact(dirs, tmp_path, layout):
    pp_to_hg(dirs / f"pp_{layout}", tmp_path / "out", max_shard_size="60KB", **QUIET)
    exported = read_hf_tensors(tmp_path / "out")
    hub = read_hf_tensors(dirs / "hub")
    assert sorted(exported) == sorted(hub)
    assert any(".block_sparse_moe.experts.3.w2.weight" in n for n in exported)
    for name, tensor in hub.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    if layout == "v5":  # the v5 file's fused tensors, split, are exactly the exported ones
        v5 = read_hf_tensors(dirs / "v5")
        f = debug_config()["intermediate_size"]
        fused = v5["model.layers.2.mlp.experts.gate_up_proj"]
        assert torch.equal(exported["model.layers.2.block_sparse_moe.experts.1.w1.weight"], fused[1, :f])
        assert torch.equal(exported["model.layers.2.block_sparse_moe.experts.1.w3.weight"], fused[1, f:])


def test_exported_model_loads_in_transformers_and_verifies(dirs, reference, tmp_path):
    pp_to_hg(dirs / "pp_v5", tmp_path / "out", **QUIET)
    exported = MixtralForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    assert models.convert.verify(tmp_path / "out", dirs / "pp_v5") < 1e-5


def test_v5_layout_wrong_expert_shape_is_a_clear_error(dirs, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    tensors = read_hf_tensors(dirs / "v5")
    tensors["model.layers.1.mlp.experts.down_proj"] = tensors["model.layers.1.mlp.experts.down_proj"][:3]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text((dirs / "v5" / "config.json").read_text())
    with pytest.raises(ModelError, match=r"'model.layers.1.mlp.experts.down_proj' has shape \(3, 64, 96\), "
                                         r"config.json implies \(4, 64, 96\)"):
        hg_to_pp(src, tmp_path / "pp", **QUIET)


def test_config_checks_and_cost_model():
    with pytest.raises(ModelError, match="num_experts_per_tok \\(5\\) must be between 1 and num_local_experts"):
        models.resolve(debug_config(num_experts_per_tok=5))
    resolved = models.resolve({k: v for k, v in debug_config().items() if k != "rope_theta"})
    args = resolved.args
    assert args.rope.theta == 1e6 and args.router_aux_loss_coef == 0.02
    flops = resolved.layer_flops(128)
    assert len(flops) == args.num_layers + 2 and flops[0] == 0
    dense_experts = models.resolve(debug_config(num_experts_per_tok=4)).layer_flops(128)[1]
    assert flops[1] < dense_experts  # only the top-k experts count
    assert FAMILY.default_parts(8) == [5, 4, 4, 4, 4, 4, 4, 5]
    model = load_sequential_from_config(debug_config(sliding_window=16))
    with pytest.raises(ModelError, match="sliding_window 16"):
        model(torch.zeros(1, 20, dtype=torch.long))


def load_sequential_from_config(cfg: dict):
    from models.sequential import build_sequential
    return build_sequential(cfg, ModelOptions())


def test_tied_embeddings_spec_and_forward():
    from deepspeed.pipe import TiedLayerSpec

    cfg = debug_config(tie_word_embeddings=True)
    specs = models.build_pipeline_layers(cfg)
    assert isinstance(specs[-1], TiedLayerSpec) and len(specs) == cfg["num_hidden_layers"] + 3
    model = load_sequential_from_config(cfg)
    ids = torch.randint(0, 512, (2, 8))
    logits = model(ids)
    labels = ids.clone()
    assert logits.shape == (2, 8, 512) and torch.isfinite(model.loss(ids, labels))


def test_bf16_layers_keep_fp32_router_statistics(dirs):
    model = load_sequential(dirs / "pp_hub", dtype=torch.bfloat16).train()
    block = model.layers["1"]
    assert all(getattr(block.block_sparse_moe.experts, w).dtype == torch.bfloat16 for w in EXPERT_WEIGHTS)
    assert block.rotary.inv_freq.dtype == torch.float32
    input_ids, position_ids, labels = batch(seed=7)
    logits, probs, routes = model.outputs(input_ids, position_ids)
    assert logits.dtype == torch.bfloat16 and probs.dtype == torch.float32 and routes.dtype == torch.uint8
    loss = model.loss_fn((logits, probs, routes), labels)
    loss.backward()
    assert loss.dtype == torch.float32 and block.block_sparse_moe.gate.weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------
# Stacked experts: grouped GEMM vs the per-expert loop, the per-expert state_dict, compiled blocks


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rtol: float = 1e-5) -> None:
    """Within `rtol` of `expected`, elementwise with an absolute floor of rtol · max|expected|."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


def idle_expert_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [1, 6], labels): so few tokens that some expert of some block receives none."""
    input_ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    return input_ids, input_ids.clone()


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_gemm_and_expert_loop_match_hf_with_idle_experts(dirs, reference, grouped):
    """Both expert paths against MixtralForCausalLM: logits, CE + aux loss and every gradient, on a batch where
    the first, a middle and the last expert of some block get no token (empty groups at every position)."""
    ours = load_sequential(dirs / "pp_hub", opts=ModelOptions(moe_grouped_gemm=grouped)).train()
    assert all(m.grouped == grouped for m in ours.modules() if isinstance(m, SparseMoe))
    reference.train()
    reference.zero_grad()
    input_ids, labels = idle_expert_batch()
    out = reference(input_ids=input_ids, labels=labels, output_router_logits=True)
    out.loss.backward()
    logits, probs, routes = ours.outputs(input_ids)
    counts = torch.stack([torch.bincount(routes[0, :, i].reshape(-1).long(), minlength=4) for i in range(4)])
    idle = {int(e) for e in (counts == 0).nonzero()[:, 1]}
    assert {0, 3} <= idle and idle & {1, 2}, counts  # leading, trailing and middle empty groups
    assert_rel_close(logits, out.logits, "logits")
    loss = ours.loss_fn((logits, probs, routes), labels)
    loss.backward()
    assert_rel_close(loss, out.loss, "loss")
    expected = hf_grads_by_pp_name(reference)
    grads = grads_by_file_name(ours)
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        assert_rel_close(grad, expected[name], name)
    idle_layer, idle_expert = (counts == 0).nonzero()[0].tolist()
    experts = ours.layers[str(idle_layer + 1)].block_sparse_moe.experts
    assert all(getattr(experts, w).grad[idle_expert].abs().max() == 0 for w in EXPERT_WEIGHTS)


def moe_and_routing(dtype: torch.dtype = torch.float32) -> tuple[SparseMoe, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    moe = SparseMoe(mixtral_args(), dtype)
    tokens = torch.randn(7, 64, dtype=dtype)
    weights = torch.softmax(torch.randn(7, 2), dim=-1)
    return moe, tokens, weights


@pytest.mark.parametrize("experts_used", [(0, 2), (1, 2), (1, 3), (3, 0)])
def test_grouped_gemm_equals_expert_loop_with_empty_groups(experts_used):
    """SparseMoe.mix alone, every token routed to the same two experts: the other two are empty groups
    (leading, middle, trailing). Output and all gradients equal; empty experts get exact zero gradients."""
    moe, tokens, weights = moe_and_routing()
    ids = torch.tensor([experts_used, experts_used[::-1]] * 3 + [experts_used])  # (7, 2)
    results = {}
    for grouped in (True, False):
        moe.grouped = grouped
        moe.zero_grad()
        x, w = tokens.clone().requires_grad_(), weights.clone().requires_grad_()
        out = moe.mix(x, w, ids)
        out.square().sum().backward()
        results[grouped] = out, x.grad, w.grad, {n: getattr(moe.experts, n).grad for n in EXPERT_WEIGHTS}
    (out_g, x_g, w_g, grads_g), (out_l, x_l, w_l, grads_l) = results[True], results[False]
    assert_rel_close(out_g, out_l, "out")
    assert_rel_close(x_g, x_l, "tokens grad")
    assert_rel_close(w_g, w_l, "weights grad")
    empty = [e for e in range(4) if e not in experts_used]
    for n in EXPERT_WEIGHTS:
        assert_rel_close(grads_g[n], grads_l[n], n)
        assert grads_g[n][empty].abs().max() == 0 and grads_l[n][empty].abs().max() == 0
        assert grads_g[n][list(experts_used)].abs().amax(dim=(1, 2)).min() > 0  # every used expert trained


def test_grouped_experts_need_no_data_on_the_host():
    """Forward and backward of the grouped path run on fake tensors (shapes only, no data): no `.item()`,
    `.tolist()` or data-dependent output shape (CUDA's bincount reads min/max on the host) anywhere. The loop
    path, which reads the group sizes, cannot. bf16: the only dtype `grouped_mm`'s fake kernel accepts."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    for grouped in (True, False):
        with FakeTensorMode():
            moe = SparseMoe(mixtral_args(), torch.bfloat16, grouped).train()
            x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
            if not grouped:
                with pytest.raises(DataDependentOutputException):
                    moe(x)
                continue
            out, probs, _ = moe(x)
            (out.float().square().sum() + probs.sum()).backward()
            assert moe.experts.w1.grad.shape == (4, 96, 64) and moe.gate.weight.grad.shape == (4, 64)


def test_state_dict_keeps_the_per_expert_layout(dirs):
    """A block's state_dict is the hub's layout (names, shapes, values of the hub file; experts in the hub's
    order), and it loads back (strict) into the stacked parameters; a missing expert is named."""
    ours = load_sequential(dirs / "pp_hub")
    hub = read_hf_tensors(dirs / "hub")
    block = ours.layers["2"]
    state = block.state_dict()
    prefix = "model.layers.1."
    expected = {n.removeprefix(prefix): t for n, t in hub.items() if n.startswith(prefix)}
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert state[name].shape == tensor.shape and torch.equal(state[name], tensor), name
    expert_keys = [k for k in state if ".experts." in k]
    assert expert_keys == [f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in EXPERT_WEIGHTS]
    assert not any(n.endswith((".w1", ".w2", ".w3")) for n in state)

    fresh = load_sequential_from_config(debug_config()).layers["2"]
    assert not torch.equal(fresh.block_sparse_moe.experts.w2, block.block_sparse_moe.experts.w2)
    fresh.load_state_dict(state, strict=True)
    for (name, a), b in zip(fresh.named_parameters(), block.parameters()):
        assert torch.equal(a, b), name
    assert "block_sparse_moe.experts.1.w3.weight" in state  # load_state_dict works on a copy
    del state["block_sparse_moe.experts.1.w3.weight"]
    with pytest.raises(RuntimeError, match=r"block_sparse_moe\.experts\.0\.w3\.weight"):
        fresh.load_state_dict(state, strict=True)


def test_deepspeed_layer_checkpoint_round_trip(dirs, tmp_path, monkeypatch):
    """PipelineModule.save_state_dict writes per-expert tensors that own their storage (no shared stacked
    buffer on disk), load_state_dir reads them back bit-exactly, and load_sequential reads the files."""
    import json

    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from tests.conftest import free_port

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = json.loads((dirs / "pp_hub" / "config.json").read_text())
    saved, loaded = (PipelineModule(models.build_pipeline_layers(cfg), num_stages=1,
                                    loss_fn=models.build_loss_fn(cfg), partition_method="uniform") for _ in range(2))
    saved.load_state_dir(str(dirs / "pp_hub"), TorchCheckpointEngine())
    saved.checkpoint_parallel_write_pipeline = False
    saved.save_state_dict(str(tmp_path), TorchCheckpointEngine())
    state = torch.load(tmp_path / "layer_01-model_states.pt", weights_only=True)
    assert state["block_sparse_moe.experts.3.w2.weight"].shape == (64, 96)
    for name, tensor in state.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
    loaded.load_state_dir(str(tmp_path), TorchCheckpointEngine())
    for (name, a), b in zip(loaded.named_parameters(), saved.parameters()):
        assert torch.equal(a, b), name
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    input_ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        expected = saved((input_ids, torch.arange(8).expand(2, 8)))[0]
        torch.testing.assert_close(load_sequential(tmp_path)(input_ids), expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def mixtral_pp(tmp_path_factory):
    """A tiny random mixtral + tokenizer converted with `convert_model.py hg_to_pp`."""
    from models.tiny import train_tiny_tokenizer

    base = tmp_path_factory.mktemp("mixtral_train")
    make_tiny_mixtral(base / "hf")
    train_tiny_tokenizer(base / "hf", vocab_size=512)
    res = run_cli("convert_model.py", "hg_to_pp", "--input-path", str(base / "hf"), "--save-path", str(base / "pp"))
    assert res.returncode == 0, res.stderr
    return base / "pp"
