"""Long texts (issue 26): encoded in chunks cut at spaces, with exactly the ids of the whole text, and a
`data.check` of one very long sample whose memory is bounded by the sample, not by the tokenizer's state.

The chunk sizes are made tiny here (`small_chunks`), so that texts of a few thousand characters cross many
chunk boundaries; the reference is the same call with chunking off.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import data.render as render
from data.render import Ids, batch_encoder, encode, first_trained_positions, render_many, render_validated
from models.tiny import _CORPUS

ROOT = Path(__file__).resolve().parents[1]

# What Llama-3 and Qwen2 split on before their byte-level BPE.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def _saved(backend, out: Path, byte_fallback: bool):
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = [f"<0x{i:02X}>" for i in range(256)] if byte_fallback else []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(SPECIALS.values()) + extra, show_progress=False,
                                  initial_alphabet=[] if byte_fallback else pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS).save_pretrained(out)
    return render.load_tokenizer(out)


@pytest.fixture(scope="module")
def tok_llama3(tmp_path_factory):
    """Byte-level BPE after Llama-3's split regex (a space before a letter joins the word after it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return _saved(backend, tmp_path_factory.mktemp("tok_llama3"), byte_fallback=False)


@pytest.fixture(scope="module")
def tok_spm(tmp_path_factory):
    """A SentencePiece `tokenizer.model` converted by transformers: no split at all before the BPE (the whole
    text is one word), `▁` prepended; its pieces never hold a `▁` after another character."""
    import sentencepiece

    out = tmp_path_factory.mktemp("tok_spm")
    sentences = [line for text in _CORPUS for line in text.splitlines() if line.strip()] * 8
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(out / "tokenizer"), vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **SPECIALS}))
    return render.load_tokenizer(out)


@pytest.fixture(scope="module")
def tok_across_spaces(tmp_path_factory):
    """A BPE trained on whole texts (no pre-tokenizer): its merges span spaces, so no cut is safe."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _saved(backend, tmp_path_factory.mktemp("tok_across"), byte_fallback=True)


CHUNKABLE = ["tok", "tok_metaspace", "tok_llama3", "tok_spm"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Texts over 200 characters are long, cut every 8 characters or so (where a space allows)."""
    monkeypatch.setattr(render, "LONG_TEXT", 200)
    monkeypatch.setattr(render, "CHUNK_CHARS", 16)


def whole(monkeypatch, fn, *args, **kwargs):
    """`fn(...)` with chunking off: the ids before long texts were chunked."""
    with monkeypatch.context() as m:
        m.setattr(render, "LONG_TEXT", 1 << 62)
        return fn(*args, **kwargs)


