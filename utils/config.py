"""One YAML file holds DeepSpeed's own keys (passed through) and ours; both are validated here.

`load_config(path, overrides)` returns a frozen `TrainConfig`: our keys in typed sections (`cfg.model.path`,
`cfg.data.max_seq_len`, `cfg.lora.r`, ...: `SECTIONS`), `cfg.precision`, and `.ds` (DeepSpeed's keys, from which
`training.plan` builds the dict handed to `deepspeed.initialize`). Every user mistake raises `ConfigError` whose
message names the config file, the dotted key and what is accepted, so scripts can print one line and
exit. DeepSpeed's keys are checked here too (`check_deepspeed`), before any model is built: optimizer and
scheduler params against the constructors DeepSpeed would call, its pydantic sections strictly, then
DeepSpeed's own `DeepSpeedConfig`. `preflight` adds what one trainer's run needs (optimizer, writable
save_path).
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from enum import Enum
from types import MappingProxyType
from typing import Any, Mapping, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A mistake in the user's YAML or command-line overrides."""


# Our keys, grouped into typed, frozen sections (`TrainConfig.model`, `.data`, ...). Each field names its dotted
# YAML key, the types accepted, its default (`REQUIRED`: none) and its help; `OUR_KEYS` (dotted key -> (types,
# default, help)) is derived from them and drives `validate`.
REQUIRED = object()
_NUM = (int, float)


def _key(dotted: str, types: tuple[type, ...], default: Any, help: str):
    """A section field: read from YAML key `dotted`, of one of `types`, `default` when absent; `help` is its doc."""
    return field(metadata={"key": dotted, "types": types, "default": default, "help": help})


@dataclass(frozen=True)
class ModelSection:
    """The model: where it is read from and how its layers run."""
    path: str = _key("model_path", (str,), REQUIRED, "train_ds.py: a converted pipeline model dir (hg_to_pp); train_ds_zero.py: an HF model dir; with from_scratch either: any dir with config.json + tokenizer")
    from_scratch: bool = _key("from_scratch", (bool,), False, "random init from model_path/config.json instead of loading weights")
    trust_remote_code: bool = _key("trust_remote_code", (bool,), False, "allow the tokenizer's remote code")
    use_grad_ckpt: bool = _key("use_grad_ckpt", (bool,), False, "activation checkpointing in every block")
    use_flash_attn: bool = _key("use_flash_attn", (bool,), False, "flash-attn kernels (needs the flash-attn package) instead of PyTorch SDPA")
    fused_head_loss: bool = _key("fused_head_loss", (bool,), True, "pipeline: LM head + cross entropy chunk by chunk, so the [tokens, vocab] logits never exist whole")
    compile_blocks: bool | str = _key("compile_blocks", (bool, str), "auto", "pipeline: torch.compile each block (fuses norms, RoPE, activations; ALiBi through FlexAttention); the first step compiles; auto = on when training on CUDA GPUs")
    moe_grouped_gemm: bool = _key("moe_grouped_gemm", (bool,), True, "mixture-of-experts families: all experts of a block as one grouped GEMM (no host sync) instead of a loop over experts")
    moe_bias_update_rate: float = _key("moe_bias_update_rate", _NUM, 0.0, "sigmoid-routed MoE (DeepSeek-V3 architecture): auxiliary-loss-free balancing, e_score_correction_bias += rate * sign(mean load - expert load) after each step (0 = the biases stay frozen; DeepSeek-V3 pretrained with 0.001)")
    z_loss_weight: float = _key("aux_max_z_loss.weight", _NUM, 0.0, "weight of mean(max_logit^2) added to the loss")


@dataclass(frozen=True)
class CheckpointSection:
    """Where checkpoints go, how often, and how a run continues or replaces an earlier one."""
    save_path: str = _key("save_path", (str,), REQUIRED, "output directory for checkpoints and metrics.jsonl")
    save_interval: int = _key("save_interval", (int,), 0, "checkpoint every N steps (0 = only the final one)")
    save_final: bool = _key("save_final", (bool,), True, "write checkpoint_final at the end (benchmarks turn it off)")
    keep_last_n: int = _key("keep_last_n", (int,), 2, "periodic checkpoints kept (the newest complete one is never pruned)")
    resume: bool = _key("resume", (bool,), False, "continue from the newest complete checkpoint in save_path")
    overwrite: bool = _key("overwrite", (bool,), False, "resume: false into a save_path that holds another run's checkpoints or metrics: move them into save_path/replaced-<time>/ and start again (without it such a run is refused)")
    resume_allow_changes: bool = _key("resume_allow_changes", (bool,), False, "resume: true although the data files, tokenizer, seed or batch geometry differ from the checkpoint's run fingerprint (one warning naming the change; without it the resume is refused)")


@dataclass(frozen=True)
class DataSection:
    """The training samples and how they become rows."""
    path: str | list[str] | None = _key("data_path", (str, list), None, "training file (.json, .jsonl or .parquet) or a list of them (concatenated in order); required unless synthetic_data is set")
    synthetic_data: bool = _key("synthetic_data", (bool,), False, "random full-length samples (benchmarks); ignores data_path")
    synthetic_min_len: int = _key("synthetic_min_len", (int,), 0, "synthetic_data: sample lengths uniform in [synthetic_min_len, synthetic_max_len] (0 = all full length)")
    synthetic_max_len: int = _key("synthetic_max_len", (int,), 0, "synthetic_data with synthetic_min_len: longest sample (0 = max_seq_len)")
    max_seq_len: int = _key("max_seq_len", (int,), REQUIRED, "samples are truncated to / padded to this many tokens")
    template: str = _key("template", (str,), "builtin", "builtin: the seed's prompt templates; chat: the tokenizer's own chat_template (loss on assistant turns)")
    pad_to_multiple_of: int = _key("pad_to_multiple_of", (int,), 64, "pad each micro-batch to its longest sample rounded up to this (0: always max_seq_len)")
    packing: bool = _key("packing", (bool,), False, "pack several samples into each max_seq_len row (positions restart per sample, attention stays inside it); batch sizes then count rows")
    num_workers: int = _key("num_workers", (int,), 1, "DataLoader workers that tokenize")


