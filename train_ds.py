"""Pipeline-parallel training with DeepSpeed.

    deepspeed train_ds.py --config configs/ds_config_pp.yml [--key.sub=value ...]

YAML config -> the family's pipeline layer list -> DeepSpeed PipelineModule/PipelineEngine.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from utils.config import ConfigError, TrainConfig, load_config, parse_overrides, resolve_batch
from utils.metrics import log


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML with DeepSpeed keys and ours")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    return args, parse_overrides(rest)


def init_distributed():
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    deepspeed.init_distributed(dist_backend=backend)
    if backend == "gloo":
        release_shm_buffer()
    device = torch.device(get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type != "cpu":
        get_accelerator().set_device(device.index)
    return device


def launched_world_size() -> int:
    """World size before init: DeepSpeed's launcher/torchrun set WORLD_SIZE, mpirun its own variables."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def release_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm segment per rank and never unlinks it: every run
    would leave its segments (tens of MB each) in RAM-backed /dev/shm for good. Once every rank has
    mapped its peers' segments (the barrier), the names can go; the mappings live until exit."""
    import torch.distributed as dist

    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    if os.path.exists(name):
        os.unlink(name)


def check_world(cfg: TrainConfig, world: int) -> None:
    pipe, data = cfg.dims
    if pipe * data != world:
        raise ConfigError(f"model_topo.process_topology.dims: {[pipe, data]} needs {pipe * data} processes, "
                          f"but {world} were launched (set dims so that pipe x data = {world})")


def param_groups(module: torch.nn.Module, no_wd_kws: list[str]) -> list[dict]:
    """Two groups: with weight decay, and without for names matching any `optimizer.no_wd_kws` regex."""
    pats = [re.compile(k) for k in no_wd_kws]
    decay, no_decay = [], []
    for name, prm in module.named_parameters():
        if prm.requires_grad:
            (no_decay if any(p.search(name) for p in pats) else decay).append(prm)
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def cpu_lion(cfg: TrainConfig, groups: list[dict], device: torch.device):
    """DeepSpeed's `Lion` is a fused GPU kernel (or its CPU version under ZeRO offload); on CPU without
    offload, hand DeepSpeed the PyTorch implementation (lion-pytorch) with the same hyper-parameters."""
    opt = cfg.ds.get("optimizer")
    offload = cfg.ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if device.type != "cpu" or not isinstance(opt, dict) or str(opt.get("type", "")).lower() != "lion" \
            or offload != "none":
        return None
    from lion_pytorch import Lion

    p = opt.get("params", {})
    del cfg.ds["optimizer"]
    return Lion(groups, lr=p.get("lr", 1e-4), betas=tuple(p.get("betas", (0.9, 0.99))),
                weight_decay=p.get("weight_decay", 0.0))


def fill_scheduler_steps(ds: dict, total_steps: int) -> None:
    sched = ds.get("scheduler")
    if isinstance(sched, dict):
        params = sched.setdefault("params", {})
        if sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR") and params.get("total_num_steps", "auto") == "auto":
            params["total_num_steps"] = max(total_steps, 1)


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg["model_path"], trust_remote_code=cfg["trust_remote_code"])
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_path: cannot load a tokenizer from {cfg['model_path']}: {e}") from None


def build_dataset(cfg: TrainConfig, tokenizer, vocab_size: int, train_batch_size: int):
    """The training set: samples, or with `packing` rows of several samples (batch sizes count rows)."""
    from utils.train_data import PackedDataset

    dataset = _samples(cfg, tokenizer, vocab_size, train_batch_size)
    if not cfg["packing"]:
        return dataset
    start = time.perf_counter()
    lengths = dataset.lengths() if hasattr(dataset, "lengths") else None  # synthetic: known without tokens
    packed = PackedDataset(dataset, cfg["max_seq_len"], seed=cfg["seed"], lengths=lengths)
    if int(os.environ.get("RANK", "0")) == 0:
        log(f"packing: {packed.num_samples} samples -> {len(packed)} rows of {cfg['max_seq_len']} tokens "
            f"({packed.fill_ratio:.1%} filled) in {time.perf_counter() - start:.1f} s")
    return packed


