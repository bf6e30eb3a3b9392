"""GPU parity and kernel timings of our fast paths against the paths they replace (bf16, one GPU).

    python benchmarks/gpu_checks.py --out benchmarks/results/gpu-checks-<host>-<date>.json [--only head moe bloom]

Sections (each records its own failure and the others still run):
- head: LM head + cross entropy at 4096 tokens, hidden 4096, for every family's vocabulary. Variants:
  `plain` (F.linear, fp32 upcast, F.cross_entropy: the unfused path), `fused` (ours,
  models.common.chunked_linear_cross_entropy), and where importable `liger` (liger-kernel's fused linear
  cross entropy) and `cce` (cut-cross-entropy). Per variant: forward+backward ms (median of 10 after 3
  warm-ups, CUDA events), peak GiB above the inputs, and loss / gradient relative error against `plain`.
- moe: mixtral-8x7b width SparseMoe at 4096 tokens: grouped GEMM vs the per-expert loop, output and
  gradients, and timings.
- bloom: bloom-7b1 width block at seq 2048, micro-batch 2: compiled (FlexAttention ALiBi) vs eager
  (SDPA with a bias mask), output and gradients, and timings.
Relative error = ‖a − b‖ / ‖b‖ (bf16 paths differ from each other by rounding; the fp32 parity tests on CPU
are the exact checks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VOCABS = {"llama2/mixtral": 32000, "chatglm3": 65024, "baichuan2": 125696, "llama3": 128256, "bloom": 250880}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def timed(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)


def head_variants() -> dict:
    from models import common
    from models.common import chunked_linear_cross_entropy

    def plain(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100, reduction="sum")

    def fused_eager(h, w, t):  # the chunk math without torch.compile: the A/B of compiling it
        saved = common.chunk_loss_fn
        common.chunk_loss_fn = lambda device: common._chunk_loss
        try:
            return chunked_linear_cross_entropy(h, w, t)
        finally:
            common.chunk_loss_fn = saved

    out = {"plain": plain, "fused": lambda h, w, t: chunked_linear_cross_entropy(h, w, t), "fused_eager": fused_eager}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        out["liger"] = lambda h, w, t: liger(w, h, t)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy
        out["cce"] = lambda h, w, t: linear_cross_entropy(h, w, t, reduction="sum")
    except ImportError:
        pass
    return out


def check_head(tokens: int = 4096, hidden: int = 4096) -> list[dict]:
    rows = []
    variants = head_variants()
    for name, vocab in VOCABS.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        h = (torch.randn(tokens, hidden, device="cuda", generator=g) * 1.0).bfloat16().requires_grad_()
        w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
        t = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
        t[::7] = -100

        def step(fn):
            h.grad = w.grad = None
            loss = fn(h, w, t)
            loss.backward()
            return loss

        ref_loss = step(variants["plain"]).detach()
        ref_gh, ref_gw = h.grad.clone(), w.grad.clone()
        for vname, fn in variants.items():
            row = {"section": "head", "vocab_of": name, "vocab": vocab, "tokens": tokens, "hidden": hidden,
                   "variant": vname}
            try:
                loss = step(fn)
                row.update(loss_rel=rel(loss, ref_loss), grad_hidden_rel=rel(h.grad, ref_gh),
                           grad_weight_rel=rel(w.grad, ref_gw))
                row["ms"] = round(timed(lambda: step(fn)), 3)
                row["peak_gib"] = peak_gib(lambda: step(fn))
                row["status"] = "ok"
            except Exception as e:  # one library failing must not hide the others
                row.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
            print(json.dumps(row), flush=True)
            rows.append(row)
        del h, w, t, ref_gh, ref_gw
        torch.cuda.empty_cache()
    return rows


def grads_of(module: torch.nn.Module, run) -> tuple[torch.Tensor, dict, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    out, x = run()
    (out.float().square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, x.grad


def compare(rows: list, section: str, label: str, ref, new, ms_ref: float, ms_new: float) -> None:
    out_r, grads_r, xg_r = ref
    out_n, grads_n, xg_n = new
    row = {"section": section, "variant": label, "out_rel": rel(out_n, out_r), "grad_input_rel": rel(xg_n, xg_r),
           "grad_param_rel_max": max(rel(grads_n[k], grads_r[k]) for k in grads_r),
           "ms_ref": round(ms_ref, 3), "ms": round(ms_new, 3), "status": "ok"}
    print(json.dumps(row), flush=True)
    rows.append(row)


def check_moe(tokens: int = 4096) -> list[dict]:
    from models import mixtral

    cfg = mixtral.debug_config(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                               num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
    args = mixtral.read_config(cfg)
    torch.manual_seed(0)
    moe = mixtral.SparseMoe(args, torch.bfloat16).cuda()
    x = torch.randn(2, tokens // 2, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows: list[dict] = []

    def run_with(grouped: bool):
        def run():
            x.grad = None
            moe.grouped = grouped
            return moe(x)[0], x
        return run
    results, times = {}, {}
    for grouped in (False, True):
        run = run_with(grouped)
        results[grouped] = grads_of(moe, run)
        times[grouped] = timed(lambda: grads_of(moe, run))
    compare(rows, "moe", "grouped_gemm vs loop", results[False], results[True], times[False], times[True])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the grouped forward/backward raises
    try:
        grads_of(moe, run_with(True))
        rows.append({"section": "moe", "variant": "grouped_gemm host syncs", "status": "ok", "syncs": 0})
    except RuntimeError as e:
        rows.append({"section": "moe", "variant": "grouped_gemm host syncs", "status": "failed", "error": str(e)[:500]})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print(json.dumps(rows[-1]), flush=True)
    return rows


def check_bloom(seq: int = 2048, mbs: int = 2) -> list[dict]:
    from models import bloom
    from models.common import ModelOptions

    args = bloom.read_config({"model_type": "bloom", "hidden_size": 4096, "n_head": 32, "n_layer": 1,
                              "vocab_size": 250880})
    rows: list[dict] = []
    results, times = {}, {}
    torch.manual_seed(0)
    blocks = {}
    for compiled in (False, True):
        opts = ModelOptions(dtype=torch.bfloat16, compile_blocks=compiled)
        torch.manual_seed(0)
        blocks[compiled] = bloom.BloomBlock(args, opts).cuda().train()
    blocks[True].load_state_dict(blocks[False].state_dict())
    x = torch.randn(mbs, seq, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq, device="cuda").expand(mbs, seq)
    for compiled, block in blocks.items():
        def run(block=block):
            x.grad = None
            return block((x, pos))[0], x
        results[compiled] = grads_of(block, run)
        times[compiled] = timed(lambda: grads_of(block, run))
    compare(rows, "bloom", "compiled flex vs eager sdpa+mask", results[False], results[True], times[False],
            times[True])
    return rows


SECTIONS = {"head": check_head, "moe": check_moe, "bloom": check_bloom}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA GPU", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for name in a.only:
        try:
            report["rows"] += SECTIONS[name]()
        except Exception as e:
            traceback.print_exc()
            report["rows"].append({"section": name, "status": "failed", "error": f"{type(e).__name__}: {e}"[:800]})
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
