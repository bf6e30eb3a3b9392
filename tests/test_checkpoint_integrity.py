"""Damaged checkpoints are found and skipped: every checkpoint carries MANIFEST.json (size + sha256 of each
file), `resume: true` falls back to the newest intact one with one warning naming the bad file, and
metrics.jsonl keeps one row per step across the resume.

Unit tests on hand-made tag dirs, plus one real 2-rank run on CPU: killed after its second periodic
checkpoint, a layer file of the newest checkpoint truncated, resumed (two launches for the whole file).
"""
import hashlib
import json
import os

import pytest

from tests.conftest import run_deepspeed, train_config
from utils import checkpoint as ckpt
from utils.metrics import drop_rows_after

FILES = {"layer_00-model_states.pt": b"embedding" * 50, "layer_01-model_states.pt": bytes(range(256)) * 9,
         "mp_rank_00_model_states.pt": b"\x00" * 1000, "config.json": b'{"model_type": "llama"}',
         "zero/shard_0.pt": b"nested" * 33}


def make_tag(save_path, tag, step, manifest=True, files=FILES):
    """A tag dir as `save` leaves it: files, MANIFEST.json (unless an old-style checkpoint), COMPLETE."""
    tag_dir = save_path / tag
    for rel, data in files.items():
        (tag_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (tag_dir / rel).write_bytes(data)
    if manifest:
        ckpt.write_manifest(str(tag_dir))
    ckpt.mark_complete(str(save_path), tag, {"step": step, "epoch": 0, "dims": [2, 1]})
    return tag_dir


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------
# Manifest write / verify


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    tag_dir = make_tag(tmp_path, "global_step2", 2)
    manifest = json.loads((tag_dir / ckpt.MANIFEST).read_text())
    assert manifest["hash"] == "sha256"
    assert manifest["files"] == {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                 for rel, data in FILES.items()}  # COMPLETE and the manifest itself left out
    assert ckpt.verify(str(tmp_path), "global_step2") is None
    assert not [p for p in tag_dir.iterdir() if ".tmp" in p.name]  # written through a temp file


def test_ranks_share_the_hashing_one_file_each(tmp_path):
    """`hash_files(rank, world)` shares (what each rank of `write_manifest_shared` hashes) partition the files,
    and merged they give the single-rank manifest."""
    tag_dir = make_tag(tmp_path, "global_step2", 2)
    whole = json.loads((tag_dir / ckpt.MANIFEST).read_text())["files"]
    shares = [ckpt.hash_files(str(tag_dir), rank, 3) for rank in range(3)]
    assert all(shares) and sum(len(s) for s in shares) == len(whole) == len(FILES)
    assert {rel: e for s in shares for rel, e in s.items()} == whole


def test_hash_is_streamed_in_chunks(tmp_path, monkeypatch):
    data = os.urandom(1000)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(ckpt, "_CHUNK", 7)
    assert ckpt._digest(str(tmp_path / "f")) == (1000, hashlib.sha256(data).hexdigest())


def test_truncated_file_is_named_with_both_sizes(tmp_path):
    tag_dir = make_tag(tmp_path, "global_step2", 2)
    size = len(FILES["layer_01-model_states.pt"])
    truncate(tag_dir / "layer_01-model_states.pt", 1000)
    assert ckpt.verify(str(tmp_path), "global_step2") == f"layer_01-model_states.pt is truncated (1000 of {size} bytes)"


def test_flipped_byte_is_a_hash_mismatch(tmp_path):
    tag_dir = make_tag(tmp_path, "global_step2", 2)
    flip_byte(tag_dir / "zero" / "shard_0.pt", 100)
    assert ckpt.verify(str(tmp_path), "global_step2") == \
        "zero/shard_0.pt has changed since it was saved (sha256 differs)"


def test_missing_and_grown_files(tmp_path):
    tag_dir = make_tag(tmp_path, "global_step2", 2)
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    assert ckpt.verify(str(tmp_path), "global_step2") == "mp_rank_00_model_states.pt is missing"
    tag_dir = make_tag(tmp_path, "global_step4", 4)
    with open(tag_dir / "config.json", "ab") as f:
        f.write(b" ")
    size = len(FILES["config.json"])
    assert ckpt.verify(str(tmp_path), "global_step4") == f"config.json has {size + 1} bytes, {size} when saved"


def test_sizes_are_checked_before_any_hash(tmp_path):
    """A flipped byte in an early file and a truncated later one: the truncation is reported (found by size)."""
    tag_dir = make_tag(tmp_path, "global_step2", 2)
    flip_byte(tag_dir / "config.json", 0)
    truncate(tag_dir / "zero" / "shard_0.pt", 3)
    assert ckpt.verify(str(tmp_path), "global_step2").startswith("zero/shard_0.pt is truncated (3 of ")


def test_unreadable_manifest_is_damage(tmp_path):
    tag_dir = make_tag(tmp_path, "global_step2", 2)
    truncate(tag_dir / ckpt.MANIFEST, 20)
    assert ckpt.verify(str(tmp_path), "global_step2").startswith(f"{ckpt.MANIFEST} is unreadable (JSONDecodeError")


def test_checkpoint_without_manifest_is_accepted_as_before(tmp_path, capsys):
    tag_dir = make_tag(tmp_path, "global_step2", 2, manifest=False)
    truncate(tag_dir / "layer_01-model_states.pt", 10)  # nothing to compare it with
    assert ckpt.verify(str(tmp_path), "global_step2") is None
    assert ckpt.resume_tag(str(tmp_path)) == "global_step2"
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from


def test_resume_falls_back_to_the_newest_intact_checkpoint_with_one_warning(tmp_path):
    make_tag(tmp_path, "global_step2", 2)
    make_tag(tmp_path, "global_step4", 4)
    bad = make_tag(tmp_path, "global_step6", 6)
    (tmp_path / "global_step8").mkdir()  # incomplete (a crash mid-save): ignored, no warning
    size = len(FILES["layer_01-model_states.pt"])
    truncate(bad / "layer_01-model_states.pt", 1234)
    warnings = []
    assert ckpt.newest_complete(str(tmp_path)) == "global_step6"
    assert ckpt.resume_tag(str(tmp_path), warn=warnings.append) == "global_step4"
    assert warnings == [f"warning: checkpoint {tmp_path}/global_step6: layer_01-model_states.pt is truncated "
                        f"(1234 of {size} bytes); resuming from {tmp_path}/global_step4"]


def test_final_checkpoint_is_newest_and_each_damaged_one_is_named(tmp_path):
    make_tag(tmp_path, "global_step2", 2)
    flip_byte(make_tag(tmp_path, "global_step4", 4) / "config.json", 3)
    (make_tag(tmp_path, "checkpoint_final", 5) / "layer_00-model_states.pt").unlink()
    warnings = []
    assert ckpt.resume_tag(str(tmp_path), warn=warnings.append) == "global_step2"
    assert warnings == [
        f"warning: checkpoint {tmp_path}/checkpoint_final: layer_00-model_states.pt is missing; "
        f"resuming from {tmp_path}/global_step2",
        f"warning: checkpoint {tmp_path}/global_step4: config.json has changed since it was saved (sha256 differs); "
        f"resuming from {tmp_path}/global_step2"]


def test_intact_newest_checkpoint_needs_no_warning(tmp_path):
    make_tag(tmp_path, "global_step2", 2)
    make_tag(tmp_path, "global_step4", 4)
    warnings = []
    assert ckpt.resume_tag(str(tmp_path), warn=warnings.append) == "global_step4"
    assert warnings == []
    assert ckpt.resume_tag(str(tmp_path / "nothing_here"), warn=warnings.append) is None


def test_no_intact_checkpoint_is_an_error_on_every_rank(tmp_path):
    truncate(make_tag(tmp_path, "global_step2", 2) / "config.json", 0)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.resume_tag(str(tmp_path), warn=pytest.fail)
    assert e.value.every_rank
    assert str(e.value).startswith(f"resume: no intact checkpoint in {tmp_path}: global_step2: config.json is "
                                   f"truncated (0 of {len(FILES['config.json'])} bytes)")


def test_warning_is_printed_by_rank_0_only(tmp_path, monkeypatch, capsys):
    make_tag(tmp_path, "global_step2", 2)
    (make_tag(tmp_path, "global_step4", 4) / "config.json").unlink()
    monkeypatch.setenv("RANK", "1")
    assert ckpt.resume_tag(str(tmp_path)) == "global_step2"
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert ckpt.resume_tag(str(tmp_path)) == "global_step2"
    assert capsys.readouterr().err == (f"warning: checkpoint {tmp_path}/global_step4: config.json is missing; "
                                       f"resuming from {tmp_path}/global_step2\n")


def test_weights_only_scan_reads_the_chosen_checkpoint(tmp_path):
    """check_resume_files scans the tag resume_tag chose: a planted file in the skipped damaged checkpoint is
    never read, one in the fallback is refused naming it."""
    import torch

    from tests.forked_runs import Planted
    from training.checkpoints import check_resume_files

    for tag, step in (("global_step2", 2), ("global_step4", 4)):
        tag_dir = make_tag(tmp_path, tag, step)
        torch.save({"w": torch.ones(2), "x": Planted(str(tmp_path / "marker"))}, tag_dir / "planted.pt")
        ckpt.write_manifest(str(tag_dir))
    # the newest is damaged and planted: skipped, the fallback's planted file is refused
    truncate(tmp_path / "global_step4" / "config.json", 1)
    with pytest.raises(ckpt.CheckpointError, match=r"global_step2/planted\.pt: refuses to unpickle"):
        check_resume_files(str(tmp_path))
    # the fallback clean: the planted file of the damaged newest one is never read
    torch.save({"w": torch.ones(2)}, tmp_path / "global_step2" / "planted.pt")
    ckpt.write_manifest(str(tmp_path / "global_step2"))
    assert check_resume_files(str(tmp_path)) == "global_step2"
    assert not (tmp_path / "marker").exists()


def test_invalidate_makes_a_tag_incomplete_before_it_is_written_again(tmp_path):
    make_tag(tmp_path, "global_step2", 2)
    ckpt.invalidate(str(tmp_path), "global_step2")
    assert not ckpt.is_complete(str(tmp_path), "global_step2")
    assert not (tmp_path / "global_step2" / ckpt.MANIFEST).exists()
    ckpt.invalidate(str(tmp_path), "global_step2")  # nothing left to remove
    ckpt.invalidate(str(tmp_path), "global_step9")  # no such dir


# ----------------------------------------------------------------------------------------------
# metrics.jsonl after a resume


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 10)]
    rows.insert(3, {"event": "no step here"})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "lo'  # the crash cut the last row
    path.write_text(text)
    assert drop_rows_after(str(path), 5) == 5  # steps 6..9 and the cut row
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in rows if r.get("step", 0) <= 5]
    assert path.read_text().endswith("\n")
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # temp file renamed over it


