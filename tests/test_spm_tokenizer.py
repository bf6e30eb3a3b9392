"""A checkpoint that ships its tokenizer the old way: only a SentencePiece `tokenizer.model` (issue 19).

Older llama conversions (and the real Mixtral-8x7B repo's `tokenizer.model`) have no `tokenizer.json`;
transformers then converts the SentencePiece model to a fast tokenizer, which needs `protobuf`. The
directory is built on the fly (a tiny SentencePiece BPE trained here, a tiny random llama) and taken
through every step a user takes: `hg_to_pp`, `data.check`, one training run (one DeepSpeed launch, one
process), `pp_to_hg` of the trained checkpoint and `demo.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import SAMPLE_DATA, run_cli, run_deepspeed, train_config

VOCAB = 512


def make_spm_only_llama(out: Path) -> Path:
    """A llama dir with config.json + random weights and, as tokenizer, only tokenizer.model + tokenizer_config.json."""
    import sentencepiece

    from models.tiny import _CORPUS, make_tiny_llama

    make_tiny_llama(out, seed=0, tokenizer=False, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
    sentences = [line for text in _CORPUS for line in text.splitlines() if line.strip()] * 8
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 512}))
    return out


def test_sentencepiece_only_checkpoint_end_to_end(tmp_path):
    import google.protobuf  # noqa: F401  (requirements.txt: transformers needs it for a tokenizer.model-only dir)
    hf = make_spm_only_llama(tmp_path / "hf")
    assert not (hf / "tokenizer.json").exists() and (hf / "tokenizer.model").exists()

    from data import load_tokenizer

    tok = load_tokenizer(hf)
    ids = tok.encode("Cai Xukun loves playing basketball.", add_special_tokens=False)
    assert tok.decode(ids) == "Cai Xukun loves playing basketball." and max(ids) < VOCAB

    pp = tmp_path / "pp"
    res = run_cli("convert_model.py", "hg_to_pp", "--input-path", str(hf), "--save-path", str(pp))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (pp / "tokenizer.model").exists()

    res = run_cli("-m", "data.check", "--data", str(SAMPLE_DATA), "--tokenizer", str(pp), "--max-seq-len", "256")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "all valid" in res.stdout

    out = tmp_path / "out"
    cfg = train_config(pp, out, dims=(1, 1), max_steps=3)
    res = run_deepspeed("train_ds.py", cfg, tmp_path, 1)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 3

    exported = tmp_path / "exported"
    res = run_cli("convert_model.py", "pp_to_hg", "--input-path", str(out), "--save-path", str(exported))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("demo.py", "--model-path", str(exported), "--instruct", "Fill out the blank", "--input",
                  "Cai Xukun loves ______", "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
