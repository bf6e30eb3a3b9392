"""The record formats and files the ecosystem uses (issue 19): OpenAI/TRL `messages`, ShareGPT, Alpaca,
`.parquet` files and `data_path` lists.

ShareGPT and Alpaca records load as the very record their `messages` / `instruct` equivalent loads as
(and so render to the same ids); a `.parquet` file gives the same `data.check --dump` as its `.jsonl`;
one file holds one kind of record; bad records stop loading with one line naming file, line/sample and
field. Everything runs in-process on the tiny tokenizer of tests/conftest.py, but one CLI run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import data.check as check
from data import DataError, load_samples, open_samples
from data.loading import ConcatSamples, ParquetSamples
from data.schema import normalize_record
from tests.conftest import run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the web.",
                                           "parameters": {"type": "object",
                                                          "properties": {"query": {"type": "string"}}}}}]

MESSAGES = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Who is Cai Xukun?"},
    {"role": "assistant", "content": "A Chinese singer."},
    {"role": "user", "content": "Born when?"},
    {"role": "assistant", "content": "In 1998."}]}
SHAREGPT = {"conversations": [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "Who is Cai Xukun?"},
    {"from": "gpt", "value": "A Chinese singer."},
    {"from": "human", "value": "Born when?"},
    {"from": "gpt", "value": "In 1998."}]}

MESSAGES_TOOLS = {"messages": [
    {"role": "user", "content": "Search for caixukun."},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": "{\"query\": \"caixukun\"}"}}]},
    {"role": "tool", "content": "{\"born\": 1998}"},
    {"role": "assistant", "content": "He was born in 1998."}], "tools": TOOLS}
SHAREGPT_TOOLS = {"conversations": [
    {"from": "human", "value": "Search for caixukun."},
    {"from": "function_call", "value": "{\"name\": \"search\", \"arguments\": {\"query\": \"caixukun\"}}"},
    {"from": "observation", "value": "{\"born\": 1998}"},
    {"from": "gpt", "value": "He was born in 1998."}], "tools": json.dumps(TOOLS)}
NORMALIZED_TOOLS = {"messages": [
    {"role": "user", "content": "Search for caixukun."},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "caixukun"}}}]},
    {"role": "tool", "content": "{\"born\": 1998}"},
    {"role": "assistant", "content": "He was born in 1998."}], "tools": TOOLS}

ALPACA = {"instruction": "Fill out the blank", "input": "Cai Xukun loves ______", "output": "basketball"}
INSTRUCT = {"type": "instruct", "instruct": "Fill out the blank", "input": "Cai Xukun loves ______",
            "output": "basketball"}
ALPACA_NO_INPUT = {"instruction": "Write a poem about rain.", "output": "Rain is falling.", "text": "(rendered)"}
INSTRUCT_NO_INPUT = {"type": "instruct", "instruct": "Write a poem about rain.", "output": "Rain is falling."}

OURS = [
    {"type": "pretrain", "text": "Cai Xukun (born August 2, 1998) is a Chinese singer."},
    INSTRUCT, INSTRUCT_NO_INPUT,
    {"type": "conversation", "rounds": [["ask", "Hello"], ["ans", "Hi, what can I do?"], ["ask", "Sing."],
                                        ["ans", "La la la."]]},
    {"type": "ref_qa", "reference": "Cai Xukun was born in 1998.", "rounds": [["ask", "When?"], ["ans", "1998"]]},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list, row_group_size: int | None = None) -> Path:
    table = pa.Table.from_struct_array(pa.array(records))  # columns: the union of the records' keys
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------------------------------------- equivalences

@pytest.mark.parametrize("foreign, ours", [
    (SHAREGPT, MESSAGES), (SHAREGPT_TOOLS, NORMALIZED_TOOLS), (MESSAGES_TOOLS, NORMALIZED_TOOLS),
    (ALPACA, INSTRUCT), (ALPACA_NO_INPUT, INSTRUCT_NO_INPUT)], ids=["sharegpt", "sharegpt-tools", "messages-tools",
                                                                    "alpaca", "alpaca-no-input"])
def test_foreign_records_load_as_their_equivalent(tmp_path, foreign, ours):
    """What the rest of the code sees: ShareGPT -> the messages record, Alpaca -> exactly our instruct sample."""
    loaded = load_samples(write_jsonl(tmp_path / "foreign.jsonl", [foreign, foreign]))
    expected = load_samples(write_jsonl(tmp_path / "ours.jsonl", [ours]))[0]
    assert loaded == [expected, expected]
    assert expected == normalize_record(ours)[1]
    assert load_samples(write_json(tmp_path / "foreign.json", [foreign])) == [expected]


def test_messages_record_normalized_exactly(tmp_path):
    """The interface: null/absent content of a tool-calling assistant -> "", arguments parsed to an object,
    extra top-level columns dropped, "tools" only when given."""
    record = dict(MESSAGES_TOOLS, id="abc-1", source="somewhere")
    assert load_samples(write_jsonl(tmp_path / "m.jsonl", [record]))[0] == NORMALIZED_TOOLS
    plain = load_samples(write_jsonl(tmp_path / "p.jsonl", [MESSAGES]))[0]
    assert plain == MESSAGES and "tools" not in plain


@pytest.mark.parametrize("foreign, ours", [(SHAREGPT, MESSAGES), (SHAREGPT_TOOLS, MESSAGES_TOOLS),
                                           (ALPACA, INSTRUCT), (ALPACA_NO_INPUT, INSTRUCT_NO_INPUT)],
                         ids=["sharegpt", "sharegpt-tools", "alpaca", "alpaca-no-input"])
def test_foreign_records_render_to_the_same_ids(tmp_path, tok, foreign, ours):
    from data.render import render_validated

    a = load_samples(write_jsonl(tmp_path / "a.jsonl", [foreign]))[0]
    b = load_samples(write_jsonl(tmp_path / "b.jsonl", [ours]))[0]
    ra, rb = render_validated(a, tok, 4096), render_validated(b, tok, 4096)
    assert (ra.input_ids, ra.labels) == (rb.input_ids, rb.labels)
    assert any(label != -100 for label in ra.labels)


# ---------------------------------------------------------------------------------------------- parquet

def _dump(tmp_path: Path, data_file: Path, tok_dir: Path, name: str) -> list[dict]:
    out = tmp_path / f"{name}.dump.jsonl"
    assert check.main(["--data", str(data_file), "--tokenizer", str(tok_dir), "--max-seq-len", "256",
                       "--dump", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("records", [OURS, [ALPACA, ALPACA_NO_INPUT] * 3, [MESSAGES, MESSAGES_TOOLS] * 2],
                         ids=["ours", "alpaca", "messages"])
def test_parquet_dumps_like_jsonl(tmp_path, tok_dir, records, capsys):
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    parquet = write_parquet(tmp_path / "d.parquet", records, row_group_size=2)  # several row groups
    expected = _dump(tmp_path, jsonl, tok_dir, "jsonl")
    assert _dump(tmp_path, parquet, tok_dir, "parquet") == expected
    assert len(expected) == len(records)
    samples = open_samples(parquet)
    assert isinstance(samples, ParquetSamples) and len(samples) == len(records)
    assert [samples[i] for i in reversed(range(len(samples)))] == load_samples(jsonl)[::-1]


def test_parquet_json_string_columns(tmp_path):
    """A parquet column of JSON strings for messages / conversations / tools is read as the lists they hold."""
    rows = [{"conversations": json.dumps(SHAREGPT_TOOLS["conversations"]), "tools": json.dumps(TOOLS)},
            {"conversations": json.dumps(SHAREGPT["conversations"]), "tools": None}]
    loaded = load_samples(write_parquet(tmp_path / "s.parquet", rows))
    assert loaded == [NORMALIZED_TOOLS, MESSAGES]
    rows = [{"messages": json.dumps(MESSAGES["messages"])}]
    assert load_samples(write_parquet(tmp_path / "m.parquet", rows)) == [MESSAGES]


def test_parquet_reads_by_batches_not_whole(tmp_path, monkeypatch):
    """Streaming: never `read()`/`read_table` of the whole file; rows arrive through iter_batches."""
    import data.loading as loading

    path = write_parquet(tmp_path / "big.parquet", [INSTRUCT] * 5000, row_group_size=1000)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read_table of the whole file"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("ParquetFile.read of the whole file"))
    batches = []
    original = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, *a, **k: (batches.append(1), original(self, *a, **k))[1])
    samples = open_samples(path)
    assert len(samples) == 5000 and samples[4321] == INSTRUCT and batches
    assert len(samples._rows) == 5000 and samples._rows.itemsize <= 4  # a few bytes per sample
    assert loading.PARQUET_BATCH < 5000


# ---------------------------------------------------------------------------------------------- data_path lists

def test_data_path_list_concatenates_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", OURS)
    b = write_parquet(tmp_path / "b.parquet", [ALPACA, ALPACA_NO_INPUT])
    c = write_json(tmp_path / "c.json", [SHAREGPT])  # each file its own kind
    expected = load_samples(a) + load_samples(b) + load_samples(c)
    assert load_samples([a, b, c]) == expected
    samples = open_samples([str(a), b, c])
    assert isinstance(samples, ConcatSamples) and len(samples) == len(expected)
    assert [samples[i] for i in range(len(samples))] == expected
    assert samples[-1] == expected[-1]
    with pytest.raises(IndexError):
        samples[len(expected)]


def test_data_path_list_errors_name_the_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", OURS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [MESSAGES, {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: sample 1: messages: no assistant message"):
        open_samples([good, bad])
    with pytest.raises(DataError, match=r"absent\.jsonl: no such file"):
        open_samples([good, tmp_path / "absent.jsonl"])
    with pytest.raises(DataError, match="data_path: empty list"):
        open_samples([])


def test_config_accepts_a_data_path_list():
    from tests.test_config import with_
    from utils.config import ConfigError, validate

    assert validate(with_(data_path=["a.jsonl", "b.parquet"]))["data_path"] == ["a.jsonl", "b.parquet"]
    with pytest.raises(ConfigError, match="data_path"):
        validate(with_(data_path=["a.jsonl", 3]))


# ---------------------------------------------------------------------------------------------- errors

def test_mixed_kinds_in_one_file(tmp_path, tok_dir, capsys):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, ALPACA, MESSAGES, INSTRUCT])
    with pytest.raises(DataError, match=r"mixed\.jsonl: line 3: sample 2: a \{\"messages\": \[\.\.\.\]\} "
                                        r"\(OpenAI/TRL\) record in a file of \{\"instruction\", \"output\"\} "
                                        r"\(Alpaca\) records"):
        load_samples(path)
    path = write_json(tmp_path / "mixed.json", [INSTRUCT, SHAREGPT])
    with pytest.raises(DataError, match=r"mixed\.json: sample 1: a \{\"conversations\".*in a file of our"):
        open_samples(path)
    path = write_parquet(tmp_path / "mixed.parquet", [MESSAGES, SHAREGPT])
    with pytest.raises(DataError, match=r"mixed\.parquet: sample 1: a .*ShareGPT"):
        open_samples(path)
    # data.check, also when the first record of another kind is in a chunk handed to another worker
    lines = [ALPACA] * 1200 + [MESSAGES] + [ALPACA] * 10
    path = write_jsonl(tmp_path / "mixed_big.jsonl", lines)
    for workers in ("1", "2"):
        assert check.main(["--data", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", "64",
                           "--workers", workers]) == check.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "line 1201: sample 1200: a {\"messages\"" in err, err


BAD_RECORDS = [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     "messages[1].role: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages: no assistant message"),
    ({"messages": []}, "messages: empty list"),
    ({"messages": "not json"}, "messages: string is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
     "messages[1].content: expected string, got array"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0].content: missing"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]},
     "messages[1].weight: unknown field"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": []}, {"role": "assistant", "content": "a"}]},
     "messages[0].tool_calls: only assistant messages may have 'tool_calls'"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     "messages[1].tool_calls[0].function.arguments: expected an object"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}]},
     "messages[1].tool_calls[0].function.name: missing required field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": {"name": "f"}}]},
     "messages[1].tool_calls: expected array, got object"),
    ({"messages": MESSAGES["messages"], "tools": [{"description": "no name"}]}, "tools[0]: a tool needs a 'name'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
     "conversations[1].from: unknown role 'assistant'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{\"args\": 1}"}]},
     "conversations[1].value.args: unknown field"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "messages: no assistant message"),
    ({"instruction": "do", "output": 3}, "output: expected string, got number"),
    ({"instruction": "do"}, "output: missing required field"),
    ({"something": "else"}, "type: missing required field"),
]


@pytest.mark.parametrize("record, message", BAD_RECORDS, ids=[m.split(":")[0] + f"-{i}"
                                                               for i, (_, m) in enumerate(BAD_RECORDS)])
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError) as err:
        load_samples(path)
    assert str(err.value).startswith(f"{path}: line 1: sample 0: "), err.value
    assert message in str(err.value)
    path = write_json(tmp_path / "bad.json", [MESSAGES if "messages" in record or "conversations" in record
                                              else record, record])
    if "messages" in record or "conversations" in record:
        with pytest.raises(DataError, match=rf"bad\.json: sample 1: {message[:12]}".replace("[", r"\[")):
            load_samples(path)


def test_check_cli_bad_messages_one_line_no_traceback(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [MESSAGES, MESSAGES,
                                                 {"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": 1}]}])
    res = run_cli("-m", "data.check", "--data", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", "64")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {path}: line 3: sample 2: messages[1].content: expected string, got number"], res.stderr
