"""convert_model.py: HF <-> pipeline round trips, input formats, verify, and user errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import convert_model
from models.convert import hg_to_pp, parse_size, pp_to_hg
from tests.conftest import assert_same_tensors, read_hf_tensors
from models.tiny import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda msg: None}


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "convert_model.py", *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)


def cli_error(capsys, *argv: str) -> str:
    """Run main() in-process, expect exit 2 and exactly one `error:` line; return it."""
    assert convert_model.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny untied GQA llama with tokenizer, fp32 safetensors."""
    path = tmp_path_factory.mktemp("hf") / "model"
    make_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def pp_dir(hf_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pp") / "model"
    hg_to_pp(hf_dir, path, **QUIET)
    return path


@pytest.fixture
def pp_copy(pp_dir, tmp_path) -> Path:
    """A private copy of the converted dir, for tests that damage it."""
    import shutil
    return Path(shutil.copytree(pp_dir, tmp_path / "pp"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact(tmp_path, dtype, tied):
    src = tmp_path / "src"
    model = make_tiny_llama(src, tokenizer=False, tie_word_embeddings=tied)
    if dtype != torch.float32:
        model.to(dtype).save_pretrained(src)
    hg_to_pp(src, tmp_path / "pp", **QUIET)
    pp_to_hg(tmp_path / "pp", tmp_path / "out", max_shard_size="40KB", **QUIET)
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), read_hf_tensors(src))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(index["weight_map"]) == sorted(read_hf_tensors(src))


def test_exported_model_loads_in_transformers_with_tokenizer(hf_dir, pp_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pp_to_hg(pp_dir, tmp_path / "out", **QUIET)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    reference = AutoModelForCausalLM.from_pretrained(hf_dir)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    text = "Write a response"
    exported_tok, reference_tok = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(hf_dir)
    assert exported_tok(text).input_ids == reference_tok(text).input_ids


def test_sharded_safetensors_input(tmp_path):
    src = tmp_path / "src"
    model = make_tiny_llama(src, tokenizer=False)
    for path in src.glob("*.safetensors"):
        path.unlink()
    model.save_pretrained(src, max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    hg_to_pp(src, tmp_path / "pp", **QUIET)
    pp_to_hg(tmp_path / "pp", tmp_path / "out", **QUIET)
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), read_hf_tensors(src))


def test_bin_input_with_tied_duplicate_head(tmp_path):
    """A `.bin` state_dict of a tied model carries `lm_head.weight` (same storage): it is dropped."""
    src = tmp_path / "src"
    model = make_tiny_llama(tmp_path / "ref", tokenizer=False, tie_word_embeddings=True)
    src.mkdir()
    model.config.save_pretrained(src)
    state = model.state_dict()
    assert "lm_head.weight" in state
    torch.save(state, src / "pytorch_model.bin")
    hg_to_pp(src, tmp_path / "pp", **QUIET)
    pp_to_hg(tmp_path / "pp", tmp_path / "out", **QUIET)
    expected = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), expected)