def _samples(cfg: TrainConfig, tokenizer, vocab_size: int, train_batch_size: int):
    from utils.train_data import SyntheticDataset

    if cfg["synthetic_data"]:
        steps, seq, low = cfg["max_steps"] or 10, cfg["max_seq_len"], cfg["synthetic_min_len"]
        high = min(cfg["synthetic_max_len"] or seq, seq) if low else seq
        if low > high:
            raise ConfigError(f"synthetic_min_len: {low} is above the longest sample ({high})")
        count = steps * train_batch_size
        if cfg["packing"]:  # enough samples for `steps` batches of rows, with a batch of rows to spare
            count = (count + train_batch_size) * max(1, (2 * seq) // (low + high))
        return SyntheticDataset(count, high, vocab_size, cfg["seed"], min_len=low or None)
    from data import SFTDataset

    if not os.path.isfile(cfg["data_path"]):
        raise ConfigError(f"data_path: file not found: {cfg['data_path']}")
    return SFTDataset(cfg["data_path"], tokenizer, cfg["max_seq_len"])


def local_layers(pipe_module):
    """(global layer index, module) for every layer with weights on this stage, tied copies included
    (a tied module is indexed by the first spec that uses it, where its weights are stored)."""
    seen = set()
    start = pipe_module._local_start
    for local_idx, layer in enumerate(pipe_module.forward_funcs):
        if isinstance(layer, torch.nn.Module):
            seen.add(id(layer))
            yield start + local_idx, layer
    for key, module in pipe_module.tied_modules.items():
        if id(module) not in seen:
            yield next(i for i, s in enumerate(pipe_module._layer_specs) if getattr(s, "key", None) == key), module


def init_from_scratch(pipe_module, hf_cfg: dict, seed: int) -> None:
    """HF-style init (normal(0, initializer_range), norm scales 1, biases 0) seeded per global layer
    index, so every partition of the same model starts from the same weights."""
    std = float(hf_cfg.get("initializer_range", 0.02))
    for idx, layer in local_layers(pipe_module):
        torch.manual_seed(seed + idx)
        for mod in layer.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(mod.weight, 0.0, std)
            for name, prm in mod.named_parameters(recurse=False):
                if name == "bias":
                    torch.nn.init.zeros_(prm)
                elif prm.ndim == 1:  # norm scales
                    torch.nn.init.ones_(prm)
                elif prm.ndim == 3:  # stacked expert weights [E, out, in]
                    torch.nn.init.normal_(prm, 0.0, std)


def load_layer_weights(pipe_module, model_path: str) -> None:
    """Load this stage's `layer_XX-model_states.pt` files (weights only, never pickled objects)."""
    from models.layout import load_layer_file

    for idx, layer in local_layers(pipe_module):
        path, state = load_layer_file(model_path, idx)
        try:
            layer.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"model_path: {path} does not match config.json: {str(e).splitlines()[0]}") from None