def _random_text(rng: random.Random, n: int) -> str:
    pieces = ["the", "quick", "Fox's", "it's", "HE'LL", "1234567", "3.14", "caf\u00e9", "cafe\u0301",
              "\u4f60\u597d", "\u4e16\u754c", "\U0001f600", "\U0001f44d\U0001f3fd", "na\u00efve",
              "\u043f\u0440\u0438\u0432\u0435\u0442", "</s>", "<s>", "<unk>", "###", "...", "(x)", "{", "}", "\u2603",
              "\u2581", "\u0120a", "\x00"]
    gaps = [" "] * 12 + ["", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\u00a0", "\u3000", " " * 40, "\n" * 20, "\r\n"]
    return "".join(rng.choice(pieces) + rng.choice(gaps) for _ in range(n))


TEXTS = {
    "prose": " ".join(_CORPUS)[:3000],
    "no_whitespace": "abcdefghij.,;" * 200,
    "cjk_no_whitespace": "\u4f60\u597d\u4e16\u754c\u3002" * 300,
    "multibyte": "caf\u00e9 na\u00efve \u00fcber Stra\u00dfe \u4f60\u597d \u4e16\u754c \U0001f600 \U0001f44d\U0001f3fd "
                 "\u043f\u0440\u0438\u0432\u0435\u0442 \u0645\u0631\u062d\u0628\u0627 e\u0301 " * 40,
    "whitespace_runs": ("word" + " " * 50 + "x y z" + "\n" * 30 + "\t\t a b" + " " * 7 + "c\n d ") * 30,
    "special_token_text": "a</s> b <s> c <unk>d ### Assistant: x " * 60,
    "leading_and_trailing_space": "  " + "leading and trailing words " * 60 + "  ",
    **{f"random_{seed}": _random_text(random.Random(seed), 400) for seed in range(6)},
}


@pytest.mark.parametrize("name", CHUNKABLE)
def test_chunked_encoding_gives_the_ids_of_the_whole_text(name, request, monkeypatch, small_chunks):
    tokenizer = request.getfixturevalue(name)
    encoder = batch_encoder(tokenizer)
    assert encoder.chunks_ok
    for label, text in TEXTS.items():
        starts = render._chunk_starts(text, render.CHUNK_CHARS)
        for at_start in (True, False):
            expected = whole(monkeypatch, encode, tokenizer, text, at_start)
            assert encode(tokenizer, text, at_start) == expected, (name, label, at_start)
            assert encoder.encode([(text, at_start), ("short", False)]) == \
                [expected, whole(monkeypatch, encode, tokenizer, "short", False)], (name, label, at_start)
            chunked = encoder.long(text, at_start)
            if len(starts) > 1:  # it was cut (texts without a single space between words are not)
                assert chunked == expected, (name, label, at_start)
            else:
                assert chunked is None
    assert len(render._chunk_starts(TEXTS["prose"], render.CHUNK_CHARS)) > 50
    assert len(render._chunk_starts(TEXTS["random_0"], render.CHUNK_CHARS)) > 50
    assert len(render._chunk_starts(TEXTS["no_whitespace"], render.CHUNK_CHARS)) == 1


def test_a_tokenizer_whose_tokens_span_spaces_encodes_long_texts_whole(tok_across_spaces, monkeypatch, small_chunks):
    encoder = batch_encoder(tok_across_spaces)
    assert not encoder.chunks_ok
    for text in (TEXTS["prose"], TEXTS["random_0"]):
        assert encoder.long(text) is None
        for at_start in (True, False):
            assert encode(tok_across_spaces, text, at_start) == whole(monkeypatch, encode, tok_across_spaces, text,
                                                                      at_start)


def test_keep_holds_the_first_ids_and_counts_them_all(tok, monkeypatch, small_chunks):
    text = TEXTS["prose"]
    full = whole(monkeypatch, encode, tok, text)
    for keep in (0, 1, 7, 100, len(full) - 1):
        ids = encode(tok, text, keep=keep)
        assert isinstance(ids, Ids) and ids == full[:keep] and ids.length == len(full)
        assert batch_encoder(tok).encode([(text, True)], keep) == [ids]
    for keep in (len(full), len(full) + 5, None):
        ids = encode(tok, text, keep=keep)
        assert type(ids) is list and ids == full


def _long_samples(text: str) -> list[dict]:
    short = "Hello there"
    return [
        {"type": "pretrain", "text": text},
        {"type": "instruct", "instruct": short, "input": text, "output": text},
        {"type": "instruct", "instruct": text, "output": short},
        {"type": "conversation", "rounds": [["ask", text], ["ans", text], ["ask", short], ["ans", short]]},
        {"type": "ref_qa", "reference": text, "rounds": [["ask", short], ["ans", text]]},
        {"type": "conver_has_api", "api_desc": short, "rounds": [
            ["ask", short],
            ["ans-api", {"actions": [{"inner_thought": text, "api_name": "search", "api_param": {"q": "x"},
                                      "api_res": text}], "ans": text}]]},
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]},
    ]


