"""What a checkpoint's data position means: the run fingerprint stored in each checkpoint's `COMPLETE` marker.

A resumed run continues at a step; which samples that step reads follows from the data files, the seed (the
shuffle), the batch geometry and how samples become rows (max_seq_len, packing, template, the eval hold-out).
`resume: true` compares this run's fingerprint with the checkpoint's and refuses a change, naming it; with
`resume_allow_changes: true` it goes on with one warning saying what changed and what that does to the data
position. The tokenizer files are in it too (a changed tokenizer changes every token id the model learnt).

    {"version": 1, "data": [{"path", "size", "mtime_ns", "sha256"}, ...], "eval_data": [...],
     "tokenizer": {"tokenizer.json": "<sha256>", ...}, "seed", "train_batch_size", "micro_batch", "grad_accum",
     "data_parallel", "max_seq_len", "packing", "template", "eval_ratio", "samples", "steps_per_epoch"}

Each data file is hashed in full (streamed sha256; ~1 GB/s) by rank 0 only, once per run start.
`DataWatch` stats the files at each step boundary: a file rewritten during the run stops it with a checkpoint.
"""
from __future__ import annotations

import os

from utils.checkpoint import MODEL_FILES, _digest

VERSION = 1
TOKENIZER_FILES = tuple(n for n in MODEL_FILES if n not in ("config.json", "generation_config.json")) + (
    "tokenizer.tiktoken", "chat_template.jinja", "chat_template.json")
GEOMETRY = ("seed", "train_batch_size", "micro_batch", "grad_accum", "data_parallel", "max_seq_len", "packing",
            "template", "eval_ratio")


def data_paths(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(p) for p in value]


def identity(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of `path`, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def file_entry(path: str) -> dict:
    size, digest = _digest(path)
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def tokenizer_files(model_path: str) -> dict[str, str]:
    """{name: sha256} of the tokenizer files of `model_path`."""
    out = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            out[name] = _digest(path)[1]
    return out


def of_run(cfg, tbs: int, mbs: int, gas: int, dp: int) -> dict:
    """This run's fingerprint (without `samples`/`steps_per_epoch`, added once the data is loaded); `cfg` is read by
    dotted key, the names the fingerprint records (a `TrainConfig` or a mapping of them)."""
    synthetic = cfg["synthetic_data"]
    return {
        "version": VERSION,
        "data": [] if synthetic else [file_entry(p) for p in data_paths(cfg["data_path"])],
        "eval_data": [file_entry(p) for p in data_paths(cfg["eval_data_path"])],
        "tokenizer": {} if synthetic else tokenizer_files(cfg["model_path"]),
        "seed": cfg["seed"], "train_batch_size": tbs, "micro_batch": mbs, "grad_accum": gas, "data_parallel": dp,
        "max_seq_len": cfg["max_seq_len"], "packing": cfg["packing"], "template": cfg["template"],
        "eval_ratio": cfg["eval_ratio"],
    }


def _file_change(key: str, old: list, new: list) -> list[str]:
    out = []
    if [os.path.basename(e["path"]) for e in old] != [os.path.basename(e["path"]) for e in new] and \
            [e["sha256"] for e in old] != [e["sha256"] for e in new]:
        return [f"{key} is now {', '.join(e['path'] for e in new) or 'none'} (was "
                f"{', '.join(e['path'] for e in old) or 'none'})"]
    for a, b in zip(old, new):
        if a["sha256"] == b["sha256"]:
            continue  # the same bytes (moved, copied or touched: same data)
        what = (f"{a['size']} -> {b['size']} bytes" if a["size"] != b["size"]
                else f"same size, other content (modified {'later' if b['mtime_ns'] > a['mtime_ns'] else 'since'})")
        out.append(f"{key} {b['path']} changed ({what})")
    return out


def changes(old: dict, new: dict) -> list[str]:
    """What differs between a checkpoint's fingerprint `old` and this run's `new`, one phrase each."""
    out = []
    for key in ("data", "eval_data"):
        out += _file_change("data_path" if key == "data" else "eval_data_path", old.get(key, []), new.get(key, []))
    old_tok, new_tok = old.get("tokenizer", {}), new.get("tokenizer", {})
    if old_tok != new_tok:
        names = sorted(n for n in set(old_tok) | set(new_tok) if old_tok.get(n) != new_tok.get(n))
        out.append(f"tokenizer files of model_path changed ({', '.join(names)})")
    for key in GEOMETRY:
        if key in old and old[key] != new.get(key):
            name = {"micro_batch": "train_micro_batch_size_per_gpu", "grad_accum": "gradient_accumulation_steps",
                    "data_parallel": "data-parallel size"}.get(key, key)
            out.append(f"{name} {old[key]} -> {new.get(key)}")
    return out


def position_note(old: dict, step: int) -> str:
    """What continuing at `step` means once the data or its order changed."""
    spe, samples = old.get("steps_per_epoch"), old.get("samples")
    where = f"step {step}"
    if spe:
        where += f" (epoch {step // spe}, batch {step % spe} of {spe} over {samples} samples when saved)"
    return (f"{where} is applied to the new data and order: this epoch's remaining batches are drawn from the "
            f"new order, so some samples may be seen twice or never")


class DataWatch:
    """The data files' (size, mtime_ns) when the run read them; `changed()` names the first that differs now."""

    def __init__(self, paths: list[str], identities: dict[str, tuple[int, int] | None] | None = None):
        self.seen = identities if identities is not None else {p: identity(p) for p in paths}

    def changed(self) -> str | None:
        for path, was in self.seen.items():
            now = identity(path)
            if now != was:
                if now is None:
                    return f"{path} was removed"
                if was is None:
                    return f"{path} appeared"
                return f"{path} changed on disk ({was[0]} -> {now[0]} bytes)"
        return None