def run_cli(train_fn, argv=None) -> int:
    """Config in, exit code out: user errors and refused checkpoint files are one `error:` line (2), a run
    stopped on NaNs is 3, one stopped by SIGINT / SIGTERM / its launcher's exit (utils.preempt) 130 / 143."""
    try:
        args, overrides = parse_args(argv)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from models import ModelError
    from utils import preempt
    from utils.checkpoint import CheckpointError
    from utils.guard import BadStepsError

    restore_signals = preempt.install()
    try:
        return train_fn(cfg)
    except preempt.Stopped as e:  # the step's checkpoint is written: one line, no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            log(str(e), 0)
        return e.code
    except (ConfigError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        if not (e.every_rank and int(os.environ.get("RANK", "0")) != 0):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except BadStepsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        restore_signals()


def main(argv=None) -> int:
    return run_cli(train, argv)


@dataclass
class Prepared:
    """Everything checked and computed before the first collective (user errors surface here)."""
    hf_cfg: dict
    family: Any
    margs: Any
    opts: Any
    costs: list
    parts: list
    tokenizer: Any
    dataset: Any
    tbs: int
    mbs: int
    gas: int
    steps_per_epoch: int
    total_steps: int
    resume_tag: str | None = None  # the checkpoint `resume: true` loads (check_resume_files chose it)


def resolve_compile_blocks(value: bool | str) -> bool:
    """`compile_blocks: auto` compiles when training on CUDA GPUs (A/B in benchmarks/results/families-*) and
    runs eagerly on CPU, where compiling costs more than it saves."""
    if value != "auto":
        return bool(value)
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def prepare(cfg: TrainConfig) -> Prepared:
    import models
    from data import DataError
    from models.layout import find_layer_file
    from utils.config import preflight
    from utils.pipeline import resolve_parts
    from utils.train_data import BatchPlan

    check_world(cfg, launched_world_size())
    preflight(cfg, "pipeline")  # optimizer present, ZeRO stage <= 1, save_path writable
    num_stages, dp = cfg.dims
    tbs, mbs, gas = resolve_batch(cfg.ds, dp)
    try:
        hf_cfg = models.read_hf_config(cfg["model_path"])
        family = models.get_family(hf_cfg.get("model_type"))
        margs = family.read_config(hf_cfg)
    except (models.ModelError, FileNotFoundError) as e:
        raise ConfigError(f"model_path: {e}") from None
    opts = models.ModelOptions(use_grad_ckpt=cfg["use_grad_ckpt"], use_flash_attn=cfg["use_flash_attn"],
                               aux_max_z_loss_weight=float(cfg["aux_max_z_loss.weight"]),
                               packed_sequences=cfg["packing"], fused_head_loss=cfg["fused_head_loss"],
                               compile_blocks=resolve_compile_blocks(cfg["compile_blocks"]),
                               moe_grouped_gemm=cfg["moe_grouped_gemm"])
    try:
        models.common.check_attention_backend(opts)
    except models.ModelError as e:
        raise ConfigError(str(e)) from None
    costs = family.layer_flops(margs, cfg["max_seq_len"])
    parts = resolve_parts(cfg["model_topo.parts"], costs, num_stages)
    if not cfg["from_scratch"]:
        try:
            for i in range(len(costs)):
                find_layer_file(cfg["model_path"], i)
        except models.ModelError as e:
            raise ConfigError(f"model_path: {e}; convert the HF model first (convert_model.py hg_to_pp) "
                              f"or set from_scratch: true") from None
    tokenizer = None if cfg["synthetic_data"] else load_tokenizer(cfg)  # synthetic ids need no tokenizer
    try:
        dataset = build_dataset(cfg, tokenizer, margs.vocab_size, tbs)
    except DataError as e:
        raise ConfigError(str(e)) from None
    except models.ModelError as e:
        raise ConfigError(f"model_path: {e}") from None
    steps_per_epoch = BatchPlan(len(dataset), tbs, mbs, gas, 0, dp, cfg["seed"]).steps_per_epoch
    if steps_per_epoch < 1:
        raise ConfigError(f"train_batch_size: {tbs} is larger than the {len(dataset)} samples in "
                          f"{cfg['data_path']}; lower it or add data")
    total_steps = steps_per_epoch * cfg["n_epoches"]
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])
    fill_scheduler_steps(cfg.ds, total_steps)
    resume_tag = check_resume_files(cfg["save_path"]) if cfg["resume"] else None
    return Prepared(hf_cfg, family, margs, opts, costs, parts, tokenizer, dataset, tbs, mbs, gas,
                    steps_per_epoch, total_steps, resume_tag)


def check_resume_files(save_path: str, tag: str | None = None) -> str | None:
    """Before any process group, on every rank alike: choose the checkpoint to resume from (`tag`, or
    utils.checkpoint.resume_tag: the newest complete one whose files match its manifest, a warning for
    each damaged newer one) and refuse it if one of its files pickles more than tensors and DeepSpeed's
    plain data types (utils.safe_load.scan_checkpoint). Returns the tag to load (None: none to resume)."""
    from utils import checkpoint as ckpt
    from utils import safe_load

    if tag is None:
        tag = ckpt.resume_tag(save_path)
    if tag is not None:
        safe_load.scan_checkpoint(os.path.join(save_path, tag))
    return tag


