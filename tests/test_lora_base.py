"""LoRA and its base (issue 26): the base fingerprint covers the tokenizer files, PEFT exports name their base and
record its weights, demo.py --adapter refuses another base of the same shapes, and the lora section is checked
(r required, targets and modules_to_save disjoint, modules_to_save names that exist). One line each, no traceback."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

import convert_model
import demo
import train_ds
from models.lora import LoraConfig
from models.tiny import make_tiny_llama
from tests.conftest import train_config
from tests.test_lora_export import write_lora_checkpoint
from utils import lora_ckpt


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """hf -> pp with convert_model.py (records the source), a LoRA checkpoint on it, its PEFT export."""
    root = tmp_path_factory.mktemp("lora_base")
    make_tiny_llama(root / "hf", seed=0)
    assert convert_model.main(["hg_to_pp", "--input-path", str(root / "hf"), "--save-path", str(root / "pp")]) == 0
    cfg = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    write_lora_checkpoint(root / "pp", root / "run", cfg)
    assert convert_model.main(["pp_to_hg", "--input-path", str(root / "run"), "--save-path", str(root / "adapter"),
                               "--adapter-only"]) == 0
    return root


def test_swapped_token_ids_change_the_base_fingerprint_and_resume_is_refused(lora_run, tmp_path):
    from training.lora import check_resume
    from utils.config import ConfigError, validate

    base = tmp_path / "base"
    shutil.copytree(lora_run / "pp", base)
    meta_dir = tmp_path / "run" / "global_step3"
    shutil.copytree(lora_run / "run" / "global_step3", meta_dir)
    meta = lora_ckpt.read_lora_meta(str(meta_dir))
    meta["base_model_path"] = str(base)
    meta["base_fingerprint"] = lora_ckpt.base_fingerprint(str(base))
    (meta_dir / lora_ckpt.LORA_META).write_text(json.dumps(meta))
    weights_only = lora_ckpt.base_fingerprint(str(base), 1)
    tok = json.loads((base / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two swapped token ids
    (base / "tokenizer.json").write_text(json.dumps(tok))
    assert lora_ckpt.base_fingerprint(str(base), 1) == weights_only  # what LORA.json version 1 covered
    assert lora_ckpt.base_fingerprint(str(base)) != meta["base_fingerprint"]
    cfg = validate(train_config(base, tmp_path / "run", resume=True,
                                lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(ConfigError, match="its weights differ from the base this LoRA checkpoint was trained on, or "
                                          "its tokenizer files do"):
        check_resume(cfg, str(meta_dir))
    old = dict(meta, base_fingerprint=weights_only)  # a checkpoint written before: version 1, still accepted
    del old["fingerprint_version"]
    assert lora_ckpt.base_mismatch(old, str(base)) is None


def test_peft_export_names_its_base(lora_run, tmp_path):
    adapter = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(lora_run / "hf")  # hg_to_pp's recorded source
    out = tmp_path / "named"
    assert convert_model.main(["pp_to_hg", "--input-path", str(lora_run / "run"), "--save-path", str(out),
                               "--adapter-only", "--base-name", "org/tiny-llama"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    recorded = json.loads((out / lora_ckpt.ADAPTER_BASE).read_text())
    assert recorded["base_weights"].startswith("sampled-bf16:") and recorded["modules"]


def test_demo_refuses_an_adapter_of_another_base_of_the_same_shapes(lora_run, tmp_path, capsys):
    other = tmp_path / "other"
    make_tiny_llama(other, seed=1)
    argv = ["--adapter", str(lora_run / "adapter"), "--instruct", "Say hi", "--temperature", "0",
            "--max-new-tokens", "4"]
    assert demo.main(["--model-path", str(other), *argv]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--adapter {lora_run / 'adapter'} was trained on other base weights ({lora_run / 'hf'})" in line
    assert "--any-base" in line
    assert demo.main(["--model-path", str(other), *argv, "--any-base"]) == 0
    assert "applying it anyway (--any-base)" in capsys.readouterr().err
    assert demo.main(["--model-path", str(lora_run / "hf"), *argv]) == 0  # its own base


@pytest.mark.parametrize("lora, words", [
    ({"dropout": 0.0}, ["missing required key 'lora.r'", "lora.dropout"]),
    ({}, ["missing required key 'lora.r'"]),
    ({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["q_proj"]},
     ["lora.target_modules and lora.modules_to_save both name q_proj"]),
    ({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_haed"]},
     ["lora.modules_to_save: 'lm_haed' (did you mean 'lm_head'?) not in llama"]),
])
def test_lora_section_checks(lora, words, lora_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = train_config(lora_run / "pp", tmp_path / "run", lora=lora)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_ds.main(["--config", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(w in line for w in words), line
    assert not (tmp_path / "run").exists()
