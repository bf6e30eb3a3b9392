"""Shared fixtures: tiny models converted to the pipeline layout, and a DeepSpeed launcher on CPU ranks."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "examples" / "data" / "sample.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_bin() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    return str(local) if local.exists() else shutil.which("deepspeed")


def extensions_dir() -> str:
    """DeepSpeed's JIT ops (the CPU shm comm op) cached per venv, so two venvs never rebuild each other's."""
    return os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def launch_env() -> dict:
    """Environment of a CPU DeepSpeed launch: gloo ranks on the CPU, one thread each, this venv's op cache and
    this venv's `ninja` first on PATH (another ninja version rebuilds every cached op, see test_multinode)."""
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", TORCH_EXTENSIONS_DIR=extensions_dir(),
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run_deepspeed(script: str, config: dict, tmp_path: Path, num_procs: int, *extra: str, timeout: int = 300):
    """Launch `script` with DeepSpeed's own launcher on `num_procs` CPU ranks (gloo)."""
    cfg_path = tmp_path / f"cfg_{free_port()}.yml"
    cfg_path.write_text(yaml.safe_dump(config))
    env = launch_env()
    cmd = [deepspeed_bin(), "--num_gpus", str(num_procs), "--master_port", str(free_port()),
           str(ROOT / script), "--config", str(cfg_path), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def launch_background(cfg: dict, tmp_path: Path, name: str) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 train_ds.py --config tmp_path/name.yml` started in its own process group
    (output discarded), for tests that kill it."""
    cfg_path = tmp_path / f"{name}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "train_ds.py"),
           "--config", str(cfg_path)]
    return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def sigkill_after_rows(proc: subprocess.Popen, save_path: Path, rows: int, timeout: float = 240) -> None:
    """SIGKILL the whole process group of `proc` once save_path/metrics.jsonl has `rows` rows (or at `timeout`)."""
    deadline = time.time() + timeout
    metrics = save_path / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_cli(*args: str, timeout: int = 120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_llama_pp(tmp_path_factory):
    """(hf_dir, pp_dir) of a tiny random llama converted with convert_model.py hg_to_pp."""
    from models.tiny import make_tiny_llama

    base = tmp_path_factory.mktemp("tiny_llama")
    hf, pp = base / "hf", base / "pp"
    make_tiny_llama(hf, seed=0)
    res = run_cli("convert_model.py", "hg_to_pp", "--input-path", str(hf), "--save-path", str(pp))
    assert res.returncode == 0, res.stderr
    return hf, pp


def train_config(pp_dir: Path, save_path: Path, dims=(2, 1), **overrides) -> dict:
    cfg = {
        "model_path": str(pp_dir), "save_path": str(save_path), "data_path": str(SAMPLE_DATA),
        "max_seq_len": 256, "n_epoches": 1, "num_workers": 0, "seed": 7,
        "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": list(dims)}, "parts": "auto"},
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}, "no_wd_kws": ["norm"]},
    }
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


# ----------------------------------------------------------------------------------------------
# Helpers shared by the family tests (test_llama, test_families, test_mixtral, test_convert)


def read_hf_tensors(model_dir: Path) -> dict:
    """Every tensor of every *.safetensors file in `model_dir`, by name."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def assert_same_tensors(actual: dict, expected: dict) -> None:
    """Same names, dtypes and values, bit for bit."""
    import torch

    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def token_batch(vocab: int, seed: int = 0):
    """input_ids [2, 24], position_ids (second row offset, as in a packed/continued sequence), labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 24), generator=g)
    position_ids = torch.stack([torch.arange(24), torch.arange(24) + 7])
    labels = input_ids.clone()
    labels[0, :5] = -100
    labels[1, 18:] = -100
    return input_ids, position_ids, labels


def hf_name(model, mapper, param_name: str) -> str:
    """`layers.{idx}.{local}` of a SequentialModel -> HF name through the family's weight map (a WeightMapper)."""
    _, idx, local = param_name.split(".", 2)
    idx, num_blocks = int(idx), len(model.layers) - 2
    kind, block = ("enter", None) if idx == 0 else ("block", idx - 1) if idx <= num_blocks else ("exit", None)
    return mapper.to_hf(kind, block, local)


# Tokenizers of the data tests (tests/test_data.py, tests/test_data_errors.py)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    from models.tiny import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    """Loaded back through AutoTokenizer, the way the trainer and data.check load it."""
    import data

    return data.load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def tok_metaspace(tmp_path_factory):
    """A SentencePiece-style tokenizer (`▁` word marker prepended to every text, byte fallback), like LLaMA-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from models.tiny import _CORPUS

    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials.values()) + byte_tokens,
                                  show_progress=False)
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    out = tmp_path_factory.mktemp("tokenizer_metaspace")
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(out)
    import data

    return data.load_tokenizer(out)


@pytest.fixture(autouse=True)
def no_process_group_left():
    """A test that starts a process group in this process (DeepSpeed's PipelineModule needs one) ends it, so later
    in-process trainer tests, which check that a refusal comes before any process group, start without one."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def perturb(model, seed: int = 1) -> None:
    """Random norm weights and biases too, so every parameter matters to a comparison with a reference."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def assert_packed_rows_equal_documents_alone(pp_dir, vocab: int) -> None:
    """Two documents (13 and 17 tokens, longer than the debug configs' windows) packed in one row: each one's logits
    equal a run of it alone."""
    import torch

    from models import ModelOptions, load_sequential

    ours = load_sequential(pp_dir, opts=ModelOptions(packed_sequences=True)).eval()
    alone = load_sequential(pp_dir).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (1, 30), generator=g)
    pos = torch.cat([torch.arange(13), torch.arange(17)])[None]
    with torch.no_grad():
        packed = ours(ids, pos)
        first = alone(ids[:, :13], torch.arange(13)[None])
        second = alone(ids[:, 13:], torch.arange(17)[None])
    torch.testing.assert_close(packed[:, :13], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 13:], second, rtol=1e-5, atol=1e-5)
