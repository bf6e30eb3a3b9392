"""SIGTERM / SIGINT (utils/preempt.py): every rank stops at the same step boundary, writes a complete
checkpoint for it, rank 0 says so in one line, no traceback, a non-zero exit, no rank left alive, and
`resume: true` continues with the losses of an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import time

import psutil
import yaml

from tests.conftest import ROOT, deepspeed_bin, free_port, launch_env, run_deepspeed, train_config
from utils import checkpoint as ckpt
from utils import preempt

STOPPED = re.compile(r"\[rank 0\] stopped by (.+) after step (\d+): saved checkpoint (\S+); resume with resume: true$",
                     re.M)


def rows(save_path):
    return [json.loads(x) for x in (save_path / "metrics.jsonl").read_text().splitlines()]


def start(script, cfg, tmp_path, name):
    """`deepspeed --num_gpus 2 script` in its own session, output to a file (a pipe nobody reads could fill)."""
    cfg_path = tmp_path / f"{name}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = launch_env()
    cmd = [deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / script),
           "--config", str(cfg_path)]
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc, tmp_path / f"{name}.log"


def wait_for_rows(proc, save_path, n, timeout=300):
    """Until metrics.jsonl has `n` rows; then the launcher's descendants and the two ranks (launch.py's
    children; their DataLoader workers are the ranks' children)."""
    deadline = time.time() + timeout
    metrics = save_path / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {n}"
        assert time.time() < deadline, f"no step {n} within {timeout} s"
        time.sleep(0.05)
    (launch,) = psutil.Process(proc.pid).children()
    ranks = sorted(launch.children(), key=lambda p: "--local_rank=1" in p.cmdline())
    assert len(ranks) == 2 and "--local_rank=0" in ranks[0].cmdline(), ranks
    return psutil.Process(proc.pid).children(recursive=True), ranks


def running(p) -> bool:
    """Alive and not a zombie (a process that exited but whose reparented parent has not reaped it yet)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stopped(proc, log, tree, timeout=240):
    """Wait for the launcher and every process it started; their output and the stop line's (why, step, tag)."""
    try:
        proc.wait(timeout=timeout)
        deadline = time.time() + timeout
        while any(running(p) for p in tree) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in tree if running(p)], "still running after the launcher exited"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:
            if running(p):
                p.kill()
    out = log.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    found = STOPPED.findall(out)
    assert len(found) == 1, out[-4000:]
    why, step, tag = found[0]
    return out, why, int(step), tag


def assert_complete(save_path, tag, step):
    assert tag == str(save_path / f"global_step{step}")
    assert ckpt.is_complete(str(save_path), f"global_step{step}")
    assert ckpt.read_info(str(save_path), f"global_step{step}")["step"] == step


def test_sigterm_to_the_launcher_then_sigint_to_one_rank_and_exact_resume(tiny_llama_pp, tmp_path):
    """SIGTERM to the `deepspeed` runner alone (what `kill PID` and Kubernetes do): DeepSpeed's runner dies
    without telling launch.py, and the ranks notice at the next step. Then the resumed run gets SIGINT on
    rank 1 only: rank 0 stops at the same step (all_reduce), exit 130 through launch.py and the runner."""
    _, pp = tiny_llama_pp
    common = dict(n_epoches=4, save_interval=5, keep_last_n=2, **{"optimizer.params.lr": 3e-3})
    res = run_deepspeed("train_ds.py", train_config(pp, tmp_path / "ref", **common), tmp_path, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = {r["step"]: r["loss"] for r in rows(tmp_path / "ref")}
    assert sorted(ref) == list(range(1, 25))

    out = tmp_path / "run"
    cfg = train_config(pp, out, **common)
    proc, log = start("train_ds.py", cfg, tmp_path, "sigterm")
    tree, _ = wait_for_rows(proc, out, 2)
    os.kill(proc.pid, signal.SIGTERM)
    text, why, first, tag = stopped(proc, log, tree)
    assert proc.returncode == -signal.SIGTERM  # the runner itself: DeepSpeed's, killed outright
    assert why == "the launcher's exit" and 2 <= first < 24
    assert "exits with return code = 143" in text  # launch.py, orphaned, saw a rank exit 143
    assert_complete(out, tag, first)
    assert rows(out)[-1]["step"] == first and not (out / "checkpoint_final").exists()

    cfg["resume"] = True
    proc, log = start("train_ds.py", cfg, tmp_path, "sigint")
    tree, ranks = wait_for_rows(proc, out, first + 2)
    ranks[1].send_signal(signal.SIGINT)
    text, why, second, tag = stopped(proc, log, tree)
    assert proc.returncode == 130, text[-3000:]
    assert why == "SIGINT" and first + 2 <= second < 24
    assert f"resumed from {out}/global_step{first} at step {first}" in text
    assert_complete(out, tag, second)

    got = {}
    for r in rows(out):  # the stopped run's rows, then the resumed run's
        got[r["step"]] = r["loss"]
    assert sorted(got) == list(range(1, second + 1))
    for step in range(1, second + 1):
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got[step], ref[step])


