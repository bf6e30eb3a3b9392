"""One YAML file holds DeepSpeed's own keys (passed through) and ours; both are validated here.

`load_config(path, overrides)` returns a `TrainConfig`: `.ours` (our keys, defaults filled in) and
`.ds` (the dict handed to `deepspeed.initialize`). Every user mistake raises `ConfigError` whose
message names the dotted key and what is accepted, so scripts can print one line and exit.
"""
from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A mistake in the user's YAML or command-line overrides."""


# Our keys: dotted name -> (accepted types, default, help). `REQUIRED` marks keys without default.
REQUIRED = object()
_NUM = (int, float)
OUR_KEYS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "model_path": ((str,), REQUIRED, "directory of a converted pipeline model (hg_to_pp) or, with from_scratch, any dir with config.json + tokenizer"),
    "from_scratch": ((bool,), False, "random init from model_path/config.json instead of loading weights"),
    "save_path": ((str,), REQUIRED, "output directory for checkpoints and metrics.jsonl"),
    "data_path": ((str,), None, "training file (.json or .jsonl); required unless synthetic_data is set"),
    "synthetic_data": ((bool,), False, "random full-length samples (benchmarks); ignores data_path"),
    "n_epoches": ((int,), 1, "passes over the data"),
    "max_steps": ((int,), 0, "stop after this many optimizer steps (0 = no limit)"),
    "max_seq_len": ((int,), REQUIRED, "samples are truncated to / padded to this many tokens"),
    "pad_to_multiple_of": ((int,), 64, "pad each micro-batch to its longest sample rounded up to this (0: always max_seq_len)"),
    "use_grad_ckpt": ((bool,), False, "activation checkpointing in every block"),
    "use_flash_attn": ((bool,), False, "flash-attn kernels (needs the flash-attn package) instead of PyTorch SDPA"),
    "packing": ((bool,), False, "pack several samples into each max_seq_len row (positions restart per sample, attention stays inside it); batch sizes then count rows"),
    "fused_head_loss": ((bool,), True, "pipeline: LM head + cross entropy chunk by chunk, so the [tokens, vocab] logits never exist whole"),
    "compile_blocks": ((bool, str), "auto", "pipeline: torch.compile each block (fuses norms, RoPE, activations; bloom: ALiBi through FlexAttention); the first step compiles; auto = on when training on CUDA GPUs"),
    "moe_grouped_gemm": ((bool,), True, "mixtral: all experts of a block as one grouped GEMM (no host sync) instead of a loop over experts"),
    "profile_step": ((int,), 0, "profile this optimizer step with torch.profiler: save_path/profile/rank{R}.{txt,json} (0 = off)"),
    "synthetic_min_len": ((int,), 0, "synthetic_data: sample lengths uniform in [synthetic_min_len, synthetic_max_len] (0 = all full length)"),
    "synthetic_max_len": ((int,), 0, "synthetic_data with synthetic_min_len: longest sample (0 = max_seq_len)"),
    "aux_max_z_loss.weight": (_NUM, 0.0, "weight of mean(max_logit^2) added to the loss"),
    "optimizer.no_wd_kws": ((list,), ["bias", "norm", "layernorm"], "regexes: parameter names matching one get no weight decay"),
    "model_topo.process_topology.axes": ((list,), ["pipe", "data"], "must be [pipe, data]"),
    "model_topo.process_topology.dims": ((list,), None, "[pipeline stages, data-parallel replicas]; product = world size; required by train_ds.py, ignored by train_ds_zero.py"),
    "model_topo.parts": ((list, str), "auto", "layers per stage summing to L+2, or 'auto'"),
    "save_interval": ((int,), 0, "checkpoint every N steps (0 = only the final one)"),
    "save_final": ((bool,), True, "write checkpoint_final at the end (benchmarks turn it off)"),
    "keep_last_n": ((int,), 2, "periodic checkpoints kept (the newest complete one is never pruned)"),
    "max_bad_steps": ((int,), 5, "consecutive NaN/Inf steps tolerated before stopping (bf16/fp32)"),
    "resume": ((bool,), False, "continue from the newest complete checkpoint in save_path"),
    "seed": ((int,), 42, "seed for init, shuffling and dropout"),
    "trust_remote_code": ((bool,), False, "allow the tokenizer's remote code"),
    "num_workers": ((int,), 1, "DataLoader workers that tokenize"),
}

