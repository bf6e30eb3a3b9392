"""The standard workload (performance.md) as files and numbers: model config.json, trainer YAMLs, FLOPs.

Two presets: `llama7b` (hidden 4096, intermediate 11008, 32 layers, 32 heads MHA, vocab 32000, bf16,
global batch 64) for the GPU host, and `tiny` (a few hundred thousand parameters, fp32, global batch 4)
for the CPU smoke run that checks the harness.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-6, rope_theta=10000.0)


@dataclass
class Workload:
    name: str
    model: dict
    global_batch: int
    bf16: bool
    steps: int = 6
    warmup: int = 2
    lr: float = 1e-5
    extra: dict = field(default_factory=dict)
    fp16: bool = False  # fp16 with dynamic loss scaling instead of bf16 (the seed's A100 table)

    def to_json(self) -> dict:
        return asdict(self)


def llama7b_workload(global_batch: int = 64, steps: int = 6, warmup: int = 2, precision: str = "bf16") -> Workload:
    return Workload("llama-7b shape", dict(LLAMA_7B), global_batch, bf16=precision == "bf16", steps=steps,
                    warmup=warmup, fp16=precision == "fp16")


def tiny_workload(global_batch: int = 4, steps: int = 3, warmup: int = 2) -> Workload:
    return Workload("tiny llama (CPU smoke)", dict(TINY), global_batch, bf16=False, steps=steps, warmup=warmup,
                    lr=1e-3)


def hf_config(model: dict, max_seq: int) -> dict:
    """A transformers LlamaConfig dict (random init `from_scratch`, untied head)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": max(4096, max_seq), "initializer_range": 0.02, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "attention_bias": False, "mlp_bias": False,
            "use_cache": False, **model}


def write_model_dir(out_dir: str, model: dict, max_seq: int) -> str:
    """config.json only: the trainers need no tokenizer and no weights for `from_scratch` + `synthetic_data`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(model, max_seq), f, indent=2)
    return out_dir


def params_no_embed(model: dict) -> int:
    """N of performance.md: all parameters except the input embedding (blocks, final norm, LM head)."""
    h, inter, layers = model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"]
    head_dim = h // model["num_attention_heads"]
    q_dim, kv_dim = model["num_attention_heads"] * head_dim, model["num_key_value_heads"] * head_dim
    block = h * q_dim * 2 + h * kv_dim * 2 + 3 * h * inter + 2 * h
    return layers * block + h + h * model["vocab_size"]


def flops_per_token(model: dict, seq: int) -> float:
    """6N + 12·L·h·s (attention counted causal-unaware, as performance.md does)."""
    return 6.0 * params_no_embed(model) + 12.0 * model["num_hidden_layers"] * model["hidden_size"] * seq


def trainer_config(trainer: str, work: Workload, model_dir: str, gpus: int, zero_stage: int = 3,
                   dims: list[int] | None = None) -> dict:
    """The base YAML of one trainer; per-run keys (seq, micro-batch, backend, save_path) come as overrides.
    `dims` defaults to [gpus, 1] for the pipeline and [1, gpus] for ZeRO (stage `zero_stage`)."""
    dims = list(dims) if dims is not None else ([gpus, 1] if trainer == "pipeline" else [1, gpus])
    cfg = {
        "model_path": model_dir, "from_scratch": True, "save_path": "unset", "synthetic_data": True,
        "max_seq_len": 512, "max_steps": work.steps, "n_epoches": 1, "num_workers": 1, "seed": 42,
        "save_final": False,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": dims}, "parts": "auto"},
        "train_batch_size": work.global_batch, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 1000000,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": work.lr, "weight_decay": 0.0, "torch_adam": True},
                      "no_wd_kws": ["norm", "bias"]},
    }
    if work.bf16:
        cfg["bf16"] = {"enabled": True}
    elif work.fp16:
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    if trainer == "zero":
        cfg["zero_optimization"] = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    return cfg


def per_rank_batch(trainer: str, global_batch: int, gpus: int) -> int:
    """Samples per optimizer step on one data-parallel replica: the largest micro-batch possible."""
    return global_batch if trainer == "pipeline" else global_batch // gpus


def micro_batch_candidates(trainer: str, global_batch: int, gpus: int, max_mbs: int) -> list[int]:
    """1, 2, 4, ... up to `max_mbs`, keeping those that divide the per-replica batch."""
    limit = min(max_mbs, per_rank_batch(trainer, global_batch, gpus))
    out, m = [], 1
    while m <= limit:
        if per_rank_batch(trainer, global_batch, gpus) % m == 0:
            out.append(m)
        m *= 2
    return out