@dataclass(frozen=True)
class EvalSection:
    """The held-out set and when its loss is computed."""
    data_path: str | list[str] | None = _key("eval_data_path", (str, list), None, "held-out file(s), same formats as data_path: eval loss every eval_interval steps and at the end")
    ratio: float = _key("eval_ratio", _NUM, 0.0, "share of data_path's samples held out for the eval loss (chosen with seed, never trained on); in [0, 1), 0 = none")
    interval: int = _key("eval_interval", (int,), 0, "evaluate every N steps (0 = only at the end); needs eval_data_path or eval_ratio")


@dataclass(frozen=True)
class ScheduleSection:
    """How long the run lasts, its seed, and what stops or profiles it."""
    n_epoches: int = _key("n_epoches", (int,), 1, "passes over the data")
    max_steps: int = _key("max_steps", (int,), 0, "stop after this many optimizer steps (0 = no limit)")
    seed: int = _key("seed", (int,), 42, "seed for init, shuffling and dropout")
    max_bad_steps: int = _key("max_bad_steps", (int,), 5, "consecutive NaN/Inf steps tolerated before stopping (bf16/fp32)")
    profile_step: int = _key("profile_step", (int,), 0, "profile this optimizer step with torch.profiler: save_path/profile/rank{R}.{txt,json} (0 = off)")


@dataclass(frozen=True)
class TopologySection:
    """The pipeline's process grid and its partition of the layers."""
    axes: list[str] = _key("model_topo.process_topology.axes", (list,), ["pipe", "data"], "must be [pipe, data]")
    dims: list[int] | None = _key("model_topo.process_topology.dims", (list,), None, "[pipeline stages, data-parallel replicas]; product = world size; required by train_ds.py, ignored by train_ds_zero.py")
    parts: list[int] | str = _key("model_topo.parts", (list, str), "auto", "layers per stage summing to L+2, or 'auto'")


@dataclass(frozen=True)
class OptimizerSection:
    """Ours beside DeepSpeed's `optimizer:` keys (which stay in `TrainConfig.ds`)."""
    no_wd_kws: list[str] = _key("optimizer.no_wd_kws", (list,), ["bias", "norm", "layernorm"], "regexes: parameter names matching one get no weight decay")


@dataclass(frozen=True)
class LoraSection:
    """Low-rank adapters on frozen base weights (the `lora:` section; absent: full fine-tuning)."""
    r: int | None = _key("lora.r", (int,), None, "LoRA rank; setting any lora key trains low-rank adapters on frozen base weights (absent: full fine-tuning)")
    alpha: float | None = _key("lora.alpha", _NUM, None, "LoRA scaling numerator: updates are scaled by alpha / r (default: r)")
    dropout: float = _key("lora.dropout", _NUM, 0.0, "dropout on the adapters' input, in [0, 1)")
    target_modules: list[str] | None = _key("lora.target_modules", (list,), None, "names of the linear layers that get adapters, as in the family's HF model (e.g. q_proj, v_proj)")
    modules_to_save: list[str] = _key("lora.modules_to_save", (list,), [], "names of modules trained in full next to the adapters (e.g. embed_tokens, lm_head)")
    quantize: str | None = _key("lora.quantize", (str,), None, "nf4: hold the frozen base linears of the blocks in 4-bit NF4 (QLoRA, torchao's NF4Tensor; train_ds.py); absent: the training dtype")

    @property
    def enabled(self) -> bool:
        return bool(self.r)


@dataclass(frozen=True)
class Fp8Section:
    """FP8 training of the blocks' linears (the `fp8:` section; absent: off)."""
    recipe: str | None = _key("fp8.recipe", (str,), None, "FP8 training of the blocks' linear layers with torchao's Float8: tensorwise, rowwise or rowwise_with_gw_hp (absent: off); needs compute capability >= 8.9 unless fp8.emulate")
    emulate: bool = _key("fp8.emulate", (bool,), False, "run torchao's FP8 emulation (FP8 casts, high-precision matmuls) instead of FP8 kernels: any device, for tests")

    @property
    def enabled(self) -> bool:
        return self.recipe is not None


# TrainConfig attribute -> section class, in the order their keys are checked and listed.
SECTIONS: dict[str, type] = {"model": ModelSection, "checkpoint": CheckpointSection, "data": DataSection,
                             "eval": EvalSection, "schedule": ScheduleSection, "topology": TopologySection,
                             "optimizer": OptimizerSection, "lora": LoraSection, "fp8": Fp8Section}
OUR_KEYS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    f.metadata["key"]: (f.metadata["types"], f.metadata["default"], f.metadata["help"])
    for section in SECTIONS.values() for f in fields(section)}


def _section(cls: type, ours: Mapping[str, Any]):
    return cls(**{f.name: ours[f.metadata["key"]] for f in fields(cls)})


def precision_of(ds: Mapping[str, Any]) -> str:
    """The run's precision, decided here only: 'bf16' or 'fp16' when that DeepSpeed section is enabled, else 'fp32'."""
    def enabled(section) -> bool:
        return isinstance(section, dict) and section.get("enabled") in (True, "true", "True", 1)

    if enabled(ds.get("bf16")):
        return "bf16"
    return "fp16" if enabled(ds.get("fp16")) else "fp32"

