#!/usr/bin/env bash
# Issue 7's measurement: mixtral-8x7b shape at reduced depth (2 blocks per stage) on the GPUs of the host with the
# shipped recipe (configs/ds_config_mixtral.yml: bf16, ZeRO-1 with the optimizer offloaded to CPU, Lion),
# seq 2048, micro-batch 1, 16 micro-batches per step. Peak GPU memory per stage -> /tmp/mixtral/run/rank_stats.
set -uo pipefail
mkdir -p /tmp/mixtral/model
LAYERS=$((2 * $(nvidia-smi -L | wc -l))) python - <<'PY'
import json, os
cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
       "intermediate_size": 14336, "num_hidden_layers": int(os.environ["LAYERS"]), "num_attention_heads": 32, "num_key_value_heads": 8,
       "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
       "rms_norm_eps": 1e-5, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
       "tie_word_embeddings": False, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
       "hidden_act": "silu", "output_router_logits": False, "router_jitter_noise": 0.0}
json.dump(cfg, open("/tmp/mixtral/model/config.json", "w"), indent=1)
PY
timeout ${MIXTRAL_TIMEOUT:-200} deepspeed --num_gpus $(nvidia-smi -L | wc -l) train_ds.py --config configs/ds_config_mixtral.yml \
  --model_path=/tmp/mixtral/model --from_scratch=true --synthetic_data=true --max_steps=3 --max_seq_len=2048 \
  --save_path=/tmp/mixtral/run --overwrite=true --save_final=false --train_batch_size=16 --train_micro_batch_size_per_gpu=1 \
  --model_topo.process_topology.dims="[$(nvidia-smi -L | wc -l), 1]" --model_topo.parts=auto > /tmp/mixtral/log.txt 2>&1
echo "mixtral rc $?"
grep -E "partition|error|Error" /tmp/mixtral/log.txt | head -5
cat /tmp/mixtral/run/rank_stats/*.json 2>/dev/null; echo
tail -3 /tmp/mixtral/run/metrics.jsonl 2>/dev/null | cut -c1-400
