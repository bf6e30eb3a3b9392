"""Arguments and config in, exit code out, for both trainers.

Exit codes: 0 done; 2 a user error or a refused checkpoint file (one `error:` line, no traceback); 3 too many
consecutive non-finite steps; 130 / 143 stopped by SIGINT / SIGTERM or the launcher's exit (utils.preempt),
after writing a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.config import ConfigError, load_config, parse_overrides
from utils.metrics import log


def parse_args(description: str, argv=None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML with DeepSpeed keys and ours")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    return args, parse_overrides(rest)


def run_cli(trainer, description: str, argv=None) -> int:
    """Load the config, run `training.loop.train(cfg, trainer)`, turn what it raises into an exit code."""
    try:
        args, overrides = parse_args(description, argv)
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from models import ModelError
    from training.loop import train
    from utils import preempt
    from utils.checkpoint import CheckpointError
    from utils.guard import BadStepsError

    restore_signals = preempt.install()
    try:
        return train(cfg, trainer)
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