# DeepSpeed's top-level keys, passed to DeepSpeed as given (numeric strings of optimizer/scheduler params
# become numbers); their insides are checked by check_deepspeed.
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


@dataclass(frozen=True)
class TrainConfig:
    """The validated config, built once (`validate`) and never changed: the typed sections the code reads
    (`cfg.model`, `cfg.data`, ...), `ours` (read-only, every key of OUR_KEYS with its default filled in, also
    readable as `cfg["dotted.key"]`) and `ds`, DeepSpeed's keys as the user wrote them; a run hands DeepSpeed a
    new dict built from it (training.plan.plan), never this one."""
    ours: Mapping[str, Any]
    ds: Mapping[str, Any]
    path: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)
    # The typed sections of `ours` (SECTIONS), filled in from it: what the trainers read.
    model: ModelSection = field(init=False)
    checkpoint: CheckpointSection = field(init=False)
    data: DataSection = field(init=False)
    eval: EvalSection = field(init=False)
    schedule: ScheduleSection = field(init=False)
    topology: TopologySection = field(init=False)
    optimizer: OptimizerSection = field(init=False)
    lora: LoraSection = field(init=False)
    fp8: Fp8Section = field(init=False)
    precision: str = field(init=False)  # 'bf16', 'fp16' or 'fp32' (precision_of the DeepSpeed keys)

    def __post_init__(self):
        object.__setattr__(self, "ours", MappingProxyType(dict(self.ours)))
        for name, cls in SECTIONS.items():
            object.__setattr__(self, name, _section(cls, self.ours))
        object.__setattr__(self, "precision", precision_of(self.ds))

    def __getitem__(self, dotted: str) -> Any:
        return self.ours[dotted]

    @property
    def dims(self) -> tuple[int, int]:
        """`[pipe, data]` of the pipeline trainer, which reads it first thing (`PipelineTrainer.check`); the
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


def _check_type(key: str, value: Any, types: tuple[type, ...], path: str) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{path}: {key}: expected {_type_name(types)}, got {type(value).__name__} {value!r}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--a.b=value` command-line overrides -> {"a.b": yaml-parsed value}."""
    out = {}
    for item in items:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"command line: cannot parse {item!r}; overrides look like --key.sub=value")
        key, _, text = item[2:].partition("=")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = (getattr(e, "problem", None) or str(e).splitlines()[0]).strip()
            raise ConfigError(f"command line: --{key}: cannot read {text!r} as a YAML value ({problem}); quote "
                              f"text values, e.g. --{key}='\"{text}\"'") from None
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
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); give the YAML config") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
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
        elif key in _OUR_SECTIONS and value is None:
            continue  # `lora: null` (or `--lora=null`): the section's defaults
        elif key in _OUR_SECTIONS:
            raise ConfigError(f"{path}: {key}: expected a mapping of keys, got {type(value).__name__} {value!r}")
        elif key.split(".")[0] in DS_KEYS:
            ds[key] = copy.deepcopy(value)  # numeric strings get coerced below; the caller's dict stays as given
        else:
            raise ConfigError(f"{path}: unknown key '{key}'{_suggest(key, set(OUR_KEYS) | DS_KEYS)}")
    if isinstance(optimizer, dict) and "no_wd_kws" in optimizer:
        ours["optimizer.no_wd_kws"] = optimizer["no_wd_kws"]
        ds["optimizer"] = {k: copy.deepcopy(v) for k, v in optimizer.items() if k != "no_wd_kws"}
    given = set(ours) | {s for s in _OUR_SECTIONS if isinstance(raw.get(s), dict)}  # keys and sections written
    for key, (types, default, _help) in OUR_KEYS.items():
        if key not in ours:
            if default is REQUIRED:
                raise ConfigError(f"{path}: missing required key '{key}' ({_help})")
            ours[key] = copy.deepcopy(default)
        elif ours[key] is not None or default is not None:
            _check_type(key, ours[key], types, path)
    _check_values(ours, ds, path, given)
    check_deepspeed(ds, path)
    return TrainConfig(ours=ours, ds=ds, path=path, raw=raw)


def _check_values(ours: dict, ds: dict, path: str, given: set | None = None) -> None:
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
    need(ours["template"] in ("builtin", "chat"), f"template: expected builtin or chat, got {ours['template']!r}")
    need(ours["compile_blocks"] in (True, False, "auto"),
         f"compile_blocks: expected true, false or auto, got {ours['compile_blocks']!r}")
    need(ours["max_seq_len"] >= 2, f"max_seq_len: must be >= 2 (a token and the eos), got {ours['max_seq_len']}")
    need(ours["n_epoches"] >= 1, f"n_epoches: must be >= 1, got {ours['n_epoches']}")
    for key in ("save_interval", "max_steps", "num_workers", "keep_last_n", "max_bad_steps", "pad_to_multiple_of",
                "profile_step", "synthetic_min_len", "synthetic_max_len"):
        need(ours[key] >= 0, f"{key}: must be >= 0, got {ours[key]}")
    need(ours["keep_last_n"] >= 1, f"keep_last_n: must be >= 1, got {ours['keep_last_n']}")
    need(ours["synthetic_data"] or bool(ours["data_path"]), "missing required key 'data_path' (the training file)")
    need(not isinstance(ours["data_path"], list) or all(isinstance(p, str) and p for p in ours["data_path"]),
         f"data_path: expected a file path or a list of file paths, got {ours['data_path']!r}")
    _check_eval(ours, need)
    _check_lora(ours, need, given)
    _check_fp8(ours, need, given)
    for i, kw in enumerate(ours["optimizer.no_wd_kws"]):
        need(isinstance(kw, str), f"optimizer.no_wd_kws: expected a list of regex strings, got {kw!r}")
        try:
            re.compile(kw)
        except re.error as e:
            need(False, f"optimizer.no_wd_kws[{i}]: {kw!r} is not a valid regex ({e})")
    need(0 <= ours["seed"] < 2**32, f"seed: must be in [0, 2**32) (it seeds torch, numpy and the sample order), "
                                   f"got {ours['seed']}")
    need("train_batch_size" in ds or "train_micro_batch_size_per_gpu" in ds,
         "missing train_batch_size (global batch, samples) and/or train_micro_batch_size_per_gpu")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds:
            need(isinstance(ds[key], int) and not isinstance(ds[key], bool) and ds[key] >= 1,
                 f"{key}: expected a positive integer, got {ds[key]!r}")


