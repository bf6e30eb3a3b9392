"""BLOOM's compiled blocks (`compile_blocks`: one shared `torch.compile`d block, ALiBi through FlexAttention)
give the eager blocks' numbers (CPU, fp32): outputs and every gradient within 1e-5 relative, for causal and
packed rows, any head count, with and without activation checkpointing, and a whole model equals
transformers' `BloomForCausalLM`.

torch 2.13's FlexAttention has no backward on CPU (its inductor backward is a Triton template and
`flex_attention` refuses CPU inputs that need grad), so the gradient tests lift that refusal
(`flex_on_cpu`) and compile with the `aot_eager` backend: dynamo and AOT autograd trace the real graph
(checkpoint included) and flex runs its dense reference implementation of the same score_mod/mask_mod.
Inductor's CPU flex kernel, which also walks the block-sparse map, is checked forward only.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch._dynamo.utils import counters

from models import ModelOptions, load_sequential
from models import attention, bloom
from models.bloom import BloomBlock, read_config
from models.common import alibi_causal_attention, document_causal_mask
from models.convert import WeightMapper, hg_to_pp
from tests.test_families import QUIET, VOCAB, batch, hf_name, make_bloom
from tests.test_fast_paths import assert_close


class GraphRecorder:
    """A torch.compile backend that keeps every graph dynamo hands it and runs it with `aot_eager`."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def has_op(self, fragment: str) -> bool:
        """Whether an op whose name contains `fragment` is in a graph or in one of its subgraphs (the body of a
        traced checkpoint)."""
        return any(fragment in str(node.target) for gm in self.graphs for sub in gm.modules()
                   if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes)

    def uses_flex(self) -> bool:
        return self.has_op("flex_attention")


