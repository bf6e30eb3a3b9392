"""Everything a user can get wrong, checked before the first collective: `plan_run(cfg, trainer) -> Plan`."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from training.distributed import launched_world_size
from training.plan import plan
from utils.config import ConfigError, TrainConfig, preflight
from utils.metrics import log

if TYPE_CHECKING:
    from training.strategy import Trainer


@dataclass
class Plan:
    """What every rank decided alike before the process group: batch split, data, steps, resume point, and
    the trainer's own model plan (`model`: the pipeline's resolved layers and partition, or the HF config
    and attention of the ZeRO trainer; both have `vocab_size`)."""
    world: int
    dp: int
    ds: dict  # what deepspeed.initialize gets: a copy of the config's DeepSpeed keys, batch and steps filled in
    tbs: int
    mbs: int
    gas: int
    model: Any
    tokenizer: Any
    dataset: Any
    steps_per_epoch: int
    total_steps: int
    resume_tag: str | None
    eval_dataset: Any = None  # eval_data_path's samples or eval_ratio's held-out share (never trained on)
    fingerprint: dict | None = None  # utils.run_fingerprint of this run (rank 0 only: it writes the markers)
    data_identity: dict | None = None  # (size, mtime_ns) of each data file before it was read (DataWatch)


def plan_run(cfg: TrainConfig, trainer: Trainer) -> Plan:
    from data import DataError
    from data.batching import BatchPlan
    from models import ModelError
    from training import save_path
    from training.checkpoints import choose_resume_tag
    from utils import run_fingerprint

    world = launched_world_size()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    trainer.check(cfg, world)
    preflight(cfg, trainer.name)  # optimizer present, ZeRO stage allowed, save_path writable
    if rank0:
        save_path.acquire(cfg.checkpoint.save_path)  # one live run per save_path (released by run_cli)
    previous = [] if cfg.checkpoint.resume else \
        save_path.check_fresh(cfg.checkpoint.save_path, cfg.checkpoint.overwrite)
    run = plan(cfg, trainer.dims(cfg, world))
    if run.speed_defaults and rank0:
        log(f"speed defaults (unset in the config): {', '.join(run.speed_defaults)}")
    ds, dp, tbs, mbs, gas = run.ds, run.dp, run.tbs, run.mbs, run.gas
    named = [("eval_data_path", cfg.eval.data_path)]
    if not cfg.data.synthetic_data:
        named.insert(0, ("data_path", cfg.data.path))
    files = [(key, path) for key, value in named for path in run_fingerprint.data_paths(value)]
    for key, path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: file not found: {path}")
    identities = {path: run_fingerprint.identity(path) for _, path in files}
    fingerprint = run_fingerprint.of_run(cfg, tbs, mbs, gas, dp) if rank0 else None
    resume_tag = choose_resume_tag(cfg, trainer, world)
    if resume_tag is not None and fingerprint is not None:
        check_fingerprint(cfg, resume_tag, fingerprint)
    model = trainer.prepare_model(cfg, resuming=resume_tag is not None)
    tokenizer = None if cfg.data.synthetic_data else load_tokenizer(cfg)  # synthetic ids need no tokenizer
    try:
        dataset, eval_dataset = build_datasets(cfg, tokenizer, model.vocab_size, tbs)
    except DataError as e:
        raise ConfigError(str(e)) from None
    except ModelError as e:
        raise ConfigError(f"model_path: {e}") from None
    steps_per_epoch = BatchPlan(len(dataset), tbs, mbs, gas, 0, dp, cfg.schedule.seed).steps_per_epoch
    if steps_per_epoch < 1:
        raise ConfigError(f"train_batch_size: {tbs} is larger than the {len(dataset)} samples in "
                          f"{cfg.data.path}; lower it or add data")
    total_steps = steps_per_epoch * cfg.schedule.n_epoches
    if cfg.schedule.max_steps:
        total_steps = min(total_steps, cfg.schedule.max_steps)
    fill_scheduler_steps(ds, total_steps)
    if fingerprint is not None:
        fingerprint.update(samples=len(dataset), steps_per_epoch=steps_per_epoch)
    if previous and rank0:  # overwrite: true, every user error checked: the old run's files go aside, whole
        moved = save_path.move_aside(cfg.checkpoint.save_path)
        log(f"overwrite: the previous run's files ({save_path.describe(previous)}) moved to {moved}")
    return Plan(world, dp, ds, tbs, mbs, gas, model, tokenizer, dataset, steps_per_epoch, total_steps, resume_tag,
                eval_dataset, fingerprint, identities)


def check_fingerprint(cfg: TrainConfig, tag: str, fingerprint: dict) -> None:
    """Refuse to resume checkpoint `tag` when its run fingerprint (utils.run_fingerprint) differs from this
    run's, naming what changed; with `resume_allow_changes: true` say it in one warning and go on."""
    from utils import checkpoint as ckpt
    from utils import run_fingerprint

    info = ckpt.read_info(cfg.checkpoint.save_path, tag)
    old = info.get("fingerprint")
    if not isinstance(old, dict):
        return  # written before fingerprints existed
    diffs = run_fingerprint.changes(old, fingerprint)
    if not diffs:
        return
    where = os.path.join(cfg.checkpoint.save_path, tag)
    if not cfg.checkpoint.resume_allow_changes:
        raise ConfigError(f"resume: since checkpoint {where} was saved: {'; '.join(diffs)}; its data position (step "
                          f"{info.get('step')}) would continue on other data: set resume_allow_changes: true to "
                          f"continue anyway, or start again (resume: false, overwrite: true or a new save_path)")
    log(f"warning: resume_allow_changes: since checkpoint {where} was saved: {'; '.join(diffs)}; "
        f"{run_fingerprint.position_note(old, int(info.get('step', 0)))}", 0)


