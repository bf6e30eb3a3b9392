"""Data-parallel training of a whole HF causal LM under DeepSpeed ZeRO (stage 3 by default).

    deepspeed train_ds_zero.py --config configs/ds_config_zero.yml [--key.sub=value ...]

The peer of train_ds.py: the same YAML keys (utils.config), the same data order and per-token loss
normalisation (utils.train_data), the same metrics.jsonl rows, tqdm bar, checkpoints with COMPLETE
markers and resume. Differences: `model_path` is an HF directory (or any dir with config.json and a
tokenizer when `from_scratch`), every rank is a data-parallel replica (`model_topo` is optional and
ignored), and `save_path/checkpoint_final` also holds an HF export (safetensors + tokenizer) next to
DeepSpeed's files. Attention is PyTorch SDPA, or eager where transformers' class has no SDPA path (BLOOM).
TFLOP/s counts FLOPs as train_ds.py does for the model types it knows (MoE: active experts only).

The model is built under `deepspeed.zero.Init` (through transformers' DeepSpeed integration), so a 7B
model never materialises on one rank. ZeRO++ (`zero_quantized_weights`, `zero_hpz_partition_size`,
`zero_quantized_gradients`) and offload keys inside `zero_optimization` are passed to DeepSpeed as given.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from train_ds import (build_dataset, check_resume_files, fill_scheduler_steps, init_distributed, load_tokenizer,
                      param_groups, run_cli, summer)
from utils.config import ConfigError, TrainConfig, resolve_batch
from utils.guard import BadStepCounter
from utils.metrics import family_flops_per_token, log, write_rank_stats

TRAINER = "zero"
HF_WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                      "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------------------------
# Checks made before any process group exists


def zero_stage(ds: dict) -> int:
    """Default `zero_optimization.stage` to 3 and return it."""
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization: expected a mapping, got {zero!r}")
    return int(zero.setdefault("stage", 3))


# Switches of our pipeline layers, noted when set explicitly to true (compile_blocks' default "auto" is silent).
# Pipeline switches that default on (fused_head_loss, moe_grouped_gemm) are ignored here without a note.
PIPELINE_ONLY_KEYS = ("compile_blocks",)


def note_ignored_topology(cfg: TrainConfig, world: int, rank: int) -> None:
    if rank != 0:
        return
    dims = cfg["model_topo.process_topology.dims"]  # optional here
    if dims is not None and list(dims) != [1, world]:
        log(f"model_topo.process_topology.dims {list(dims)} ignored: ZeRO runs all {world} ranks as "
            f"data-parallel replicas (dims [1, {world}])", rank)
    ignored = [k for k in PIPELINE_ONLY_KEYS if cfg[k] is True]
    if ignored:
        log(f"{', '.join(ignored)}: apply to train_ds.py's pipeline layers only; ignored for the HF model here",
            rank)


def has_hf_weights(model_dir: str) -> bool:
    return any(glob.glob(os.path.join(model_dir, pat)) for pat in HF_WEIGHT_PATTERNS)


def read_model_config(cfg: TrainConfig, resuming: bool) -> dict:
    """config.json of `model_path` as a dict; refuses a pipeline dir without HF weights."""
    path = os.path.join(cfg["model_path"], "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"model_path: no config.json in {cfg['model_path']}")
    with open(path) as f:
        hf_cfg = json.load(f)
    if not (cfg["from_scratch"] or resuming or has_hf_weights(cfg["model_path"])):
        hint = (" (it looks like a pipeline dir: convert it with convert_model.py pp_to_hg)"
                if glob.glob(os.path.join(cfg["model_path"], "layer_*-model_states.pt")) else "")
        raise ConfigError(f"model_path: {cfg['model_path']} holds no HF weights (model.safetensors or "
                          f"pytorch_model.bin){hint}; or set from_scratch: true")
    return hf_cfg


# transformers' ValueError when a class has no SDPA path (PreTrainedModel._sdpa_can_dispatch)
SDPA_UNSUPPORTED = ("does not support an attention implementation through "
                    "torch.nn.functional.scaled_dot_product_attention")


def causal_lm_class(cfg: TrainConfig, hf_cfg: dict):
    """transformers' built-in class that `AutoModelForCausalLM` builds for this config.json, or None when
    that is only known while building (remote code, or a model_type transformers lacks: build_model says)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg["trust_remote_code"] and "AutoModelForCausalLM" in (hf_cfg.get("auto_map") or {}):
        return None
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_cfg.get("model_type"))
    return getattr(transformers, name, None) if name else None