# DeepSpeed's top-level keys we pass through untouched (DeepSpeed validates their insides).
DS_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
    "optimizer", "scheduler", "fp16", "bf16", "amp", "zero_optimization", "gradient_clipping",
    "prescale_gradients", "gradient_predivide_factor", "wall_clock_breakdown", "memory_breakdown",
    "dump_state", "tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler", "activation_checkpointing",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "communication_data_type",
    "seq_parallel_communication_data_type", "pipeline", "checkpoint", "data_types", "sparse_gradients",
    "dataloader_drop_last", "disable_allgather", "load_universal_checkpoint", "timers", "torch_autocast",
    "use_node_local_storage", "aio", "elasticity", "autotuning", "compression_training", "data_efficiency",
    "curriculum_learning", "eigenvalue", "progressive_layer_drop", "sparse_attention", "weight_quantization",
    "hybrid_engine", "nebula", "zero_quantized_weights", "zero_hpz_partition_size", "zero_quantized_gradients",
    "graph_harvesting", "compile",
}
_OUR_SECTIONS = {k.split(".")[0] for k in OUR_KEYS if "." in k} - DS_KEYS


@dataclass
class TrainConfig:
    ours: dict[str, Any]
    ds: dict[str, Any]
    path: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, dotted: str) -> Any:
        return self.ours[dotted]

    @property
    def dims(self) -> tuple[int, int]:
        """`[pipe, data]` of the pipeline trainer, which reads it first thing (`train_ds.check_world`); the
        key is optional for train_ds.py's ZeRO peer, so a config without it fails here, naming the key."""
        dims = self.ours["model_topo.process_topology.dims"]
        if dims is None:
            raise ConfigError(f"{self.path or '<config>'}: missing required key 'model_topo.process_topology.dims' "
                              f"([pipeline stages, data-parallel replicas], product = world size): train_ds.py "
                              f"needs it (train_ds_zero.py does not)")
        pipe, data = dims
        return pipe, data


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in _OUR_SECTIONS | {"model_topo.process_topology", "aux_max_z_loss", "model_topo"}:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join({int: "integer", float: "number", bool: "true/false", str: "string", list: "list"}[t]
                       for t in types)