def fill_scheduler_steps(ds: dict, total_steps: int) -> None:
    """`scheduler.params.total_num_steps: auto` (or absent) -> the run's step count."""
    sched = ds.get("scheduler")
    if isinstance(sched, dict):
        params = sched.setdefault("params", {})
        if sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR") and params.get("total_num_steps", "auto") == "auto":
            params["total_num_steps"] = max(total_steps, 1)


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model_path: cannot load a tokenizer from {cfg.model.path}: {e}") from None


def build_datasets(cfg: TrainConfig, tokenizer, vocab_size: int, train_batch_size: int):
    """(training set, eval set or None). The eval set is `eval_data_path`'s samples, or the `eval_ratio` share of
    `data_path`'s held out (`hold_out`) before packing; it is never packed (one sample per row)."""
    dataset = _samples(cfg, tokenizer, vocab_size, train_batch_size)
    eval_dataset = None
    if cfg.eval.ratio:
        dataset, eval_dataset = hold_out(dataset, cfg.eval.ratio, cfg.schedule.seed)
    elif cfg.eval.data_path:
        eval_dataset = sft_dataset(cfg, tokenizer, "eval_data_path")
    return pack(cfg, dataset), eval_dataset


def pack(cfg: TrainConfig, dataset):
    """The samples, or with `packing` rows of several samples (batch sizes count rows)."""
    from data.batching import PackedDataset

    if not cfg.data.packing:
        return dataset
    start = time.perf_counter()
    lengths = dataset.lengths() if hasattr(dataset, "lengths") else None  # synthetic: known without tokens
    packed = PackedDataset(dataset, cfg.data.max_seq_len, seed=cfg.schedule.seed, lengths=lengths)
    if int(os.environ.get("RANK", "0")) == 0:
        log(f"packing: {packed.num_samples} samples -> {len(packed)} rows of {cfg.data.max_seq_len} tokens "
            f"({packed.fill_ratio:.1%} filled) in {time.perf_counter() - start:.1f} s")
    return packed


def hold_out(dataset, ratio: float, seed: int):
    """(training Subset, eval Subset): `round(ratio * n)` samples (at least 1) chosen with `seed` are held out."""
    from torch.utils.data import Subset

    n = len(dataset)
    n_eval = max(1, round(ratio * n))
    if n_eval >= n:
        raise ConfigError(f"eval_ratio: {ratio} holds out {n_eval} of the {n} samples in data_path, leaving none "
                          f"to train on; lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(perm[n_eval:])), Subset(dataset, sorted(perm[:n_eval]))


def sft_dataset(cfg: TrainConfig, tokenizer, key: str):
    """SFTDataset of the file(s) of config key `key` (data_path, eval_data_path): a path or a list of paths."""
    from torch.utils.data import ConcatDataset

    from data import SFTDataset

    value = cfg.data.path if key == "data_path" else cfg.eval.data_path
    paths = [value] if isinstance(value, str) else list(value)
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: file not found: {path}")
    parts = [SFTDataset(path, tokenizer, cfg.data.max_seq_len, template=cfg.data.template) for path in paths]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _samples(cfg: TrainConfig, tokenizer, vocab_size: int, train_batch_size: int):
    from data.batching import SyntheticDataset

    if cfg.data.synthetic_data:
        steps, seq, low = cfg.schedule.max_steps or 10, cfg.data.max_seq_len, cfg.data.synthetic_min_len
        high = min(cfg.data.synthetic_max_len or seq, seq) if low else seq
        if low > high:
            raise ConfigError(f"synthetic_min_len: {low} is above the longest sample ({high})")
        count = steps * train_batch_size
        if cfg.data.packing:  # enough samples for `steps` batches of rows, with a batch of rows to spare
            count = (count + train_batch_size) * max(1, (2 * seq) // (low + high))
        return SyntheticDataset(count, high, vocab_size, cfg.schedule.seed, min_len=low or None)
    return sft_dataset(cfg, tokenizer, "data_path")


def param_groups(module: torch.nn.Module, no_wd_kws: list[str]) -> list[dict]:
    """Two groups: with weight decay, and without for names matching any `optimizer.no_wd_kws` regex."""
    pats = [re.compile(k) for k in no_wd_kws]
    decay, no_decay = [], []
    for name, prm in module.named_parameters():
        if prm.requires_grad:
            (no_decay if any(p.search(name) for p in pats) else decay).append(prm)
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
