"""`resume: true` never runs code planted in a checkpoint: every file is read with weights_only=True.

Real checkpoints of both trainers (pipeline bf16 + ZeRO-1, ZeRO-3) are written and resumed in one warm
process (tests/forked_runs.py forks one single-rank run per job: one launch for the whole file). Each
kind of file they hold is then planted with a pickle that would create a marker file, and resumed twice:
through the trainer's scan before any process group (in-process here), and with the scan switched off so
DeepSpeed's own loads in `engine.load_checkpoint` meet the file.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, launch_env, train_config
from tests.forked_runs import Planted, hashes, plant

PIPE_FILES = ["mp_rank_00_model_states.pt", "layer_00-model_states.pt", "layer_05-model_states.pt",
              "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]  # + layer_01..04, same kind as these two
ZERO_FILES = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def pipe_config(pp, save_path, **overrides):
    """1 stage, bf16 + ZeRO-1: the files hold every non-tensor type of the allow-list but DynamicLossScaler."""
    keys = {"max_steps": 4, "save_interval": 2, "keep_last_n": 5, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 1}, "optimizer.params.torch_adam": True, **overrides}
    return train_config(pp, save_path, dims=(1, 1), **keys)


def zero_config(hf, save_path, **overrides):
    """ZeRO-3 (the trainer's default stage), fp32, one rank."""
    return train_config(hf, save_path, dims=(1, 1), **{"max_steps": 2, "optimizer.params.torch_adam": True,
                                                       **overrides})


def write(cfg, path):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def refusal_line(path):
    return (f"error: checkpoint {path}: refuses to unpickle 'builtins.getattr', 'pathlib.Path' (weights_only); "
            f"the file may be malicious or from an incompatible DeepSpeed")


@pytest.fixture(scope="module")
def runs(tiny_llama_pp, tmp_path_factory):
    """Save both checkpoints, resume an unmodified copy, and resume a planted copy per kind of file."""
    hf, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("ckpt_security")
    jobs, names = [], []

    def job(name, trainer, cfg, **extra):
        names.append(name)
        jobs.append(dict(trainer=trainer, config=write(cfg, tmp / f"{name}.yml"), log=str(tmp / f"{name}.log"),
                         **extra))

    job("pipe_save", "train_ds", pipe_config(pp, tmp / "pipe"))
    job("zero_save", "train_ds_zero", zero_config(hf, tmp / "zero"))
    # resume from step 2 (the final checkpoint of step 4 left out): steps 3 and 4 again
    job("pipe_resume", "train_ds", pipe_config(pp, tmp / "pipe_resume", resume=True),
        copy=[str(tmp / "pipe"), str(tmp / "pipe_resume")], exclude=["checkpoint_final", "metrics.jsonl"])
    for trainer, src, cfg_fn, model, files in (("train_ds", "pipe", pipe_config, pp, PIPE_FILES),
                                               ("train_ds_zero", "zero", zero_config, hf, ZERO_FILES)):
        for name in files:
            dst = tmp / f"{src}_planted_{name}"
            job(f"{src}:{name}", trainer, cfg_fn(model, dst, resume=True, max_steps=6), skip_scan=True,
                copy=[str(tmp / src), str(dst)], plant=[str(dst / "checkpoint_final" / name), str(dst) + ".marker"],
                hash_dir=str(dst))
    jobs_path, results_path = tmp / "jobs.json", tmp / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    env = launch_env()
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "forked_runs.py"), str(jobs_path), str(results_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = dict(zip(names, json.loads(results_path.read_text())))
    for name, j in zip(names, jobs):
        results[name]["log"] = open(j["log"]).read()
    for name in ("pipe_save", "zero_save"):
        assert results[name]["rc"] == 0, results[name]["log"][-3000:]
    return tmp, results


def metrics(save_path):
    return {r["step"]: r["loss"] for r in map(json.loads, (save_path / "metrics.jsonl").read_text().splitlines())}


def test_unmodified_checkpoint_resumes_exactly(runs):
    """bf16 + ZeRO-1 through the weights_only engine: fragment_address, ZeroStageEnum and LossScaler load."""
    tmp, results = runs
    r = results["pipe_resume"]
    assert r["rc"] == 0, r["log"][-3000:]
    assert "global_step2 at step 2" in r["log"]
    ref, got = metrics(tmp / "pipe"), metrics(tmp / "pipe_resume")
    assert sorted(ref) == [1, 2, 3, 4] and sorted(got) == [3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got, ref)


def test_every_kind_of_file_is_planted(runs):
    """The planted kinds are all the .pt files DeepSpeed writes (the layer files counted as one kind)."""
    tmp, _ = runs
    for src, files in (("pipe", PIPE_FILES), ("zero", ZERO_FILES)):
        on_disk = {p.name for p in (tmp / src / "checkpoint_final").glob("*.pt")}
        kinds = {n if not n.startswith("layer_") else "layer" for n in on_disk}
        assert kinds == {n if not n.startswith("layer_") else "layer" for n in files}, (src, sorted(on_disk))


@pytest.mark.parametrize("name", [f"pipe:{n}" for n in PIPE_FILES] + [f"zero:{n}" for n in ZERO_FILES])
def test_deepspeed_loads_refuse_a_planted_file(runs, name):
    """The scan switched off: DeepSpeed's own load of the file (checkpoint engine) refuses it."""
    tmp, results = runs
    src, file = name.split(":")
    dst = tmp / f"{src}_planted_{file}"
    r = results[name]
    assert not os.path.exists(str(dst) + ".marker"), "the planted code ran"
    assert r["rc"] == 2, r["log"][-3000:]
    assert error_lines(r["log"]) == [refusal_line(dst / "checkpoint_final" / file)], r["log"][-3000:]
    assert "Traceback" not in r["log"]
    assert r["before"] == r["after"]  # nothing written, pruned or rewritten


@pytest.mark.parametrize("name", [f"pipe:{n}" for n in PIPE_FILES] + [f"zero:{n}" for n in ZERO_FILES])
def test_resume_refuses_a_planted_file_before_any_process_group(runs, tiny_llama_pp, tmp_path, monkeypatch, capsys,
                                                                name):
    """In-process: the trainer's scan stops with one line naming the file, exit 2, before init."""
    import train_ds
    import train_ds_zero

    hf, pp = tiny_llama_pp
    src_name, file = name.split(":")
    src = runs[0] / src_name
    before_src = hashes(src)
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    marker = tmp_path / "marker"
    plant(dst / "checkpoint_final" / file, marker)
    before = hashes(dst)
    trainer, cfg = ((train_ds, pipe_config(pp, dst, resume=True)) if src_name == "pipe"
                    else (train_ds_zero, zero_config(hf, dst, resume=True, max_steps=4)))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert trainer.main(["--config", write(cfg, tmp_path / "c.yml")]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [refusal_line(dst / "checkpoint_final" / file)] and "Traceback" not in err, err
    assert not marker.exists()
    assert hashes(dst) == before and hashes(src) == before_src
    import torch.distributed as dist
    assert not dist.is_initialized()

    monkeypatch.setenv("RANK", "1")  # every rank found the same: rank 0 alone says it
    assert trainer.main(["--config", str(tmp_path / "c.yml")]) == 2
    assert error_lines(capsys.readouterr().err) == []


def test_allow_list_is_what_deepspeed_writes(runs):
    """Every real file loads with weights_only=True, and the allow-list holds nothing they do not need
    (but DynamicLossScaler, fp16's loss scaler: fp16 needs a GPU, so it is checked by a round trip)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from training.ds import safe_load

    tmp, _ = runs
    needed = set()
    for src in ("pipe", "zero"):
        for path in sorted((tmp / src).rglob("*.pt")):
            safe_load.safe_load(path, map_location="cpu")
            needed |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert needed | {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"} == safe_load.ALLOWED_NAMES

    path = tmp / "fp16_zero_shard.pt"
    scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    scaler.cur_iter = 7
    torch.save({"loss_scaler": scaler, "zero_stage": ZeroStageEnum.optimizer_states, "state": torch.ones(3)}, path)
    got = safe_load.safe_load(path)
    assert type(got["loss_scaler"]) is DynamicLossScaler and got["loss_scaler"].__dict__ == scaler.__dict__
    assert got["zero_stage"] is ZeroStageEnum.optimizer_states


def test_planted_file_would_run_without_weights_only(tmp_path):
    """The test's plant is a real attack on DeepSpeed's stock loader, and safe_load refuses it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from training.ds import safe_load
    from utils.checkpoint import CheckpointError

    marker = tmp_path / "marker"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "planted": Planted(str(marker))}, path)
    with pytest.raises(CheckpointError) as err:
        safe_load.safe_load(path)
    assert str(err.value) == refusal_line(path)[len("error: "):] and not marker.exists()
    TorchCheckpointEngine().load(str(path))  # DeepSpeed 0.19.8's own engine: weights_only=False
    assert marker.exists()


