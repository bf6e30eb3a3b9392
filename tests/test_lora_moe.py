"""LoRA on mixtral's stacked experts (models/mixtral.py `Experts.add_lora` / `merge_lora`, through
models/lora.py's `apply_lora`): both expert paths against per-expert `LoraLinear`s, grouped == looped,
merge, freezing, the per-expert state_dict and a tiny mixtral loaded with `load_sequential`. CPU, fp32."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ModelOptions, load_sequential
from models.lora import LoraConfig, LoraLinear, apply_lora, check_targets, is_lora_name, merge_lora, valid_targets
from models.mixtral import EXPERT_WEIGHTS, SparseMoe
from tests.test_mixtral import assert_rel_close, make_tiny_mixtral, mixtral_args

CFG = LoraConfig(r=4, alpha=8.0, target_modules=("w1", "w2", "w3"))


def moe_with_adapters(cfg: LoraConfig = CFG, random_b: bool = True, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> SparseMoe:
    torch.manual_seed(seed)
    moe = SparseMoe(mixtral_args(), dtype)
    apply_lora(moe, cfg)
    if random_b:
        with torch.no_grad():
            for w in moe.experts.lora_names:
                getattr(moe.experts, w + "_lora_B").normal_(std=0.05)
    return moe


def routing(seed: int = 1, tokens: int = 9, experts_used=None):
    """tokens [T, 64], top-2 weights [T, 2], ids [T, 2] (with `experts_used`: every token to those two)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g)
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), dim=-1)
    if experts_used is None:
        ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(tokens)])
    else:
        ids = torch.tensor([experts_used] * tokens)
    return x, weights, ids


def run_mix(moe: SparseMoe, grouped: bool, x, weights, ids):
    """(out, input grad, {param name: grad}) of `moe.mix` under loss sum(out²)."""
    moe.grouped = grouped
    moe.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    out = moe.mix(xg, weights, ids)
    out.square().sum().backward()
    return out.detach(), xg.grad, {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}


def test_add_lora_shapes_init_and_names():
    moe = moe_with_adapters(random_b=False)
    ex = moe.experts
    assert ex.lora_names == EXPERT_WEIGHTS and ex.lora_scaling == 2.0
    assert ex.w1_lora_A.shape == (4, 4, 64) and ex.w1_lora_B.shape == (4, 96, 4)
    assert ex.w2_lora_A.shape == (4, 4, 96) and ex.w2_lora_B.shape == (4, 64, 4)
    assert all(getattr(ex, f"{w}_lora_B").abs().max() == 0 for w in EXPERT_WEIGHTS)
    # kaiming-uniform(a=√5) per expert matrix: bound 1/√in, every expert drawn (not one copy)
    a = ex.w2_lora_A
    assert a.abs().max() <= 1 / 96 ** 0.5 and a.abs().max() > 0.5 / 96 ** 0.5
    assert not torch.equal(a[0], a[1])
    assert {n for n, p in moe.named_parameters() if p.requires_grad} == {
        f"experts.{w}_lora_{ab}" for w in EXPERT_WEIGHTS for ab in "AB"}
    assert all(is_lora_name(n) for n, p in moe.named_parameters() if p.requires_grad)
    assert {"w1", "w2", "w3", "gate"} <= set(valid_targets(moe))
    only_w2 = moe_with_adapters(LoraConfig(r=8, alpha=8, target_modules=("w2",)), random_b=False)
    assert only_w2.experts.lora_names == ("w2",) and not hasattr(only_w2.experts, "w1_lora_A")
    bf16 = moe_with_adapters(random_b=False, dtype=torch.bfloat16)
    assert bf16.experts.w3_lora_B.dtype == torch.bfloat16