def _check_lora(ours: dict, need, written: set | None = None) -> None:
    """The `lora:` section: r and target_modules when the section or any lora key is written (even at its
    default: `lora: {dropout: 0.0}` must not train the full model), their ranges; targets and modules_to_save
    disjoint; quantize refused."""
    written = written if written is not None else set()
    given = sorted(k for k in OUR_KEYS if k.startswith("lora.") and (ours[k] != OUR_KEYS[k][1] or k in written))
    if not given and "lora" not in written:
        return
    given = given or ["lora: {}"]
    quantize = ours["lora.quantize"]
    need(quantize in (None, "nf4"), f"lora.quantize: expected nf4 (4-bit base weights, QLoRA) or no key, got "
                                    f"{quantize!r}")
    need(ours["lora.r"] is not None, f"lora: missing required key 'lora.r' (the adapter rank, e.g. 16); "
                                     f"set with {', '.join(given)}")
    need(ours["lora.r"] >= 1, f"lora.r: must be an integer >= 1, got {ours['lora.r']!r}")
    alpha = ours["lora.alpha"]
    need(alpha is None or (math.isfinite(alpha) and alpha > 0), f"lora.alpha: must be > 0, got {alpha!r}")
    need(0 <= ours["lora.dropout"] < 1, f"lora.dropout: must be in [0, 1), got {ours['lora.dropout']!r}")
    targets = ours["lora.target_modules"]
    need(bool(targets) and all(isinstance(t, str) and t for t in targets),
         f"lora.target_modules: expected a non-empty list of module names (e.g. [q_proj, v_proj]), got {targets!r}")
    saved = ours["lora.modules_to_save"]
    need(all(isinstance(t, str) and t for t in saved),
         f"lora.modules_to_save: expected a list of module names, got {saved!r}")
    both = sorted(set(targets) & set(saved))
    need(not both, f"lora.target_modules and lora.modules_to_save both name {', '.join(both)}; a module either gets "
                   f"adapters (target_modules) or is trained in full (modules_to_save), not both")
    need(not ours["from_scratch"], "lora: needs pretrained base weights (they stay frozen); from_scratch: true "
                                   "would train adapters on a random model: remove one of them")


def _check_fp8(ours: dict, need, written: set) -> None:
    """The `fp8:` section: written (even `fp8: {}`) means on, and then `recipe` is required; the recipe is one of
    torchao's three."""
    recipes = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
    written_keys = [k for k in ("fp8.recipe", "fp8.emulate") if k in written]
    if not written_keys and "fp8" not in written:
        return
    recipe = ours["fp8.recipe"]
    need(recipe is not None, f"fp8: missing required key 'fp8.recipe' ({', '.join(recipes)}); set with "
                             f"{', '.join(written_keys) or 'fp8: {}'} (remove the fp8 section to train without FP8)")
    need(recipe in recipes, f"fp8.recipe: expected one of {', '.join(recipes)}, got {recipe!r}")


def _check_eval(ours: dict, need) -> None:
    """eval_data_path or eval_ratio (not both), on real data; eval_interval only with one of them."""
    ratio, path = ours["eval_ratio"], ours["eval_data_path"]
    need(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1,
         f"eval_ratio: must be in [0, 1) (the share of data_path held out), got {ratio!r}")
    need(not (path and ratio), "eval_data_path and eval_ratio: both set; give one eval set (a file, or a share "
                               "of data_path held out)")
    if path is not None:
        paths = [path] if isinstance(path, str) else path
        need(bool(paths) and all(isinstance(p, str) and p for p in paths),
             f"eval_data_path: expected a path or a list of paths, got {path!r}")
    need(not ((path or ratio) and ours["synthetic_data"]),
         "eval_data_path, eval_ratio: evaluate real data only; synthetic_data has no held-out set")
    need(ours["eval_interval"] >= 0, f"eval_interval: must be >= 0, got {ours['eval_interval']}")
    need(not ours["eval_interval"] or bool(path or ratio),
         f"eval_interval: {ours['eval_interval']} but no eval set; set eval_data_path or eval_ratio")


