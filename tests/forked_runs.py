"""Several single-rank trainer runs from one warm process: imports are paid once, each run is a fork.

    DS_ACCELERATOR=cpu python tests/forked_runs.py JOBS.json RESULTS.json

Each job of JOBS.json (a list, run in order) is a dict:
  trainer    "train_ds" or "train_ds_zero"; the child runs `sys.exit(<trainer>.main(["--config", config]))`
             as `deepspeed --num_gpus 1 <trainer>.py` would (RANK 0 of WORLD_SIZE 1, gloo)
  config     the YAML; log: the file the child's stdout and stderr go to
  copy       optional [src, dst]: copy the save dir src to dst first (names in `exclude` left out)
  plant      optional [file, marker]: replace `file` (its tensors kept) by a pickle that touches `marker`
             when unpickled with weights_only=False (its tag dir's MANIFEST.json is rewritten to match)
  skip_scan  disable training.ds.safe_load.scan_checkpoint in the child, so a planted file reaches DeepSpeed's
             own loads in `engine.load_checkpoint`
  hash_dir   optional dir whose file hashes are recorded before and after the run
RESULTS.json gets one {"rc", "before", "after"} per job.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Planted:
    """Unpickled with weights_only=False, this creates `marker`: a stand-in for an attacker's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def plant(file, marker) -> None:
    """Rewrite a real checkpoint file so that it still holds its tensors plus one planted object."""
    import torch

    from training.ds.safe_load import safe_load

    state = safe_load(file, map_location="cpu")  # our own file: tensors and DeepSpeed's allow-listed types
    torch.save({"planted": Planted(str(marker)), "state": state}, file)
    # Whoever can rewrite a checkpoint file can rewrite its MANIFEST.json too (it finds damage, not
    # tampering): the planted file must meet the weights_only layers, not a hash mismatch and a fallback.
    from utils import checkpoint as ckpt

    tag_dir = os.path.dirname(os.path.abspath(file))
    if os.path.exists(os.path.join(tag_dir, ckpt.MANIFEST)):
        ckpt.write_manifest(tag_dir)


def hashes(root) -> dict[str, str]:
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(job: dict, port: int) -> int:
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        import importlib

        trainer = importlib.import_module(job["trainer"])
        if job.get("skip_scan"):
            from training.ds import safe_load
            safe_load.scan_checkpoint = lambda tag_dir: None
        code = trainer.main(["--config", job["config"]])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - what an uncaught exception would print, then its exit status
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def run(job: dict) -> dict:
    if job.get("copy"):
        src, dst = job["copy"]
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*job.get("exclude", [])))
    if job.get("plant"):
        plant(*job["plant"])
    before = hashes(job["hash_dir"]) if job.get("hash_dir") else None
    port = _free_port()
    pid = os.fork()
    if pid == 0:
        os._exit(_child(job, port))
    _, status = os.waitpid(pid, 0)
    after = hashes(job["hash_dir"]) if job.get("hash_dir") else None
    return {"rc": os.waitstatus_to_exitcode(status), "before": before, "after": after}


def main(jobs_path: str, results_path: str) -> int:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import deepspeed  # noqa: F401 - the imports every child would otherwise pay again
    import train_ds  # noqa: F401
    import train_ds_zero  # noqa: F401
    import transformers  # noqa: F401

    results = [run(job) for job in json.loads(pathlib.Path(jobs_path).read_text())]
    pathlib.Path(results_path).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
