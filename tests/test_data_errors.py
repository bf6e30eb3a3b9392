"""Data problems that used to pass silently, and the batched / streamed / parallel paths of `data.check`.

Warnings (issue 20): samples with no trained token after truncation, dialogues ending with `ask` or
starting with an answer, repeated JSON keys, each with a count and the first lines / samples; a file in
which nothing trains is refused by `data.check` and by the dataset the trainers build. The batched
renderer must equal the one-sample renderer bit for bit, the streamed `.json` reader the whole-file
parser, and `--workers 2` the sequential check. Everything here runs in-process on tiny tokenizers.
"""
from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pytest

import data
import data.check as check
import data.loading as loading
from data import DataError, load_samples, render_sample
from data.render import batch_encoder, first_trained_positions, render_many, render_validated

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_JSON = REPO / "examples" / "data" / "sample.json"

PRETRAIN = {"type": "pretrain", "text": "Cai Xukun (born August 2, 1998) is a Chinese singer."}
INSTRUCT = {"type": "instruct", "instruct": "Fill out the blank in the following sentence",
            "input": "Cai Xukun loves singing, dancing, rapping and ______", "output": "playing basketball"}
INSTRUCT_NO_INPUT = {"type": "instruct", "instruct": "Write a poem about rain.", "output": "Rain is falling."}
CONVERSATION = {"type": "conversation", "rounds": [
    ["ask", "Hello"], ["ans", "Hello, what can I do for you ?"],
    ["ask", "Who is caixukun?"], ["ask", "When was caixukun born?"], ["ans", "In the year of 1998."]]}
CONVER_HAS_API = {"type": "conver_has_api", "api_desc": "search: Search the XiaoHuangShu.\n", "rounds": [
    ["ask", "Search for \"love your neighbor\"."],
    ["ans-api", {"actions": [
        {"inner_thought": "I need to use the search tool.", "api_name": "search",
         "api_param": "{\"query\": \"XiaoHuangShu\", \"version\": \"King James Version\"}",
         "api_res": "Status Code: 200. Response: {\"book\": \"Mark\"}"},
        {"inner_thought": "Again.", "api_name": "search", "api_param": {"query": "GuoChanQu"},
         "api_res": {"book": "Luke", "verse": 27}}],
        "ans": "It is in Mark 12:31."}],
    ["ask", "I do not think you are correct."], ["ans", "Then you should ask others, not me. </s> <eos>"]]}
REF_QA = {"type": "ref_qa", "reference": "On January 10, 2019, Kun was named Goodwill Ambassador.", "rounds": [
    ["ask", "When was Kun named Goodwill Ambassador?"], ["ans", "On January 10, 2019"],
    ["ask", "Who was named?"], ["ans", "Kun."]]}
ALL_TYPES = {"pretrain": PRETRAIN, "instruct": INSTRUCT, "instruct_no_input": INSTRUCT_NO_INPUT,
             "conversation": CONVERSATION, "conver_has_api": CONVER_HAS_API, "ref_qa": REF_QA}

