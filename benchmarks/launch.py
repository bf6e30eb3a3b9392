"""Run one training command as a subprocess: a wall-clock limit, OOM detection, GPU memory polling.

Nothing here raises on a failed run: every outcome is a `Launch` with a status the sweep can act on
(`ok`, `OOM`, `timeout`, `failed`), so a benchmark of many configurations always reaches its table.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

OOM_PATTERNS = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED",
                          re.IGNORECASE)
KILL_GRACE_S = 15


@dataclass
class Launch:
    status: str  # ok | OOM | timeout | failed
    returncode: int | None
    elapsed_s: float
    log_path: str
    tail: str = ""
    smi_peak_gib: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_bin() -> str:
    """The `deepspeed` launcher next to this Python, else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return local if os.path.exists(local) else (shutil.which("deepspeed") or "deepspeed")


def classify(returncode: int | None, timed_out: bool, oom_in_log: bool) -> str:
    """A run that exits 0 is ok; otherwise an OOM message anywhere in its log names the cause (a rank that
    ran out of memory can leave the others hanging in a collective until the time limit)."""
    if returncode == 0 and not timed_out:
        return "ok"
    if oom_in_log:
        return "OOM"
    return "timeout" if timed_out else "failed"


def read_tail(path: str, chars: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - chars))
        return f.read().decode("utf-8", errors="replace")


def log_mentions_oom(path: str) -> bool:
    """Scan the whole log in chunks (the OOM line can be far from the end of a long traceback)."""
    tail = ""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            text = tail + chunk.decode("utf-8", errors="replace")
            if OOM_PATTERNS.search(text):
                return True
            tail = text[-200:]
    return False


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group (the launcher and its ranks), SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class SmiPoller:
    """Polls `nvidia-smi` for memory used per GPU while a run is alive; the max per GPU, in GiB."""

    def __init__(self, gpus: int, interval_s: float = 1.0):
        self.gpus, self.interval_s = gpus, interval_s
        self.peak: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        self.available = shutil.which("nvidia-smi") is not None

    def sample(self) -> list[float]:
        """MiB used on the first `gpus` visible GPUs (CUDA_VISIBLE_DEVICES respected), as GiB."""
        cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if visible:
            cmd.append("--id=" + ",".join(visible.split(",")[:self.gpus]))
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        return [float(v) / 1024 for v in out.split()[:self.gpus] if v.replace(".", "", 1).isdigit()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                now = self.sample()
            except (OSError, subprocess.SubprocessError):
                return
            self.peak = [max(a, b) for a, b in zip(self.peak, now)] if self.peak else now
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


def run_command(cmd: list[str], env: dict, log_path: str, timeout_s: float, gpus: int = 0,
                cwd: str | None = None) -> Launch:
    """Run `cmd` in its own session with stdout+stderr to `log_path`; never raises for the run's failures."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log, SmiPoller(gpus) as smi:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as e:
            log.write(f"cannot start: {e}\n")
            return Launch("failed", None, 0.0, log_path, tail=f"cannot start: {e}")
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
        except KeyboardInterrupt:  # the run has its own session: Ctrl-C does not reach it by itself
            stop_group(proc)
            raise
    elapsed = time.monotonic() - t0
    tail = read_tail(log_path)
    status = classify(proc.returncode, timed_out, log_mentions_oom(log_path))
    return Launch(status, proc.returncode, elapsed, log_path, tail=tail if status != "ok" else "",
                  smi_peak_gib=[round(v, 2) for v in smi.peak])