@pytest.mark.parametrize("grouped", [True, False])
def test_fresh_adapters_change_nothing(grouped):
    """B = 0: outputs bit-identical to the experts without adapters (dropout on, training mode: it touches
    the adapter path only)."""
    plain = moe_with_adapters(random_b=False)
    x, weights, ids = routing()
    with torch.no_grad():
        plain.grouped = grouped
        with_lora = plain.mix(x, weights, ids)
        names = plain.experts.lora_names
        adapters = {n: getattr(plain.experts, n) for n in [f"{w}_lora_{ab}" for w in names for ab in "AB"]}
        plain.experts.lora_names = ()
        without = plain.mix(x, weights, ids)
        plain.experts.lora_names = names
    assert torch.equal(with_lora, without) and len(adapters) == 6
    dropped = moe_with_adapters(LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=EXPERT_WEIGHTS),
                                random_b=False).train()
    dropped.grouped = grouped
    with torch.no_grad():
        assert torch.equal(dropped.mix(x, weights, ids), without)


def reference_mix(moe: SparseMoe, x, weights, ids) -> torch.Tensor:
    """The same layer as PEFT builds it: per expert three `nn.Linear`s wrapped in `LoraLinear` (A[e], B[e]
    copied in), tokens run one by one through their top-k experts."""
    ex = moe.experts
    experts = []
    for e in range(4):
        lins = {}
        for w in EXPERT_WEIGHTS:
            weight = getattr(ex, w)[e]
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            lin.weight.data.copy_(weight)
            lora = LoraLinear(lin, CFG.r, CFG.alpha)
            lora.lora_A.data.copy_(getattr(ex, f"{w}_lora_A")[e])
            lora.lora_B.data.copy_(getattr(ex, f"{w}_lora_B")[e])
            lins[w] = lora
        experts.append(lins)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(64)
        for j in range(2):
            m = experts[int(ids[t, j])]
            acc = acc + weights[t, j] * m["w2"](F.silu(m["w1"](x[t])) * m["w3"](x[t]))
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("experts_used", [None, (1, 2), (3, 0)])
def test_grouped_equals_looped_and_per_expert_lora_linear(experts_used):
    """Random B: grouped and looped paths give the same output, input gradient and adapter gradients (fp32,
    1e-5), equal to per-expert LoraLinears; experts without tokens (empty groups) get exact zero adapter
    gradients; the frozen base weights get none."""
    moe = moe_with_adapters()
    x, weights, ids = routing(experts_used=experts_used)
    (out_g, x_g, grads_g), (out_l, x_l, grads_l) = (run_mix(moe, g, x, weights, ids) for g in (True, False))
    with torch.no_grad():
        expected = reference_mix(moe, x, weights, ids)
    assert_rel_close(out_g, expected, "grouped vs LoraLinear")
    assert_rel_close(out_l, expected, "looped vs LoraLinear")
    assert_rel_close(out_g, out_l, "out")
    assert_rel_close(x_g, x_l, "input grad")
    assert set(grads_g) == set(grads_l) == {f"experts.{w}_lora_{ab}" for w in EXPERT_WEIGHTS for ab in "AB"}
    for name in grads_g:
        assert_rel_close(grads_g[name], grads_l[name], name)
        assert grads_g[name].abs().max() > 0, name
    if experts_used is not None:
        idle = [e for e in range(4) if e not in experts_used]
        for name in grads_g:
            assert grads_g[name][idle].abs().max() == 0 and grads_l[name][idle].abs().max() == 0, name


def test_merge_equals_adapters():
    """merge_lora: w += scaling·B A per expert; the merged layer equals the adapter layer (1e-5) and has
    neither adapters nor adapter keys left."""
    moe = moe_with_adapters().eval()
    x, weights, ids = routing()
    with torch.no_grad():
        before = {}
        for g in (True, False):
            moe.grouped = g
            before[g] = moe.mix(x, weights, ids)
        w1 = moe.experts.w1.clone()
        delta = (moe.experts.w1_lora_B[2] @ moe.experts.w1_lora_A[2]) * 2.0
        merge_lora(moe)
        torch.testing.assert_close(moe.experts.w1[2], w1[2] + delta, rtol=0, atol=1e-6)
        for g in (True, False):
            moe.grouped = g
            assert_rel_close(moe.mix(x, weights, ids), before[g], f"merged grouped={g}")
    assert moe.experts.lora_names == () and not any(is_lora_name(n) for n in moe.state_dict())
    assert not any("lora" in n for n, _ in moe.named_parameters())