def test_metrics_rewrite_leaves_a_clean_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    inode = path.stat().st_ino
    assert drop_rows_after(str(path), 3) == 0
    assert path.stat().st_ino == inode  # not rewritten
    assert drop_rows_after(str(tmp_path / "absent.jsonl"), 3) == 0
    assert not (tmp_path / "absent.jsonl").exists()
    assert drop_rows_after(str(path), 0) == 3 and path.read_text() == ""  # resumed fresh: no step kept
    path.write_text('{"step": 1}')  # a last row cut right before its newline: the next append would join it
    assert drop_rows_after(str(path), 1) == 0 and path.read_text() == '{"step": 1}\n'


# ----------------------------------------------------------------------------------------------
# A real run: killed, newest checkpoint truncated, resumed


def test_conversion_refuses_a_damaged_checkpoint_naming_the_file(tiny_llama_pp, tmp_path):
    """pp_to_hg (and verify, through the same resolve_pp_dir) on a tag dir whose manifest no longer matches:
    one error line naming the file, no output; intact, it converts."""
    import shutil

    from tests.conftest import run_cli

    _, pp = tiny_llama_pp
    tag = tmp_path / "global_step4"
    shutil.copytree(pp, tag)
    ckpt.write_manifest(str(tag))
    ok = run_cli("convert_model.py", "pp_to_hg", "--input-path", str(tag), "--save-path", str(tmp_path / "hf_ok"))
    assert ok.returncode == 0, ok.stderr
    layer = tag / "layer_01-model_states.pt"
    truncate(layer, layer.stat().st_size // 2)
    res = run_cli("convert_model.py", "pp_to_hg", "--input-path", str(tag), "--save-path", str(tmp_path / "hf"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"checkpoint {tag}: layer_01-model_states.pt is truncated" in res.stderr, res.stderr
    assert not (tmp_path / "hf").exists()


def read_rows(path):
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # the row the kill cut
    return rows


@pytest.fixture(scope="module")
def damaged_resume(tiny_llama_pp, tmp_path_factory):
    from tests.conftest import launch_background, sigkill_after_rows

    _, pp = tiny_llama_pp
    tmp = tmp_path_factory.mktemp("ckpt_integrity")
    out = tmp / "run"
    cfg = train_config(pp, out, n_epoches=2, save_interval=2, keep_last_n=2, **{"optimizer.params.lr": 3e-3})
    proc = launch_background(cfg, tmp, "crash")
    sigkill_after_rows(proc, out, 7)  # after the second periodic checkpoint is complete, before the end
    assert not (out / "checkpoint_final").exists(), "run finished before the kill; the test proves nothing"
    complete = ckpt.complete_tags(str(out))
    assert len(complete) >= 2, complete
    newest, older = complete[0], complete[1]
    older_step = ckpt.read_info(str(out), older)["step"]  # read now: the resumed run prunes it
    crashed_rows = read_rows(out / "metrics.jsonl")
    victim = out / newest / "layer_01-model_states.pt"
    full = victim.stat().st_size
    truncate(victim, full // 2)

    cfg["resume"] = True
    res = run_deepspeed("train_ds.py", cfg, tmp, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    expected_warning = (f"warning: checkpoint {out}/{newest}: layer_01-model_states.pt is truncated "
                        f"({full // 2} of {full} bytes); resuming from {out}/{older}")
    return dict(out=out, res=res, older=older, older_step=older_step, crashed_rows=crashed_rows,
                expected_warning=expected_warning)


def test_resume_skips_the_truncated_checkpoint_with_one_warning(damaged_resume):
    d = damaged_resume
    lines = d["res"].stderr.splitlines()
    assert [line for line in lines if line.startswith("warning: checkpoint")] == [d["expected_warning"]], \
        d["res"].stderr[-3000:]
    assert f"resumed from {d['out']}/{d['older']} at step {d['older_step']}" in d["res"].stderr
    assert "Traceback" not in d["res"].stderr


def test_rerun_steps_repeat_the_uninterrupted_losses_and_each_step_has_one_row(damaged_resume):
    d = damaged_resume
    older_step = d["older_step"]
    rows = read_rows(d["out"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # one row per step, in order
    assert len((d["out"] / "metrics.jsonl").read_text().splitlines()) == 12
    before = {r["step"]: r for r in d["crashed_rows"]}
    assert rows[:older_step] == [before[s] for s in range(1, older_step + 1)]  # the rows up to it are kept
    rerun = [s for s in sorted(before) if s > older_step]
    assert rerun and rerun[-1] > older_step + 1, rerun  # several steps were run twice
    for step in rerun:  # the crashed run was uninterrupted up to the kill
        ref, got = before[step]["loss"], rows[step - 1]["loss"]
        assert abs(got - ref) <= 1e-6 * abs(ref), (step, got, ref)


def test_checkpoints_of_the_resumed_run_carry_matching_manifests(damaged_resume):
    out = damaged_resume["out"]
    tags = ckpt.complete_tags(str(out))
    assert "checkpoint_final" in tags and len(tags) == 3, tags  # keep_last_n periodic ones + the final one
    for tag in tags:
        manifest = json.loads((out / tag / ckpt.MANIFEST).read_text())
        on_disk = {str(p.relative_to(out / tag)) for p in (out / tag).rglob("*") if p.is_file()}
        assert set(manifest["files"]) == on_disk - {ckpt.MANIFEST, ckpt.MARKER}, tag
        assert ckpt.verify(str(out), tag) is None, tag
