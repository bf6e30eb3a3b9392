#!/usr/bin/env bash
# The GPU measurements of issues 9 and 7 on all GPUs of the host, in phases that each fit one 10-minute
# device call (micro-batches chosen from the 2x H200 search of 2026-11-27):
#   PHASE=1 bash tools/bench_gpus.sh     (device tool, carry .wheelhouse; results tarred into $OUT)
# Phase 1: seq 2048 plain vs compiled blocks (profiled), 4096; ZeRO-3 at the same lengths.
# Phase 2: seq 512 and 1024, pipeline and ZeRO-3; seq 16384 with activation checkpointing.
# Phase 3: packing on a length mix, mixtral memory (issue 7), micro-batch 1 (the seed's claim).
set -uo pipefail
source tools/install_wheelhouse.sh .wheelhouse >/dev/null 2>&1 || { echo "wheelhouse install failed"; exit 1; }
OUT=${OUT:-/tmp/out}; R=/tmp/bres; W=/tmp/bw; mkdir -p $R $W $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
MM=$(cat $R/matmul 2>/dev/null)
if [ -z "$MM" ]; then
  MM=$(python benchmarks/matmul.py --device cuda --n 8192 --dtype bf16 | tail -1 |
       python -c "import json,sys; print(json.load(sys.stdin)['matmul_tflops'])"); echo $MM > $R/matmul
fi
echo "matmul $MM TFLOP/s"
NG=$(nvidia-smi -L | wc -l)
B="python benchmarks/run.py --gpus $NG --results-dir $R --work-dir $W --steps ${STEPS:-6} --warmup 2 --stop-below -1 --matmul-tflops $MM"
C="--set compile_blocks=true --label compiled"
case "${PHASE:-1}" in
1)
  $B --seq 2048 --mbs 4 --trainers pipeline --profile-step 3 --timeout 110
  $B --seq 2048 --mbs 4 --trainers pipeline $C --profile-step 3 --timeout 140
  $B --seq 2048 --mbs 4 --trainers zero --timeout 110
  $B --seq 4096 --mbs 2 --trainers pipeline $C --timeout 130
  $B --seq 4096 --mbs 2 --trainers zero --steps 3 --timeout 120
  ;;
2)
  $B --seq 2048 --mbs 4 --trainers pipeline $C --timeout 110
  $B --seq 512 1024 --mbs 4 --trainers pipeline $C --steps 5 --timeout 80
  $B --seq 512 --mbs 8 --trainers zero --steps 5 --timeout 80
  $B --seq 1024 --mbs 4 --trainers zero --steps 5 --timeout 80
  $B --seq 16384 --mbs 1 --global-batch 4 --trainers pipeline zero --steps 4 \
     --set compile_blocks=true use_grad_ckpt=true --label ckpt --timeout 100
  ;;
3)
  # packing on a realistic length mix: samples of 50..1500 tokens, rows of 4096 vs one sample per row
  $B --seq 4096 --mbs 1 --trainers pipeline --set compile_blocks=true packing=true synthetic_min_len=50 \
     synthetic_max_len=1500 --label packed --steps 5 --timeout 90
  $B --seq 1536 --mbs 4 --trainers pipeline --set compile_blocks=true synthetic_min_len=50 \
     synthetic_max_len=1500 --label unpacked --steps 5 --timeout 90
  $B --seq 16384 --mbs 1 --global-batch 4 --trainers pipeline --steps 4 --set use_grad_ckpt=true --label ckpt \
     --timeout 90
  MIXTRAL_TIMEOUT=150 bash tools/mixtral_memory.sh
  $B --seq 1024 --mbs 1 --trainers pipeline $C --steps 4 --timeout 80
  ;;
esac
python - "$R" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    for r in json.load(open(path))["runs"]:
        line = f"{r['trainer']:8s} {r.get('label') or 'plain':9s} seq {r['seq']:5d} mbs {r['mbs']} {r['status']:7s}"
        if r["status"] == "ok":
            line += (f" {r['samples_per_s']:7.2f} samples/s {r['trained_tokens_per_s']:9.0f} trained tok/s "
                     f"{r['tflops_per_gpu']:5.0f} TF/GPU MFU {r['mfu'] or 0:.1%} step {r['step_time_s']:.2f}s "
                     f"peak {r['peak_gib_per_gpu']}")
        print(line, f"({r['elapsed_s']} s)")
        metrics = f"/tmp/bw/runs/{r['log'].rsplit('/', 1)[-1][:-4]}/metrics.jsonl"
        try:
            print("    step s:", [round(json.loads(l)["step_time_s"], 2) for l in open(metrics)])
        except OSError:
            pass
        for p in r.get("profile") or []:
            print(f"    rank {p['rank']}: wall {p['wall_ms']:.0f} ms, compute {p['compute_busy_ms']:.0f}, "
                  f"idle {p['idle_ms']:.0f}, kernels {{{', '.join(f'{k}: {v:.0f}' for k, v in p['kernels_ms'].items())}}}")
PY
tar czf $OUT/bench.tgz -C /tmp bres bw/logs $(cd /tmp && ls -d bw/runs/*/profile bw/runs/*/rank_stats bw/runs/*/metrics.jsonl 2>/dev/null) mixtral/log.txt mixtral/run 2>/dev/null
ls -la $OUT