# ----------------------------------------------------------------------------------------------
# DeepSpeed's keys, checked against what DeepSpeed and torch accept, before any model is built: the optimizer's
# and scheduler's params against the signatures of the classes DeepSpeed would construct, the sections DeepSpeed
# models with pydantic against those models (strictly: pydantic would read `enabled: "false"` as false while our
# trainers read the raw dict), then DeepSpeed's own `DeepSpeedConfig` on the dict as the last word.

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(params: dict, key: str, where: str, path: str, allow_list: bool = False) -> None:
    """`params[key]` must be a finite number (a list of them with `allow_list`: per parameter group).
    A numeric string is replaced by its float: PyYAML reads `3e-4` (no dot) as the string '3e-4'."""
    def coerce(value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None
        return value if _is_number(value) and math.isfinite(value) else None

    value = params[key]
    if allow_list and isinstance(value, list) and value:
        coerced = [coerce(v) for v in value]
        if all(v is not None for v in coerced):
            params[key] = coerced
            return
    elif coerce(value) is not None:
        params[key] = coerce(value)
        return
    raise ConfigError(f"{path}: {where}: expected a number{' (or a list of numbers)' if allow_list else ''}, "
                      f"got {type(value).__name__} {value!r}")


# natural bounds of optimizer and scheduler params: name -> (check, what it must be)
_BOUNDS: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: v > 0, "> 0"),
    "muon_lr": (lambda v: v > 0, "> 0"),
    "adam_lr": (lambda v: v > 0, "> 0"),
    "eps": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: v >= 0, ">= 0"),
    "betas": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_num_steps": (lambda v: v >= 1, ">= 1"),
    "total_num_steps": (lambda v: v >= 1, ">= 1"),
    "warmup_min_lr": (lambda v: v >= 0, ">= 0"),
    "warmup_max_lr": (lambda v: v > 0, "> 0"),
    "warmup_min_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "cos_min_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "last_batch_iteration": (lambda v: v >= -1, ">= -1"),
    "cycle_min_lr": (lambda v: v >= 0, ">= 0"),
    "cycle_max_lr": (lambda v: v > 0, "> 0"),
    "lr_range_test_min_lr": (lambda v: v > 0, "> 0"),
}
_CHOICES = {"warmup_type": ("log", "linear")}  # DeepSpeed falls back to 'log' on anything else, with a warning


def _check_bounds(params: dict, section: str, path: str) -> None:
    for key, value in params.items():
        where = f"{section}.params.{key}"
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{path}: {where}: expected one of {', '.join(_CHOICES[key])}, got {value!r}")
        if key not in _BOUNDS:
            continue
        check, text = _BOUNDS[key]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if _is_number(v) and not check(v):
                raise ConfigError(f"{path}: {where}: must be {text}, got {value!r}")


def _check_param_type(params: dict, key: str, param: inspect.Parameter | None, where: str, path: str,
                      allow_list: bool) -> None:
    """Check `params[key]` against the annotation (plain float/int/bool/str) or else the default of `param`."""
    value = params[key]
    if param is None:
        return
    plain = {bool: bool, int: int, float: float, str: str, "bool": bool, "int": int, "float": float, "str": str}
    annotation = plain.get(param.annotation) if isinstance(param.annotation, (type, str)) else None
    default = param.default
    if annotation is bool or (annotation is None and isinstance(default, bool)):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {where}: expected true/false, got {type(value).__name__} {value!r}")
    elif annotation is int or (annotation is None and _is_int(default) and key not in _FLOAT_KEYS):
        if not _is_int(value):
            raise ConfigError(f"{path}: {where}: expected an integer, got {type(value).__name__} {value!r}")
    elif annotation is float or (annotation is None and _is_number(default)) or key in _FLOAT_KEYS:
        _number(params, key, where, path, allow_list)
    elif annotation is str or (annotation is None and isinstance(default, str)):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {where}: expected a string, got {type(value).__name__} {value!r}")
    elif isinstance(default, tuple) and all(_is_number(d) for d in default):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"{path}: {where}: expected a list of {len(default)} numbers, got {value!r}")
        items = dict(enumerate(value))
        for i in items:
            _number(items, i, f"{where}[{i}]", path)
        params[key] = [items[i] for i in range(len(value))]


# params whose defaults are integers (weight_decay=0) but which take any number
_FLOAT_KEYS = {"lr", "weight_decay", "eps", "momentum", "dampening", "warmup_min_lr", "warmup_max_lr",
               "decay_lr_rate", "cycle_min_lr", "cycle_max_lr", "cycle_min_mom", "cycle_max_mom", "decay_mom_rate",
               "max_coeff", "min_coeff", "lr_decay", "initial_accumulator_value", "alpha", "rho", "lambd"}


