"""Checkpoints that are either complete or invisible.

DeepSpeed writes `save_path/<tag>/` (per-layer weights, optimizer shards). We add, after a barrier
that every rank reaches only once its own files are written, a `COMPLETE` marker inside the tag dir
and then `latest` (written to a temp file and renamed). A crash mid-save leaves a tag dir without
marker: resume ignores it and pruning deletes it.

Before the marker, rank 0 writes `MANIFEST.json`: size and sha256 of every file of the tag dir (every rank
hashes its share of the files: `write_manifest_shared`).
`resume: true` verifies the newest complete checkpoint against it (`resume_tag`) and falls back to the
newest intact one with a warning naming the bad file (a disk that truncated or flipped a file after the
save). Checkpoints without a manifest (written before it existed) are accepted unverified. The manifest
finds damage, not tampering: whoever can rewrite a file can rewrite the manifest (training/ds/safe_load.py).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
from typing import Callable

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
HASH = "sha256"  # hashlib's; OpenSSL's sha256 is the fastest of sha256/blake2b on CPUs with SHA extensions
_CHUNK = 4 << 20
_STEP_TAG = re.compile(r"^global_step(\d+)$")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


class CheckpointError(Exception):
    """A checkpoint file that cannot be loaded safely (training.ds.safe_load); the message names the file.
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


def complete_tags(save_path: str) -> list[str]:
    """Every complete checkpoint, periodic or final, newest (highest step in its marker) first."""
    candidates = [tag for _, tag in step_tags(save_path) if is_complete(save_path, tag)]
    if is_complete(save_path, "checkpoint_final"):
        candidates.append("checkpoint_final")
    return sorted(candidates, key=lambda t: _marker_step(save_path, t), reverse=True)  # stable: ties keep order


def newest_complete(save_path: str) -> str | None:
    """The newest complete checkpoint, periodic or final, intact or not (`resume_tag` checks its files)."""
    tags = complete_tags(save_path)
    return tags[0] if tags else None


def read_info(save_path: str, tag: str) -> dict:
    with open(os.path.join(save_path, tag, MARKER)) as f:
        return json.load(f)


def _marker_step(save_path: str, tag: str) -> int:
    try:
        return int(read_info(save_path, tag).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):  # a damaged marker: verified (and refused) later
        return -1


