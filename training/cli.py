"""Arguments and config in, exit code out, for both trainers.

Exit codes: 0 done; 2 a user error (an installed DeepSpeed without the internals training/ds patches among them)
or a refused checkpoint file (one `error:` line, no traceback, printed by rank 0 when every rank finds it before
the process group), or a data file changed during the run (after a checkpoint); 3 too many consecutive
non-finite steps; 129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM or the launcher's exit (utils.preempt),
after writing a checkpoint.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import TYPE_CHECKING

from utils.config import ConfigError, load_config, parse_overrides
from utils.metrics import log

if TYPE_CHECKING:
    from training.strategy import Trainer


def parse_args(description: str, argv=None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML with DeepSpeed keys and ours")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    return args, parse_overrides(rest)


def run_cli(trainer: Trainer, description: str, argv=None) -> int:
    """Load the config, run `training.loop.train(cfg, trainer)`, turn what it raises into an exit code."""
    try:
        args, overrides = parse_args(description, argv)
        from training.ds import check_installed

        check_installed()  # the DeepSpeed internals training/ds patches exist (else one line, exit 2)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from models import ModelError
    from training.loop import train
    from training import save_path
    from training.guard import BadStepsError
    from utils import preempt
    from utils.checkpoint import CheckpointError

    restore_signals = preempt.install()
    rank = int(os.environ.get("RANK", "0"))
    try:
        return train(cfg, trainer)
    except preempt.Stopped as e:  # the step's checkpoint is written: one line, no traceback
        if rank == 0:
            print(f"error: {e}", file=sys.stderr) if e.is_error else log(str(e), 0)
        return e.code
    except (ConfigError, ModelError) as e:
        if rank == 0 or _after_init():  # before the process group every rank finds the same: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        if not (e.every_rank and rank != 0):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except BadStepsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        where = e.filename or cfg.checkpoint.save_path
        print(f"error: {where}: {e.strerror} while training; the newest complete checkpoint in "
              f"{cfg.checkpoint.save_path} is intact: free space and resume with resume: true", file=sys.stderr)
        return 2
    finally:
        save_path.release()
        restore_signals()


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk, a quota, a read-only remount


def _after_init() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