def test_zero_trainer_stops_on_sigterm_to_a_rank_and_the_dataloader_workers(tiny_llama_pp, tmp_path):
    """SIGTERM to rank 1 and every DataLoader worker (as a signal to the whole job would): the workers
    live on (torch's own handler would kill them and make the rank raise mid-step), rank 0 stops at the
    same step, and every process exits by itself: 143 passed on by launch.py and the runner."""
    hf, _ = tiny_llama_pp
    out = tmp_path / "zero"
    cfg = train_config(hf, out, n_epoches=4, num_workers=2, **{"optimizer.params.torch_adam": True})
    proc, log = start("train_ds_zero.py", cfg, tmp_path, "zero")
    tree, ranks = wait_for_rows(proc, out, 2)
    workers = [w for r in ranks for w in r.children()]
    assert len(workers) == 4, workers
    for p in [ranks[1], *workers]:
        p.send_signal(signal.SIGTERM)
    text, why, step, tag = stopped(proc, log, tree)
    assert proc.returncode == 143, text[-3000:]
    assert why == "SIGTERM" and 2 <= step < 24
    assert_complete(out, tag, step)
    assert rows(out)[-1]["step"] == step


def test_signals_only_set_the_flag_and_a_second_ctrl_c_interrupts():
    restore = preempt.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the first reason stays
        assert preempt.agreed(None) == signal.SIGTERM  # no process group: this process's reason
        preempt.install()
        os.kill(os.getpid(), signal.SIGINT)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("a second SIGINT should raise KeyboardInterrupt")
        except KeyboardInterrupt:
            pass
    finally:
        restore()
    stop = preempt.Stopped(preempt.LAUNCHER_EXITED, 7, "out/global_step7")
    assert stop.code == 143 and str(stop) == ("stopped by the launcher's exit after step 7: saved checkpoint "
                                              "out/global_step7; resume with resume: true")
    assert preempt.Stopped(signal.SIGINT, 3, "o/global_step3").code == 130


def _worker(ready):
    preempt.workers_ignore_stop_signals(0)
    ready.set()
    time.sleep(60)


def test_dataloader_worker_ignores_a_strangers_sigterm_but_not_its_ranks():
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # DataLoader's default on Linux
    ready = ctx.Event()
    worker = ctx.Process(target=_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # not the worker's parent
        worker.join(1)
        assert worker.is_alive()
        worker.terminate()  # what multiprocessing does to daemon children at the rank's exit
        worker.join(10)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


def test_sigusr1_prints_every_threads_stack_and_training_goes_on():
    """`kill -USR1 PID` on a rank (after preempt.install, as run_cli does): the Python stack of every thread
    on stderr, naming the function it is in, and the process carries on."""
    import sys

    code = ("import os, signal, time; from utils import preempt; preempt.install()\n"
            "def waiting_in_a_collective():\n"
            "    os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2); return 'still here'\n"
            "print(waiting_in_a_collective())\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "still here", res.stderr
    assert "waiting_in_a_collective" in res.stderr and "Current thread" in res.stderr, res.stderr
