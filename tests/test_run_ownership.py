"""Runs that never destroy each other (issue 26): one live run per save_path (a lock), a fresh run refused in
another run's save_path (or its files moved aside with overwrite: true), a run fingerprint in each checkpoint
that resume compares, a data file rewritten mid-run stopping the run with a checkpoint, SIGHUP handled like
SIGTERM, training.launch's non-zero exit when launch.py is killed, and the lr of step N logged for step N.
Each user error is one `error:` line (once, by rank 0) and leaves the files already there byte-identical."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

import train_ds
from tests.conftest import ROOT, SAMPLE_DATA, deepspeed_bin, free_port, launch_env, run_deepspeed, train_config
from utils import checkpoint as ckpt
from training import save_path
from utils import run_fingerprint

SCHED = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 2e-3, "warmup_num_steps": 2,
                                        "warmup_type": "linear"}}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def jsonl_data(path: Path, extra: int = 0) -> Path:
    """examples/data/sample.json as a .jsonl file (plus the first `extra` samples once more)."""
    from data.loading import load_samples

    samples = load_samples(str(SAMPLE_DATA))
    path.write_text("".join(json.dumps(s) + "\n" for s in samples + samples[:extra]))
    return path


def in_process(cfg: dict, tmp_path: Path, capsys, monkeypatch, name: str = "user") -> tuple[int, str]:
    """train_ds.main in this process as rank 0 of 2 (every check before the process group runs)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = train_ds.main(["--config", str(path)])
    return code, capsys.readouterr().err


def start(cmd_head: list[str], cfg: dict, tmp_path: Path, name: str):
    cfg_path = tmp_path / f"{name}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [*cmd_head, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "train_ds.py"),
           "--config", str(cfg_path)]
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    return proc, tmp_path / f"{name}.log"


def wait_rows(proc, out: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= n):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {n}"
        assert time.time() < deadline
        time.sleep(0.05)