@pytest.mark.parametrize("name", ["tok", "tok_metaspace"])
def test_long_samples_render_as_with_whole_encoding(name, request, monkeypatch, small_chunks):
    """Every sample type with long fields: ids, labels, segment texts, truncation and `full_length`, as before."""
    tokenizer = request.getfixturevalue(name)
    samples = _long_samples(TEXTS["random_1"]) + _long_samples(TEXTS["prose"])
    for max_seq_len in (None, 3, 40, 700, 1 << 20):
        expected = whole(monkeypatch, render_many, samples, tokenizer, max_seq_len)
        assert render_many(samples, tokenizer, max_seq_len) == expected
        assert render_many(samples, tokenizer, max_seq_len, keep_segments=False) == \
            whole(monkeypatch, render_many, samples, tokenizer, max_seq_len, keep_segments=False)
        assert [render_validated(s, tokenizer, max_seq_len) for s in samples] == expected
        if max_seq_len in (3, 700):
            assert any(r.truncated and r.full_length > max_seq_len for r in expected)
    assert first_trained_positions(samples, tokenizer) == whole(monkeypatch, first_trained_positions, samples,
                                                                tokenizer)


def test_data_check_of_long_samples_is_the_same_with_workers(capsys, tok_dir, tmp_path, monkeypatch, small_chunks):
    """Workers (whole encoding there: the small chunks are this process's) give the output of one process
    (long texts chunked); chunks larger than the workers' share of bytes wait for those before them."""
    from data import check

    monkeypatch.setattr(check, "CHUNK_SAMPLES", 3)
    monkeypatch.setattr(check, "CHUNK_BYTES", 300)
    rows = [{"type": "pretrain", "text": f"short {i}"} for i in range(20)]
    for i, sample in enumerate(_long_samples(TEXTS["random_2"])[:-1]):  # not `messages`: one kind per file
        rows.insert(3 * i + 1, sample)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    runs = []
    for workers in (1, 2):
        dump = tmp_path / f"dump{workers}.jsonl"
        code = check.main(["--data", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", "300",
                           "--workers", str(workers), "--dump", str(dump), "--show", "4"])
        out, err = capsys.readouterr()
        assert code == 0, err
        runs.append((out.replace(str(dump), "DUMP"), err, dump.read_bytes()))
    assert runs[0] == runs[1]
    assert "truncated to 300 tokens: 6 of 26 samples" in runs[0][0]


# Peak RSS of `data.check` on `big`, and RSS before it (after a check of `small`: libraries loaded, caches
# warm). Read from /proc: `ru_maxrss` of a child can start at its parent's (a vfork child's exec keeps it).
MEASURE = """
import gc, json, sys
from data.check import main
def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))
small, big, tokenizer = sys.argv[1:]
assert main(["--data", small, "--tokenizer", tokenizer, "--max-seq-len", "512"]) == 0
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) starts again from here
except OSError:
    pass
base = status("VmRSS")
assert main(["--data", big, "--tokenizer", tokenizer, "--max-seq-len", "512"]) == 0
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def test_data_check_memory_is_bounded_by_the_longest_sample(tok_dir, tmp_path):
    """One 20 MB pretrain document: peak RSS within the interpreter's baseline + 6x the document (whole
    encoding took ~110 bytes per character: 2.3 GB more for this one)."""
    rng = random.Random(0)
    words = " ".join(_CORPUS).split()
    text = " ".join(rng.choices(words, k=3_400_000))[:20_000_000]
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text(json.dumps({"type": "pretrain", "text": text}) + "\n", encoding="utf-8")
    small.write_text(json.dumps({"type": "pretrain", "text": "hello world"}) + "\n", encoding="utf-8")
    res = subprocess.run([sys.executable, "-c", MEASURE, str(small), str(big), str(tok_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "truncated to 512 tokens: 1 of 1 samples" in res.stdout
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    grown = rss["peak"] - rss["base"]
    assert grown < 6 * len(text), f"data.check of a {len(text) >> 20} MiB sample grew RSS by {grown >> 20} MiB"