@pytest.fixture
def recorder(monkeypatch) -> GraphRecorder:
    """Compiled bloom blocks run through a fresh `GraphRecorder` (aot_eager) with dynamo reset."""
    rec = GraphRecorder()
    monkeypatch.setattr(bloom, "COMPILE_BACKEND", rec)
    monkeypatch.setattr(bloom, "_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    yield rec
    torch._dynamo.reset()


@pytest.fixture
def flex_on_cpu(monkeypatch, recorder) -> GraphRecorder:
    """FlexAttention allowed to take CPU inputs that need grad (see the module docstring)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda query, key, value: None)
    monkeypatch.setattr(attention, "NO_FLEX_BACKWARD", ())
    return recorder


def bloom_args(heads: int, hidden_per_head: int = 8):
    return read_config({"model_type": "bloom", "vocab_size": VOCAB, "hidden_size": heads * hidden_per_head,
                        "n_layer": 2, "n_head": heads})


def twin_blocks(heads: int, packed: bool, ckpt: bool, count: int = 1):
    """`count` pairs (eager block, compiled block) with the same random weights (biases and norms too)."""
    args = bloom_args(heads)
    pairs = []
    for i in range(count):
        torch.manual_seed(i)
        eager = BloomBlock(args, ModelOptions(packed_sequences=packed, use_grad_ckpt=ckpt))
        with torch.no_grad():
            for p in eager.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        compiled = BloomBlock(args, ModelOptions(packed_sequences=packed, use_grad_ckpt=ckpt, compile_blocks=True))
        compiled.load_state_dict(eager.state_dict())
        pairs.append((eager.train(), compiled.train()))
    return pairs


def packed_positions(rows: list[list[int]], seq: int) -> torch.Tensor:
    """Document lengths per row -> position_ids [B, seq] as `pad_collate` builds them: 0.. per document, the
    padding continuing the last one."""
    out = []
    for lengths in rows:
        pos = torch.cat([torch.arange(n) for n in lengths])
        pad = torch.arange(seq - len(pos)) + (pos[-1] + 1)
        out.append(torch.cat([pos, pad]))
    return torch.stack(out)


# 300 tokens: three 128-token flex blocks, documents crossing and ending inside them
PACKED_ROWS = [[100, 150, 50], [20, 200, 61, 1]]
PACKED_ROWS_PADDED = [[7, 130, 90], [300]]


def run_blocks(blocks, hidden: torch.Tensor, position_ids: torch.Tensor, grad_out: torch.Tensor):
    """Chain of blocks forward + backward -> (output, d hidden, {param name: grad} of every block)."""
    for block in blocks:
        block.zero_grad()
    x = hidden.clone().requires_grad_(True)
    out = x
    for block in blocks:
        out, _ = block((out, position_ids))
    out.backward(grad_out)
    grads = {f"{i}.{n}": p.grad.clone() for i, b in enumerate(blocks) for n, p in b.named_parameters()}
    return out.detach(), x.grad, grads


def assert_same_block_math(pairs, position_ids: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, s = position_ids.shape
    hidden = torch.randn(b, s, pairs[0][0].input_layernorm.weight.shape[0], generator=g)
    grad_out = torch.randn(hidden.shape, generator=g)
    ref = run_blocks([e for e, _ in pairs], hidden, position_ids, grad_out)
    got = run_blocks([c for _, c in pairs], hidden, position_ids, grad_out)
    assert_close(got[0], ref[0])
    assert_close(got[1], ref[1])
    assert sorted(got[2]) == sorted(ref[2])
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name])


@pytest.mark.parametrize("packed, heads, ckpt", [(False, 8, False), (False, 6, True), (False, 5, False),
                                                  (True, 6, False), (True, 5, True)],
                         ids=["causal-8heads", "causal-6heads-grad_ckpt", "causal-5heads", "packed-6heads",
                              "packed-5heads-grad_ckpt"])
def test_compiled_flex_block_equals_eager_block(flex_on_cpu, packed, heads, ckpt):
    """Two chained blocks (one shared graph); 6 and 5 heads take the extra slopes of a non-power-of-two count."""
    pairs = twin_blocks(heads, packed=packed, ckpt=ckpt, count=2)
    if packed:
        assert_same_block_math(pairs, packed_positions(PACKED_ROWS, 300))
        # another batch of the same shape: a new block mask, the same graph
        assert_same_block_math(pairs, packed_positions(PACKED_ROWS_PADDED, 300), seed=1)
    else:
        # second row offset: unpacked rows count up by one from any start, so kv_idx - q_idx = pos_j - pos_i
        assert_same_block_math(pairs, torch.stack([torch.arange(300), torch.arange(300) + 7]))
    assert flex_on_cpu.uses_flex() and flex_on_cpu.has_op("checkpoint") == ckpt
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_block_masks_cached_per_length_and_per_batch_and_match_the_dense_mask():
    pos = packed_positions(PACKED_ROWS, 300)
    assert bloom.causal_block_mask(300, pos.device) is bloom.causal_block_mask(300, pos.device)
    assert bloom.causal_block_mask(256, pos.device).shape == (1, 1, 256, 256)
    first = bloom.packed_block_mask(pos)
    assert bloom.packed_block_mask(pos) is first and first.shape == (2, 1, 300, 300)
    assert bloom.packed_block_mask(pos.clone()) is not first  # another micro-batch
    # block level: a 128x128 tile is kept iff the dense document-causal mask has a visible key in it
    dense = torch.nn.functional.pad(document_causal_mask(pos), (0, 84, 0, 84))  # (B, 1, 384, 384)
    tiles = dense.unflatten(2, (3, 128)).unflatten(4, (3, 128)).any(dim=(3, 5))  # (B, 1, 3, 3)
    assert torch.equal(first.to_dense().bool(), tiles)
    assert not tiles.all() and tiles.any()


def test_compiled_block_without_flex_backward_keeps_mask_attention(recorder):
    """CPU + grad, flex not lifted: the compiled block runs the SDPA + mask math and still matches."""
    pairs = twin_blocks(6, packed=True, ckpt=False)
    assert_same_block_math(pairs, packed_positions([[10, 14], [24]], 24))
    assert recorder.graphs and not recorder.uses_flex()


def test_sequence_length_change_recompiles_once(flex_on_cpu):
    """Right-padded micro-batches change length: one recompile with a dynamic length, then no more."""
    pairs = twin_blocks(6, packed=False, ckpt=False)
    for seq in (24, 40, 56):
        assert_same_block_math(pairs, torch.arange(seq).expand(2, seq))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_inductor_flex_kernel_equals_mask_attention():
    """Inductor's CPU flex kernel (forward only), which skips whole blocks and cuts partial ones by the
    BlockMask: packed rows, documents crossing 128-token tiles. Only the attention is compiled (a cold
    C++ compile of the whole block costs CI time and adds nothing flex-specific)."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 300, 8, generator=g) for _ in range(3))
    position_ids, slopes = packed_positions(PACKED_ROWS, 300), bloom.alibi_slopes(6)
    expected = alibi_causal_attention(q, k, v, slopes, position_ids, use_flash_attn=False, packed=True)
    # config.patch, not monkeypatch: monkeypatch's undo deletes the key from inductor's config module, and
    # every later compile in the session then fails ("compile_threads does not exist").
    with inductor_config.patch(compile_threads=1):  # no worker pool to start on 2 cores
        actual = torch.compile(bloom.flex_alibi_attention)(q, k, v, slopes, bloom.packed_block_mask(position_ids),
                                                           position_ids)
    assert_close(actual, expected)
    torch._dynamo.reset()


def test_compiled_model_equals_transformers_bloom(flex_on_cpu, tmp_path):
    """3 compiled blocks with activation checkpointing (the block tests cover each switch on its own)."""
    from transformers import BloomForCausalLM

    make_bloom(tmp_path / "hf", n_head=6, tied=True, hub_names=False)
    hg_to_pp(tmp_path / "hf", tmp_path / "pp", **QUIET)
    reference = BloomForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                 attn_implementation="eager").train()
    ours = load_sequential(tmp_path / "pp", opts=ModelOptions(compile_blocks=True, use_grad_ckpt=True)).train()
    input_ids, position_ids, labels = batch(seed=1)
    expected = reference(input_ids=input_ids, labels=labels).loss
    expected.backward()
    actual = ours.loss(input_ids, labels, position_ids)
    actual.backward()
    assert_close(actual.detach(), expected.detach())
    assert flex_on_cpu.uses_flex() and flex_on_cpu.has_op("checkpoint")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # 3 blocks, one graph

    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    mapper = WeightMapper(bloom.FAMILY.weight_map)
    seen = set()
    for name, param in ours.named_parameters():
        target = hf_name(ours, mapper, name)
        seen.add(target)
        assert_close(param.grad, ref_grads[target])
    assert seen == set(ref_grads)