def varying_shapes(cfg: TrainConfig) -> bool:
    """Whether micro-batch shapes can change between micro-batches. If so DeepSpeed sends each boundary
    tensor's shape before the tensor (small blocking p2p messages per micro-batch) and compiled blocks see
    several shapes; if not, shapes are sent once. Packed rows are nearly full: they are padded to
    max_seq_len, as are full-length synthetic samples."""
    full_length_only = cfg["synthetic_data"] and not cfg["synthetic_min_len"]
    return cfg["pad_to_multiple_of"] > 0 and not full_length_only and not cfg["packing"]


def build_engine(cfg: TrainConfig, prep: Prepared, device: torch.device, rank: int):
    """PipelineModule over this stage's layers (weights initialised or loaded), then DeepSpeed's engine.

    Returns (engine, loss_fn, guard); `guard` is the fp32 StepGuard or None.
    """
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    import models
    from utils import safe_load
    from utils.guard import StepGuard
    from utils.pipeline import PartitionedPipelineModule, describe_parts, spec_bounds

    num_stages, dp = cfg.dims
    specs = models.build_pipeline_layers(prep.hf_cfg, prep.opts)
    loss_fn = prep.family.loss_fn(prep.margs, prep.opts)
    with torch.device(device):  # build (and init) this stage's layers directly on its accelerator
        module = PartitionedPipelineModule(specs, spec_bounds(prep.parts, len(specs)),
                                           topology=PipeDataParallelTopology(num_pp=num_stages, num_dp=dp),
                                           loss_fn=loss_fn, seed_layers=True, base_seed=cfg["seed"],
                                           dynamic_shape=varying_shapes(cfg))
    if rank == 0:
        log(f"{prep.family.model_type}: {len(prep.costs) - 2} blocks, partition {prep.parts}: "
            f"{describe_parts(prep.parts, prep.costs)}", rank)
        log(f"compile_blocks: {'on (torch.compile; the first step compiles)' if prep.opts.compile_blocks else 'off'}"
            f", fused_head_loss: {'on' if prep.opts.fused_head_loss else 'off'}", rank)
    if cfg["from_scratch"]:
        init_from_scratch(module, prep.hf_cfg, cfg["seed"])
    elif prep.resume_tag is None:
        load_layer_weights(module, cfg["model_path"])
    module.to(device)

    # A stage's parameters are this stage's alone: marking them model-parallel makes DeepSpeed's
    # gradient norms (fp32 clipping, ZeRO-1) sum over all stages instead of counting stage 0 only.
    for prm in module.parameters():
        prm.model_parallel = not getattr(prm, "ds_pipe_replicated", False)
    fp32 = not any(isinstance(cfg.ds.get(k), dict) and cfg.ds[k].get("enabled") for k in ("fp16", "bf16"))
    plain_fp32 = fp32 and not int(cfg.ds.get("zero_optimization", {}).get("stage", 0))
    max_norm = float(cfg.ds.get("gradient_clipping", 1.0))  # DeepSpeed's default is 1.0
    if plain_fp32:
        cfg.ds["gradient_clipping"] = 0.0  # StepGuard measures the norm before clipping, then clips
    groups = param_groups(module, cfg["optimizer.no_wd_kws"])
    optimizer = cpu_lion(cfg, groups, device)
    engine, _, _, _ = deepspeed.initialize(model=module, config=cfg.ds, optimizer=optimizer,
                                           model_parameters=None if optimizer else groups)
    safe_load.install(engine)  # checkpoint files are read with torch.load(weights_only=True)
    guard = None
    if plain_fp32:
        guard = StepGuard(engine.optimizer, module.parameters(), engine.grid.get_pipe_parallel_group(), max_norm)
    return engine, loss_fn, guard