def _marker_problem(save_path: str, tag: str) -> str | None:
    try:
        info = read_info(save_path, tag)
        int(info["step"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"{MARKER} is unreadable ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------------------------
# Manifest: size and hash of every file of a tag dir


def _digest(path: str, algo: str = HASH) -> tuple[int, str]:
    """(bytes read, hex digest) of `path`, streamed in chunks."""
    h = hashlib.new(algo)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def _tag_files(tag_dir: str) -> list[str]:
    """Every file under `tag_dir` ('/'-separated relative paths, sorted) but the manifest and the marker."""
    out = []
    for root, _, names in os.walk(tag_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), tag_dir).replace(os.sep, "/")
            if rel not in (MANIFEST, MARKER):
                out.append(rel)
    return sorted(out)


def hash_files(tag_dir: str, rank: int = 0, world: int = 1) -> dict:
    """{relative path: {"size", HASH}} of every `world`-th file of the tag dir from the `rank`-th on, so that
    the ranks of a run share the hashing of a checkpoint (each file hashed by exactly one rank)."""
    files = {}
    for rel in _tag_files(tag_dir)[rank::world]:
        size, digest = _digest(os.path.join(tag_dir, rel))
        files[rel] = {"size": size, HASH: digest}
    return files


def write_manifest(tag_dir: str, files: dict | None = None) -> dict:
    """`tag_dir/MANIFEST.json` (atomically): size and hash of every file of the tag dir (`files`, as merged from
    every rank's `hash_files`, or hashed here). Written once every rank's files and the model files are
    written, before `mark_complete`."""
    manifest = {"version": 1, "hash": HASH, "files": dict(sorted((files or hash_files(tag_dir)).items()))}
    atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_manifest_shared(tag_dir: str) -> None:
    """`write_manifest` with the hashing spread over the ranks of the default process group (every rank
    calls it, once the tag dir is complete on the shared filesystem); rank 0 writes the file."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, hash_files(tag_dir, rank, world))
    if rank == 0:
        write_manifest(tag_dir, {rel: entry for part in parts for rel, entry in part.items()})


def verify_dir(tag_dir: str) -> str | None:
    """None when every file of `tag_dir`'s manifest is there with its size and hash, or when the dir has no
    manifest (written before manifests existed: accepted as it is); else what is wrong with the first bad
    file: "layer_03-model_states.pt is truncated (1234 of 5678 bytes)". Sizes of all files are compared
    before any file is hashed, so a truncated or missing file is found without reading the others."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.lexists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        algo = manifest.get("hash", HASH)
        hashlib.new(algo)
        entries = sorted((str(rel), int(e["size"]), str(e[algo])) for rel, e in manifest["files"].items())
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for rel, size, _ in entries:
        file = os.path.join(tag_dir, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        actual = os.path.getsize(file)
        if actual < size:
            return f"{rel} is truncated ({actual} of {size} bytes)"
        if actual != size:
            return f"{rel} has {actual} bytes, {size} when saved"
    for rel, size, digest in entries:
        try:
            actual_size, actual = _digest(os.path.join(tag_dir, rel), algo)
        except OSError as e:
            return f"{rel} cannot be read ({type(e).__name__}: {e})"
        if actual_size != size:
            return f"{rel} has {actual_size} bytes, {size} when saved"
        if actual != digest:
            return f"{rel} has changed since it was saved ({algo} differs)"
    return None


def verify(save_path: str, tag: str) -> str | None:
    """`verify_dir` of the checkpoint `save_path/tag`."""
    return verify_dir(os.path.join(save_path, tag))


def _warn_rank0(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank decides alike before any process group: one says it
        print(line, file=sys.stderr, flush=True)


def resume_tag(save_path: str, warn: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint `resume: true` continues from: the newest complete one whose files match its manifest
    (or that has none). Each newer complete but damaged one is skipped with one line through `warn` (rank 0
    prints it on stderr): "warning: checkpoint out/global_step6: layer_03-model_states.pt is truncated (1234
    of 5678 bytes); resuming from out/global_step4". None when `save_path` holds no complete checkpoint;
    CheckpointError when it holds some and none is intact. Reads files only, alike on every rank: call it
    before any process group, once, and load the tag it returns."""
    warn = warn or _warn_rank0
    damaged = []
    for tag in complete_tags(save_path):
        problem = _marker_problem(save_path, tag) or verify(save_path, tag)
        if problem is None:
            for bad, why in damaged:
                warn(f"warning: checkpoint {os.path.join(save_path, bad)}: {why}; "
                     f"resuming from {os.path.join(save_path, tag)}")
            return tag
        damaged.append((tag, problem))
    if damaged:
        raise CheckpointError(f"resume: no intact checkpoint in {save_path}: "
                              + "; ".join(f"{tag}: {why}" for tag, why in damaged)
                              + "; move the damaged ones away, or set resume: false to start over", every_rank=True)
    return None


def invalidate(save_path: str, tag: str) -> None:
    """Before `tag` is written again (a resumed run saving the step of a damaged checkpoint it skipped, or
    checkpoint_final once more): drop its marker, then its manifest, so a crash mid-save leaves it incomplete."""
    for name in (MARKER, MANIFEST):
        try:
            os.remove(os.path.join(save_path, tag, name))
        except FileNotFoundError:
            pass


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
    """config.json, generation config, tokenizer files, remote-code `*.py` and the tensors hg_to_pp carried
    outside the pipeline model (`extra_tensors.safetensors`, e.g. a multimodal checkpoint's vision tower), so pp_to_hg takes the dir."""
    names = list(MODEL_FILES) + ["extra_tensors.safetensors"] + [
        os.path.basename(p) for p in glob.glob(os.path.join(src_dir, "*.py"))]
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