def _check_type(key: str, value: Any, types: tuple[type, ...]) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(types)}, got {type(value).__name__} {value!r}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--a.b=value` command-line overrides -> {"a.b": yaml-parsed value}."""
    out = {}
    for item in items:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"command line: cannot parse {item!r}; overrides look like --key.sub=value")
        key, _, text = item[2:].partition("=")
        out[key] = yaml.safe_load(text)
    return out


def _apply_override(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    raw = copy.deepcopy(raw)
    for k, v in (overrides or {}).items():
        _apply_override(raw, k, v)
    return validate(raw, path)


def validate(raw: dict, path: str = "<config>") -> TrainConfig:
    ds: dict[str, Any] = {}
    ours: dict[str, Any] = {}
    optimizer = raw.get("optimizer")
    for key, value in _flatten(raw).items():
        if key in OUR_KEYS:
            ours[key] = value
        elif key.split(".")[0] in DS_KEYS:
            ds[key] = value
        else:
            raise ConfigError(f"{path}: unknown key '{key}'{_suggest(key, set(OUR_KEYS) | DS_KEYS)}")
    if isinstance(optimizer, dict) and "no_wd_kws" in optimizer:
        ours["optimizer.no_wd_kws"] = optimizer["no_wd_kws"]
        ds["optimizer"] = {k: v for k, v in optimizer.items() if k != "no_wd_kws"}
    for key, (types, default, _help) in OUR_KEYS.items():
        if key not in ours:
            if default is REQUIRED:
                raise ConfigError(f"{path}: missing required key '{key}' ({_help})")
            ours[key] = copy.deepcopy(default)
        elif ours[key] is not None or default is not None:
            _check_type(key, ours[key], types)
    _check_values(ours, ds, path)
    return TrainConfig(ours=ours, ds=ds, path=path, raw=raw)


def _check_values(ours: dict, ds: dict, path: str) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{path}: {msg}")

    axes = ours["model_topo.process_topology.axes"]
    need(axes == ["pipe", "data"], f"model_topo.process_topology.axes: expected [pipe, data], got {axes}")
    dims = ours["model_topo.process_topology.dims"]  # None (not set): only train_ds.py needs it, see TrainConfig.dims
    if dims is not None:
        need(len(dims) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims),
             f"model_topo.process_topology.dims: expected two positive integers [pipe, data], got {dims}")
    parts = ours["model_topo.parts"]
    if isinstance(parts, str):
        need(parts == "auto", f"model_topo.parts: expected a list of layer counts or 'auto', got {parts!r}")
    else:
        if dims is not None:
            need(len(parts) == dims[0],
                 f"model_topo.parts: {len(parts)} entries but {dims[0]} pipeline stages (dims[0])")
        need(all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in parts),
             f"model_topo.parts: every stage needs a positive integer layer count, got {parts}")
    need(ours["compile_blocks"] in (True, False, "auto"),
         f"compile_blocks: expected true, false or auto, got {ours['compile_blocks']!r}")
    for key in ("max_seq_len", "n_epoches"):
        need(ours[key] >= 1, f"{key}: must be >= 1, got {ours[key]}")
    for key in ("save_interval", "max_steps", "num_workers", "keep_last_n", "max_bad_steps", "pad_to_multiple_of",
                "profile_step", "synthetic_min_len", "synthetic_max_len"):
        need(ours[key] >= 0, f"{key}: must be >= 0, got {ours[key]}")
    need(ours["keep_last_n"] >= 1, f"keep_last_n: must be >= 1, got {ours['keep_last_n']}")
    need(ours["synthetic_data"] or bool(ours["data_path"]), "missing required key 'data_path' (the training file)")
    for kw in ours["optimizer.no_wd_kws"]:
        need(isinstance(kw, str), f"optimizer.no_wd_kws: expected a list of regex strings, got {kw!r}")
    need("train_batch_size" in ds or "train_micro_batch_size_per_gpu" in ds,
         "missing train_batch_size (global batch, samples) and/or train_micro_batch_size_per_gpu")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds:
            need(isinstance(ds[key], int) and not isinstance(ds[key], bool) and ds[key] >= 1,
                 f"{key}: expected a positive integer, got {ds[key]!r}")


def check_parts_sum(parts: list[int], num_layers: int) -> None:
    """`parts` count logical layers: embedding + L blocks + head = L + 2."""
    if sum(parts) != num_layers:
        raise ConfigError(f"model_topo.parts: {parts} sums to {sum(parts)}, but the model has "
                          f"{num_layers} pipeline layers (embedding + {num_layers - 2} blocks + head)")


def resolve_batch(ds: dict, data_parallel: int) -> tuple[int, int, int]:
    """Fill train_batch_size / micro batch / gradient accumulation consistently, or explain why not.

    Returns (train_batch_size, micro_batch, grad_accum) and writes all three into `ds`.
    """
    tbs = ds.get("train_batch_size")
    mbs = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    if tbs is None:
        tbs = mbs * (gas or 1) * data_parallel
    if mbs is None:
        gas = gas or 1
        if tbs % (gas * data_parallel):
            raise ConfigError(f"train_batch_size: {tbs} is not divisible by gradient_accumulation_steps x "
                              f"data-parallel size = {gas} x {data_parallel}")
        mbs = tbs // (gas * data_parallel)
    if gas is None:
        if tbs % (mbs * data_parallel):
            raise ConfigError(f"train_batch_size: {tbs} is not divisible by train_micro_batch_size_per_gpu x "
                              f"data-parallel size = {mbs} x {data_parallel}; accepted: multiples of "
                              f"{mbs * data_parallel}")
        gas = tbs // (mbs * data_parallel)
    if tbs != mbs * gas * data_parallel:
        raise ConfigError(f"train_batch_size: {tbs} != train_micro_batch_size_per_gpu ({mbs}) x "
                          f"gradient_accumulation_steps ({gas}) x data-parallel size ({data_parallel})")
    ds.update(train_batch_size=tbs, train_micro_batch_size_per_gpu=mbs, gradient_accumulation_steps=gas)
    return tbs, mbs, gas