def _signature_params(classes: list, drop: set[str]) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword params of the constructors of `classes` (less the first: the parameters or the optimizer, and
    less `drop`), and whether one of them takes **kwargs."""
    accepted: dict[str, inspect.Parameter] = {}
    var_kw = False
    for cls in classes:
        for name, prm in list(inspect.signature(cls).parameters.items())[1:]:  # skip params/optimizer
            if prm.kind is inspect.Parameter.VAR_KEYWORD:
                var_kw = True
            elif prm.kind is not inspect.Parameter.VAR_POSITIONAL and name not in drop:
                accepted.setdefault(name, prm)
    return accepted, var_kw


def _offloads_optimizer(ds: dict) -> bool:
    zero = ds.get("zero_optimization")
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")


_DS_OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "lamb": "Lamb", "lion": "Lion", "adagrad": "Adagrad",
                       "muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD", "muon": "Muon"}
# keys DeepSpeed pops from optimizer.params before building the Adam classes (engine.get_optimizer_configuration)
_ADAM_EXTRA = {"torch_adam": False, "adam_w_mode": True, "fp32_optimizer_states": True}


def _optimizer_classes(name: str, params: dict, ds: dict, path: str) -> tuple[list, dict[str, Any], set[str]]:
    """(classes DeepSpeed 0.19.8's engine would construct for `optimizer.type`, extra keys it pops with their
    defaults, keys it passes itself), following `DeepSpeedEngine._configure_basic_optimizer`."""
    import torch

    lower = name.lower()
    offload = _offloads_optimizer(ds)
    if lower in ("adam", "adamw"):
        if params.get("torch_adam") is True:
            adamw = lower == "adamw" or params.get("adam_w_mode", True)
            return [torch.optim.AdamW if adamw else torch.optim.Adam], _ADAM_EXTRA, set()
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return [DeepSpeedCPUAdam], _ADAM_EXTRA, {"adamw_mode"}
        from deepspeed.ops.adam import FusedAdam
        return [FusedAdam], _ADAM_EXTRA, set()
    if lower == "lamb":
        from deepspeed.ops.lamb import FusedLamb
        return [FusedLamb], {}, {"max_grad_norm"}
    if lower == "lion":
        from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion
        return [DeepSpeedCPULion if offload else FusedLion], {}, set()
    if lower == "adagrad":
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
        return [DeepSpeedCPUAdagrad if offload else torch.optim.Adagrad], {}, set()
    if lower in ("muadam", "muadamw", "musgd"):
        try:
            import mup
        except ImportError:
            raise ConfigError(f"{path}: optimizer.type: {name} needs the mup package (pip install mup)") from None
        return [getattr(mup, _DS_OPTIMIZER_NAMES[lower])], {}, set()
    if lower == "muon":
        return [], {}, set()  # Muon splits its params between its two halves itself: names are not checked
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        known = list(_DS_OPTIMIZER_NAMES.values()) + [
            n for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer]
        close = [k for k in known if k.lower() == lower] or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{path}: optimizer.type: unknown optimizer {name!r}{hint}; DeepSpeed takes "
                          f"{', '.join(_DS_OPTIMIZER_NAMES.values())} or a torch.optim class name")
    return [cls], {}, set()


def _check_optimizer(ds: dict, path: str) -> None:
    opt = ds.get("optimizer")
    if opt is None:
        return
    _need_mapping(opt, "optimizer", path)
    for key in opt:
        if key not in ("type", "params", "legacy_fusion"):
            raise ConfigError(f"{path}: optimizer.{key}: unknown key{_suggest(key, ['type', 'params', 'no_wd_kws'])}"
                              f"; the optimizer takes type, params and our no_wd_kws")
    name = opt.get("type")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: optimizer.type: missing or not a string (e.g. AdamW, Lion), got {name!r}")
    params = opt.setdefault("params", {})
    _need_mapping(params, "optimizer.params", path)
    if "max_grad_norm" in params:
        raise ConfigError(f"{path}: optimizer.params.max_grad_norm: not taken by DeepSpeed; set the top-level "
                          f"gradient_clipping instead")
    classes, extra, passed = _optimizer_classes(name, params, ds, path)
    accepted, var_kw = _signature_params(classes, passed)
    extra_params = {k: inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=d) for k, d in extra.items()}
    accepted = {**accepted, **extra_params}
    label = "/".join(c.__name__ for c in classes)
    for key in list(params):
        where = f"optimizer.params.{key}"
        if classes and not var_kw and key not in accepted:
            raise ConfigError(f"{path}: {where}: unknown parameter of {name} ({label}){_suggest(key, accepted)}; "
                              f"accepted: {', '.join(accepted)}")
        _check_param_type(params, key, accepted.get(key), where, path, allow_list=False)
    for key, prm in accepted.items():
        if prm.default is inspect.Parameter.empty and key not in params:
            raise ConfigError(f"{path}: optimizer.params.{key}: missing (required by {label})")
    _check_bounds(params, "optimizer", path)


def _scheduler_class(name: Any, path: str):
    import torch
    from deepspeed.runtime import lr_schedules

    if name in lr_schedules.VALID_LR_SCHEDULES:
        return getattr(lr_schedules, name)
    base = getattr(torch.optim.lr_scheduler, "LRScheduler", None) or torch.optim.lr_scheduler._LRScheduler
    cls = getattr(torch.optim.lr_scheduler, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, base) and cls is not base:
        return cls
    known = list(lr_schedules.VALID_LR_SCHEDULES) + [
        n for n, c in vars(torch.optim.lr_scheduler).items() if isinstance(c, type) and issubclass(c, base)
        and c is not base and not n.startswith("_")]
    hint = _suggest(name, known) if isinstance(name, str) else ""
    raise ConfigError(f"{path}: scheduler.type: unknown scheduler {name!r}{hint}; DeepSpeed takes "
                      f"{', '.join(lr_schedules.VALID_LR_SCHEDULES)} or a torch.optim.lr_scheduler class name")


def _check_scheduler(ds: dict, path: str) -> None:
    sched = ds.get("scheduler")
    if sched is None:
        return
    _need_mapping(sched, "scheduler", path)
    for key in sched:
        if key not in ("type", "params"):
            raise ConfigError(f"{path}: scheduler.{key}: unknown key{_suggest(key, ['type', 'params'])}; "
                              f"the scheduler takes type and params")
    cls = _scheduler_class(sched.get("type"), path)
    params = sched.setdefault("params", {})
    _need_mapping(params, "scheduler.params", path)
    accepted, var_kw = _signature_params([cls], set())
    auto_total = cls.__name__ in ("WarmupDecayLR", "WarmupCosineLR")  # training.setup.fill_scheduler_steps fills it
    ours = cls.__module__.startswith("deepspeed")
    for key in list(params):
        where = f"scheduler.params.{key}"
        if not var_kw and key not in accepted:
            raise ConfigError(f"{path}: {where}: unknown parameter of {cls.__name__}{_suggest(key, accepted)}; "
                              f"accepted: {', '.join(accepted)}")
        if key == "total_num_steps" and auto_total and params[key] == "auto":
            continue
        # DeepSpeed's schedulers take a list (one value per parameter group) wherever they take a float
        _check_param_type(params, key, accepted.get(key), where, path, allow_list=ours)
    for key, prm in accepted.items():
        if prm.default is inspect.Parameter.empty and key not in params and not (key == "total_num_steps" and auto_total):
            raise ConfigError(f"{path}: scheduler.params.{key}: missing (required by {cls.__name__})")
    _check_bounds({k: v for k, v in params.items() if v != "auto"}, "scheduler", path)
    low, high = params.get("warmup_min_lr"), params.get("warmup_max_lr")
    if _is_number(low) and _is_number(high) and low > high:
        raise ConfigError(f"{path}: scheduler.params.warmup_min_lr: {low} is above warmup_max_lr {high}")


def _need_mapping(value: Any, where: str, path: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where}: expected a mapping of keys, got {type(value).__name__} {value!r}")


# DeepSpeed's top-level keys that hold a mapping
_DS_SECTIONS = {"optimizer", "scheduler", "fp16", "bf16", "amp", "zero_optimization", "tensorboard", "csv_monitor",
                "wandb", "comet", "flops_profiler", "activation_checkpointing", "pipeline", "checkpoint", "data_types",
                "aio", "elasticity", "autotuning", "compression_training", "data_efficiency", "curriculum_learning",
                "eigenvalue", "progressive_layer_drop", "sparse_attention", "weight_quantization", "hybrid_engine",
                "nebula", "compile", "timers", "torch_autocast"}
# DeepSpeed's top-level scalars: key -> (kind, check or None, what it must be)
_DS_SCALARS: dict[str, tuple[str, Any, str]] = {
    "gradient_clipping": ("number", lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "steps_per_print": ("integer", lambda v: v >= 1, ">= 1"),
    "gradient_predivide_factor": ("number", lambda v: v > 0, "> 0"),
    "prescale_gradients": ("bool", None, ""),
    "wall_clock_breakdown": ("bool", None, ""),
    "memory_breakdown": ("bool", None, ""),
    "dump_state": ("bool", None, ""),
    "sparse_gradients": ("bool", None, ""),
    "dataloader_drop_last": ("bool", None, ""),
    "disable_allgather": ("bool", None, ""),
    "zero_allow_untested_optimizer": ("bool", None, ""),
    "zero_force_ds_cpu_optimizer": ("bool", None, ""),
    "communication_data_type": ("choice", ("fp16", "bf16", "fp32"), ""),
    "seq_parallel_communication_data_type": ("choice", ("fp16", "bf16", "fp32"), ""),
}


# top-level spellings DeepSpeed ignores: it reads these keys inside a section
_DS_MISPLACED = {"zero_quantized_weights": "zero_optimization.zero_quantized_weights",
                 "zero_quantized_gradients": "zero_optimization.zero_quantized_gradients",
                 "zero_hpz_partition_size": "zero_optimization.zero_hpz_partition_size",
                 "load_universal_checkpoint": "checkpoint.load_universal",
                 "use_node_local_storage": "checkpoint.use_node_local_storage"}


def _check_ds_scalars(ds: dict, path: str) -> None:
    for key in _DS_MISPLACED.keys() & set(ds):
        raise ConfigError(f"{path}: {key}: DeepSpeed reads it as {_DS_MISPLACED[key]}; at the top level it "
                          f"would be ignored")
    for key in _DS_SECTIONS & set(ds):
        _need_mapping(ds[key], key, path)
    for key, (kind, check, text) in _DS_SCALARS.items():
        if key not in ds:
            continue
        value = ds[key]
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{path}: {key}: expected true/false, got {type(value).__name__} {value!r}")
        if kind == "choice" and value not in check:
            raise ConfigError(f"{path}: {key}: expected one of {', '.join(check)}, got {value!r}")
        if kind == "integer" and not _is_int(value):
            raise ConfigError(f"{path}: {key}: expected an integer, got {type(value).__name__} {value!r}")
        if kind == "number":
            _number(ds, key, key, path)
        if kind in ("integer", "number") and not check(ds[key]):
            raise ConfigError(f"{path}: {key}: must be {text}, got {ds[key]!r}")
    enabled = [k for k in ("fp16", "bf16") if isinstance(ds.get(k), dict) and ds[k].get("enabled") is True]
    if len(enabled) == 2:
        raise ConfigError(f"{path}: fp16.enabled, bf16.enabled: both true; enable one of them (bf16 on GPUs that "
                          f"have it), or neither for fp32")


def _pydantic_models() -> dict[str, Any]:
    """DeepSpeed's pydantic model per top-level section (absent in other DeepSpeed versions: skipped)."""
    found = {}
    for key, module, name in (("zero_optimization", "deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
                              ("fp16", "deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
                              ("bf16", "deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
                              ("tensorboard", "deepspeed.monitor.config", "TensorBoardConfig"),
                              ("csv_monitor", "deepspeed.monitor.config", "CSVConfig"),
                              ("wandb", "deepspeed.monitor.config", "WandbConfig"),
                              ("comet", "deepspeed.monitor.config", "CometConfig"),
                              ("compile", "deepspeed.compile.config", "CompileConfig"),
                              ("hybrid_engine", "deepspeed.runtime.config", "HybridEngineConfig")):
        try:
            found[key] = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            pass
    return found


def _whole_number(value: Any) -> int | None:
    """5e8, 5.0e8 or '5e8' (PyYAML's reading of 5e8) -> 500000000; anything else -> None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _model_field_type(annotation: Any) -> Any:
    """`Optional[X]` -> X; other unions and generics -> None (not checked here)."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 and isinstance(args[0], type) else None
    return annotation if isinstance(annotation, type) else None


def _check_model_section(model: Any, data: dict, where: str, path: str) -> None:
    """Keys of `data` against the pydantic `model`'s fields (names and aliases): unknown keys with a suggestion,
    and bool/int/float/enum fields strictly (pydantic's lax mode takes "yes" for true and "1" for 1)."""
    from pydantic import BaseModel

    fields = {}
    for name, info in model.model_fields.items():
        fields[name] = info
        if info.alias:
            fields[info.alias] = info
    for key, value in data.items():
        dotted = f"{where}.{key}"
        if key not in fields:
            if model.model_config.get("extra") == "forbid":
                raise ConfigError(f"{path}: {dotted}: unknown key{_suggest(key, fields)}")
            continue
        kind = _model_field_type(fields[key].annotation)
        if value is None or kind is None:
            continue
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{path}: {dotted}: expected true/false, got {type(value).__name__} {value!r}")
        if kind is int and not _is_int(value):  # DeepSpeed's docs write sizes as 5e8: whole floats are taken
            whole = _whole_number(value)
            if whole is None:
                raise ConfigError(f"{path}: {dotted}: expected an integer, got {type(value).__name__} {value!r}")
            data[key] = whole
        if kind is float and not _is_number(value):
            _number(data, key, dotted, path)
        if issubclass(kind, Enum):
            values = [e.value for e in kind]
            if all(isinstance(v, (str, int)) for v in values) and not any(
                    v == value and type(v) is type(value) for v in values):
                raise ConfigError(f"{path}: {dotted}: expected one of {', '.join(map(str, dict.fromkeys(values)))}, "
                                  f"got {value!r}")
        if issubclass(kind, BaseModel) and isinstance(value, dict):
            _check_model_section(kind, value, dotted, path)


# natural bounds DeepSpeed's models leave open
_DS_NESTED_BOUNDS = {
    "fp16.initial_scale_power": (lambda v: v >= 0, ">= 0"),
    "fp16.loss_scale_window": (lambda v: v >= 1, ">= 1"),
    "fp16.hysteresis": (lambda v: v >= 1, ">= 1"),
    "fp16.min_loss_scale": (lambda v: v > 0, "> 0"),
}


def _run_deepspeed_config(ds: dict, path: str) -> None:
    """DeepSpeed's own `DeepSpeedConfig` (no engine, no process group) on a copy whose batch keys are those
    of one process (ours were checked above and are resolved for the real world size later)."""
    import logging

    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    probe = {k: v for k, v in copy.deepcopy(ds).items()
             if k not in ("train_batch_size", "gradient_accumulation_steps")}
    probe["train_micro_batch_size_per_gpu"] = 1
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        prefix = {"DeepSpeedZeroConfig": "zero_optimization.", "DeepSpeedFP16Config": "fp16.",
                  "DeepSpeedBF16Config": "bf16.", "CompileConfig": "compile.",
                  "HybridEngineConfig": "hybrid_engine."}.get(err.title, "")
        where = prefix + ".".join(str(p) for p in first["loc"])
        got = "" if first["type"] == "missing" or isinstance(first.get("input"), dict) else f", got {first['input']!r}"
        msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        raise ConfigError(f"{path}: {where}: {msg}{got}") from None
    except Exception as err:  # noqa: BLE001 - DeepSpeed's asserts, ValueErrors, TypeErrors on odd values
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{path}: DeepSpeed rejects the config: {text}") from None
    finally:
        logger.setLevel(level)


def check_deepspeed(ds: dict, path: str = "<config>") -> None:
    """DeepSpeed's keys of a config (after `validate` split them off): raises ConfigError naming the key."""
    _check_ds_scalars(ds, path)
    for key, model in _pydantic_models().items():
        if isinstance(ds.get(key), dict):
            _check_model_section(model, ds[key], key, path)
    for dotted, (check, text) in _DS_NESTED_BOUNDS.items():
        section, key = dotted.split(".")
        value = ds.get(section, {}).get(key)
        if _is_number(value) and not check(value):
            raise ConfigError(f"{path}: {dotted}: must be {text}, got {value!r}")
    _check_optimizer(ds, path)
    _check_scheduler(ds, path)
    _run_deepspeed_config(ds, path)


# ----------------------------------------------------------------------------------------------
# Checks of one trainer's run, before any model is built (training.setup.plan_run)


def check_save_path(save_path: str) -> None:
    """`save_path` is a directory we can write, or can be created: probed with a temp file in it (or in its
    nearest existing parent) that is removed at once; nothing is created otherwise."""
    target = os.path.abspath(save_path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"save_path: {save_path} exists and is not a directory")
    probe = target
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"save_path: cannot create {save_path}: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        reason = err.strerror or str(err)
        where = "" if probe == target else f" (its nearest existing parent {probe} is not writable)"
        raise ConfigError(f"save_path: cannot write to {save_path}{where}: {reason}") from None


def preflight(cfg: TrainConfig, trainer: str) -> None:
    """What a run of `trainer` ('pipeline' or 'zero') needs beyond `validate`: an optimizer, a ZeRO stage the
    pipeline engine takes, a writable save_path."""
    path = cfg.path or "<config>"
    if not isinstance(cfg.ds.get("optimizer"), dict):
        raise ConfigError(f"{path}: missing required key 'optimizer' (e.g. optimizer: {{type: AdamW, params: "
                          f"{{lr: 2.0e-5}}}}); without it DeepSpeed builds no optimizer and nothing trains")
    if trainer == "pipeline":
        stage = (cfg.ds.get("zero_optimization") or {}).get("stage", 0)
        if _is_int(stage) and stage >= 2:
            raise ConfigError(f"{path}: zero_optimization.stage: {stage}: DeepSpeed's pipeline engine takes ZeRO "
                              f"stage 0 or 1 (train_ds_zero.py runs stages 2 and 3)")
    check_save_path(cfg["save_path"])


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