def finish(proc, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        try:  # whatever the group left behind (a rank orphaned by a killed launcher)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_ranks_gone(pids: list[int], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:
            return
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# Cheap: no launch


def test_fresh_run_into_another_runs_save_path_is_refused_and_nothing_is_touched(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    (out / "global_step2").mkdir(parents=True)
    (out / "global_step2" / "layer_01-model_states.pt").write_bytes(b"weights of run A")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(out)
    cfg = train_config(tmp_path / "no-model", out)
    code, err = in_process(cfg, tmp_path, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2
    assert f"save_path: {out} holds another run (global_step2, metrics.jsonl)" in line
    assert "resume: true" in line and "overwrite: true" in line and "new save_path" in line
    assert snapshot(out) == before  # the lock was released, nothing else touched


def test_overwrite_moves_the_previous_run_aside_only_after_every_check(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoint_final").mkdir(parents=True)
    (out / "checkpoint_final" / "COMPLETE").write_text('{"step": 3}')
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(out)
    code, err = in_process(train_config(tmp_path / "no-model", out, overwrite=True), tmp_path, capsys, monkeypatch)
    assert code == 2 and "model_path" in one_error_line(err)  # a user error: nothing moved
    assert snapshot(out) == before
    moved = save_path.move_aside(str(out))
    assert snapshot(Path(moved)) == before and not (out / "checkpoint_final").exists()


def test_a_live_runs_lock_refuses_a_second_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        lock = {"pid": holder.pid, "host": socket.gethostname(), "start_time": psutil.Process(holder.pid).create_time(),
                "since": "earlier"}
        (out / save_path.LOCK).write_text(json.dumps(lock))
        before = snapshot(out)
        code, err = in_process(train_config(tmp_path / "no-model", out), tmp_path, capsys, monkeypatch)
        line = one_error_line(err)
        assert code == 2
        assert f"save_path: {out} is in use by another run (pid {holder.pid} on host {socket.gethostname()}" in line
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_runs_lock_is_taken_over_and_released(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / save_path.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    code, err = in_process(train_config(tmp_path / "no-model", out), tmp_path, capsys, monkeypatch)
    assert code == 2 and "model_path" in one_error_line(err)  # got past the lock to the next check
    assert not (out / save_path.LOCK).exists()


def test_another_hosts_lock_names_the_file_to_delete(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / save_path.LOCK).write_text(json.dumps({"pid": 123, "host": "node-elsewhere", "since": "then"}))
    code, err = in_process(train_config(tmp_path / "no-model", out), tmp_path, capsys, monkeypatch)
    line = one_error_line(err)
    assert "pid 123 on host node-elsewhere" in line and f"delete {out / save_path.LOCK}" in line


def test_fingerprint_changes_name_what_changed(tmp_path):
    data = jsonl_data(tmp_path / "d.jsonl")
    tok = tmp_path / "m"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")

    class Cfg(dict):
        pass
    cfg = Cfg({"synthetic_data": False, "data_path": str(data), "eval_data_path": None, "model_path": str(tok),
               "seed": 7, "max_seq_len": 256, "packing": False, "template": "builtin", "eval_ratio": 0.0})
    old = run_fingerprint.of_run(cfg, 4, 1, 4, 1)
    assert run_fingerprint.changes(old, run_fingerprint.of_run(cfg, 4, 1, 4, 1)) == []
    os.utime(data, ns=(1, 1))  # touched or copied: the same bytes are the same data
    assert run_fingerprint.changes(old, run_fingerprint.of_run(cfg, 4, 1, 4, 1)) == []
    jsonl_data(data, extra=8)
    (tok / "tokenizer.json").write_text('{"x": 1}')
    new = run_fingerprint.of_run(dict(cfg, seed=8), 8, 1, 8, 1)
    diffs = run_fingerprint.changes(old, new)
    assert diffs[0].startswith(f"data_path {data} changed (") and "bytes)" in diffs[0]
    assert "tokenizer files of model_path changed (tokenizer.json)" in diffs
    assert "seed 7 -> 8" in diffs and "train_batch_size 4 -> 8" in diffs


# ----------------------------------------------------------------------------------------------
# Real 2-rank runs


@pytest.fixture(scope="module")
def run_a(tiny_llama_pp, tmp_path_factory):
    """Run A: 3 steps, a checkpoint each step, a warmup scheduler; then run B, fresh, other seed, same save_path."""
    _, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("run_a")
    data = jsonl_data(tmp / "data.jsonl")
    out = tmp / "out"
    cfg = train_config(pp, out, max_steps=3, save_interval=1, keep_last_n=5, data_path=str(data), scheduler=SCHED)
    res = run_deepspeed("train_ds.py", cfg, tmp, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    before = snapshot(out)
    res_b = run_deepspeed("train_ds.py", dict(cfg, seed=8), tmp, 2)
    return dict(tmp=tmp, out=out, cfg=cfg, data=data, res=res, before=before, res_b=res_b, after_b=snapshot(out))


def test_lr_logged_for_a_step_is_the_one_that_step_used(run_a):
    # WarmupLR: step 1 runs at warmup_min_lr, the scheduler steps after each optimizer step (from iteration 0)
    assert [r["lr"] for r in rows(run_a["out"])] == pytest.approx([1e-3, 1e-3, 1.5e-3])  # was logged [1e-3, 1.5e-3, 2e-3]


def test_second_fresh_run_is_refused_once_and_run_a_is_intact(run_a):
    res = run_a["res_b"]
    assert res.returncode == 2
    line = one_error_line(res.stderr)  # printed by rank 0 only
    assert f"save_path: {run_a['out']} holds another run (global_step1, global_step2, checkpoint_final, latest" \
           in line
    assert run_a["after_b"] == run_a["before"]
    info = ckpt.read_info(str(run_a["out"]), "checkpoint_final")
    assert info["fingerprint"]["seed"] == 7 and info["fingerprint"]["samples"] > 0
    assert info["fingerprint"]["data"][0]["sha256"]


def test_resume_refuses_a_changed_seed_and_changed_data_then_continues_when_told(run_a, capsys, monkeypatch):
    out, cfg, tmp = run_a["out"], run_a["cfg"], run_a["tmp"]
    code, err = in_process(dict(cfg, resume=True, seed=8, max_steps=5), tmp, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and "resume: since checkpoint" in line and "seed 7 -> 8" in line
    assert "resume_allow_changes: true" in line
    jsonl_data(run_a["data"], extra=8)  # 8 samples appended after the stop
    code, err = in_process(dict(cfg, resume=True, max_steps=5), tmp, capsys, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and f"data_path {run_a['data']} changed (" in line and "bytes)" in line
    assert snapshot(out) == run_a["before"]

    res = run_deepspeed("train_ds.py", dict(cfg, resume=True, max_steps=5, resume_allow_changes=True), tmp, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [x for x in res.stderr.splitlines() if "warning: resume_allow_changes" in x]
    assert len(warnings) == 1 and f"data_path {run_a['data']} changed" in warnings[0]
    assert "step 3 (epoch 0, batch 3 of" in warnings[0]
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5]


def test_concurrent_run_refused_and_data_rewritten_mid_run_stops_with_a_checkpoint(tiny_llama_pp, tmp_path, capsys,
                                                                                  monkeypatch):
    _, pp = tiny_llama_pp
    data = jsonl_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    cfg = train_config(pp, out, n_epoches=50, data_path=str(data))
    proc, log = start([deepspeed_bin()], cfg, tmp_path, "long")
    try:
        wait_rows(proc, out, 1)
        lock = json.loads((out / save_path.LOCK).read_text())
        before = (out / "metrics.jsonl").read_bytes()[:10]
        code, err = in_process(dict(cfg, resume=True), tmp_path, capsys, monkeypatch, "second")
        line = one_error_line(err)
        assert code == 2 and f"is in use by another run (pid {lock['pid']} on host {socket.gethostname()}" in line
        assert (out / save_path.LOCK).exists() and (out / "metrics.jsonl").read_bytes()[:10] == before
        jsonl_data(data, extra=3)  # rewritten in place while the run reads it
        code = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert "Traceback" not in text
    (line,) = [x for x in text.splitlines() if x.startswith("error: ")]
    assert f"{data} changed on disk" in line and "while training: stopped after step" in line
    step = int(line.split("stopped after step ")[1].split(":")[0])
    assert ckpt.is_complete(str(out), f"global_step{step}") and ckpt.verify(str(out), f"global_step{step}") is None
    assert not (out / save_path.LOCK).exists()


def test_launcher_wrapper_exits_nonzero_when_launch_py_is_killed_and_sighup_stops_cleanly(tiny_llama_pp, tmp_path):
    _, pp = tiny_llama_pp
    out = tmp_path / "out"
    cfg = train_config(pp, out, n_epoches=50)
    proc, log = start([sys.executable, "-m", "training.launch"], cfg, tmp_path, "wrapped")
    try:
        wait_rows(proc, out, 2)
        (launch,) = [p for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        launch.kill()  # SIGKILL: DeepSpeed's runner would exit 0 here
        code = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert "stopped by the launcher's exit after step" in text and "Traceback" not in text
    assert ckpt.newest_complete(str(out)).startswith("global_step")

    # SIGHUP to the whole process group, as a closed terminal sends it: a checkpoint and exit 129
    cfg2 = dict(cfg, resume=True)
    proc, log = start([deepspeed_bin()], cfg2, tmp_path, "hup")
    n = len(rows(out))
    try:
        wait_rows(proc, out, n + 2)
        ranks = [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if "train_ds.py" in " ".join(p.cmdline())]
        os.killpg(proc.pid, signal.SIGHUP)
        proc.wait(timeout=120)
        wait_ranks_gone(ranks)
    finally:
        finish(proc)
    text = log.read_text()
    assert "[rank 0] stopped by SIGHUP after step" in text, text[-3000:]
    assert "Traceback" not in text
    step = int(text.split("stopped by SIGHUP after step ")[1].split(":")[0])
    assert ckpt.is_complete(str(out), f"global_step{step}")


def test_launcher_exit_code_rules():
    from training.launch import exit_code

    assert exit_code(0, []) == 0
    assert exit_code(2, []) == 2
    assert exit_code(-9, [143, 143]) == 143
    assert exit_code(-9, [0, 0]) == 137
    assert exit_code(-1, []) == 129


def test_full_disk_during_a_checkpoint_is_one_line_and_the_previous_one_stays(tiny_llama_pp, tmp_path):
    _, pp = tiny_llama_pp
    small = tmp_path / "small"
    small.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        out = small / "out"
        proc, log = start([deepspeed_bin()], train_config(pp, out, n_epoches=50, save_interval=2), tmp_path, "full")
        try:
            deadline = time.time() + 300
            while not ckpt.is_complete(str(out), "global_step2"):
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            before = snapshot(out / "global_step2")
            with open(small / "filler", "wb") as f:  # the disk fills up under the run
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass
            code = finish(proc, timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        text = log.read_text()
        assert code == 2, text[-3000:]
        assert "Traceback" not in text
        errors = [x for x in text.splitlines() if x.startswith("error: ")]
        assert errors and all("No space left on device" in x and "resume with resume: true" in x for x in errors), text
        assert snapshot(out / "global_step2") == before and ckpt.verify(str(out), "global_step2") is None
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=True)


# ----------------------------------------------------------------------------------------------
# Valid but odd input: one line naming the file, the key or the sample, no traceback


def test_odd_data_files_are_one_line(tmp_path):
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import run_cli

    deep = "[" * 5000 + "]" * 5000
    good = '{"type": "pretrain", "text": "hi"}'
    (tmp_path / "deep.jsonl").write_text(f'{good}\n{{"type": "pretrain", "text": {deep}}}\n')
    (tmp_path / "deep.json").write_text(f'[{good}, {{"type": "pretrain", "text": {deep}}}]')
    (tmp_path / "surrogate.jsonl").write_text(f'{good}\n{{"type": "pretrain", "text": "a\\ud800b"}}\n')
    pq.write_table(pa.table({"text": ["a"], "type": ["pretrain"], "ts": [datetime.datetime(2024, 1, 1)],
                             "price": pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2))}),
                   tmp_path / "typed.parquet")
    pq.write_table(pa.table({"type": ["pretrain"], "text": [b"\xff\xfe"]}), tmp_path / "binary.parquet")
    cases = [("deep.jsonl", "line 2, column 1: invalid JSON: nested too deeply"),
             ("deep.json", "line 1: sample 1: nested too deeply"),
             ("surrogate.jsonl", "line 2: sample 1 (pretrain): text: holds a lone surrogate (\\ud800) at character 1"),
             ("typed.parquet", "sample 0 (pretrain): ts: unknown field"),
             ("binary.parquet", "row group 0, row 0: column 'text': binary data that is not UTF-8 text")]
    tok = ROOT / "examples" / "tiny_llama"
    for name, words in cases:
        res = run_cli("-m", "data.check", "--data", str(tmp_path / name), "--tokenizer", str(tok), "--max-seq-len", "64")
        line = one_error_line(res.stderr)
        assert res.returncode != 0 and f"{tmp_path / name}: " in line and words in line, (name, line)


def test_parquet_with_more_than_65535_row_groups_trains(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.loading import open_samples

    n = 65540
    pq.write_table(pa.table({"type": ["pretrain"] * n, "text": [f"t{i}" for i in range(n)]}), tmp_path / "g.parquet",
                   row_group_size=1)
    samples = open_samples(str(tmp_path / "g.parquet"))
    assert len(samples) == n and samples[n - 1]["text"] == f"t{n - 1}"


@pytest.mark.parametrize("override, words", [
    ("--seed=[1", ["command line: --seed: cannot read '[1' as a YAML value"]),
    ("--max_steps=!!python/object/apply:os.system [echo]", ["command line: --max_steps:", "cannot read"]),
    ("--seed=1180591620717411303424", ["seed: must be in [0, 2**32)"]),
    ("--optimizer.no_wd_kws=['[']", ["optimizer.no_wd_kws[0]: '[' is not a valid regex"]),
])
def test_odd_overrides_are_one_line(override, words, tmp_path, capsys, monkeypatch):
    cfg = train_config(tmp_path / "no-model", tmp_path / "run")
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_ds.main(["--config", str(path), override]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


def test_binary_config_file_and_the_memory_planner(tmp_path, capsys):
    from tests.conftest import run_cli

    path = tmp_path / "c.yml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert train_ds.main(["--config", str(path)]) == 2
    assert "not a text file (byte" in one_error_line(capsys.readouterr().err)
    cfg = tmp_path / "ok.yml"
    cfg.write_text(yaml.safe_dump(train_config(tmp_path / "no-model", tmp_path / "run")))
    res = run_cli("-m", "tools.memory", "--config", str(cfg), "--seed=[1")
    assert res.returncode == 2 and "cannot read '[1' as a YAML value" in one_error_line(res.stderr)
