"""A hostile user's catalogue: every mistake is one `error:` line naming the file and the key, exit code 2, no
traceback, and nothing already on disk is lost. Cheap: no DeepSpeed launch, no process group; the trainers and
convert_model.py run in-process (two cases run the CLIs as subprocesses, as users do)."""
from __future__ import annotations

import copy
import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import convert_model
import train_ds
import train_ds_zero
from tests.conftest import ROOT, train_config
from utils.config import ConfigError, validate
from models.tiny import make_tiny_llama

DELETE = object()


def one_error_line(err: str) -> str:
    """The single `error:` line of stderr (anything else there is DeepSpeed's import notice, never a traceback)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (names relative to it, hidden ones included) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temp or moved-aside dirs a conversion could leave next to its output."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------------------------
# Training configs: train_ds.main / train_ds_zero.main in-process, as `python train_ds.py --config X`


def base_config(tmp_path: Path) -> dict:
    """A config that passes every check and then fails on its missing model_path (see test_good_config_...)."""
    return train_config(tmp_path / "no-model", tmp_path / "run", dims=(1, 1))


def edited(cfg: dict, changes: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        node, *path, last = [cfg, *dotted.split(".")]
        for p in path:
            node = node.setdefault(p, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    return cfg


def run_trainer(main, cfg: dict, tmp_path: Path, capsys, *overrides: str, yaml_tail: str = "") -> tuple[int, str, Path]:
    path = tmp_path / "user.yml"
    path.write_text(yaml.safe_dump(cfg) + yaml_tail)
    code = main(["--config", str(path), *overrides])
    return code, capsys.readouterr().err, path


SCHED = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 2e-3, "warmup_num_steps": 10,
                                             "total_num_steps": "auto"}}

# (id, changes to the base config, command-line overrides, words the error line must hold)
CONFIG_CASES = [
    # DeepSpeed's optimizer: params checked against the signature of the class DeepSpeed would build
    ("betas-misspelled", {"optimizer.params.beta": [0.9, 0.95]}, [],
     ["optimizer.params.beta", "unknown parameter of AdamW", "did you mean 'betas'"]),
    ("lr-not-a-number", {}, ["--optimizer.params.lr=3e-3x"], ["optimizer.params.lr", "expected a number", "'3e-3x'"]),
    ("lr-zero", {"optimizer.params.lr": 0}, [], ["optimizer.params.lr", "must be > 0"]),
    ("lr-negative", {}, ["--optimizer.params.lr=-1.0e-3"], ["optimizer.params.lr", "must be > 0"]),
    ("weight-decay-negative", {"optimizer.params.weight_decay": -0.1}, [], ["optimizer.params.weight_decay", ">= 0"]),
    ("betas-out-of-range", {"optimizer.params.betas": [0.9, 1.2]}, [], ["optimizer.params.betas", "in [0, 1)"]),
    ("betas-one-value", {"optimizer.params.betas": [0.9]}, [], ["optimizer.params.betas", "list of 2 numbers"]),
    ("amsgrad-not-bool", {"optimizer.params.amsgrad": "no"}, [], ["optimizer.params.amsgrad", "true/false"]),
    ("optimizer-unknown-type", {"optimizer.type": "AdamWW"}, [], ["optimizer.type", "did you mean 'AdamW'"]),
    ("optimizer-lowercase-torch-name", {"optimizer.type": "sgd"}, [], ["optimizer.type", "'SGD'"]),
    ("optimizer-missing-type", {"optimizer.type": DELETE}, [], ["optimizer.type", "missing"]),
    ("optimizer-key-misspelled", {"optimizer.parms": {"lr": 1e-3}}, [], ["optimizer.parms", "did you mean 'params'"]),
    ("max-grad-norm", {"optimizer.params.max_grad_norm": 1.0}, [],
     ["optimizer.params.max_grad_norm", "gradient_clipping"]),
    ("lion-has-no-eps", {"optimizer": {"type": "Lion", "params": {"lr": 1e-4, "eps": 1e-8}}}, [],
     ["optimizer.params.eps", "unknown parameter of Lion"]),
    ("foreach-needs-torch-adam", {"optimizer.params.foreach": True}, [],
     ["optimizer.params.foreach", "FusedAdam"]),
    ("optimizer-missing", {"optimizer": DELETE}, [], ["missing required key 'optimizer'", "nothing trains"]),
    # DeepSpeed's scheduler: params against the constructor of deepspeed.runtime.lr_schedules' class
    ("scheduler-unknown-type", {"scheduler": {**SCHED, "type": "WarmupDecay"}}, [],
     ["scheduler.type", "did you mean 'WarmupDecayLR'"]),
    ("scheduler-param-misspelled", {"scheduler": SCHED, "scheduler.params.warmup_num_step": 5}, [],
     ["scheduler.params.warmup_num_step", "did you mean 'warmup_num_steps'"]),
    ("warmup-steps-not-int", {"scheduler": SCHED}, ["--scheduler.params.warmup_num_steps=ten"],
     ["scheduler.params.warmup_num_steps", "expected an integer"]),
    ("warmup-negative", {"scheduler": SCHED, "scheduler.params.warmup_num_steps": -5}, [],
     ["scheduler.params.warmup_num_steps", "must be >= 1"]),
    ("warmup-max-lr-string", {"scheduler": SCHED, "scheduler.params.warmup_max_lr": "high"}, [],
     ["scheduler.params.warmup_max_lr", "expected a number"]),
    ("warmup-min-above-max", {"scheduler": SCHED, "scheduler.params.warmup_min_lr": 1.0}, [],
     ["scheduler.params.warmup_min_lr", "above warmup_max_lr"]),
    ("warmup-type-unknown", {"scheduler": SCHED, "scheduler.params.warmup_type": "cosine"}, [],
     ["scheduler.params.warmup_type", "log, linear"]),
    ("torch-scheduler-missing-param", {"scheduler": {"type": "CosineAnnealingLR", "params": {}}}, [],
     ["scheduler.params.T_max", "missing"]),
    # DeepSpeed's pydantic sections, strictly, and DeepSpeedConfig itself
    ("fp16-and-bf16", {"fp16": {"enabled": True}, "bf16": {"enabled": True}}, [], ["fp16.enabled, bf16.enabled"]),
    ("bf16-enabled-yes", {"bf16": {"enabled": "yes"}}, [], ["bf16.enabled", "expected true/false"]),
    ("zero-key-misspelled", {"zero_optimization": {"stag": 1}}, [], ["zero_optimization.stag", "did you mean 'stage'"]),
    ("zero-stage-5", {"zero_optimization": {"stage": 5}}, [], ["zero_optimization.stage", "0, 1, 2, 3", "got 5"]),
    ("offload-device-gpu", {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "gpu"}}}, [],
     ["zero_optimization.offload_optimizer.device", "none, cpu, nvme"]),
    ("zero-not-a-mapping", {"zero_optimization": "stage 1"}, [], ["zero_optimization", "expected a mapping"]),
    ("fp16-loss-scale-negative", {"fp16": {"enabled": True, "loss_scale": -1}}, [], ["fp16.loss_scale", ">= 0"]),
    ("fp16-scale-power-negative", {"fp16": {"enabled": True, "initial_scale_power": -2}}, [],
     ["fp16.initial_scale_power", ">= 0"]),
    ("tensorboard-key-misspelled", {"tensorboard": {"enabled": True, "output_pth": "tb"}}, [],
     ["tensorboard.output_pth", "did you mean 'output_path'"]),
    ("gradient-clipping-string", {"gradient_clipping": "1.0x"}, [], ["gradient_clipping", "expected a number"]),
    ("gradient-clipping-negative", {"gradient_clipping": -1.0}, [], ["gradient_clipping", ">= 0"]),
    ("steps-per-print-zero", {"steps_per_print": 0}, [], ["steps_per_print", ">= 1"]),
    ("removed-deepspeed-feature", {"amp": {"enabled": True}}, [], ["DeepSpeed rejects the config", "AMP"]),
    ("zero-key-at-top-level", {"zero_quantized_weights": True}, [],
     ["zero_quantized_weights", "zero_optimization.zero_quantized_weights", "ignored"]),
    ("pipeline-zero-stage-2", {"zero_optimization": {"stage": 2}}, [], ["zero_optimization.stage", "stage 0 or 1"]),
    # ours (existing behaviour)
    ("unknown-key", {"model_pth": "x"}, [], ["unknown key 'model_pth'", "did you mean 'model_path'"]),
    ("seq-len-not-int", {"max_seq_len": "long"}, [], ["max_seq_len", "integer"]),
    ("seq-len-1", {"max_seq_len": 1}, [], ["max_seq_len", ">= 2"]),
    ("batch-not-divisible", {"train_batch_size": 3, "train_micro_batch_size_per_gpu": 2}, [],
     ["train_batch_size", "not divisible"]),
    ("dims-vs-world", {"model_topo.process_topology.dims": [2, 1]}, [], ["dims", "needs 2 processes"]),
]


@pytest.mark.parametrize("case, changes, overrides, words", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_error(case, changes, overrides, words, tmp_path, capsys):
    code, err, path = run_trainer(train_ds.main, edited(base_config(tmp_path), changes), tmp_path, capsys, *overrides)
    line = one_error_line(err)
    assert code == 2
    if not case.startswith(("batch-", "dims-")):  # these name the keys, the config checks name the file too
        assert line.startswith(f"error: {path}: "), line
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "run").exists()


ZERO_CASES = [c for c in CONFIG_CASES if c[0] in ("betas-misspelled", "lr-zero", "fp16-and-bf16", "warmup-negative",
                                                   "optimizer-missing")]


@pytest.mark.parametrize("case, changes, overrides, words", ZERO_CASES, ids=[c[0] for c in ZERO_CASES])
def test_zero_trainer_config_error(case, changes, overrides, words, tmp_path, capsys):
    cfg = edited(base_config(tmp_path), {"model_topo": DELETE, **changes})
    code, err, _ = run_trainer(train_ds_zero.main, cfg, tmp_path, capsys, *overrides)
    line = one_error_line(err)
    assert code == 2 and all(w in line for w in words), line


@pytest.mark.parametrize("main", [train_ds.main, train_ds_zero.main], ids=["pipeline", "zero"])
def test_good_config_passes_every_check_and_stops_at_the_missing_model(main, tmp_path, capsys):
    """The control: the base config of the cases above (with a scheduler, fp16, ZeRO-1 offload, tensorboard)
    gets through config and save_path checks; the first error is its missing model_path."""
    cfg = edited(base_config(tmp_path), {"scheduler": SCHED, "fp16": {"enabled": True, "loss_scale": 0},
                                        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
                                        "tensorboard": {"enabled": False, "output_path": "tb"},
                                        "optimizer.params.betas": [0.9, 0.95], "gradient_clipping": 1.0})
    code, err, _ = run_trainer(main, cfg, tmp_path, capsys)
    line = one_error_line(err)
    assert code == 2 and "model_path" in line and str(tmp_path / "no-model") in line, line


def test_yaml_exponent_without_dot_is_a_number():
    """PyYAML reads `lr: 3e-4` as the string '3e-4' (YAML 1.1): DeepSpeed gets the number."""
    raw = yaml.safe_load(yaml.safe_dump(base_config(Path("/x")))
                         .replace("lr: 0.002", "lr: 3e-4"))
    assert raw["optimizer"]["params"]["lr"] == "3e-4"
    cfg = validate(edited(raw, {"scheduler": SCHED, "scheduler.params.warmup_max_lr": "3e-4",
                                "zero_optimization": {"stage": 1, "reduce_bucket_size": "5e8"}}))
    assert cfg.ds["optimizer"]["params"]["lr"] == 3e-4 and cfg.ds["scheduler"]["params"]["warmup_max_lr"] == 3e-4
    assert cfg.ds["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's docs write sizes so
    assert raw["optimizer"]["params"]["lr"] == "3e-4"  # the caller's dict is not edited
    with pytest.raises(ConfigError, match="optimizer.params.lr: expected a number"):
        validate(edited(raw, {"optimizer.params.lr": "3e-4x"}))


# ----------------------------------------------------------------------------------------------
# save_path: probed before any model is built


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory nobody may write to: chmod for a normal user; as root (who ignores modes), a read-only
    tmpfs mount (skipped where mounting is not allowed)."""
    path = tmp_path / "readonly"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"root without mount permission: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # lazy: a file still open cannot block it


