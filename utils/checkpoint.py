"""Checkpoints that are either complete or invisible.

DeepSpeed writes `save_path/<tag>/` (per-layer weights, optimizer shards). We add, after a barrier
that every rank reaches only once its own files are written, a `COMPLETE` marker inside the tag dir
and then `latest` (written to a temp file and renamed). A crash mid-save leaves a tag dir without
marker: resume ignores it and pruning deletes it.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil

MARKER = "COMPLETE"
_STEP_TAG = re.compile(r"^global_step(\d+)$")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


class CheckpointError(Exception):
    """A checkpoint file that cannot be loaded safely (utils.safe_load); the message names the file.
    `every_rank`: every rank found the same (a scan of all files), so rank 0 alone needs to say it."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(save_path: str, tag: str, info: dict) -> None:
    """Called by one rank after all ranks finished writing `tag`."""
    atomic_write_text(os.path.join(save_path, tag, MARKER), json.dumps(info))
    atomic_write_text(os.path.join(save_path, "latest"), tag)


def is_complete(save_path: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(save_path, tag, MARKER))


def step_tags(save_path: str) -> list[tuple[int, str]]:
    """(step, tag) of every periodic checkpoint dir, complete or not, oldest first."""
    out = []
    for d in glob.glob(os.path.join(save_path, "global_step*")):
        m = _STEP_TAG.match(os.path.basename(d))
        if m and os.path.isdir(d):
            out.append((int(m.group(1)), os.path.basename(d)))
    return sorted(out)


def newest_complete(save_path: str) -> str | None:
    """The tag to resume from: the newest complete checkpoint, periodic or final."""
    candidates = [tag for _, tag in step_tags(save_path) if is_complete(save_path, tag)]
    if is_complete(save_path, "checkpoint_final"):
        candidates.append("checkpoint_final")
    if not candidates:
        return None
    return max(candidates, key=lambda t: read_info(save_path, t).get("step", -1))


def read_info(save_path: str, tag: str) -> dict:
    with open(os.path.join(save_path, tag, MARKER)) as f:
        return json.load(f)


def prune(save_path: str, keep_last_n: int) -> list[str]:
    """Delete periodic checkpoints beyond the newest `keep_last_n` complete ones, and incomplete ones
    older than the newest complete one (debris of a crash). Never touches the newest complete."""
    tags = step_tags(save_path)
    complete = [t for _, t in tags if is_complete(save_path, t)]
    keep = set(complete[-keep_last_n:])
    newest_step = max((s for s, t in tags if t in keep), default=None)
    removed = []
    for step, tag in tags:
        stale_incomplete = tag not in complete and newest_step is not None and step < newest_step
        if (tag in complete and tag not in keep) or stale_incomplete:
            shutil.rmtree(os.path.join(save_path, tag), ignore_errors=True)
            removed.append(tag)
    return removed


def copy_model_files(src_dir: str, dst_dir: str) -> None:
    """config.json, generation config, tokenizer files and remote-code `*.py`, so pp_to_hg takes the dir."""
    names = list(MODEL_FILES) + [os.path.basename(p) for p in glob.glob(os.path.join(src_dir, "*.py"))]
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