def test_direct_torch_load_calls_are_weights_only_during_load_checkpoint(tmp_path):
    """DeepSpeed's universal-checkpoint loads call torch.load(weights_only=False) themselves: while
    load_checkpoint runs, that is weights_only too; afterwards torch.load is torch's again."""
    from training.ds import safe_load
    from utils.checkpoint import CheckpointError

    marker = tmp_path / "marker"
    path = tmp_path / "global_step2" / "zero" / "optimizer_state.pt"
    path.parent.mkdir(parents=True)
    torch.save({"planted": Planted(str(marker))}, path)
    original = torch.load

    class FakeEngine:
        """load_checkpoint runs DeepSpeed's universal-checkpoint load of `zero/optimizer_state.pt`."""

        def __init__(self):
            from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
            self.checkpoint_engine, self._config = TorchCheckpointEngine(), None

        def load_checkpoint(self, load_dir, tag):
            from deepspeed.runtime.base_optimizer import ZeROOptimizer
            ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir(self, "bit16_groups",
                                                                       os.path.join(load_dir, tag))

    engine = FakeEngine()
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        safe_load.load_checkpoint(engine, str(tmp_path), "global_step2")
    assert not marker.exists() and torch.load is original
    assert isinstance(engine.checkpoint_engine, safe_load.SafeTorchCheckpointEngine)


def test_install_keeps_a_configured_writer_engine():
    """`checkpoint.writer` engines keep their own save; only their load is replaced."""
    from deepspeed.runtime.checkpoint_engine.fast_checkpoint_engine import FastCheckpointEngine

    from training.ds import safe_load

    class Engine:
        checkpoint_engine = FastCheckpointEngine.__new__(FastCheckpointEngine)

    engine = Engine()
    safe_load.install(engine)
    assert isinstance(engine.checkpoint_engine, FastCheckpointEngine)
    assert engine.checkpoint_engine.load is safe_load._engine_load
    assert engine.checkpoint_engine.save.__func__ is FastCheckpointEngine.save


def _torch_load_calls(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def test_every_torch_load_in_the_repo_is_weights_only():
    files = []
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("shared", "node_modules", "__pycache__")]
        files += [Path(top) / n for n in names if n.endswith(".py")]
    calls = 0
    for path in files:
        for call in _torch_load_calls(path):
            calls += 1
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True"
    assert calls >= 5
