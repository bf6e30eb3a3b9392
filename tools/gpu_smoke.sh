#!/usr/bin/env bash
# GPU smoke: llama-7b shape, synthetic data, pipeline over all GPUs of the host.
# Usage on the GPU host (device tool, carry .wheelhouse): SEQS="1024 2048" MBSS="1 4" STEPS=4 bash tools/gpu_smoke.sh
set -uo pipefail
source tools/install_wheelhouse.sh .wheelhouse >/dev/null 2>&1 || source tools/install_wheelhouse.sh .wheelhouse
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"
NG=$(nvidia-smi -L | wc -l)
mkdir -p /tmp/m7b
LAYERS=${LAYERS:-32} python - <<'PY'
import os
from transformers import LlamaConfig
LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=int(os.environ["LAYERS"]),
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096).save_pretrained("/tmp/m7b")
PY
for SEQ in ${SEQS:-1024}; do for MBS in ${MBSS:-1 2}; do
  echo "=== seq $SEQ mbs $MBS gpus $NG"
  timeout 240 deepspeed --num_gpus $NG train_ds.py --config configs/ds_config_pp.yml --model_path=/tmp/m7b --from_scratch=true \
    --synthetic_data=true --max_steps=${STEPS:-5} --optimizer.params.torch_adam=true --max_seq_len=$SEQ --save_path=/tmp/out_${SEQ}_${MBS} --overwrite=true --train_batch_size=64 \
    --train_micro_batch_size_per_gpu=$MBS --model_topo.process_topology.dims="[$NG, 1]" --model_topo.parts=auto \
    --fp16.enabled=false --bf16.enabled=true --steps_per_print=100 --save_interval=0 --save_final=false > $OUT/log_${SEQ}_${MBS}.txt 2>&1
  echo "rc $?"; grep -E "error|Error|partition" $OUT/log_${SEQ}_${MBS}.txt | head -5
  cp /tmp/out_${SEQ}_${MBS}/metrics.jsonl $OUT/metrics_${SEQ}_${MBS}.jsonl 2>/dev/null && tail -2 $OUT/metrics_${SEQ}_${MBS}.jsonl
done; done
