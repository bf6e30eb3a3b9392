#!/usr/bin/env bash
# Issue 12: the seed's 8-GPU table (llama-7b shape, micro-batch 1, global batch 128, dims [8, 1],
# parts [5,4,4,4,4,4,4,5], seq 256 ... 4096, fp16 and bf16) on an 8-GPU host, one phase per device call:
#   PHASE=1 bash tools/bench_seed_table.sh      (device tool, carry .wheelhouse; results tarred into $OUT)
# Phase 1/2: pipeline (sdpa, and flash when flash_attn imports) at micro-batch 1, fp16 / bf16.
# Phase 3/4: ZeRO-3 and ZeRO++ at micro-batch 1 and their best micro-batch, fp16 / bf16.
set -uo pipefail
source tools/install_wheelhouse.sh .wheelhouse >/dev/null 2>&1 || { echo "wheelhouse install failed"; exit 1; }
OUT=${OUT:-/tmp/out}; R=/tmp/sres; W=/tmp/sw; mkdir -p $R $W $OUT
NG=$(nvidia-smi -L | wc -l)
[ "$NG" -eq 8 ] || echo "warning: $NG GPUs, the seed's table is for 8"
MM=$(cat $R/matmul 2>/dev/null)
if [ -z "$MM" ]; then
  MM=$(python benchmarks/matmul.py --device cuda --n 8192 --dtype bf16 | tail -1 |
       python -c "import json,sys; print(json.load(sys.stdin)['matmul_tflops'])"); echo $MM > $R/matmul
fi
SEQS="256 512 1024 2048 4096"
B="python benchmarks/run.py --gpus $NG --global-batch 128 --results-dir $R --work-dir $W --steps 5 --warmup 2
   --matmul-tflops $MM --backends auto --pipeline-set model_topo.parts=[5,4,4,4,4,4,4,5] --timeout 240"
ZPP="zero_optimization.zero_quantized_weights=true zero_optimization.zero_hpz_partition_size=$NG zero_optimization.zero_quantized_gradients=true"
case "${PHASE:-1}" in
1) $B --precision fp16 --seq $SEQS --mbs 1 --trainers pipeline ;;
2) $B --precision bf16 --seq $SEQS --mbs 1 --trainers pipeline ;;
3) $B --precision fp16 --seq $SEQS --trainers zero --max-mbs 16
   $B --precision fp16 --seq $SEQS --trainers zero --max-mbs 16 --zero-set $ZPP --label zeropp ;;
4) $B --precision bf16 --seq $SEQS --trainers zero --max-mbs 16
   $B --precision bf16 --seq $SEQS --trainers zero --max-mbs 16 --zero-set $ZPP --label zeropp ;;
esac
tar czf $OUT/seed_table.tgz -C /tmp sres sw/logs $(cd /tmp && ls -d sw/runs/*/rank_stats sw/runs/*/metrics.jsonl 2>/dev/null)
ls -la $OUT