def resume(cfg: TrainConfig, engine, rank: int, tag: str | None) -> int:
    """Load checkpoint `tag` of `save_path` (the one `prepare` chose and verified, same dims only); the
    step to continue from. Every file is unpickled with weights_only=True (utils.safe_load): a file holding
    anything but tensors and DeepSpeed's plain data types stops the run with one line naming it. The
    reporting rank drops the metrics.jsonl rows of later steps (a crashed run's), so each step has one."""
    from utils import checkpoint as ckpt
    from utils import safe_load
    from utils.metrics import drop_rows_after

    step = 0
    if tag is None:
        log(f"resume: no complete checkpoint in {cfg['save_path']}, starting fresh", rank)
    else:
        info = ckpt.read_info(cfg["save_path"], tag)
        if info.get("dims") != list(cfg.dims):
            raise ConfigError(f"resume: checkpoint {tag} was written with dims {info.get('dims')}, "
                              f"this run has {list(cfg.dims)}; resume with the same dims")
        safe_load.load_checkpoint(engine, cfg["save_path"], tag)
        step = int(info["step"])
        log(f"resumed from {cfg['save_path']}/{tag} at step {step}", rank)
    if engine.is_last_stage() and engine.grid.data_parallel_id == 0:  # the rank writing metrics.jsonl
        drop_rows_after(os.path.join(cfg["save_path"], "metrics.jsonl"), step)
    return step


def save(cfg: TrainConfig, engine, rank: int, tag: str, step: int, epoch: int) -> None:
    """DeepSpeed's checkpoint, then (after every rank wrote its part) model files, MANIFEST.json,
    COMPLETE, pruning."""
    import torch.distributed as dist

    from utils import checkpoint as ckpt

    os.makedirs(cfg["save_path"], exist_ok=True)
    if rank == 0:
        ckpt.invalidate(cfg["save_path"], tag)  # a tag written again is incomplete until marked again
    dist.barrier()
    engine.save_checkpoint(cfg["save_path"], tag=tag, save_latest=False, client_state={"step": step, "epoch": epoch})
    dist.barrier()
    if rank == 0:
        ckpt.copy_model_files(cfg["model_path"], os.path.join(cfg["save_path"], tag))
    dist.barrier()
    ckpt.write_manifest_shared(os.path.join(cfg["save_path"], tag))
    if rank == 0:
        ckpt.mark_complete(cfg["save_path"], tag, {"step": step, "epoch": epoch, "dims": list(cfg.dims),
                                                    "samples": step * engine.train_batch_size()})
        removed = ckpt.prune(cfg["save_path"], cfg["keep_last_n"])
        log(f"saved checkpoint {cfg['save_path']}/{tag} (step {step})"
            + (f", pruned {', '.join(removed)}" if removed else ""), rank)
    dist.barrier()