def sdpa_fallback_note(class_name: str) -> str:
    import transformers

    return (f"attention: {class_name} has no SDPA support in transformers {transformers.__version__}; "
            f"using eager attention")


def choose_attention(cfg: TrainConfig, model_cls=None) -> tuple[str, str | None]:
    """(attn_implementation, note to log or None): flash-attn when asked (or a ConfigError saying why not),
    else SDPA, or eager with a note when `model_cls` (see causal_lm_class) has no SDPA path, e.g. BLOOM."""
    import transformers

    if cfg["use_flash_attn"]:
        if model_cls is not None and not (getattr(model_cls, "_supports_flash_attn", False)
                                          or getattr(model_cls, "_supports_flash_attn_2", False)):
            raise ConfigError(f"use_flash_attn: {model_cls.__name__} has no flash-attention support in "
                              f"transformers {transformers.__version__}; set use_flash_attn: false")
        from models.common import flash_attn_available

        if not flash_attn_available():
            raise ConfigError("use_flash_attn: true but flash-attn is not installed")
        return "flash_attention_2", None
    if model_cls is not None and not getattr(model_cls, "_supports_sdpa", False):
        return "eager", sdpa_fallback_note(model_cls.__name__)
    return "sdpa", None


def model_dtype(ds: dict) -> torch.dtype:
    if (ds.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def resume_tag(cfg: TrainConfig) -> str | None:
    """The checkpoint `resume: true` loads: the newest complete one whose files match its manifest (a
    warning for each damaged newer one, utils.checkpoint.resume_tag); every rank alike, before any
    process group."""
    from utils import checkpoint as ckpt

    return ckpt.resume_tag(cfg["save_path"]) if cfg["resume"] else None


# ----------------------------------------------------------------------------------------------
# Model under zero.Init


class _ZeroConfigRef:
    """What transformers reads from `HfDeepSpeedConfig` (`.config`, `.is_zero3()`), for hosts without
    `accelerate`, which transformers' own class needs; registered the same way (a weak reference)."""

    def __init__(self, ds: dict):
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        self.config = ds
        set_hf_deepspeed_config(self)

    def is_zero3(self) -> bool:
        return int(self.config.get("zero_optimization", {}).get("stage", 0)) == 3


def hf_deepspeed_config(ds: dict):
    """Tell transformers about the DeepSpeed config so `from_pretrained`/`from_config` partition the
    model while building it (ZeRO-3). Keep the returned object alive until the model is built."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(ds)
    return _ZeroConfigRef(ds)


def init_device(ds: dict) -> torch.device:
    """Where random init runs: this rank's GPU below ZeRO-3 (on the CPU, HF's init of a 7B-width model took
    minutes on the benchmark host: bloom's did not finish in 180 s); ZeRO-3 partitions while building."""
    if zero_stage(ds) >= 3 or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def build_model(cfg: TrainConfig, ds: dict, from_weights: bool, attn: str = "sdpa"):
    """The HF model, partitioned at construction under ZeRO-3; weights from `model_path` if `from_weights`,
    else HF's random init (seeded by `seed`). `attn` comes from choose_attention; a class only known while
    building (remote code) that refuses SDPA is built with eager attention instead, with a note."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(attn_impl: str):
        kwargs = dict(attn_implementation=attn_impl, dtype=model_dtype(ds),
                      trust_remote_code=cfg["trust_remote_code"])
        torch.manual_seed(cfg["seed"])
        if from_weights:
            return AutoModelForCausalLM.from_pretrained(cfg["model_path"], **kwargs)
        hf_config = AutoConfig.from_pretrained(cfg["model_path"], trust_remote_code=cfg["trust_remote_code"])
        with init_device(ds):
            return AutoModelForCausalLM.from_config(hf_config, **kwargs)

    keep_alive = hf_deepspeed_config(ds)
    try:
        try:
            model = build(attn)
        except ValueError as e:
            if attn != "sdpa" or SDPA_UNSUPPORTED not in str(e):
                raise
            class_name = str(e).split(" does not support", 1)[0]
            if int(os.environ.get("RANK", "0")) == 0:
                log(sdpa_fallback_note(class_name))
            model = build("eager")
    except (OSError, ValueError) as e:
        key = "use_flash_attn" if attn.startswith("flash") and "Flash Attention" in str(e) else "model_path"
        raise ConfigError(f"{key}: cannot build a causal LM from {cfg['model_path']}: {e}") from None
    del keep_alive
    if cfg["use_grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_params(model) -> int:
    """All parameters (ZeRO-3 partitioned ones by their full size), shared ones once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += int(getattr(p, "ds_numel", p.numel()))
    return total


def registered_family(hf_cfg: dict):
    """(family, args) when our registry (models.get_family) knows config.json's model_type, else None."""
    import models

    try:
        family = models.get_family(hf_cfg.get("model_type"))
        return family, family.read_config(hf_cfg)
    except models.ModelError:
        return None


def model_flops_per_token(model, hf_cfg: dict, seq_len: int) -> float:
    """Training FLOPs per token for TFLOP/s. A model_type of our registry: train_ds.py's count
    (utils.metrics.family_flops_per_token: MoE counts the router and top-k experts only); any other
    (e.g. transformers' `glm`): param_flops_per_token."""
    known = registered_family(hf_cfg)
    if known is not None:
        return family_flops_per_token(*known, seq_len)
    return param_flops_per_token(model, hf_cfg, seq_len)


def param_flops_per_token(model, hf_cfg: dict, seq_len: int) -> float:
    """6N + 12·L·h·s with N = all parameters except the input embedding (a tied head still counts; MoE:
    every expert, so it overcounts by the idle experts)."""
    from utils.metrics import flops_per_token

    hidden = int(hf_cfg.get("hidden_size", 0))
    embed = int(hf_cfg["vocab_size"]) * hidden
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    n_no_embed = count_params(model) - (0 if tied else embed)
    return flops_per_token(n_no_embed, int(hf_cfg.get("num_hidden_layers", 0)), hidden, seq_len)


# ----------------------------------------------------------------------------------------------
# One optimizer step


def micro_batch_loss(engine, loss_fn, batch, device) -> torch.Tensor:
    """Forward one micro-batch from PipeFeeder, `((ids, pos), (labels, scale))`, and return its scaled loss."""
    (ids, pos), labels = batch
    out = engine(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False)
    return loss_fn(out.logits, labels)


def train_step(engine, feeder, loss_fn, gas: int, device) -> torch.Tensor:
    """`gas` forward/backward passes and one optimizer step; returns this rank's mean micro-batch loss.

    Each micro-batch loss carries `scale = gas * dp * n_i / N`; DeepSpeed divides by `gas` in backward and
    averages gradients over the replicas, so the gradient is that of `sum(CE) / N` over the global batch.
    """
    total = torch.zeros((), dtype=torch.float32, device=device)
    for _ in range(gas):
        loss = micro_batch_loss(engine, loss_fn, next(feeder), device)
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return total / gas


def mean_over_ranks(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def grad_norm_of(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


# ----------------------------------------------------------------------------------------------
# Checkpoints and the HF export


def gather_state_dict(module: torch.nn.Module) -> dict | None:
    """Full weights on rank 0 (CPU), gathered one module at a time; None on other ranks. Every rank must
    call it. Parameters that ZeRO does not partition (stages 0-2) are read as they are."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank()
    state: dict | None = {} if rank == 0 else None
    first_key: dict[int, str] = {}

    def visit(mod: torch.nn.Module, prefix: str) -> None:
        with deepspeed.zero.GatheredParameters(list(mod.parameters(recurse=False)), modifier_rank=None):
            if state is not None:
                for name, prm in mod.named_parameters(recurse=False):
                    key = first_key.setdefault(id(prm), prefix + name)
                    state[prefix + name] = state[key] if key != prefix + name else prm.detach().cpu().clone()
                for name, buf in mod.named_buffers(recurse=False):
                    if buf is not None and name not in mod._non_persistent_buffers_set:
                        state[prefix + name] = buf.detach().cpu().clone()
        for name, child in mod.named_children():
            visit(child, prefix + name + ".")

    visit(module, "")
    return state


def export_hf(module, tokenizer, out_dir: str) -> None:
    """All ranks: gather; rank 0: `save_pretrained` (safetensors shards) + tokenizer (if any) into `out_dir`."""
    import torch.distributed as dist

    state = gather_state_dict(module)
    if dist.get_rank() == 0:
        module.save_pretrained(out_dir, state_dict=state, max_shard_size="5GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


def check_resume_info(info: dict, tag: str, world: int) -> None:
    if info.get("trainer") != TRAINER or info.get("dims") != [1, world]:
        raise ConfigError(f"resume: checkpoint {tag} was written by trainer {info.get('trainer', 'pipeline')!r} "
                          f"with dims {info.get('dims')}; this ZeRO run has dims [1, {world}]: resume with the "
                          f"same trainer and number of ranks")


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    return run_cli(train, argv)


@dataclass
class RunPlan:
    """Everything decided before the first collective: batch split, data, steps, resume point."""
    world: int
    stage: int
    tbs: int
    mbs: int
    gas: int
    hf_cfg: dict
    tokenizer: Any
    dataset: Any
    steps_per_epoch: int
    total_steps: int
    resume_tag: str | None
    attn: str = "sdpa"  # attn_implementation (choose_attention)
    attn_note: str | None = None  # why it is not the one asked for


def plan_run(cfg: TrainConfig, world: int) -> RunPlan:
    """Check everything a user can get wrong before any process group exists."""
    from data import DataError
    from utils import checkpoint as ckpt
    from utils.config import preflight
    from utils.train_data import BatchPlan

    preflight(cfg, "zero")  # optimizer present, save_path writable
    if cfg["packing"]:
        raise ConfigError("packing: true is a train_ds.py (pipeline) feature: transformers' SDPA attention "
                          "ignores the document boundaries in position_ids, so packed samples would attend "
                          "to each other here")
    stage = zero_stage(cfg.ds)
    tbs, mbs, gas = resolve_batch(cfg.ds, world)
    tag = resume_tag(cfg)
    if tag is not None:
        check_resume_info(ckpt.read_info(cfg["save_path"], tag), tag, world)
        check_resume_files(cfg["save_path"], tag)
    hf_cfg = read_model_config(cfg, resuming=tag is not None)
    attn, attn_note = choose_attention(cfg, causal_lm_class(cfg, hf_cfg))
    tokenizer = None if cfg["synthetic_data"] else load_tokenizer(cfg)  # synthetic ids need no tokenizer
    try:
        dataset = build_dataset(cfg, tokenizer, hf_cfg["vocab_size"], tbs)
    except DataError as e:
        raise ConfigError(str(e)) from None
    steps_per_epoch = BatchPlan(len(dataset), tbs, mbs, gas, 0, world, cfg["seed"]).steps_per_epoch
    if steps_per_epoch < 1:
        raise ConfigError(f"train_batch_size: {tbs} is larger than the {len(dataset)} samples in "
                          f"{cfg['data_path']}; lower it or add data")
    total_steps = steps_per_epoch * cfg["n_epoches"]
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])
    fill_scheduler_steps(cfg.ds, total_steps)
    return RunPlan(world, stage, tbs, mbs, gas, hf_cfg, tokenizer, dataset, steps_per_epoch, total_steps, tag,
                   attn, attn_note)


def save_checkpoint(engine, cfg: TrainConfig, plan: RunPlan, tag: str, step: int, epoch: int,
                    export: bool = False) -> None:
    """DeepSpeed's files (+ the HF export), model files, then MANIFEST.json and the COMPLETE marker once
    every rank is done."""
    import torch.distributed as dist

    from utils import checkpoint as ckpt

    rank = dist.get_rank()
    os.makedirs(cfg["save_path"], exist_ok=True)
    if rank == 0:
        ckpt.invalidate(cfg["save_path"], tag)  # a tag written again is incomplete until marked again
    dist.barrier()
    engine.save_checkpoint(cfg["save_path"], tag=tag, save_latest=False, client_state={"step": step, "epoch": epoch})
    dist.barrier()
    tag_dir = os.path.join(cfg["save_path"], tag)
    if rank == 0:
        ckpt.copy_model_files(cfg["model_path"], tag_dir)
    if export:
        export_hf(engine.module, plan.tokenizer, tag_dir)
    dist.barrier()
    ckpt.write_manifest_shared(tag_dir)
    if rank == 0:
        ckpt.mark_complete(cfg["save_path"], tag, {"step": step, "epoch": epoch, "dims": [1, plan.world],
                                                    "samples": step * plan.tbs, "trainer": TRAINER,
                                                    "zero_stage": plan.stage})
        removed = ckpt.prune(cfg["save_path"], cfg["keep_last_n"])
        log(f"saved checkpoint {tag_dir} (step {step})" + (f", pruned {', '.join(removed)}" if removed else ""), rank)
    dist.barrier()


def build_engine(cfg: TrainConfig, plan: RunPlan):
    import deepspeed

    from utils import safe_load

    model = build_model(cfg, cfg.ds, from_weights=not cfg["from_scratch"] and plan.resume_tag is None,
                        attn=plan.attn)
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg.ds,
                                           model_parameters=param_groups(model, cfg["optimizer.no_wd_kws"]))
    safe_load.install(engine)  # checkpoint files are read with torch.load(weights_only=True)
    return engine


def restore(engine, cfg: TrainConfig, plan: RunPlan, rank: int) -> int:
    """Load the checkpoint plan_run chose (when resuming); returns the step to continue from. Every file
    is unpickled with weights_only=True (utils.safe_load), as in train_ds.py. Rank 0 (the one writing
    metrics.jsonl) drops the rows of later steps (a crashed run's), so each step has one row."""
    from utils import checkpoint as ckpt
    from utils import safe_load
    from utils.metrics import drop_rows_after

    if not cfg["resume"]:
        return 0
    step = 0
    if plan.resume_tag is None:
        log(f"resume: no complete checkpoint in {cfg['save_path']}, starting fresh", rank)
    else:
        safe_load.load_checkpoint(engine, cfg["save_path"], plan.resume_tag)
        step = int(ckpt.read_info(cfg["save_path"], plan.resume_tag)["step"])
        log(f"resumed from {cfg['save_path']}/{plan.resume_tag} at step {step}", rank)
    if rank == 0:
        drop_rows_after(os.path.join(cfg["save_path"], "metrics.jsonl"), step)
    return step


def make_feeder(cfg: TrainConfig, plan: RunPlan, rank: int, device):
    from data import pad_id_of
    from utils.train_data import BatchPlan, PipeFeeder

    pad_id = pad_id_of(plan.tokenizer) if plan.tokenizer is not None else 0
    batches = BatchPlan(len(plan.dataset), plan.tbs, plan.mbs, plan.gas, rank, plan.world, cfg["seed"])
    return PipeFeeder(plan.dataset, batches, pad_id, cfg["max_seq_len"], cfg["num_workers"],
                      sum_over_dp=summer(device) if plan.world > 1 else None,
                      pad_multiple=cfg["pad_to_multiple_of"])


def train(cfg: TrainConfig) -> int:
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from models.common import CausalLMLoss
    from utils import preempt
    from utils.metrics import MetricsWriter, peak_mem_gib, step_row

    plan = plan_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    device = init_distributed()
    rank = dist.get_rank()
    note_ignored_topology(cfg, plan.world, rank)
    if rank == 0 and plan.attn_note:
        log(plan.attn_note, rank)
    engine = build_engine(cfg, plan)
    loss_fn = CausalLMLoss(float(cfg["aux_max_z_loss.weight"]))
    fpt = model_flops_per_token(engine.module, plan.hf_cfg, cfg["max_seq_len"])
    if rank == 0:
        log(f"{plan.hf_cfg.get('model_type')}: {count_params(engine.module) / 1e6:.1f}M parameters, ZeRO stage "
            f"{plan.stage} over {plan.world} ranks, attention "
            f"{getattr(engine.module.config, '_attn_implementation', None) or plan.attn}, {model_dtype(cfg.ds)}", rank)
        log(f"{len(plan.dataset)} samples, {plan.steps_per_epoch} steps/epoch x {cfg['n_epoches']} epochs (global "
            f"batch {plan.tbs} = micro {plan.mbs} x accum {plan.gas} x dp {plan.world}); {plan.total_steps} steps",
            rank)
    step = restore(engine, cfg, plan, rank)
    feeder = make_feeder(cfg, plan, rank, device)
    bad_steps = BadStepCounter(cfg["max_bad_steps"])
    metrics = bar = None
    if rank == 0:
        from tqdm import tqdm
        metrics = MetricsWriter(os.path.join(cfg["save_path"], "metrics.jsonl"))
        bar = tqdm(total=plan.total_steps, initial=step, desc=f"[rank {rank}] train", dynamic_ncols=True,
                   file=sys.stderr)
    spe = plan.steps_per_epoch
    epoch = step // spe
    done = step >= plan.total_steps
    engine.train()
    while not done:
        feeder.start_epoch(epoch, step - epoch * spe)
        for _ in range(step - epoch * spe, spe):
            t0 = time.perf_counter()
            if step + 1 == cfg["profile_step"]:
                from utils.profile import profile_call
                loss_v = profile_call(lambda: mean_over_ranks(train_step(engine, feeder, loss_fn, plan.gas, device)),
                                      os.path.join(cfg["save_path"], "profile"), rank, device,
                                      {"stage": 0, "step": step + 1})
            else:
                loss_v = mean_over_ranks(train_step(engine, feeder, loss_fn, plan.gas, device))
            get_accelerator().synchronize()
            dt = time.perf_counter() - t0
            step += 1
            norm = grad_norm_of(engine)
            skipped = not engine.fp16_enabled() and bad_steps.update(step, norm)
            if skipped and rank == 0:
                log(f"step {step}: loss {loss_v}, gradient norm {norm}: optimizer step skipped", rank)
            if metrics is not None:
                row = step_row(step, epoch, loss_v, engine.get_lr()[0], norm, skipped, dt, feeder, plan.tbs,
                               plan.world, fpt / plan.world, peak_mem_gib(device))
                metrics.write(row)
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.2f}",
                                tps=f"{row['tokens_per_s']:.0f}", tflops=f"{row['tflops_per_gpu']:.1f}")
                bar.update(1)
            stop = preempt.agreed(device) if step < plan.total_steps else 0  # any rank signalled: all stop
            if step < plan.total_steps and (stop or cfg["save_interval"] and step % cfg["save_interval"] == 0):
                save_checkpoint(engine, cfg, plan, f"global_step{step}", step, epoch)
            if stop:
                if bar is not None:
                    bar.close()
                raise preempt.Stopped(stop, step, os.path.join(cfg["save_path"], f"global_step{step}"))
            if step >= plan.total_steps:
                done = True
                break
        epoch += 1
    if bar is not None:
        bar.close()
    write_rank_stats(cfg["save_path"], rank, {"rank": rank, "stage": 0, "dp_rank": rank, "steps": step,
                                              "peak_mem_gib": peak_mem_gib(device), "trainer": TRAINER})
    if cfg["save_final"]:
        save_checkpoint(engine, cfg, plan, "checkpoint_final", step, epoch, export=True)
    if metrics is not None:
        metrics.close()
    log(f"done: {step} steps" + (f", final checkpoint {cfg['save_path']}/checkpoint_final" if cfg["save_final"]
                                 else ""), rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
