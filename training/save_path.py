"""`save_path` belongs to one run: a lock while the run is alive, and a fresh run never mixes with an older one.

The lock is `save_path/run.lock` (JSON: pid, host, process start time, when), taken by global rank 0 before
anything is written and removed when the run ends, however it ends short of SIGKILL. A second run into the
same `save_path` is refused while the holder is alive; a lock left by a dead process of this host (SIGKILL, a
crash of the machine) is taken over. A lock of another host cannot be checked from here: it is refused, naming
the file to delete once that run is known to be gone.

A fresh run (`resume: false`) into a `save_path` that holds another run's checkpoints or `metrics.jsonl` is
refused (nothing is deleted); with `overwrite: true` those files are moved into `save_path/replaced-<time>/`,
once every user error of the new run has been checked, so nothing is lost and the old run's checkpoints can no
longer be resumed, pruned or mixed into the new run's metrics.
"""
from __future__ import annotations

import json
import os
import socket
import time

from utils.config import ConfigError

LOCK = "run.lock"
REPLACED = "replaced-"
# what a run writes into save_path: its checkpoints first (they make the dir "another run's")
RUN_FILES = ("latest", "metrics.jsonl")
RUN_DIRS = ("checkpoint_final", "rank_stats", "profile")


class SavePathError(ConfigError):
    """save_path is in use or holds another run (one line, naming the path and what to do)."""


def _host() -> str:
    return socket.gethostname()


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no psutil, or no such process
        return None


def _alive(pid: int, started: float | None) -> bool:
    """Whether `pid` (of this host) is the process that wrote the lock: alive, and (when both are known)
    started at the recorded time, so a recycled pid does not keep a dead run's lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    now = _start_time(pid)
    return started is None or now is None or abs(now - started) < 1.0


def read_lock(save_path: str) -> dict | None:
    """The lock's JSON (None when there is none; {} when it is unreadable)."""
    try:
        with open(os.path.join(save_path, LOCK)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
            f"{info.get('since', '?')}")


class RunLock:
    """`acquire` takes `save_path/run.lock` for this process or raises SavePathError; `release` removes it
    (only while it is still ours) and the save_path dir if the lock created it and it stayed empty."""

    def __init__(self, save_path: str):
        self.save_path = save_path
        self.path = os.path.join(save_path, LOCK)
        self.created_dir = False
        self.held = False

    def _mine(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": _host(), "start_time": _start_time(pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def _try_create(self) -> bool:
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self._mine(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # atomic create-if-absent, with its content already in place
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def acquire(self) -> None:
        if not os.path.isdir(self.save_path):
            os.makedirs(self.save_path, exist_ok=True)
            self.created_dir = True
        for _ in range(3):
            if self._try_create():
                self.held = True
                return
            info = read_lock(self.save_path)
            if info is None:
                continue  # released meanwhile
            stale = (info.get("host") == _host() and isinstance(info.get("pid"), int)
                     and (info["pid"] == os.getpid() or not _alive(info["pid"], info.get("start_time"))))
            if not stale:
                if not info:
                    raise SavePathError(f"save_path: {self.save_path} is locked by {self.path}, which is unreadable; "
                                        f"if no run uses this save_path, delete that file")
                other_host = info.get("host") != _host()
                raise SavePathError(
                    f"save_path: {self.save_path} is in use by another run ({_describe(info)}); wait for it to "
                    f"finish or use another save_path"
                    + (f" (if that run is gone, delete {self.path})" if other_host else ""))
            aside = f"{self.path}.stale{os.getpid()}"
            try:
                os.rename(self.path, aside)  # one taker wins; the others find the new lock and look again
                os.unlink(aside)
            except FileNotFoundError:
                pass
        raise SavePathError(f"save_path: {self.save_path}: could not take {self.path} (other runs keep taking it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = read_lock(self.save_path)
        if info and info.get("pid") == os.getpid() and info.get("host") == _host():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self.created_dir:
            try:
                os.rmdir(self.save_path)  # only if empty: the run failed before writing anything
            except OSError:
                pass


_held: RunLock | None = None


def acquire(save_path: str) -> None:
    """Take the lock for this process (the run's rank 0); `release()` gives it back (run_cli's finally)."""
    global _held
    if _held is not None and _held.held and os.path.abspath(_held.save_path) == os.path.abspath(save_path):
        return
    lock = RunLock(save_path)
    lock.acquire()
    _held = lock


def release() -> None:
    global _held
    if _held is not None:
        _held.release()
        _held = None


def previous_run(save_path: str) -> list[str]:
    """What another run left in `save_path` that a fresh run would mix with: checkpoint dirs (complete or not),
    `latest`, `metrics.jsonl` (names, sorted)."""
    from utils.checkpoint import step_tags

    if not os.path.isdir(save_path):
        return []
    found = [tag for _, tag in step_tags(save_path)]
    if os.path.isdir(os.path.join(save_path, "checkpoint_final")):
        found.append("checkpoint_final")
    found += [name for name in RUN_FILES if os.path.isfile(os.path.join(save_path, name))]
    return found


def describe(names: list[str]) -> str:
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_fresh(save_path: str, overwrite: bool) -> list[str]:
    """For a run with `resume: false`: SavePathError if `save_path` holds another run's files and `overwrite`
    is off; else the names `move_aside` will move (empty when there are none)."""
    found = previous_run(save_path)
    if found and not overwrite:
        raise SavePathError(f"save_path: {save_path} holds another run ({describe(found)}); set resume: true to "
                            f"continue it, overwrite: true to start again (its files are moved to "
                            f"{os.path.join(save_path, REPLACED)}<time>/, nothing is deleted), or use a new save_path")
    return found


def move_aside(save_path: str) -> str | None:
    """Move the previous run's files (checkpoints, latest, metrics, rank stats, profiles) into
    `save_path/replaced-<time>/`; returns that dir (None when there was nothing to move)."""
    from utils.checkpoint import step_tags

    names = [tag for _, tag in step_tags(save_path)]
    names += [n for n in RUN_FILES + RUN_DIRS if os.path.exists(os.path.join(save_path, n))]
    if not names:
        return None
    dest = os.path.join(save_path, REPLACED + time.strftime("%Y%m%d-%H%M%S"))
    suffix = 0
    while os.path.exists(dest + (f"-{suffix}" if suffix else "")):
        suffix += 1
    dest += f"-{suffix}" if suffix else ""
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(save_path, name), os.path.join(dest, name))
    return dest