def test_training_checkpoint_layout_is_accepted(pp_dir, hf_dir, tmp_path):
    """save_path/latest -> global_step7/layer_XX-model_00-model_states.pt, config + tokenizer at the top."""
    import shutil

    run = tmp_path / "run"
    tag = run / "global_step7"
    tag.mkdir(parents=True)
    (run / "latest").write_text("global_step7")
    for path in pp_dir.glob("layer_*"):
        shutil.copy(path, tag / path.name.replace("-model_states", "-model_00-model_states"))
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a layer file")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pp_dir / name, run / name)
    pp_to_hg(run, tmp_path / "out", **QUIET)
    assert_same_tensors(read_hf_tensors(tmp_path / "out"), read_hf_tensors(hf_dir))
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_cli_subcommands_via_subprocess(hf_dir, tmp_path):
    done = run_cli("hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(tmp_path / "pp"))
    assert done.returncode == 0, done.stderr
    assert "peak RSS" in done.stdout
    assert sorted(p.name for p in (tmp_path / "pp").glob("layer_*")) == [
        f"layer_{i:02d}-model_states.pt" for i in range(6)]
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "pp").iterdir()}

    done = run_cli("pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "hf"),
                   "--max-shard-size", "100KB")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    done = run_cli("verify", "--hf-path", str(tmp_path / "hf"), "--pp-path", str(tmp_path / "pp"))
    assert done.returncode == 0, done.stderr
    assert "max relative logit diff" in done.stdout

    done = run_cli("hg_to_pp", "--input-path", "no-such-org/no-such-model", "--save-path", str(tmp_path / "x"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: input path 'no-such-org/no-such-model' does not exist locally")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_verify_fails_on_a_perturbed_weight(hf_dir, pp_copy, capsys):
    assert convert_model.main(["verify", "--hf-path", str(hf_dir), "--pp-path", str(pp_copy)]) == 0
    path = pp_copy / "layer_02-model_states.pt"
    state = torch.load(path, weights_only=True)
    state["mlp.down_proj.weight"][0, 0] += 0.5
    torch.save(state, path)
    assert convert_model.main(["verify", "--hf-path", str(hf_dir), "--pp-path", str(pp_copy)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_error_missing_layer_file(pp_copy, tmp_path, capsys):
    (pp_copy / "layer_03-model_states.pt").unlink()
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(pp_copy), "--save-path", str(tmp_path / "out"))
    assert "missing layer file" in msg and "layer_03-model_states.pt" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_error_surplus_layer_file(pp_copy, tmp_path, capsys):
    (pp_copy / "layer_06-model_states.pt").write_bytes((pp_copy / "layer_05-model_states.pt").read_bytes())
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(pp_copy), "--save-path", str(tmp_path / "out"))
    assert "layer_06" in msg and "6 pipeline layers" in msg


@pytest.mark.parametrize("change, expected", [
    ("extra", "unexpected tensor 'self_attn.extra.weight'"),
    ("missing", "missing tensor 'mlp.up_proj.weight'"),
    ("shape", "tensor 'self_attn.q_proj.weight' has shape (32, 64), config.json implies (64, 64)"),
])
def test_error_bad_layer_file_tensors(pp_copy, tmp_path, capsys, change, expected):
    path = pp_copy / "layer_01-model_states.pt"
    state = torch.load(path, weights_only=True)
    if change == "extra":
        state["self_attn.extra.weight"] = torch.zeros(2)
    elif change == "missing":
        del state["mlp.up_proj.weight"]
    else:
        state["self_attn.q_proj.weight"] = state["self_attn.q_proj.weight"][:32]
    torch.save(state, path)
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(pp_copy), "--save-path", str(tmp_path / "out"))
    assert "layer_01-model_states.pt" in msg and expected in msg
    msg = cli_error(capsys, "verify", "--hf-path", str(pp_copy), "--pp-path", str(pp_copy))
    assert expected in msg


def copy_hf(hf_dir: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copy of the HF dir with its tensors and/or config.json edited."""
    dst.mkdir()
    tensors = read_hf_tensors(hf_dir)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((hf_dir / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit_tensors, edit_config, expected", [
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(1)}), None,
     "unexpected tensor 'model.layers.0.mlp.extra.weight': no weight-map rule matches it"),
    (lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}), None,
     "unexpected tensor 'model.layers.9.mlp.up_proj.weight': not part of the model described by config.json"),
    (lambda t: t.pop("model.layers.2.self_attn.v_proj.weight"), None,
     "missing tensor 'model.layers.2.self_attn.v_proj.weight'"),
    (lambda t: t.pop("lm_head.weight"), None, "missing tensor 'lm_head.weight'"),
    (None, lambda c: c.update(intermediate_size=96),
     "tensor 'model.layers.0.mlp.down_proj.weight' has shape (64, 128), config.json implies (64, 96)"),
    (None, lambda c: c.update(model_type="bloomz"), "unsupported model_type 'bloomz' (supported: baichuan, bloom, chatglm, "),
    (None, lambda c: c.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope scaling type 'dynamic' is not supported (supported: default, llama3, linear, longrope)"),
])
def test_error_bad_hf_checkpoint(hf_dir, tmp_path, capsys, edit_tensors, edit_config, expected):
    src = copy_hf(hf_dir, tmp_path / "src", edit_tensors, edit_config)
    msg = cli_error(capsys, "hg_to_pp", "--input-path", str(src), "--save-path", str(tmp_path / "out"))
    assert expected in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_stale_rotary_buffers_are_dropped(hf_dir, tmp_path):
    """Old llama checkpoints carry `self_attn.rotary_emb.inv_freq`; the weight map drops it."""
    src = copy_hf(hf_dir, tmp_path / "src",
                  lambda t: t.update({"model.layers.1.self_attn.rotary_emb.inv_freq": torch.zeros(8)}))
    logs = []
    hg_to_pp(src, tmp_path / "pp", log=logs.append)
    assert "dropped 1 tensor(s)" in logs[0]


def test_error_existing_output_without_overwrite(hf_dir, pp_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    msg = cli_error(capsys, "hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(out))
    assert "exists and is not empty (pass --overwrite to replace it)" in msg
    assert (out / "keep.txt").is_file()
    assert convert_model.main(["hg_to_pp", "--input-path", str(hf_dir), "--save-path", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "layer_05-model_states.pt").is_file()
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(out), "--save-path", str(out), "--overwrite")
    assert "contains the input" in msg


def test_error_missing_input_and_bad_shard_size(pp_dir, tmp_path, capsys):
    msg = cli_error(capsys, "hg_to_pp", "--input-path", str(tmp_path / "nope"), "--save-path", str(tmp_path / "o"))
    assert "does not exist" in msg
    msg = cli_error(capsys, "pp_to_hg", "--input-path", str(pp_dir), "--save-path", str(tmp_path / "o"),
                    "--max-shard-size", "lots")
    assert "--max-shard-size" in msg
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 1024**2 and parse_size(100) == 100