@pytest.mark.parametrize("main", [train_ds.main, train_ds_zero.main], ids=["pipeline", "zero"])
def test_save_path_is_a_file(main, tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("my notes\n")
    code, err, _ = run_trainer(main, edited(base_config(tmp_path), {"model_topo": DELETE} if main is train_ds_zero.main
                                            else {}), tmp_path, capsys)
    line = one_error_line(err)
    assert code == 2 and f"save_path: {target} exists and is not a directory" in line, line
    assert target.read_text() == "my notes\n"


def test_save_path_below_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    cfg = edited(base_config(tmp_path), {"save_path": str(tmp_path / "notes.txt" / "run")})
    code, err, _ = run_trainer(train_ds.main, cfg, tmp_path, capsys)
    line = one_error_line(err)
    assert code == 2 and "save_path: cannot create" in line and "notes.txt is a file" in line, line


@pytest.mark.parametrize("below", [False, True], ids=["dir", "subdir"])
def test_save_path_not_writable(below, unwritable_dir, tmp_path, capsys):
    target = unwritable_dir / "run" if below else unwritable_dir
    code, err, _ = run_trainer(train_ds.main, edited(base_config(tmp_path), {"save_path": str(target)}), tmp_path,
                               capsys)
    line = one_error_line(err)
    assert code == 2 and f"save_path: cannot write to {target}" in line, line
    assert list(unwritable_dir.iterdir()) == []  # the probe leaves nothing behind


def test_config_error_from_the_command_line_has_no_traceback(tmp_path):
    """As users run it: `python train_ds.py --config X` (no launcher), one line, exit 2."""
    path = tmp_path / "user.yml"
    path.write_text(yaml.safe_dump(edited(base_config(tmp_path), {"optimizer.params.beta": [0.9, 0.95]})))
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "train_ds.py", "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and line.startswith(f"error: {path}: optimizer.params.beta: "), line


# ----------------------------------------------------------------------------------------------
# Conversion and verify: I/O and format errors name the file; a failed conversion leaves nothing that looks done


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user_hf") / "model"
    make_tiny_llama(path, tokenizer=False)
    return path


@pytest.fixture(scope="module")
def pp_dir(hf_dir, tmp_path_factory) -> Path:
    from models.convert import hg_to_pp

    path = tmp_path_factory.mktemp("user_pp") / "model"
    hg_to_pp(hf_dir, path, log=lambda msg: None)
    return path


def broken_hf(hf_dir: Path, dst: Path, how: str) -> Path:
    """A copy of the HF dir broken in one way."""
    dst.mkdir()
    shutil.copy(hf_dir / "config.json", dst / "config.json")
    weights = (hf_dir / "model.safetensors").read_bytes()
    if how == "truncated":
        (dst / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif how == "foreign":
        (dst / "model.safetensors").write_bytes(b"<html>404 Not Found</html>\n" * 10)
    elif how == "pickled":
        marker = dst / "PWNED"
        (dst / "pytorch_model.bin").write_bytes(pickled_payload(marker))
    elif how == "truncated-bin":
        from safetensors.torch import load_file
        torch.save(load_file(hf_dir / "model.safetensors"), dst / "full.bin")
        data = (dst / "full.bin").read_bytes()
        (dst / "full.bin").unlink()
        (dst / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif how == "bad-index":
        (dst / "model.safetensors").write_bytes(weights)
        (dst / "model.safetensors.index.json").write_text("{weight_map: oops")
    elif how == "no-weights":
        pass
    elif how == "bad-config":
        (dst / "model.safetensors").write_bytes(weights)
        (dst / "config.json").write_text('{"model_type": "llama",')
    elif how == "zero-heads":
        import json
        (dst / "model.safetensors").write_bytes(weights)
        cfg = json.loads((hf_dir / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
    return dst


def pickled_payload(marker: Path) -> bytes:
    """A `.bin` whose unpickling would create `marker` (os.system), like a planted checkpoint."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    return pickle.dumps({"model.embed_tokens.weight": Payload()}, protocol=4)


def convert_error(capsys, *argv: str) -> str:
    assert convert_model.main(list(argv)) == 2
    return one_error_line(capsys.readouterr().err)


CONVERT_CASES = [
    ("truncated", "model.safetensors", "not a complete safetensors file"),
    ("foreign", "model.safetensors", "not a complete safetensors file"),
    ("pickled", "pytorch_model.bin", "refused"),
    ("truncated-bin", "pytorch_model.bin", "cannot read"),
    ("bad-index", "model.safetensors.index.json", "cannot read"),
    ("no-weights", "", "no *.safetensors or pytorch_model*.bin weights"),
    ("bad-config", "config.json", "is not valid JSON"),
    ("zero-heads", "", "'num_attention_heads' must be >= 1, got 0"),
]


@pytest.mark.parametrize("how, file, words", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_hg_to_pp_bad_input(how, file, words, hf_dir, tmp_path, capsys):
    src = broken_hf(hf_dir, tmp_path / "src", how)
    line = convert_error(capsys, "hg_to_pp", "--input-path", str(src), "--save-path", str(tmp_path / "out"))
    assert words in line and str(src / file) in line, line
    assert "weights_only=False" not in line  # torch's advice for a refused pickle is never passed on
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert not (src / "PWNED").exists()


@pytest.mark.parametrize("how, file, words", [c for c in CONVERT_CASES if c[0] != "zero-heads"] + [
    ("zero-heads", "", "cannot load the HF model in")], ids=[c[0] for c in CONVERT_CASES])
def test_verify_bad_hf_dir(how, file, words, hf_dir, pp_dir, tmp_path, capsys):
    src = broken_hf(hf_dir, tmp_path / "src", how)
    line = convert_error(capsys, "verify", "--hf-path", str(src), "--pp-path", str(pp_dir))
    assert words in line and str(src / file) in line, line
    assert not (src / "PWNED").exists()


def test_pp_to_hg_truncated_layer_file(pp_dir, tmp_path, capsys):
    pp = Path(shutil.copytree(pp_dir, tmp_path / "pp"))
    layer = pp / "layer_02-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:1000])
    line = convert_error(capsys, "pp_to_hg", "--input-path", str(pp), "--save-path", str(tmp_path / "out"))
    assert f"cannot read {layer}" in line, line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_conversion_save_path_is_a_file(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("keep")
    line = convert_error(capsys, "hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(out), "--overwrite")
    assert f"save path {out} exists and is not a directory" in line and out.read_text() == "keep"


def full_disk_after(calls: int, real):
    """`real` (torch.save or safetensors' save_file) that writes its first `calls` files, then half a file and
    ENOSPC, as a full disk does."""
    count = {"n": 0}

    def save(obj, f, *args, **kwargs):
        count["n"] += 1
        if count["n"] <= calls:
            return real(obj, f, *args, **kwargs)
        if hasattr(f, "write"):
            f.write(b"\0" * 100)
        else:
            Path(f).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def test_hg_to_pp_disk_full_keeps_the_previous_output(hf_dir, tmp_path, capsys, monkeypatch):
    """--overwrite of a good conversion on a disk that fills up at the third layer file: the old output is
    byte-for-byte intact, the partial new one is gone, the error names the file."""
    out = tmp_path / "out"
    assert convert_model.main(["hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(out)]) == 0
    before = snapshot(out)
    monkeypatch.setattr(torch, "save", full_disk_after(2, torch.save))
    line = convert_error(capsys, "hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(out), "--overwrite")
    assert re.search(r"cannot write \S+/layer_\d\d-model_states\.pt: No space left on device", line), line
    assert f"{out} was left as it was" in line, line
    assert snapshot(out) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert convert_model.main(["hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(out), "--overwrite"]) == 0
    assert snapshot(out) == before and leftovers(tmp_path) == []  # the swap leaves no moved-aside copy either


def test_pp_to_hg_disk_full(pp_dir, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_after(1, safetensors.torch.save_file))
    out = tmp_path / "hf"
    line = convert_error(capsys, "pp_to_hg", "--input-path", str(pp_dir), "--save-path", str(out),
                         "--max-shard-size", "100KB")
    assert "model-00002.safetensors.part: No space left on device" in line and "was not created" in line, line
    assert not out.exists() and leftovers(tmp_path) == []


def test_hg_to_pp_on_a_real_full_disk(hf_dir, tmp_path, capsys):
    """A 64 KiB tmpfs (root only): torch's own writer hits ENOSPC; same one line, nothing left."""
    small = tmp_path / "small"
    small.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        line = convert_error(capsys, "hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(small / "pp"))
        assert "No space left on device" in line and "-model_states.pt" in line, line
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=True)


def test_conversion_error_from_the_command_line_has_no_traceback(hf_dir, tmp_path):
    src = broken_hf(hf_dir, tmp_path / "src", "pickled")
    done = subprocess.run([sys.executable, "convert_model.py", "hg_to_pp", "--input-path", str(src), "--save-path",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1"))
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and f"refused {src / 'pytorch_model.bin'}" in line, line
    assert not (src / "PWNED").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# demo.py: bad arguments and model directories, one line before any model is loaded


DEMO_CASES = [
    ("no-such-dir", ["--model-path", "{tmp}/missing", "--instruct", "hi"], "{tmp}/missing: no such directory"),
    ("no-config-json", ["--model-path", "{tmp}", "--instruct", "hi"], "not a Hugging Face model directory"),
    ("negative-temperature", ["--model-path", "{hf}", "--instruct", "hi", "--temperature", "-1"], "--temperature"),
    ("top-p-above-1", ["--model-path", "{hf}", "--instruct", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("zero-new-tokens", ["--model-path", "{hf}", "--instruct", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("missing-tools-file", ["--model-path", "{hf}", "--chat", "--tools", "{tmp}/api.txt"], "{tmp}/api.txt: no such file"),
]


@pytest.mark.parametrize("case,argv,words", DEMO_CASES, ids=[c[0] for c in DEMO_CASES])
def test_demo_user_error(case, argv, words, tmp_path, capsys):
    import demo

    hf = tmp_path / "hf"
    make_tiny_llama(hf, seed=0)
    before = snapshot(hf)
    fill = {"tmp": str(tmp_path), "hf": str(hf)}
    code = demo.main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert words.format(**fill) in one_error_line(err)
    assert snapshot(hf) == before  # the model directory is only read
