"""training/ds: the one DeepSpeed version check (a missing patch target refuses the run in one line, another
version warns), and no DeepSpeed private name used outside the package."""
import re

import deepspeed
import pytest
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.pipe.module import PipelineModule

from tests.conftest import ROOT
from training.ds import bf16_grads, version


@pytest.fixture
def unchecked(monkeypatch):
    """check_installed() runs again in this test."""
    monkeypatch.setattr(version, "_done", False)


def test_installed_deepspeed_passes_silently():
    assert deepspeed.__version__.startswith("0.19.")
    assert version.check() is None
    assert all(version.present(t) for t in version.TARGETS)


def test_other_version_with_every_target_warns_once(monkeypatch, unchecked, capsys):
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    monkeypatch.delenv("RANK", raising=False)
    version.check_installed()
    version.check_installed()  # once per process
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "warning: deepspeed 0.20.1 is installed" in err[0] and "0.19.x (0.19.8)" in err[0]
    assert "pip install deepspeed==0.19.8" in err[0]


def _drop_local_start(monkeypatch):
    """A DeepSpeed whose PipelineModule no longer keeps its first local layer in `_local_start`."""
    def _set_bounds(self, start=None, stop=None):
        self.local_bounds = (start, stop)

    monkeypatch.setattr(PipelineModule, "_set_bounds", _set_bounds)


def test_missing_patch_target_is_refused_naming_both_versions(monkeypatch):
    _drop_local_start(monkeypatch)
    with pytest.raises(version.DeepSpeedVersionError) as e:
        version.check("0.21.0")
    text = str(e.value)
    assert text.startswith("deepspeed 0.21.0 is installed") and "0.19.x (0.19.8)" in text
    assert "PipelineModule._local_start (used by PipelineModule._set_bounds)" in text
    assert text.endswith("install deepspeed==0.19.8") and "\n" not in text


def test_cli_prints_the_refusal_as_one_line_exit_2(monkeypatch, unchecked, capsys, tmp_path):
    from training.cli import run_cli
    from training.pipeline import PipelineTrainer

    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    _drop_local_start(monkeypatch)
    code = run_cli(PipelineTrainer(), "test", ["--config", str(tmp_path / "never-read.yml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: deepspeed 0.21.0 is installed"), err


def test_changed_copied_method_keeps_deepspeeds_own(monkeypatch, unchecked, capsys):
    """A DeepSpeed whose `_update_hp_grad` differs from the copy: warned, and the copy is not installed."""
    monkeypatch.setattr(BF16_Optimizer, "_update_hp_grad", bf16_grads.ORIGINAL or BF16_Optimizer._update_hp_grad)
    monkeypatch.setattr(version, "COPIED", {q: "0" * 16 for q in version.COPIED})
    deepspeds = BF16_Optimizer._update_hp_grad
    assert "BF16_Optimizer._update_hp_grad differs from DeepSpeed 0.19.8's" in version.check()
    bf16_grads.install()
    assert BF16_Optimizer._update_hp_grad is deepspeds


# DeepSpeed's private names that training/ds reads, writes, overrides or replaces (version.TARGETS), and the
# DeepSpeed methods named there.
PRIVATE = sorted({n for t in version.TARGETS for n in (t.name, t.used_in) if n and re.match(r"_[a-z]", n)})


def test_no_deepspeed_private_name_outside_training_ds():
    assert {"_hp_grad", "_local_start", "_layer_specs", "_update_hp_grad", "_config"} <= set(PRIVATE)
    pattern = re.compile(r"\.(" + "|".join(PRIVATE) + r")\b")
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests") or rel.parts[:2] == ("training", "ds") or "site-packages" in rel.parts:
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{rel}:{no}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