def test_state_dict_round_trip_per_expert_names():
    """state_dict: per expert `{e}.w1.weight`, `{e}.w1.lora_A` [r, in], `{e}.w1.lora_B` [out, r]; it loads
    (strict) into a fresh module given the same adapters, bit-exactly; a missing expert adapter is named."""
    moe = moe_with_adapters()
    state = moe.experts.state_dict()
    assert list(state)[:3] == ["0.w1.weight", "0.w1.lora_A", "0.w1.lora_B"]
    assert sorted(state) == sorted(f"{e}.{w}.{k}" for e in range(4) for w in EXPERT_WEIGHTS
                                   for k in ("weight", "lora_A", "lora_B"))
    assert state["2.w1.lora_A"].shape == (4, 64) and state["2.w1.lora_B"].shape == (96, 4)
    assert state["3.w2.lora_A"].shape == (4, 96) and state["3.w2.lora_B"].shape == (64, 4)
    assert torch.equal(state["1.w3.lora_B"], moe.experts.w3_lora_B[1])
    full = moe.state_dict()
    fresh = moe_with_adapters(seed=5, random_b=False)
    assert not torch.equal(fresh.experts.w2_lora_A, moe.experts.w2_lora_A)
    fresh.load_state_dict({k: v.clone() for k, v in full.items()}, strict=True)
    for (name, a), (_, b) in zip(fresh.named_parameters(), moe.named_parameters()):
        assert torch.equal(a, b), name
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        n for n, p in moe.named_parameters() if p.requires_grad]  # loading keeps the freezing
    del full["experts.2.w1.lora_B"]
    missing = r"(?s)Missing key.*experts\.w1_lora_B.*Unexpected key.*experts\.0\.w1\.lora_B"
    with pytest.raises(RuntimeError, match=missing):
        fresh.load_state_dict(full, strict=True)


