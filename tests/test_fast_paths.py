"""The speed paths give the same numbers as the plain ones (CPU, fp32): the fused head + loss
(`fused_head_loss`, what the trainer runs) for every family, and `torch.compile`d blocks."""
from __future__ import annotations

import pytest
import torch

from models import ModelOptions
from models.common import CausalLMLoss, chunked_linear_cross_entropy
from models.mixtral import debug_config
from models.sequential import build_sequential
from tests.test_families import BAICHUAN_CONFIG, VOCAB, chatglm_config
from models.tiny import tiny_llama_config

CONFIGS = {
    "llama": lambda: tiny_llama_config(vocab_size=VOCAB).to_dict(),
    "llama-tied": lambda: tiny_llama_config(vocab_size=VOCAB, tie_word_embeddings=True).to_dict(),
    "bloom-tied": lambda: {"model_type": "bloom", "vocab_size": VOCAB, "hidden_size": 48, "n_layer": 2,
                           "n_head": 6, "tie_word_embeddings": True},
    "baichuan": lambda: dict(BAICHUAN_CONFIG),
    "chatglm": lambda: chatglm_config(2, True, 1.0),
    "mixtral": lambda: {**debug_config(), "vocab_size": VOCAB},
}


def batch(seed: int = 0, b: int = 2, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    return ids, (labels, torch.tensor([0.7]))


def loss_and_grads(model, ids, labels):
    model.zero_grad()
    loss = model.loss(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def twin_models(cfg: dict, **opts):
    torch.manual_seed(0)
    plain = build_sequential(cfg, ModelOptions(aux_max_z_loss_weight=opts.get("aux_max_z_loss_weight", 0.0)))
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    other = build_sequential(cfg, ModelOptions(**opts))
    other.load_state_dict(plain.state_dict())
    return plain, other


def assert_close(actual, expected, rtol=1e-5):
    assert torch.allclose(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item()), \
        (actual - expected).abs().max()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_head_loss_equals_logits_loss(name):
    z = 0.05 if name == "llama" else 0.0
    plain, fused = twin_models(CONFIGS[name](), fused_head_loss=True, aux_max_z_loss_weight=z)
    ids, labels = batch()
    assert isinstance(fused.outputs(ids), tuple)  # the fused Exit hands over (hidden, weight), not logits
    ref_loss, ref_grads = loss_and_grads(plain, ids, labels)
    loss, grads = loss_and_grads(fused, ids, labels)
    assert_close(loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n])


def test_chunked_cross_entropy_matches_full_logits_in_any_chunking():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (23,), generator=g)
    targets[[0, 5, 22]] = -100
    logits = hidden @ weight.t()
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    ref = ref + 0.1 * (logits.max(-1).values.square() * (targets != -100)).sum()
    ref_grads = torch.autograd.grad(ref * 1.3, (hidden, weight))
    for chunk in (1, 4, 23, 100):
        loss = chunked_linear_cross_entropy(hidden, weight, targets, z_weight=0.1, chunk=chunk)
        grads = torch.autograd.grad(loss * 1.3, (hidden, weight))
        assert_close(loss, ref)
        for a, b in zip(grads, ref_grads):
            assert_close(a, b)


def test_compiled_chunk_loss_equals_eager_and_writes_the_gradient_in_place():
    from models.common import _chunk_loss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 37, generator=g) * 3
    targets = torch.randint(0, 37, (9,), generator=g)
    targets[[1, 8]] = -100
    ref_in = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_in, targets, ignore_index=-100, reduction="sum")
    ref = ref + 0.1 * (ref_in.max(-1).values.square() * (targets != -100)).sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_in)
    torch._dynamo.reset()
    for fn in (_chunk_loss, torch.compile(_chunk_loss, dynamic=False)):
        buf = logits.clone()
        assert_close(fn(buf, targets, 0.1, True), ref)
        assert_close(buf, ref_grad)
        assert_close(fn(logits.clone(), targets, 0.1, False), ref)


def test_fused_head_keeps_no_fp32_logits_and_matches_the_plain_head_in_bf16():
    g = torch.Generator().manual_seed(3)
    rows, vocab = 64, 1000
    hidden = torch.randn(rows, 32, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, 32, generator=g) * 0.1).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk=16)
    big_fp32 = [t for t in saved if t.dtype == torch.float32 and t.numel() >= rows * vocab]
    assert saved and not big_fp32, [(t.dtype, tuple(t.shape)) for t in saved]
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    assert torch.allclose(loss, ref, rtol=1e-3)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16 and ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def test_fused_loss_of_an_untrained_micro_batch_is_zero_with_zero_grads():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = CausalLMLoss()((hidden, weight), torch.full((2, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_compiled_blocks_equal_eager_blocks(name, ckpt):
    """compile_blocks == eager in loss and every gradient (fp32), with and without use_grad_ckpt (mixtral:
    the attention half compiled, experts eager)."""
    plain, compiled = twin_models(CONFIGS[name](), compile_blocks=True, use_grad_ckpt=ckpt)
    plain.train(), compiled.train()
    ids, labels = batch()
    ref_loss, ref_grads = loss_and_grads(plain, ids, labels)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    loss, grads = loss_and_grads(compiled, ids, labels)
    assert_close(loss, ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n])
    # the four blocks share one compiled graph (the module is an input, not a constant)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_varlen_boundaries_and_document_mask_follow_position_ids():
    from models.common import document_causal_mask, varlen_cu_seqlens

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [3, 4, 0, 1, 2, 3, 4, 5]])  # row 2 starts mid-document
    cu, longest = varlen_cu_seqlens(pos)
    assert cu.tolist() == [0, 3, 5, 8, 10, 16] and cu.dtype == torch.int32 and longest == 6
    mask = document_causal_mask(pos)[:, 0]
    assert mask[0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[1, 1].tolist() == [True, True] + [False] * 6 and mask[1, 7, 2:].all() and not mask[1, 7, :2].any()


def test_profile_summary_splits_the_step_without_double_counting_overlap():
    from utils.profile import kernel_kind, summarize, union_length

    assert union_length([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert [kernel_kind(n) for n in ("ncclDevKernel_SendRecv", "sm90_xmma_gemm_bf16", "pytorch_flash::fwd",
                                     "triton_poi_fused_mul_0")] == ["comm", "matmul", "attention", "other"]
    s = summarize([("nccl_send", 0, 100), ("gemm", 50, 150), ("triton_red", 150, 160)], wall_us=200)
    assert s["busy_ms"] == 0.16 and s["compute_busy_ms"] == 0.11 and abs(s["idle_ms"] - 0.04) < 1e-9
    assert s["kernels_ms"] == {"comm": 0.1, "matmul": 0.1, "other": 0.01}