GOOD = {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"]]}
LONG_PROMPT = {"type": "instruct", "instruct": "Explain this. " * 40, "output": "ok"}  # ~100+ masked tokens


# ---------------------------------------------------------------------------------------------- fixtures

def write_jsonl(path: Path, rows) -> Path:
    """Rows are samples (dumped) or raw strings (written as they are)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
                    encoding="utf-8")
    return path


def write_json(path: Path, samples) -> Path:
    path.write_text(json.dumps(samples, indent=1), encoding="utf-8")
    return path


def run_check(capsys, path, tok_dir, max_seq_len=512, *extra):
    code = check.main(["--data", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", str(max_seq_len),
                       *map(str, extra)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------- errors

def test_jsonl_bad_field_names_file_line_sample_and_field(capsys, tok_dir, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", {"type": "instruct", "instruct": "x"}])
    code, out, err = run_check(capsys, path, tok_dir)
    assert code == 2 and out == ""
    assert one_error(err) == f"error: {path}: line 3: sample 1 (instruct): output: missing required field"


def test_json_array_error_after_many_chunks_names_sample_and_field(capsys, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_CHUNK", 256)  # the array is read in many small pieces
    bad = {"type": "conversation", "rounds": [["ask", "q"], ["user", "x"]]}
    path = write_json(tmp_path / "bad.json", [GOOD] * 40 + [bad] + [GOOD] * 3)
    code, _, err = run_check(capsys, path, tok_dir)
    assert code == 2
    assert one_error(err) == (f"error: {path}: sample 40 (conversation): rounds[1][0]: unknown role 'user' "
                              "(expected ask, ans)")


def test_jsonl_syntax_error_names_line_and_column(capsys, tok_dir, tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [GOOD, GOOD, '{"type": "pretrain" "text": "b"}'])
    code, _, err = run_check(capsys, path, tok_dir)
    assert code == 2
    assert one_error(err) == f"error: {path}: line 3, column 21: invalid JSON: Expecting ',' delimiter (sample 2)"


def test_json_syntax_error_deep_in_a_streamed_file_is_the_whole_file_parsers(capsys, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_CHUNK", 512)
    lines = ["[", "// comment, with a comma,"] + [json.dumps(GOOD) + "," for _ in range(60)]
    lines += ['{"type": "pretrain", "text": "a"}', '{"type": "pretrain", "text": "b"}', "]"]
    path = tmp_path / "broken.json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = run_check(capsys, path, tok_dir)
    assert code == 2
    assert one_error(err) == f"error: {path}: line 64, column 1: invalid JSON: Expecting ',' delimiter"


def test_non_utf8_line_names_the_line(capsys, tok_dir, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"type": "pretrain", "text": "caf\xe9"}\n'.encode("latin-1"))
    code, _, err = run_check(capsys, path, tok_dir)
    assert code == 2
    assert one_error(err).startswith(f"error: {path}: line 2: not UTF-8 text (byte ")


def test_workers_must_be_positive(capsys, tok_dir, tmp_path):
    code, _, err = run_check(capsys, write_jsonl(tmp_path / "ok.jsonl", [GOOD]), tok_dir, 512, "--workers", "0")
    assert code == 2 and one_error(err) == "error: --workers must be at least 1, got 0"


def test_nothing_trains_is_an_error_naming_file_length_and_lines(capsys, tok_dir, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [LONG_PROMPT] * 4)
    code, out, err = run_check(capsys, path, tok_dir, 32)
    assert code == 2
    assert "truncated to 32 tokens: 4 of 4 samples" in out  # the report is still printed
    warning, error = err.splitlines()
    assert warning == (f"warning: {path}: 4 of 4 samples have no trained token after truncation to max_seq_len 32 "
                       "(first: lines 1, 2, 3)")
    shortest = first_trained_positions([LONG_PROMPT], data.load_tokenizer(tok_dir))[0]
    assert shortest > 32
    assert error == (f"error: {path}: no sample has a trained token after truncation to max_seq_len 32: all 4 "
                     "samples are cut before their first trained token (first: lines 1, 2, 3); the shortest "
                     f"prompt before a trained token is {shortest} tokens, so raise max_seq_len above {shortest} "
                     "or shorten the prompts")


# ---------------------------------------------------------------------------------------------- warnings

def test_untrained_samples_counted_with_first_lines(capsys, tok_dir, tmp_path):
    rows = [LONG_PROMPT, LONG_PROMPT, GOOD, "// a comment line", LONG_PROMPT, PRETRAIN, LONG_PROMPT]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    code, out, err = run_check(capsys, path, tok_dir, 64)
    assert code == 0 and "6 samples, all valid" in out
    assert err.splitlines() == [f"warning: {path}: 4 of 6 samples have no trained token after truncation to "
                                "max_seq_len 64 (first: lines 1, 2, 5)"]


def test_trailing_ask_and_leading_answer_are_noted(capsys, tok_dir, tmp_path):
    trailing = {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"], ["ask", "and then?"]]}
    leading = {"type": "ref_qa", "reference": "r", "rounds": [["ans", "a"], ["ask", "q"], ["ans", "b"]]}
    leading_api = {"type": "conver_has_api", "api_desc": "d", "rounds": [
        ["ans-api", {"actions": [{"inner_thought": "t", "api_name": "f", "api_param": {}, "api_res": "r"}],
                     "ans": "a"}]]}
    path = write_jsonl(tmp_path / "rounds.jsonl", [GOOD, trailing, leading, trailing, leading_api, PRETRAIN])
    code, _, err = run_check(capsys, path, tok_dir)
    assert code == 0
    assert err.splitlines() == [
        f"warning: {path}: 2 of 6 samples end with an 'ask' round, which is never answered or trained "
        "(first: lines 2, 4)",
        f"warning: {path}: 2 of 6 samples start with an answer round ('ans' or 'ans-api') that answers no question "
        "(first: lines 3, 5)"]


def test_duplicate_keys_are_noted_with_the_key(capsys, tok_dir, tmp_path):
    rows = [json.dumps(GOOD),
            '{"type": "instruct", "instruct": "a", "output": "first", "output": "second"}',
            '{"type": "conver_has_api", "api_desc": "d", "rounds": [["ask", "q"], ["ans-api", {"actions": '
            '[{"inner_thought": "t", "api_name": "f", "api_name": "g", "api_param": {}, "api_res": "r"}], '
            '"ans": "a"}]]}']
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    code, _, err = run_check(capsys, path, tok_dir)
    assert code == 0
    assert err.splitlines() == [f"warning: {path}: 2 of 3 samples repeat a key in one JSON object; only the last "
                                "value is kept (first: lines 2 (key 'output'), 3 (key 'api_name'))"]
    assert load_samples(path)[1]["output"] == "second"  # still loads, with JSON's meaning


def test_json_array_warnings_give_sample_indices_and_lines(capsys, tok_dir, tmp_path):
    trailing = {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"], ["ask", "?"]]}
    path = write_json(tmp_path / "data.json", [GOOD, trailing, LONG_PROMPT])
    code, _, err = run_check(capsys, path, tok_dir, 64)
    assert code == 0
    line_of = {i: n for i, n in enumerate(
        (n for n, text in enumerate(path.read_text().splitlines(), 1) if text == " {"))}
    assert err.splitlines() == [
        f"warning: {path}: 1 of 3 samples have no trained token after truncation to max_seq_len 64 "
        f"(first: sample 2 (line {line_of[2]}))",
        f"warning: {path}: 1 of 3 samples end with an 'ask' round, which is never answered or trained "
        f"(first: sample 1 (line {line_of[1]}))"]


def test_clean_file_has_no_warnings(capsys, tok_dir):
    code, out, err = run_check(capsys, REPO / "examples" / "data" / "sample.jsonl", tok_dir, 4096)
    assert code == 0 and err == "" and "6 samples, all valid" in out


def test_count_of_first_positions_is_capped_at_three(capsys, tok_dir, tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [GOOD] + [LONG_PROMPT] * 9)
    _, _, err = run_check(capsys, path, tok_dir, 64)
    assert err.splitlines() == [f"warning: {path}: 9 of 10 samples have no trained token after truncation to "
                                "max_seq_len 64 (first: lines 2, 3, 4)"]


# ---------------------------------------------------------------------------------------------- the loader

def test_dataset_warns_like_check_and_counts_untrained(capsys, tok_dir, tok, tmp_path):
    trailing = {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"], ["ask", "?"]]}
    path = write_jsonl(tmp_path / "data.jsonl", [LONG_PROMPT, GOOD, trailing, LONG_PROMPT])
    _, _, check_err = run_check(capsys, path, tok_dir, 64)
    seen = []
    dataset = data.SFTDataset(path, tok, 64, warn=seen.append)
    assert seen == check_err.splitlines() and len(seen) == 2
    assert dataset.num_untrained == 2 and len(dataset) == 4
    assert dataset[1]["labels"].ne(-100).any()


def test_dataset_prints_warnings_on_rank_0_only(capsys, tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "data.jsonl", [LONG_PROMPT, GOOD])
    monkeypatch.setenv("RANK", "1")
    data.SFTDataset(path, tok, 64)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    data.SFTDataset(path, tok, 64)
    assert capsys.readouterr().err.startswith(f"warning: {path}: 1 of 2 samples have no trained token")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_dataset_refuses_a_file_where_nothing_trains(tok, tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    (write_jsonl if suffix == ".jsonl" else write_json)(path, [LONG_PROMPT, LONG_PROMPT])
    seen = []
    with pytest.raises(DataError) as info:
        data.SFTDataset(path, tok, 32, warn=seen.append)
    message = str(info.value)
    assert message.startswith(f"{path}: no sample has a trained token after truncation to max_seq_len 32: all 2 ")
    assert "raise max_seq_len above " in message and "\n" not in message
    assert seen == []  # the error says it; no duplicate warning
    assert data.SFTDataset(path, tok, 512, warn=seen.append).num_untrained == 0


def test_trainer_build_dataset_refuses_before_any_model(tok, tmp_path):
    """The trainers' data entry point (training.setup.build_datasets, both trainers) raises the
    DataError that `plan_run` turns into one `error:` line before any model or process group."""
    from training import setup as train_ds
    from utils.config import validate

    path = write_jsonl(tmp_path / "data.jsonl", [LONG_PROMPT] * 3)
    raw = {"model_path": str(tmp_path), "save_path": str(tmp_path / "out"), "data_path": str(path), "max_seq_len": 32,
           "seed": 0, "train_micro_batch_size_per_gpu": 1}
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no sample has a trained token .* max_seq_len 32"):
        train_ds.build_datasets(validate(raw), tok, len(tok), 1)
    dataset, eval_dataset = train_ds.build_datasets(validate(dict(raw, max_seq_len=1024)), tok, len(tok), 1)
    assert len(dataset) == 3 and eval_dataset is None


# ---------------------------------------------------------------------------------------------- batched = one by one

def _as_tuple(rendered):
    return rendered.input_ids, rendered.labels, rendered.truncated, rendered.type, rendered.full_length


@pytest.mark.parametrize("tokenizer", ["tok", "tok_metaspace"])
@pytest.mark.parametrize("max_seq_len", [None, 12, 40])
def test_batched_rendering_equals_one_by_one_on_every_type(request, tokenizer, max_seq_len):
    tok = request.getfixturevalue(tokenizer)
    samples = list(ALL_TYPES.values()) * 2
    single = [render_validated(sample, tok, max_seq_len) for sample in samples]
    assert render_many(samples, tok, max_seq_len) == single  # ids, labels, segment texts, truncation
    assert [_as_tuple(r) for r in render_many(samples, tok, max_seq_len, keep_segments=False)] == \
        [_as_tuple(r) for r in single]
    assert any(r.truncated for r in single) == (max_seq_len is not None)


@pytest.mark.parametrize("tokenizer", ["tok", "tok_metaspace"])
def test_batched_rendering_of_the_readme_example(request, tokenizer):
    tok = request.getfixturevalue(tokenizer)
    samples = load_samples(EXAMPLE_JSON)
    for max_seq_len in (None, 64, 256):
        assert render_many(samples, tok, max_seq_len) == [render_sample(s, tok, max_seq_len) for s in samples]


@pytest.mark.parametrize("tokenizer", ["tok", "tok_metaspace"])
def test_first_trained_position_matches_full_render(request, tokenizer):
    tok = request.getfixturevalue(tokenizer)
    samples = list(ALL_TYPES.values()) + load_samples(EXAMPLE_JSON)
    expected = [next(i for i, label in enumerate(render_validated(s, tok).labels) if label != -100) for s in samples]
    assert first_trained_positions(samples, tok) == expected


def test_batch_encoder_routes_all_give_the_ids_of_tokenizer_call(tok_dir):
    tok = data.load_tokenizer(tok_dir)
    texts = ["hello </s> world", "", "x" * 50, " <pad> \n"]
    expected = [list(tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]) for t in texts]
    direct = batch_encoder(tok)
    assert direct.backend is not None  # the stock fast tokenizer: straight to the Rust batch encoder
    tok.backend_tokenizer.enable_truncation(max_length=8)  # `tokenizer(...)` would switch this off first
    tok.backend_tokenizer.encode_special_tokens = False  # as `tokenizer(text)` leaves it
    assert direct.encode([(t, True) for t in texts]) == expected
    assert not tok.backend_tokenizer.encode_special_tokens  # restored after the batch

    class Reworked(type(tok)):  # a subclass that changes encoding goes through `tokenizer(list)`
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    reworked = data.load_tokenizer(tok_dir)
    reworked.__class__ = Reworked
    assert batch_encoder(reworked).backend is None
    assert batch_encoder(reworked).encode([(t, True) for t in texts]) == expected


# ---------------------------------------------------------------------------------------------- workers, streaming

def test_workers_2_gives_identical_output_to_workers_1(capsys, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(check, "CHUNK_SAMPLES", 5)  # many chunks, so the workers interleave
    trailing = {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"], ["ask", "?"]]}
    rows = (list(ALL_TYPES.values()) + [LONG_PROMPT, trailing]) * 6
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    runs = []
    for workers in (1, 2):
        dump = tmp_path / f"dump{workers}.jsonl"
        code, out, err = run_check(capsys, path, tok_dir, 40, "--workers", workers, "--dump", dump, "--show", 9)
        assert code == 0
        runs.append((out.replace(str(dump), "DUMP"), err, dump.read_bytes()))
    assert runs[0] == runs[1]
    assert "[[" in runs[0][0] and len(runs[0][1].splitlines()) == 2


def test_workers_2_reports_the_first_error_in_file_order(capsys, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(check, "CHUNK_SAMPLES", 3)
    rows = [GOOD] * 10 + [{"type": "pretrain", "text": 1}] + [GOOD] * 10 + [{"type": "nope"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    errors = [one_error(run_check(capsys, path, tok_dir, 64, "--workers", w)[2]) for w in (1, 2)]
    assert errors[0] == errors[1] == f"error: {path}: line 11: sample 10 (pretrain): text: expected string, got number"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_first_problem_in_file_order_wins_over_a_later_syntax_error(capsys, tok_dir, tmp_path, monkeypatch,
                                                                   workers, suffix):
    monkeypatch.setattr(check, "CHUNK_SAMPLES", 2)
    monkeypatch.setattr(loading, "_CHUNK", 64)
    rows = [json.dumps(GOOD)] * 3 + [json.dumps({"type": "pretrain"})] + [json.dumps(GOOD)] * 3 + ["oops"]
    path = tmp_path / f"bad{suffix}"
    path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[\n" + ",\n".join(rows) + "\n]\n")
    where = "line 4: sample 3" if suffix == ".jsonl" else "sample 3"
    expected = f"error: {path}: {where} (pretrain): text: missing required field"
    assert one_error(run_check(capsys, path, tok_dir, 64, "--workers", workers)[2]) == expected
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert f"error: {info.value}" == expected
    path.write_text(path.read_text().replace('{"type": "pretrain"}', json.dumps(GOOD)))
    error = one_error(run_check(capsys, path, tok_dir, 64, "--workers", workers)[2])
    assert error.startswith(f"error: {path}: line 8, column 1: invalid JSON" if suffix == ".jsonl" else
                            f"error: {path}: line 9, column 1: invalid JSON")


LENIENT = ('\ufeff[\n  // first, with [brackets] and {braces}\n'
           '  {"type": "pretrain", "text": "see http://x.org /* no */",},\n'
           '  /* block\n comment, ] */ {"type": "pretrain", "text": "\\"quoted // text\\" [x] {y}"},\n'
           '  {"type": "conversation", "rounds": [["ask", "caf\u00e9 \u4f60\u597d"], ["ans", "a, ]"],],},\n'
           '  {"type": "instruct", "instruct": "i", "output": "o", "output": "p"}, // trailing\n]  // end\n')


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_streamed_array_equals_whole_file_parse_at_any_chunk_size(tmp_path, monkeypatch, chunk):
    path = tmp_path / "lenient.json"
    path.write_text(LENIENT, encoding="utf-8")
    monkeypatch.setattr(loading, "_CHUNK", chunk)
    records = list(loading.iter_array_records(str(path)))
    assert [json.loads(r.text) for r in records] == loading._load_array(str(path))
    assert [r.line for r in records] == [3, 5, 6, 7]
    assert loading.parse_sample(str(path), records[3], jsonl=False)[1] == ["output"]


@pytest.mark.parametrize("text,message", [
    ("", "empty file"),
    ('[{"type": "pretrain", "text": "a"},, 3]', "line 1, column 36: invalid JSON"),
    ('[{"type": "pretrain", "text": "a"}] [', "Extra data"),
    ('{"type": "pretrain", "text": "a"}', "expected a JSON array of samples, got object"),
    ('[{"type": "pretrain", "text": "a"}', "line 1, column 35: invalid JSON"),
    ('[{"type": "pretrain", /* open comment', "invalid JSON"),
])
def test_streamed_array_errors_are_the_whole_file_parsers(tmp_path, monkeypatch, text, message):
    path = tmp_path / "odd.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as whole:
        loading._load_array(str(path))
    monkeypatch.setattr(loading, "_CHUNK", 4)
    with pytest.raises(DataError) as streamed:
        load_samples(path)
    assert str(streamed.value) == str(whole.value) and message in str(whole.value)


def test_streamed_array_memory_stays_flat(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_CHUNK", 1 << 16)
    sample = {"type": "pretrain", "text": "word " * 200}
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join([json.dumps(sample)] * 3000) + "\n]\n", encoding="utf-8")
    assert path.stat().st_size > 3_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in loading.iter_array_records(str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 3000 and peak < 1_000_000  # the file is 3 MB