def test_grouped_path_with_adapters_needs_no_data_on_the_host():
    """As tests/test_mixtral.py's fake-tensor test: forward + backward of the grouped path with adapters on
    every expert weight run on shapes alone (bf16, rank 8: the 16-byte rows CUDA's kernel needs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        moe = SparseMoe(mixtral_args(), torch.bfloat16, True).train()
        apply_lora(moe, LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=EXPERT_WEIGHTS))
        x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
        out, probs, _ = moe(x)
        (out.float().square().sum() + probs.sum()).backward()
        assert moe.experts.w2_lora_B.grad.shape == (4, 64, 8) and moe.experts.w1.grad is None


@pytest.fixture(scope="module")
def tiny_pp(tmp_path_factory):
    from models.convert import hg_to_pp

    root = tmp_path_factory.mktemp("lora_moe")
    make_tiny_mixtral(root / "hf")
    hg_to_pp(root / "hf", root / "pp", log=lambda msg: None)
    return root / "pp"


@pytest.mark.parametrize("grouped", [True, False])
def test_load_sequential_tiny_mixtral_q_proj_and_experts(tiny_pp, grouped):
    """A tiny mixtral from its layer files, LoRA on q_proj, w1, w2, w3: the right modules get adapters,
    fresh adapters keep the logits, only adapters train (an expert without tokens gets zero adapter
    gradients), and the merged model equals the adapter model."""
    cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "w1", "w2", "w3"))
    base = load_sequential(tiny_pp, opts=ModelOptions(moe_grouped_gemm=grouped))
    model = load_sequential(tiny_pp, opts=ModelOptions(moe_grouped_gemm=grouped))
    check_targets(cfg, model, "mixtral")
    wrapped = apply_lora(model, cfg)
    assert sorted(wrapped) == sorted([f"layers.{i}.self_attn.q_proj" for i in range(1, 5)]
                                     + [f"layers.{i}.block_sparse_moe.experts" for i in range(1, 5)])
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))  # idle experts in some block
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    model.train()
    logits, probs, routes = model.outputs(ids)
    model.loss_fn((logits, probs, routes), ids.clone()).backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"layers.{i}.self_attn.q_proj.lora_{ab}" for i in range(1, 5) for ab in "AB"} | {
        f"layers.{i}.block_sparse_moe.experts.{w}_lora_{ab}" for i in range(1, 5) for w in EXPERT_WEIGHTS
        for ab in "AB"}
    counts = torch.stack([torch.bincount(routes[0, :, i].reshape(-1).long(), minlength=4) for i in range(4)])
    layer, expert = (counts == 0).nonzero()[0].tolist()
    experts = model.layers[str(layer + 1)].block_sparse_moe.experts
    assert all(getattr(experts, f"{w}_lora_{ab}").grad[expert].abs().max() == 0 for w in EXPERT_WEIGHTS for ab in "AB")
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        assert (adapted - base(ids)).abs().max() > 1e-4
        merge_lora(model)
        assert_rel_close(model(ids), adapted, "merged logits")
    assert not any(is_lora_name(k) for k in model.state_dict())
    assert set(model.state_dict()) == set(base.state_dict())



def test_training_run_saves_resumes_and_exports_expert_adapters(tiny_pp, tmp_path):
    """One rank, LoRA on q_proj and the experts: the checkpoint's layer files hold the per-expert adapters and
    nothing frozen (DeepSpeed's own frozen-key list raised KeyError on the per-expert state_dict), a resume
    continues from it, and the merged `pp_to_hg` export of the checkpoint gives the trained model's logits."""
    import json
    import subprocess
    import sys

    import yaml

    from models.convert import hg_to_pp, pp_to_hg
    from tests.conftest import ROOT, launch_env, train_config
    from utils.checkpoint import newest_complete

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "w1", "w2", "w3"]}
    save = tmp_path / "run"
    jobs = []
    for name, steps, resume in (("first", 2, False), ("resumed", 4, True)):
        cfg = train_config(tiny_pp, save, dims=(1, 1), lora=lora, max_steps=steps, resume=resume, save_interval=2,
                           synthetic_data=True, max_seq_len=32, **{"optimizer.params.torch_adam": True})
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        jobs.append({"trainer": "train_ds", "config": str(tmp_path / f"{name}.yml"), "log": str(tmp_path / f"{name}.log")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_runs.py"), str(tmp_path / "jobs.json"),
                          str(tmp_path / "results.json")], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for job, rec in zip(jobs, json.loads((tmp_path / "results.json").read_text())):
        assert rec["rc"] == 0, open(job["log"]).read()[-3000:]
    assert "resumed from" in open(jobs[1]["log"]).read()
    tag = newest_complete(str(save))
    keys = {k for f in (save / tag).glob("layer_*-model_states.pt") for k in torch.load(f, weights_only=True)}
    assert keys and all(is_lora_name(k) for k in keys)
    assert {"block_sparse_moe.experts.0.w1.lora_A", "block_sparse_moe.experts.3.w2.lora_B"} <= keys
    pp_to_hg(save / tag, tmp_path / "merged", log=lambda msg: None)
    hg_to_pp(tmp_path / "merged", tmp_path / "merged_pp", log=lambda msg: None)
    merged = load_sequential(tmp_path / "merged_pp").eval()
    trained = load_sequential(tiny_pp).eval()
    apply_lora(trained, LoraConfig.from_dict(lora))
    state = {}
    for f in sorted((save / tag).glob("layer_*-model_states.pt")):
        idx = int(f.name.split("_")[1].split("-")[0])
        state.update({f"layers.{idx}.{k}": v for k, v in torch.load(f, weights_only=True).items()})
    missing, unexpected = trained.load_state_dict(state, strict=False)
    assert not unexpected
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_rel_close(merged(ids), trained(ids), "merged export vs trained adapters")
        assert (trained(ids) - load_sequential(tiny_pp).eval()(ids)).abs().max() > 0  # the adapters trained
