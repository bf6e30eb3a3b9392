#!/usr/bin/env bash
# CPU quick start: convert a tiny llama, train it in 2 pipeline stages on 2 CPU processes, export it to
# HuggingFace format and ask it something. Runs in a few minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
rm -rf runs/tiny_llama_pp runs/tiny_llama_ckpt runs/tiny_llama_hf
python convert_model.py hg_to_pp --input-path examples/tiny_llama --save-path runs/tiny_llama_pp
python -m data.check --data examples/data/sample.json --tokenizer runs/tiny_llama_pp --max-seq-len 384
deepspeed --num_gpus 2 train_ds.py --config configs/tiny_llama_cpu.yml
python convert_model.py pp_to_hg --input-path runs/tiny_llama_ckpt/checkpoint_final --save-path runs/tiny_llama_hf
python -m utils.plot runs/tiny_llama_ckpt
python demo.py --model-path runs/tiny_llama_hf --instruct "Write a peom associated with rain." --max-new-tokens 40 --temperature 0
