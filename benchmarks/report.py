"""From a run's files to numbers, and from all runs to the tables (markdown) and the summary ratios."""
from __future__ import annotations

import glob
import json
import os

TRAINER_LABEL = {"pipeline": "pipeline", "zero": "ZeRO-3"}
TARGET_VS_BEST_ZERO = 1.25
TARGET_VS_ZERO_MBS1 = 3.0


def read_rank_files(save_path: str, folder: str) -> list[dict]:
    """The `save_path/<folder>/rank{R}.json` records of every rank, in rank order ([] if none)."""
    records = []
    for path in glob.glob(os.path.join(save_path, folder, "rank*.json")):
        with open(path) as f:
            records.append(json.load(f))
    return sorted(records, key=lambda r: r["rank"])


def read_rank_peaks(save_path: str) -> list[float] | None:
    """Peak GiB of every rank from `save_path/rank_stats/rank{R}.json`, in rank order; None if absent."""
    stats = read_rank_files(save_path, "rank_stats")
    return [round(float(s["peak_mem_gib"]), 2) for s in stats] or None


def read_profiles(save_path: str) -> list[dict] | None:
    """The per-rank time split of a profiled step (`save_path/profile/rank{R}.json`), in rank order."""
    return read_rank_files(save_path, "profile") or None


def throughput(rows: list[dict], warmup: int, global_batch: int) -> dict | None:
    """Steps after the first `warmup`: samples/s and tokens/s over their total time; None if none are left.
    Evaluation rows (`eval_loss`) of metrics.jsonl are skipped."""
    rows = [r for r in rows if "eval_loss" not in r]
    measured = [r for r in rows if r["step"] > warmup]
    if not measured:
        return None
    seconds = sum(r["step_time_s"] for r in measured)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in measured)
    trained = sum(r.get("trained_tokens_per_s", 0.0) * r["step_time_s"] for r in measured)
    return {"steps_measured": len(measured), "step_time_s": seconds / len(measured),
            "samples_per_s": global_batch * len(measured) / seconds, "tokens_per_s": tokens / seconds,
            "trained_tokens_per_s": trained / seconds,
            "trainer_tflops_per_gpu": sum(r["tflops_per_gpu"] for r in measured) / len(measured),
            "reporter_peak_gib": round(max(r["peak_mem_gib"] for r in rows), 2)}


def efficiency(tokens_per_s: float, flops_per_token: float, gpus: int, matmul_tflops: float | None,
               datasheet_tflops: float) -> dict:
    tflops = flops_per_token * tokens_per_s / gpus / 1e12
    return {"tflops_per_gpu": tflops, "mfu": tflops / matmul_tflops if matmul_tflops else None,
            "mfu_datasheet": tflops / datasheet_tflops if datasheet_tflops else None}


def ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok"]


def best_of(records: list[dict]) -> dict | None:
    good = ok(records)
    return max(good, key=lambda r: r["samples_per_s"]) if good else None


def at_mbs1(records: list[dict]) -> dict | None:
    """The fastest mbs-1 run (over attention backends)."""
    return best_of([r for r in records if r["mbs"] == 1])


def ratio(a: dict | None, b: dict | None) -> float | None:
    if a is None or b is None or not b["samples_per_s"]:
        return None
    return a["samples_per_s"] / b["samples_per_s"]


def summarize(records: list[dict], seqs: list[int]) -> dict:
    """Per sequence length: best and mbs-1 run of each trainer, and the two ratios performance.md targets."""
    out = {}
    for seq in seqs:
        mine = [r for r in records if r["seq"] == seq]
        pipe = [r for r in mine if r["trainer"] == "pipeline"]
        zero = [r for r in mine if r["trainer"] == "zero"]
        best_pipe, best_zero = best_of(pipe), best_of(zero)
        out[str(seq)] = {
            "pipeline_best": _brief(best_pipe), "zero_best": _brief(best_zero),
            "pipeline_mbs1": _brief(at_mbs1(pipe)), "zero_mbs1": _brief(at_mbs1(zero)),
            "ratio_pipeline_vs_best_zero": ratio(best_pipe, best_zero),
            "ratio_pipeline_vs_zero_mbs1": ratio(at_mbs1(pipe), at_mbs1(zero)),
        }
    return out


def _brief(rec: dict | None) -> dict | None:
    if rec is None:
        return None
    return {k: rec.get(k) for k in ("trainer", "backend", "mbs", "samples_per_s", "tflops_per_gpu", "mfu")}


