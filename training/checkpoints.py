"""Checkpoints of both trainers: which one `resume: true` loads (chosen, verified and scanned before any process
group, every rank alike), loading it, and saving one that is either complete or invisible (utils.checkpoint)."""
from __future__ import annotations

import os

from training.transforms import Transforms
from utils.config import ConfigError, TrainConfig
from utils.metrics import log


def check_resume_files(save_path: str) -> str | None:
    """Choose the checkpoint to resume from (utils.checkpoint.resume_tag: the newest complete one whose files
    match its manifest, a warning for each damaged newer one) and refuse it if one of its files pickles more
    than tensors and DeepSpeed's plain data types (training.ds.safe_load.scan_checkpoint). Returns the tag to load
    (None: none to resume)."""
    from training.ds import safe_load
    from utils import checkpoint as ckpt

    tag = ckpt.resume_tag(save_path)
    if tag is not None:
        safe_load.scan_checkpoint(os.path.join(save_path, tag))
    return tag


def choose_resume_tag(cfg: TrainConfig, trainer, world: int) -> str | None:
    """The tag `resume: true` loads (check_resume_files), written by the same trainer with the same dims and, for
    a LoRA checkpoint, the same lora section and base weights (each transform's check_resume; else a ConfigError)."""
    from utils import checkpoint as ckpt

    if not cfg.checkpoint.resume:
        return None
    tag = check_resume_files(cfg.checkpoint.save_path)
    if tag is not None:
        info = ckpt.read_info(cfg.checkpoint.save_path, tag)
        dims = trainer.dims(cfg, world)
        if info.get("trainer", "pipeline") != trainer.name or info.get("dims") != dims:
            raise ConfigError(f"resume: checkpoint {tag} was written by trainer {info.get('trainer', 'pipeline')!r} "
                              f"with dims {info.get('dims')}; this {trainer.name} run has dims {dims}: resume with "
                              f"the same trainer and dims")
        Transforms(cfg).check_resume(cfg, os.path.join(cfg.checkpoint.save_path, tag))
    return tag


def load_checkpoint(cfg: TrainConfig, trainer, tag: str | None, rank: int) -> int:
    """Load checkpoint `tag` (None: none to resume, start fresh); the step to continue from. Every file is
    unpickled with weights_only=True (training.ds.safe_load). The rank writing metrics.jsonl drops the rows of
    later steps (a crashed run's), so each step has one row."""
    from utils import checkpoint as ckpt
    from utils.metrics import drop_rows_after

    step = 0
    if tag is None:
        log(f"resume: no complete checkpoint in {cfg.checkpoint.save_path}, starting fresh", rank)
    else:
        # a LoRA checkpoint holds the trained tensors only: the base weights came from model_path
        trainer.engine_view.load_checkpoint(cfg.checkpoint.save_path, tag,
                                            load_module_strict=not Transforms(cfg).trained_only)
        step = int(ckpt.read_info(cfg.checkpoint.save_path, tag)["step"])
        log(f"resumed from {cfg.checkpoint.save_path}/{tag} at step {step}", rank)
    if trainer.reporter:
        drop_rows_after(os.path.join(cfg.checkpoint.save_path, "metrics.jsonl"), step)
    return step


def save_checkpoint(cfg: TrainConfig, trainer, plan, tag: str, step: int, epoch: int, final: bool = False) -> None:
    """DeepSpeed's files, then (once every rank wrote its part) the model files and the trainer's extras (the
    ZeRO trainer's HF export in the final one), MANIFEST.json hashed by all ranks, COMPLETE, pruning. A write that
    fails (a full disk) is one CheckpointError line naming the checkpoint and the newest complete one, which is
    untouched (this one never gets its COMPLETE marker)."""
    from utils import checkpoint as ckpt

    save_path = cfg.checkpoint.save_path
    try:
        _save_checkpoint(cfg, trainer, plan, tag, step, epoch, final)
    except (OSError, RuntimeError) as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, RuntimeError):  # torch's writer says "unexpected pos 2176 vs 2064" for a full disk
            full = disk_problem(save_path)
            if full is None:
                raise  # not a failed write: a bug, with its traceback
            text = full
        newest = ckpt.newest_complete(save_path)
        keep = (f"the newest complete checkpoint {os.path.join(save_path, newest)} is intact"
                if newest else "no complete checkpoint exists yet")
        raise ckpt.CheckpointError(f"saving checkpoint {os.path.join(save_path, tag)} failed at step {step}: "
                                   f"{text}; {keep}: free space and resume with resume: true") from None


def disk_problem(save_path: str) -> str | None:
    """strerror of writing 4 MiB into `save_path` (a full disk or a quota), None when that works."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=save_path, prefix=".space-probe-") as f:
            f.write(b"\0" * (4 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    return None


def _save_checkpoint(cfg: TrainConfig, trainer, plan, tag: str, step: int, epoch: int, final: bool) -> None:
    import torch.distributed as dist

    from utils import checkpoint as ckpt

    rank = dist.get_rank()
    save_path = cfg.checkpoint.save_path
    os.makedirs(save_path, exist_ok=True)
    if rank == 0:
        ckpt.invalidate(save_path, tag)  # a tag written again is incomplete until marked again
    dist.barrier()
    transforms = Transforms(cfg)  # LoRA: the trained tensors and their optimizer state only, plus LORA.json
    trainer.engine_view.save_checkpoint(save_path, tag=tag, save_latest=False, client_state={"step": step,
                                        "epoch": epoch}, exclude_frozen_parameters=transforms.trained_only)
    dist.barrier()
    tag_dir = os.path.join(save_path, tag)
    if rank == 0:
        ckpt.copy_model_files(cfg.model.path, tag_dir)
        transforms.write_meta(tag_dir)
    trainer.save_extras(cfg, plan, tag_dir, final)
    dist.barrier()
    ckpt.write_manifest_shared(tag_dir)
    if rank == 0:
        ckpt.mark_complete(save_path, tag, {"step": step, "epoch": epoch, "samples": step * plan.tbs,
                                            "trainer": trainer.name, "dims": trainer.dims(cfg, plan.world),
                                            **trainer.checkpoint_info(),
                                            **({"fingerprint": plan.fingerprint} if plan.fingerprint else {})})
        removed = ckpt.prune(save_path, cfg.checkpoint.keep_last_n)
        log(f"saved checkpoint {tag_dir} (step {step})" + (f", pruned {', '.join(removed)}" if removed else ""), rank)
    dist.barrier()