def train(cfg: TrainConfig) -> int:
    import torch.distributed as dist

    from data import pad_id_of
    from models.mixtral import expert_load_metrics
    from utils import preempt
    from utils.guard import BadStepCounter
    from utils.metrics import MetricsWriter, family_flops_per_token, peak_mem_gib, step_row, write_rank_stats
    from utils.train_data import BatchPlan, PipeFeeder

    prep = prepare(cfg)  # everything a user can get wrong, before the first collective
    num_stages, dp = cfg.dims
    device = init_distributed()
    rank = dist.get_rank()
    engine, loss_fn, guard = build_engine(cfg, prep, device, rank)
    stage, dp_rank = engine.stage_id, engine.grid.data_parallel_id
    bad_steps = BadStepCounter(cfg["max_bad_steps"])
    is_reporter = engine.is_last_stage() and dp_rank == 0
    start_step = resume(cfg, engine, rank, prep.resume_tag) if cfg["resume"] else 0

    feeder = None
    if engine.is_first_stage() or engine.is_last_stage():
        plan = BatchPlan(len(prep.dataset), prep.tbs, prep.mbs, prep.gas, dp_rank, dp, cfg["seed"])
        feeder = PipeFeeder(prep.dataset, plan, pad_id_of(prep.tokenizer) if prep.tokenizer is not None else 0,
                            cfg["max_seq_len"], cfg["num_workers"],
                            sum_over_dp=summer(device, engine.grid.get_data_parallel_group())
                            if engine.is_last_stage() and dp > 1 else None,
                            pad_multiple=0 if not varying_shapes(cfg) else cfg["pad_to_multiple_of"])

    # Active parameters outside the input embedding (MoE: only the top-k experts), from the family's
    # cost model at seq 1 where attention is negligible; attention is added causal-unaware as usual.
    fpt = family_flops_per_token(prep.family, prep.margs, cfg["max_seq_len"])

    metrics = MetricsWriter(os.path.join(cfg["save_path"], "metrics.jsonl")) if is_reporter else None
    bar = None
    if is_reporter:
        from tqdm import tqdm
        bar = tqdm(total=prep.total_steps, initial=start_step, desc=f"[rank {rank}] train", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    step, spe, total_steps = start_step, prep.steps_per_epoch, prep.total_steps
    if rank == 0:
        log(f"{len(prep.dataset)} samples, {spe} steps/epoch x {cfg['n_epoches']} epochs (global batch "
            f"{prep.tbs} = micro {prep.mbs} x accum {prep.gas} x dp {dp}; {len(prep.dataset) - spe * prep.tbs} "
            f"samples/epoch left over); {total_steps} steps", rank)
    epoch = step // spe
    while step < total_steps:
        if feeder is not None:
            feeder.start_epoch(epoch, step - epoch * spe)
        for _ in range(step - epoch * spe, spe):
            t0 = time.perf_counter()
            if step + 1 == cfg["profile_step"]:
                from utils.profile import profile_call
                loss = profile_call(lambda: engine.train_batch(data_iter=feeder),
                                    os.path.join(cfg["save_path"], "profile"), rank, device,
                                    {"stage": stage, "step": step + 1})
            else:
                loss = engine.train_batch(data_iter=feeder)
            dt = time.perf_counter() - t0
            moe = expert_load_metrics(loss_fn) if engine.is_last_stage() else {}
            step += 1
            norm = _grad_norm(engine, guard)
            skipped = not engine.fp16_enabled() and norm is not None and not math.isfinite(norm)
            if skipped and rank == 0:
                log(f"step {step}: loss {float(loss)}, gradient norm {norm}: optimizer step skipped", rank)
            if is_reporter:
                row = step_row(step, epoch, float(loss), engine.get_lr()[0], norm, skipped, dt, feeder, prep.tbs,
                               dp, fpt / (num_stages * dp), peak_mem_gib(device))
                row.update(moe)
                metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.2f}",
                                tps=f"{row['tokens_per_s']:.0f}", tflops=f"{row['tflops_per_gpu']:.1f}")
                bar.update(1)
            if not engine.fp16_enabled():
                bad_steps.update(step, norm)
            stop = preempt.agreed(device) if step < total_steps else 0  # a signal on any rank: all stop now
            if step < total_steps and (stop or cfg["save_interval"] and step % cfg["save_interval"] == 0):
                save(cfg, engine, rank, f"global_step{step}", step, epoch)
            if stop:
                if bar is not None:
                    bar.close()
                raise preempt.Stopped(stop, step, os.path.join(cfg["save_path"], f"global_step{step}"))
            if step >= total_steps:
                break
        else:
            epoch += 1
    if bar is not None:
        bar.close()
    write_rank_stats(cfg["save_path"], rank, {"rank": rank, "stage": stage, "dp_rank": dp_rank, "steps": step,
                                              "peak_mem_gib": peak_mem_gib(device), "trainer": "pipeline"})
    if cfg["save_final"]:
        save(cfg, engine, rank, "checkpoint_final", step, epoch)
    if metrics is not None:
        metrics.close()
    log(f"done: {step} steps" + (f", final checkpoint {cfg['save_path']}/checkpoint_final" if cfg["save_final"] else ""),
        rank)
    return 0


def summer(device, group=None):
    """Sum a [1] tensor over the ranks of `group` (default: all ranks): the global token count."""
    import torch.distributed as dist

    def summed(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        dist.all_reduce(t, group=group)
        return t.cpu()
    return summed


def _grad_norm(engine, guard) -> float | None:
    norm = guard.last_norm if guard is not None else engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


if __name__ == "__main__":
    sys.exit(main())