# ----------------------------------------------------------------------------------------------
# Markdown


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _peak(rec: dict) -> str:
    """Per rank from rank_stats (allocator peak), else per GPU from nvidia-smi (includes the CUDA context
    and cached blocks), else the reporting rank's own figure from metrics.jsonl."""
    if rec.get("peak_gib_per_gpu"):
        return " / ".join(f"{v:.1f}" for v in rec["peak_gib_per_gpu"])
    if rec.get("smi_peak_gib"):
        return " / ".join(f"{v:.1f}" for v in rec["smi_peak_gib"]) + " (nvidia-smi)"
    if rec.get("reporter_peak_gib") is not None:
        return f"{rec['reporter_peak_gib']:.1f} (reporting rank)"
    return "—"


def setting_rows(records: list[dict], seq: int) -> list[tuple[str, dict]]:
    """(label, record) for each trainer x backend: mbs 1, then the best micro-batch (or its failure)."""
    rows = []
    for trainer in ("pipeline", "zero"):
        for backend in sorted({r["backend"] for r in records if r["trainer"] == trainer and r["seq"] == seq}):
            group = [r for r in records if r["trainer"] == trainer and r["backend"] == backend and r["seq"] == seq]
            label = f"{TRAINER_LABEL[trainer]} ({backend})"
            first = next((r for r in group if r["mbs"] == 1), group[0])
            rows.append((f"{label}, micro-batch 1", first))
            best = best_of(group)
            if best is not None and best is not first:
                rows.append((f"{label}, best micro-batch", best))
            tried = ", ".join(f"{r['mbs']}: {r['status']}" for r in group)
            rows[-1] = (rows[-1][0] + f" (tried {tried})", rows[-1][1])
    return rows


def seq_table(records: list[dict], seq: int, summary: dict) -> str:
    head = ("| setting | mbs | samples/s | tokens/s | TFLOP/s/GPU | MFU | MFU (datasheet) | peak GiB per GPU "
            "| status |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"### seq {seq}", "", head]
    for label, r in setting_rows(records, seq):
        lines.append(f"| {label} | {r['mbs']} | {_num(r.get('samples_per_s'), '.2f')} | "
                     f"{_num(r.get('tokens_per_s'), '.0f')} | {_num(r.get('tflops_per_gpu'), '.1f')} | "
                     f"{_num(r.get('mfu'), '.1%')} | {_num(r.get('mfu_datasheet'), '.1%')} | {_peak(r)} | "
                     f"{r['status']} |")
    s = summary[str(seq)]
    lines += ["", f"pipeline / best ZeRO-3: **{_num(s['ratio_pipeline_vs_best_zero'], '.2f')}×** "
                  f"(target {TARGET_VS_BEST_ZERO}×); pipeline / ZeRO-3 at micro-batch 1: "
                  f"**{_num(s['ratio_pipeline_vs_zero_mbs1'], '.2f')}×** (target {TARGET_VS_ZERO_MBS1}×)", ""]
    return "\n".join(lines)


def overview_table(summary: dict, seqs: list[int]) -> str:
    """performance.md's layout: samples/s (TFLOP/s per GPU) per setting and sequence length."""
    def cell(b):
        return "—" if b is None else f"{b['samples_per_s']:.2f} (mbs {b['mbs']}, {b['tflops_per_gpu']:.0f})"

    cols = " | ".join(f"seq {s}" for s in seqs)
    lines = [f"| setting | {cols} |", "|---|" + "---|" * len(seqs)]
    for key, label in (("zero_mbs1", "ZeRO-3, micro-batch 1"), ("zero_best", "ZeRO-3, best micro-batch"),
                       ("pipeline_mbs1", "pipeline, micro-batch 1"), ("pipeline_best", "pipeline, best micro-batch")):
        lines.append(f"| {label} | " + " | ".join(cell(summary[str(s)][key]) for s in seqs) + " |")
    for key, label in (("ratio_pipeline_vs_best_zero", f"pipeline / best ZeRO-3 (target {TARGET_VS_BEST_ZERO}×)"),
                       ("ratio_pipeline_vs_zero_mbs1", f"pipeline / ZeRO-3 at mbs 1 (target {TARGET_VS_ZERO_MBS1}×)")):
        lines.append(f"| {label} | " + " | ".join(_num(summary[str(s)][key], ".2f") for s in seqs) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    dev, work = result["device"], result["workload"]
    seqs = result["seqs"]
    head = [f"# Benchmark {result['host']} {result['date']} ({result['mode']})", "",
            f"{dev.get('device_name')} x {result['gpus']}; dense {dev.get('matmul_dtype')} matmul "
            f"{dev.get('matmul_n')}³: {dev.get('matmul_tflops')} TFLOP/s (MFU denominator; datasheet "
            f"{result['datasheet_tflops']}); {work['name']}, global batch {work['global_batch']}, "
            f"{work['steps']} steps of which the first {work['warmup']} are not counted.", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
            "Samples/s (micro-batch, TFLOP/s per GPU):", "", overview_table(result["summary"], seqs), ""]
    body = [seq_table(result["runs"], seq, result["summary"]) for seq in seqs]
    return "\n".join(head + body)
