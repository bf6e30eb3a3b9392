"""Crash-safe checkpoints and exact resume: SIGKILL every rank mid-run, resume, same losses."""
import json


from tests.conftest import launch_background, run_deepspeed, sigkill_after_rows, train_config


def losses_by_step(save_path):
    rows = [json.loads(x) for x in (save_path / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for r in rows:  # after a crash a step may appear twice; the resumed run's row comes last
        out[r["step"]] = r["loss"]
    return out, rows


def test_sigkill_then_resume_gives_the_same_losses(tiny_llama_pp, tmp_path):
    _, pp = tiny_llama_pp
    common = dict(n_epoches=2, save_interval=2, keep_last_n=2, **{"optimizer.params.lr": 3e-3})
    ref_cfg = train_config(pp, tmp_path / "ref", **common)
    res = run_deepspeed("train_ds.py", ref_cfg, tmp_path, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    ref, _ = losses_by_step(tmp_path / "ref")
    assert len(ref) == 12

    out = tmp_path / "crash"
    cfg = train_config(pp, out, **common)
    proc = launch_background(cfg, tmp_path, "crash")
    sigkill_after_rows(proc, out, 7)  # somewhere after the step-6 checkpoint, before the end
    assert not (out / "checkpoint_final").exists(), "run finished before the kill; the test proves nothing"
    tags = sorted(p.name for p in out.glob("global_step*"))
    assert tags, "no periodic checkpoint was written before the kill"

    cfg["resume"] = True
    res = run_deepspeed("train_ds.py", cfg, tmp_path, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    got, rows = losses_by_step(out)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got[step], ref[step])
    assert rows[0]["step"] == 1  # appended, never truncated
    # pruning keeps the newest complete periodic checkpoints only
    assert len(list(out.glob("global_step*"))) <= 2


def test_resume_refuses_a_different_topology(tiny_llama_pp, tmp_path):
    _, pp = tiny_llama_pp
    cfg = train_config(pp, tmp_path / "o", max_steps=2)
    assert run_deepspeed("train_ds.py", cfg, tmp_path, 2).returncode == 0
    cfg.update(resume=True, max_steps=4)
    cfg["model_topo"]["process_topology"]["dims"] = [1, 2]
    res = run_deepspeed("train_ds.py", cfg, tmp_path, 2)
    assert res.returncode == 2
    assert "resume" in res.stderr and "dims [2, 1]" in res.stderr and "Traceback" not in res.stderr


def test_nan_weights_are_never_trained_and_stop_the_run(tiny_llama_pp, tmp_path):
    """A NaN in the weights makes every gradient NaN: each step is skipped, then the run stops."""
    import shutil

    import torch

    _, pp = tiny_llama_pp
    bad = tmp_path / "bad_pp"
    shutil.copytree(pp, bad)
    state = torch.load(bad / "layer_02-model_states.pt", weights_only=True)
    state["mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(state, bad / "layer_02-model_states.pt")
    cfg = train_config(bad, tmp_path / "o", max_bad_steps=2)
    res = run_deepspeed("train_ds.py", cfg, tmp_path, 2)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "3 consecutive steps with a non-finite gradient norm (max_bad_steps: 2)" in res.stderr
    _, rows = losses_by_step(tmp_path / "o")
    assert [r["skipped"] for r in rows] == [True, True, True]
    assert not (tmp_path / "o" / "checkpoint_final").exists()
