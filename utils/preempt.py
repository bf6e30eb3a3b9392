"""Clean stop on SIGTERM, SIGINT, SIGHUP or the launcher's exit: every rank finishes its step, the ranks agree on
the step, one checkpoint is written, rank 0 says so in one line, and each rank exits 128 + the signal
(130 SIGINT, 143 SIGTERM, 129 SIGHUP: a closed terminal or a dropped ssh session; 143 too when the launcher is
gone). A data file that changes on disk during the run stops it the same way (exit 2, see `DATA_CHANGED`).

Why the ranks must do this themselves (DeepSpeed 0.19.8, `deepspeed` on one node):
- the `deepspeed` runner (launcher/runner.py) installs no signal handler on one node: SIGTERM kills it
  at once and launch.py and the ranks train on to the end, orphaned; SIGINT raises KeyboardInterrupt in
  its `Popen.wait()` (its own traceback) and it exits, again without telling launch.py;
- launch.py, on SIGTERM or SIGINT, sends SIGTERM to each rank's process tree in turn, waits up to 30 s
  for each, SIGKILLs what is left and exits 1; when a rank exits non-zero it does the same to the other
  ranks and exits with that rank's code (which the runner passes on).
So here: SIGINT/SIGTERM only set a flag (never an exception in the middle of a step or a collective;
a second SIGINT to the same process raises KeyboardInterrupt, the way to stop at once without a checkpoint);
at each step boundary a rank started by DeepSpeed's launch.py also checks that launch.py is still its
parent and that launch.py's parent (the runner) is still alive; then one all_reduce(MAX) makes every
rank stop at the same step even when only one of them was signalled.
"""
from __future__ import annotations

import os
import faulthandler
import signal
import sys
import threading

LAUNCHER_EXITED = 64  # a stop reason above the signal numbers caught; exits as SIGTERM would (143)
DATA_CHANGED = 65  # a data file changed on disk (training.loop's DataWatch): a user error, exits 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_reason = 0  # first stop reason seen by this process (a signal number, LAUNCHER_EXITED or DATA_CHANGED)
_detail = ""  # what DATA_CHANGED saw
_watch: list[tuple[int, int]] = []  # (pid, the parent it must keep): this rank and launch.py


class Stopped(Exception):
    """Raised by a trainer's step loop after the stop checkpoint; run_cli prints it on rank 0 and
    returns `code`."""

    def __init__(self, reason: int, step: int, checkpoint: str):
        self.is_error = reason == DATA_CHANGED
        if self.is_error:
            self.code = 2
            super().__init__(f"{_detail or 'a data file changed on disk'} while training: stopped after step {step}: "
                             f"saved checkpoint {checkpoint} (samples read after the change may come from the new "
                             f"content); resume with resume: true (it names the change; resume_allow_changes: true "
                             f"continues on the new data)")
            return
        self.code = 128 + (signal.SIGTERM if reason == LAUNCHER_EXITED else reason)
        why = "the launcher's exit" if reason == LAUNCHER_EXITED else signal.Signals(reason).name
        super().__init__(f"stopped by {why} after step {step}: saved checkpoint {checkpoint}; "
                         "resume with resume: true")


def request(reason: int, detail: str = "") -> None:
    """Stop at this step boundary for `reason` (unless a stop is already asked for)."""
    global _reason, _detail
    if not _reason:
        _reason, _detail = reason, detail


def _on_signal(signum, frame) -> None:
    global _reason
    if signum == _reason == signal.SIGINT:  # Ctrl-C twice: stop now, as Python would (no checkpoint)
        raise KeyboardInterrupt
    if signum == signal.SIGHUP:
        _silence_hung_up_terminal()
    _reason = _reason or signum


def _silence_hung_up_terminal() -> None:
    """After a terminal hangup every write to it fails (EIO): stdout/stderr on a terminal that no longer answers
    as one go to /dev/null, so the stop line and the progress bar cannot kill the rank before its checkpoint."""
    import stat

    for fd in (1, 2):
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode) and not os.isatty(fd):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)
        except OSError:
            pass


def _launcher_chain() -> list[tuple[int, int]]:
    """When DeepSpeed's launch.py started this rank: [(this rank, launch.py), (launch.py, its parent)]."""
    try:
        import psutil

        launch = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in launch.cmdline():
            return []
        chain = [(os.getpid(), launch.pid)]
        if launch.ppid() > 1:
            chain.append((launch.pid, launch.ppid()))
        return chain
    except Exception:  # noqa: BLE001 - no psutil, no /proc: signals alone
        return []


def _launcher_exited() -> bool:
    import psutil

    for pid, parent in _watch:
        try:
            if psutil.Process(pid).ppid() != parent:  # reparented: its parent is gone
                return True
        except psutil.Error:
            return True
    return False


def install():
    """At rank start (run_cli): SIGINT/SIGTERM/SIGHUP set the stop flag. Returns what restores the previous
    handlers (for in-process callers)."""
    global _reason, _watch, _detail
    _reason, _watch, _detail = 0, _launcher_chain(), ""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    if sys.__stderr__ is not None:  # `kill -USR1 PID`: every thread's stack to the process's stderr (fd 2)
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)

    def restore() -> None:
        if sys.__stderr__ is not None:
            faulthandler.unregister(signal.SIGUSR1)
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)
    return restore


def workers_ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker ignores SIGINT, and SIGTERM unless its rank sent it. A SIGTERM
    to the whole process group (SLURM) or launch.py's to each rank's process tree would otherwise kill it
    (torch's worker handler re-raises a SIGTERM from anyone else) and torch would raise in the rank mid-step.
    Its rank's SIGTERM (multiprocessing's shutdown at exit) still ends it at once, as torch's handler does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal hangs up the whole process group
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: torch's handling as it is
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit it

    def wait_for_the_rank() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
            pass
        os._exit(0)
    threading.Thread(target=wait_for_the_rank, daemon=True).start()


def agreed(device) -> int:
    """Called by every rank at every step boundary: the reason to stop now (0: go on), the same on all
    ranks. One all_reduce of one integer."""
    global _reason
    if not _reason and _watch and _launcher_exited():
        _reason = LAUNCHER_EXITED
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _reason
    flag = torch.tensor([_reason], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
