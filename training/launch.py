"""`python -m training.launch [the deepspeed command's arguments]`: DeepSpeed's own runner (the `deepspeed`
command, `deepspeed.launcher.runner.main`), with an exit status that is non-zero whenever the ranks stopped early,
whoever was killed.

    python -m training.launch --num_gpus 8 train_ds.py --config configs/ds_config_pp.yml

Why: the runner exits with launch.py's status only when it is positive. When launch.py itself is killed by a
signal (SIGKILL by the OOM killer or a scheduler, SIGHUP), the runner exits 0, although the ranks notice that
their launcher is gone (utils.preempt), save a checkpoint and exit 143. Here the runner runs in this process,
which is made a child subreaper (Linux `prctl(PR_SET_CHILD_SUBREAPER)`), so the orphaned ranks become its
children: once launch.py is gone it waits for them and exits with their status (else 128 + launch.py's signal).
A positive launch.py status (a rank's error or stop code) passes through as it does with `deepspeed`.
One node; a multi-node run goes through pdsh and exits as `deepspeed` does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans() -> list[int]:
    """Wait for every remaining child (the ranks launch.py left behind); their exit codes (128 + signal for a
    killed one)."""
    codes = []
    while True:
        try:
            _, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return codes
        except InterruptedError:
            continue
        code = os.waitstatus_to_exitcode(status)
        codes.append(128 - code if code < 0 else code)


def exit_code(launched: int | None, orphans: list[int]) -> int:
    """The status to exit with, from launch.py's return code and its orphaned ranks' codes."""
    if launched is None:
        return 1
    if launched > 0:
        return launched
    if launched < 0:
        failed = [c for c in orphans if c]
        return max(failed) if failed else 128 - launched
    return 0


def main(argv: list[str] | None = None) -> int:
    from deepspeed.launcher import runner

    subreaper = become_subreaper()
    started: list[subprocess.Popen] = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    # the runner module's own `subprocess` name only: everything else keeps the real module
    names = {k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")}
    runner.subprocess = types.SimpleNamespace(**{**names, "Popen": RecordingPopen})
    try:
        runner.main(argv if argv is not None else sys.argv[1:])
        code = None
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        runner.subprocess = subprocess
    launched = started[0].returncode if started else None
    orphans = reap_orphans() if subreaper and launched is not None and launched < 0 else []
    if code not in (None, 0) and (launched is None or launched >= 0):
        return code
    return exit_code(launched, orphans)


if __name__ == "__main__":
    sys.exit(main())
