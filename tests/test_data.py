"""Tests of the training-data layer against the data-format spec.

Expected texts are written out here from the spec, character for character, rather than taken from
`data.templates`: a typo in the templates must fail a test, not be copied into the expectation.
"""
from __future__ import annotations

import functools
import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import data
from data import DataError, load_samples, pad_id_of, render_sample
from data.batching import pad_collate
from models.tiny import train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_JSON = REPO / "examples" / "data" / "sample.json"
EXAMPLE_JSONL = REPO / "examples" / "data" / "sample.jsonl"
EOS = "</s>"

INSTRUCT_HEADER = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n")
CHAT_HEADER = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions. \n\n")
API_HEADER = "Answer the following questions as best as you can. You have access to the following tool(s):\n"
REF_HEADER = "Generate responses to the given instruction series according to the reference text. \n\n"


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tok_nopad(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer_nopad")
    train_tiny_tokenizer(out, pad=False)
    return data.load_tokenizer(out)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_texts(tokenizer, rendered) -> list[str]:
    """Decoded runs of consecutive trained tokens; also checks labels equal ids where trained."""
    runs, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    if current:
        runs.append(current)
    return [decode(tokenizer, run) for run in runs]


def write_json(path: Path, samples) -> Path:
    path.write_text(json.dumps(samples), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- samples

PRETRAIN = {"type": "pretrain", "text": "Cai Xukun (born August 2, 1998) is a Chinese singer."}

INSTRUCT = {"type": "instruct", "instruct": "Fill out the blank in the following sentence",
            "input": "Cai Xukun loves singing, dancing, rapping and ______", "output": "playing basketball"}

INSTRUCT_NO_INPUT = {"type": "instruct", "instruct": "Write a poem about rain.",
                     "output": "Rain is falling all around."}

INSTRUCT_BLANK_INPUT = dict(INSTRUCT_NO_INPUT, input="  ")

CONVERSATION = {"type": "conversation", "rounds": [
    ["ask", "Hello"], ["ans", "Hello, what can I do for you ?"],
    ["ask", "Who is caixukun?"], ["ask", "When was caixukun born?"], ["ans", "In the year of 1998."]]}

API_DESC = "search: Search the XiaoHuangShu.\nParameters: {\"query\": \"string\"}\n"
CONVER_HAS_API = {"type": "conver_has_api", "api_desc": API_DESC, "rounds": [
    ["ask", "Hello"], ["ans", "Hi, what can I do for you ?"],
    ["ask", "Search for \"love your neighbor\"."],
    ["ans-api", {"actions": [
        {"inner_thought": "I need to use the search tool.", "api_name": "search",
         "api_param": "{\"query\": \"XiaoHuangShu\", \"version\": \"King James Version\"}",
         "api_res": "Status Code: 200. Response: {\"book\": \"Mark\"}"},
        {"inner_thought": "Let me search again.", "api_name": "search",
         "api_param": {"query": "GuoChanQu", "version": "King James Version"},
         "api_res": {"book": "Luke", "verse": 27}}],
        "ans": "It is in Mark 12:31."}],
    ["ask", "I do not think you are correct."], ["ans", "Then you should ask others, not me."]]}

REF_QA = {"type": "ref_qa", "reference": "On January 10, 2019, Kun was named Goodwill Ambassador.", "rounds": [
    ["ask", "When was Kun named Goodwill Ambassador?"], ["ans", "On January 10, 2019"],
    ["ask", "Who was named?"], ["ans", "Kun."]]}

# (sample, full rendered text, trained runs) written out from the spec tables.
EXPECTED = {
    "pretrain": (PRETRAIN, PRETRAIN["text"] + EOS, [PRETRAIN["text"] + EOS]),
    "instruct": (
        INSTRUCT,
        INSTRUCT_HEADER + "### Instruction:\nFill out the blank in the following sentence\n\n"
        "### Input:\nCai Xukun loves singing, dancing, rapping and ______\n\n### Response:\nplaying basketball\n" + EOS,
        ["playing basketball\n" + EOS]),
    "instruct_no_input": (
        INSTRUCT_NO_INPUT,
        INSTRUCT_HEADER + "### Instruction:\nWrite a poem about rain.\n\n### Response:\nRain is falling all around.\n"
        + EOS,
        ["Rain is falling all around.\n" + EOS]),
    "instruct_blank_input": (
        INSTRUCT_BLANK_INPUT,
        INSTRUCT_HEADER + "### Instruction:\nWrite a poem about rain.\n\n### Response:\nRain is falling all around.\n"
        + EOS,
        ["Rain is falling all around.\n" + EOS]),
    "conversation": (
        CONVERSATION,
        CHAT_HEADER + "### Human: Hello \n### Assistant: Hello, what can I do for you ? </s>\n"
        "### Human: Who is caixukun? \n### Human: When was caixukun born? \n"
        "### Assistant: In the year of 1998. </s>\n",
        ["Hello, what can I do for you ? </s>\n", "In the year of 1998. </s>\n"]),
    "conver_has_api": (
        CONVER_HAS_API,
        API_HEADER + API_DESC + "\n"
        "### Human: Hello \n### Assistant: Hi, what can I do for you ? </s>\n"
        "### Human: Search for \"love your neighbor\". \n"
        "### Assistant: I need to use the search tool.\n#### api call\n```python\n"
        "search(query='XiaoHuangShu', version='King James Version')\n```  </s>"
        "\n#### api output\nStatus Code: 200. Response: {\"book\": \"Mark\"}\n"
        "### Assistant: Let me search again.\n#### api call\n```python\n"
        "search(query='GuoChanQu', version='King James Version')\n```  </s>"
        "\n#### api output\n{\n  \"book\": \"Luke\",\n  \"verse\": 27\n}\n"
        "### Assistant: It is in Mark 12:31.  </s>"
        "### Human: I do not think you are correct. \n### Assistant: Then you should ask others, not me. </s>\n",
        ["Hi, what can I do for you ? </s>\n",
         "I need to use the search tool.\n#### api call\n```python\n"
         "search(query='XiaoHuangShu', version='King James Version')\n```  </s>",
         "Let me search again.\n#### api call\n```python\nsearch(query='GuoChanQu', version='King James Version')\n"
         "```  </s>",
         "It is in Mark 12:31.  </s>",
         "Then you should ask others, not me. </s>\n"]),
    "ref_qa": (
        REF_QA,
        REF_HEADER + "### Reference: \nOn January 10, 2019, Kun was named Goodwill Ambassador.\n\n"
        "### Instruction: When was Kun named Goodwill Ambassador? \n### Response: On January 10, 2019 </s>\n"
        "### Instruction: Who was named? \n### Response: Kun. </s>\n",
        ["On January 10, 2019 </s>\n", "Kun. </s>\n"]),
}


# ---------------------------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("name", list(EXPECTED))
def test_render_matches_spec_text_and_masks_at_token_level(tok, name):
    sample, full_text, trained = EXPECTED[name]
    rendered = render_sample(sample, tok)
    assert rendered.type == sample["type"]
    assert not rendered.truncated
    assert len(rendered.input_ids) == len(rendered.labels) == rendered.full_length
    assert decode(tok, rendered.input_ids) == full_text
    assert "".join(text for text, _ in rendered.segments) == full_text
    assert trained_texts(tok, rendered) == trained
    assert [text for text, is_trained in rendered.segments if is_trained] == trained


@pytest.mark.parametrize("name", list(EXPECTED))
def test_sentencepiece_style_tokenizer_gets_no_spurious_space_between_segments(tok_metaspace, name):
    """Segment-by-segment encoding must not add the tokenizer's start-of-text `▁` to every segment."""
    sample, full_text, _ = EXPECTED[name]
    rendered = render_sample(sample, tok_metaspace)
    assert decode(tok_metaspace, rendered.input_ids) == full_text
    first = tok_metaspace.convert_ids_to_tokens(rendered.input_ids[:1])[0]
    assert first.startswith("\u2581")  # the sample's start is encoded as a text start, like a whole prompt


def test_eos_is_the_single_eos_id(tok):
    rendered = render_sample(CONVERSATION, tok)
    eos_positions = [i for i, token in enumerate(rendered.input_ids) if token == tok.eos_token_id]
    assert len(eos_positions) == 2
    assert all(rendered.labels[i] == tok.eos_token_id for i in eos_positions)


def test_special_token_text_in_data_is_not_an_eos(tok):
    rendered = render_sample({"type": "pretrain", "text": "a </s> b <eos> c"}, tok)
    assert rendered.input_ids.count(tok.eos_token_id) == 1
    assert rendered.input_ids[-1] == tok.eos_token_id
    assert decode(tok, rendered.input_ids) == "a </s> b <eos> c" + EOS


def test_user_text_with_braces_is_inserted_verbatim(tok):
    sample = {"type": "instruct", "instruct": "Fill {this}", "output": "{0} {x}"}
    assert decode(tok, render_sample(sample, tok).input_ids).endswith("### Instruction:\nFill {this}\n\n"
                                                                       "### Response:\n{0} {x}\n" + EOS)


def _api_sample(api_param, api_res="ok"):
    action = {"inner_thought": "t", "api_name": "search", "api_param": api_param, "api_res": api_res}
    return {"type": "conver_has_api", "api_desc": "d", "rounds": [
        ["ask", "q"], ["ans-api", {"actions": [action], "ans": "a"}]]}


def test_api_param_object_and_string_render_the_same_call(tok):
    as_object = render_sample(_api_sample({"query": "XiaoHuangShu", "version": "King James Version"}), tok)
    as_string = render_sample(
        _api_sample("{\"query\": \"XiaoHuangShu\", \"version\": \"King James Version\"}"), tok)
    assert as_object.input_ids == as_string.input_ids
    assert as_object.labels == as_string.labels
    assert "search(query='XiaoHuangShu', version='King James Version')" in decode(tok, as_object.input_ids)


def test_api_param_values_use_python_repr(tok):
    params = {"n": 3, "flag": True, "tags": ["a", "b"], "x": None, "q": "it's"}
    text = decode(tok, render_sample(_api_sample(params), tok).input_ids)
    assert "search(n=3, flag=True, tags=['a', 'b'], x=None, q=\"it's\")" in text


def test_api_res_json_value_is_indented_json_and_masked(tok):
    rendered = render_sample(_api_sample({"q": "x"}, api_res={"results": [1, 2], "ok": True}), tok)
    text = decode(tok, rendered.input_ids)
    assert "\n#### api output\n{\n  \"results\": [\n    1,\n    2\n  ],\n  \"ok\": true\n}\n### Assistant: " in text
    assert not any("results" in run for run in trained_texts(tok, rendered))


# ---------------------------------------------------------------------------------------------- prompts

def test_instruct_prompt_is_training_text_up_to_the_response_tag(tok):
    _, full_text, trained = EXPECTED["instruct"]
    prompt = data.instruct_prompt(INSTRUCT["instruct"], INSTRUCT["input"])
    assert prompt.endswith("### Response:\n")
    assert prompt + trained[0] == full_text
    assert data.instruct_prompt("Write a poem about rain.", "") + "Rain is falling all around.\n" + EOS == \
        EXPECTED["instruct_no_input"][1]


@pytest.mark.parametrize("name,kwargs", [
    ("conversation", {}),
    ("ref_qa", {"reference": REF_QA["reference"]}),
    ("conver_has_api", {"api_desc": API_DESC}),
])
def test_conversation_prompt_is_training_text_up_to_the_next_answer(name, kwargs):
    sample, full_text, trained = EXPECTED[name]
    prompt = data.conversation_prompt(sample["rounds"][:-1], kind=name, eos_token=EOS, **kwargs)
    assert prompt + trained[-1] == full_text


def test_conversation_prompt_mid_tool_use_asks_for_the_next_step():
    rounds = CONVER_HAS_API["rounds"][:3] + [["ans-api", {"actions": CONVER_HAS_API["rounds"][3][1]["actions"]}]]
    prompt = data.conversation_prompt(rounds, kind="conver_has_api", api_desc=API_DESC)
    full_text = EXPECTED["conver_has_api"][1]
    assert prompt == full_text[:full_text.index("It is in Mark 12:31.")]


def test_conversation_prompt_rejects_bad_input():
    with pytest.raises(ValueError, match="reference"):
        data.conversation_prompt([("ask", "q")], kind="ref_qa")
    with pytest.raises(ValueError, match="unknown role 'user'"):
        data.conversation_prompt([("user", "q")])
    assert data.TEMPLATE_VERSION == 1


# ---------------------------------------------------------------------------------------------- truncation

def _first_trained(rendered) -> int:
    return next(i for i, label in enumerate(rendered.labels) if label != -100)


def test_truncation_inside_trained_segment_ends_with_trained_eos(tok):
    full = render_sample(INSTRUCT, tok)
    max_len = _first_trained(full) + 3
    cut = render_sample(INSTRUCT, tok, max_seq_len=max_len)
    assert cut.truncated and cut.full_length == len(full.input_ids)
    assert len(cut.input_ids) == len(cut.labels) == max_len
    assert cut.input_ids[:-1] == full.input_ids[:max_len - 1]
    assert cut.labels[:-1] == full.labels[:max_len - 1]
    assert cut.input_ids[-1] == cut.labels[-1] == tok.eos_token_id
    assert "".join(text for text, _ in cut.segments) == decode(tok, cut.input_ids)
    assert cut.segments[-1][1] is True and cut.segments[-1][0].endswith(EOS)


def test_truncation_inside_masked_segment_ends_with_masked_eos(tok):
    full = render_sample(INSTRUCT, tok)
    max_len = _first_trained(full) - 2
    cut = render_sample(INSTRUCT, tok, max_seq_len=max_len)
    assert cut.truncated and len(cut.input_ids) == max_len
    assert cut.input_ids[-1] == tok.eos_token_id
    assert set(cut.labels) == {-100}
    assert "".join(text for text, _ in cut.segments) == decode(tok, cut.input_ids)


def test_exact_fit_is_not_truncated(tok):
    full = render_sample(CONVERSATION, tok)
    fit = render_sample(CONVERSATION, tok, max_seq_len=len(full.input_ids))
    assert not fit.truncated
    assert fit.input_ids == full.input_ids and fit.labels == full.labels


# ---------------------------------------------------------------------------------------------- batching

def test_pad_id_falls_back_to_unk_then_eos(tok, tok_nopad):
    assert pad_id_of(tok) == tok.pad_token_id == 3
    assert tok_nopad.pad_token_id is None
    assert pad_id_of(tok_nopad) == tok_nopad.unk_token_id == 0
    assert pad_id_of(types.SimpleNamespace(pad_token_id=None, unk_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(DataError, match="no pad, unk or eos"):
        pad_id_of(types.SimpleNamespace(pad_token_id=None, unk_token_id=None, eos_token_id=None))


# ---------------------------------------------------------------------------------------------- dataset

def test_dataset_renders_lazily_and_counts_truncation(tok, tmp_path):
    path = write_json(tmp_path / "train.json", [PRETRAIN, INSTRUCT, CONVERSATION, CONVER_HAS_API, REF_QA])
    max_len = len(render_sample(INSTRUCT, tok).input_ids)
    dataset = data.SFTDataset(path, tok, max_len)
    assert len(dataset) == 5
    item = dataset[1]
    assert item["input_ids"].dtype == item["labels"].dtype == torch.int64
    assert item["input_ids"].tolist() == render_sample(INSTRUCT, tok).input_ids
    expected = sum(len(render_sample(s, tok).input_ids) > max_len for s in load_samples(path))
    assert expected > 0
    assert dataset.count_truncated() == dataset.num_truncated == expected
    assert all(len(dataset[i]["input_ids"]) <= max_len for i in range(len(dataset)))


def test_jsonl_dataset_keeps_offsets_and_survives_pickling(tok_dir, tmp_path):
    samples = [PRETRAIN, INSTRUCT, CONVERSATION, CONVER_HAS_API, REF_QA]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in samples[:2]) + "\n\n// a comment line\n"
                    + "\n".join(json.dumps(s) for s in samples[2:]) + "\n", encoding="utf-8")
    dataset = data.SFTDataset(path, str(tok_dir), 4096)
    assert not isinstance(dataset.samples, list)
    assert [dataset.samples[i] for i in range(len(dataset))] == samples
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[3]["labels"].tolist() == dataset[3]["labels"].tolist()
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=functools.partial(
        pad_collate, pad_id=pad_id_of(dataset.tokenizer), seq_len=4096))
    batches = list(loader)
    assert len(batches) == 3
    (input_ids, _), labels = batches[0]
    assert input_ids[0, :len(dataset[0]["input_ids"])].tolist() == dataset[0]["input_ids"].tolist()


# ---------------------------------------------------------------------------------------------- loading

def test_readme_example_with_comments_and_trailing_commas_loads():
    text = EXAMPLE_JSON.read_text(encoding="utf-8")
    assert "// samples used for pretraining" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # the asset must keep exercising the lenient parser
    samples = load_samples(EXAMPLE_JSON)
    assert {s["type"] for s in samples} == set(data.SAMPLE_TYPES)
    assert len(samples) >= 25
    assert [s["type"] for s in samples[:7]] == ["pretrain", "instruct", "instruct", "conversation",
                                                "conver_has_api", "ref_qa", "pretrain"]
    api = samples[4]["rounds"][3][1]
    assert len(api["actions"]) == 2 and api["actions"][0]["api_name"] == "search"


def test_readme_example_renders(tok):
    samples = load_samples(EXAMPLE_JSON)
    api_text = decode(tok, render_sample(samples[4], tok).input_ids)
    assert "```python\nsearch(query='XiaoHuangShu', version='King James Version')\n```  </s>" in api_text
    for sample in samples:
        rendered = render_sample(sample, tok)
        assert trained_texts(tok, rendered)


def test_jsonl_example_loads():
    samples = load_samples(EXAMPLE_JSONL)
    assert {s["type"] for s in samples} == set(data.SAMPLE_TYPES)


def test_comment_markers_inside_strings_are_kept(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('[\n  // first\n  {"type": "pretrain", "text": "see http://x.org /* not */ here",},\n'
                    '  /* block\n comment */ {"type": "pretrain", "text": "\\"quoted // text\\""},\n]\n')
    assert [s["text"] for s in load_samples(path)] == ["see http://x.org /* not */ here", '"quoted // text"']


GOOD_CONV = {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"]]}
ACTION = {"inner_thought": "t", "api_name": "search", "api_param": {"q": "x"}, "api_res": "r"}


def _with_action(**change):
    action = {k: v for k, v in dict(ACTION, **change).items() if v is not ...}
    return {"type": "conver_has_api", "api_desc": "d",
            "rounds": [["ask", "q"], ["ans-api", {"actions": [action], "ans": "a"}]]}


BAD_SAMPLES = {
    "unknown type": ({"type": "chat", "text": "x"}, "type", "unknown type 'chat'"),
    "missing type": ({"text": "x"}, "type", "missing required field"),
    "not an object": ("hello", "sample 1", "expected an object, got string"),
    "missing field": ({"type": "instruct", "instruct": "x"}, "output", "missing required field"),
    "mistyped field": ({"type": "pretrain", "text": 5}, "text", "expected string, got number"),
    "empty text": ({"type": "pretrain", "text": " "}, "text", "empty"),
    "misspelt field": ({"type": "instruct", "instruct": "x", "inputs": "y", "output": "z"}, "inputs",
                       "unknown field"),
    "missing reference": ({"type": "ref_qa", "rounds": GOOD_CONV["rounds"]}, "reference", "missing"),
    "missing api_desc": ({"type": "conver_has_api", "rounds": GOOD_CONV["rounds"]}, "api_desc", "missing"),
    "rounds not a list": ({"type": "conversation", "rounds": "hi"}, "rounds", "expected array, got string"),
    "empty rounds": ({"type": "conversation", "rounds": []}, "rounds", "empty"),
    "round not a pair": ({"type": "conversation", "rounds": [["ask"]]}, "rounds[0]", "[role, text] pair"),
    "unknown role": ({"type": "conversation", "rounds": [["ask", "q"], ["user", "x"]]}, "rounds[1][0]",
                     "unknown role 'user' (expected ask, ans)"),
    "ans-api outside api type": ({"type": "conversation", "rounds": [["ask", "q"], ["ans-api", {}]]},
                                 "rounds[1][0]", "needs type conver_has_api"),
    "text not a string": ({"type": "ref_qa", "reference": "r", "rounds": [["ask", "q"], ["ans", 3]]},
                          "rounds[1][1]", "expected string"),
    "no answer": ({"type": "conversation", "rounds": [["ask", "q"]]}, "rounds", "nothing in this sample"),
    "ans-api not an object": ({"type": "conver_has_api", "api_desc": "d", "rounds": [["ask", "q"], ["ans-api", "x"]]},
                              "rounds[1][1]", "'ans-api' needs an object"),
    "ans-api without actions": ({"type": "conver_has_api", "api_desc": "d",
                                 "rounds": [["ask", "q"], ["ans-api", {"ans": "a"}]]},
                                "rounds[1][1].actions", "missing required field"),
    "ans-api without ans": ({"type": "conver_has_api", "api_desc": "d",
                             "rounds": [["ask", "q"], ["ans-api", {"actions": [ACTION]}]]},
                            "rounds[1][1].ans", "missing required field"),
    "empty actions": ({"type": "conver_has_api", "api_desc": "d",
                       "rounds": [["ask", "q"], ["ans-api", {"actions": [], "ans": "a"}]]},
                      "rounds[1][1].actions", "empty"),
    "action missing api_res": (_with_action(api_res=...), "rounds[1][1].actions[0].api_res", "missing"),
    "api_param bad JSON": (_with_action(api_param="{query: 1}"), "rounds[1][1].actions[0].api_param",
                           "not valid JSON"),
    "api_param JSON list": (_with_action(api_param="[1, 2]"), "rounds[1][1].actions[0].api_param",
                            "must hold an object, got array"),
    "api_param number": (_with_action(api_param=7), "rounds[1][1].actions[0].api_param",
                         "expected an object or a JSON string"),
    "api_param bad name": (_with_action(api_param={"book-name": "x"}), "rounds[1][1].actions[0].api_param",
                           "not a Python identifier"),
    "api_name not a string": (_with_action(api_name=None), "rounds[1][1].actions[0].api_name", "got null"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample_names_file_index_and_field(tmp_path, case):
    bad, field, message = BAD_SAMPLES[case]
    path = write_json(tmp_path / "bad.json", [GOOD_CONV, bad])
    with pytest.raises(DataError) as info:
        load_samples(path)
    text = str(info.value)
    assert isinstance(info.value, ValueError)
    assert text.startswith(f"{path}: sample 1")
    assert f": {field}: " in text or field in text.split(": ")[0]
    assert message in text
    assert "\n" not in text


def test_error_message_format_matches_issue(tmp_path):
    path = write_json(tmp_path / "data.json", [GOOD_CONV] * 3 + [
        {"type": "conversation", "rounds": [["ask", "q"], ["ans", "a"], ["user", "x"]]}])
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert str(info.value) == f"{path}: sample 3 (conversation): rounds[2][0]: unknown role 'user' (expected ask, ans)"


def test_render_sample_validates_too(tok):
    with pytest.raises(DataError, match=r"sample \(instruct\): output: missing required field"):
        render_sample({"type": "instruct", "instruct": "x"}, tok)


def test_jsonl_error_names_line_and_sample(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD_CONV) + "\n\n" + json.dumps({"type": "pretrain"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: sample 1 \(pretrain\): text: missing required field"):
        load_samples(path)


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n// a comment, with a comma,\n{"type": "pretrain", "text": "a"}\n'
                    '{"type": "pretrain", "text": "b"}\n]\n')
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert str(info.value) == f"{path}: line 4, column 1: invalid JSON: Expecting ',' delimiter"


def test_jsonl_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD_CONV) + '\n{"type": "pretrain" "text": "b"}\n')
    expected = r"broken\.jsonl: line 2, column 21: invalid JSON: Expecting ',' delimiter \(sample 1\)"
    with pytest.raises(DataError, match=expected):
        load_samples(path)


@pytest.mark.parametrize("content,message", [
    ("", "empty file"),
    ("[]", "no samples"),
    ('{"type": "pretrain", "text": "a"}', "expected a JSON array of samples, got object"),
    ('{"type": "pretrain", "text": "a"}\n{"type": "pretrain", "text": "b"}\n', "name the file .jsonl"),
])
def test_bad_json_file_shapes(tmp_path, content, message):
    path = tmp_path / "odd.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_samples(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_samples(tmp_path / "absent.json")
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"type": "pretrain", "text": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_samples(path)


# ---------------------------------------------------------------------------------------------- data.check

def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.check", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_check_cli_reports_dumps_and_shows(tok, tok_dir, tmp_path):
    out = tmp_path / "dump.jsonl"
    proc = run_check("--data", str(EXAMPLE_JSON), "--tokenizer", str(tok_dir), "--max-seq-len", "256",
                     "--dump", str(out), "--show", "1")
    assert proc.returncode == 0, proc.stderr
    samples = load_samples(EXAMPLE_JSON)
    for kind in data.SAMPLE_TYPES:
        count = sum(s["type"] == kind for s in samples)
        assert any(line.split() == [kind, str(count)] for line in proc.stdout.splitlines())
    assert "min " in proc.stdout and "median " in proc.stdout and "p95 " in proc.stdout
    truncated = sum(render_sample(s, tok, 256).truncated for s in samples)
    assert f"truncated to 256 tokens: {truncated} of {len(samples)} samples" in proc.stdout
    assert "trained tokens: " in proc.stdout
    assert "[[playing basketball\n" + EOS + "]]" in proc.stdout
    assert "### Instruction:\nFill out the blank in the following sentence" in proc.stdout

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(samples)))
    for record, sample in zip(records, samples):
        rendered = render_sample(sample, tok, 256)
        assert record == {"index": record["index"], "type": sample["type"], "input_ids": rendered.input_ids,
                          "labels": rendered.labels, "truncated": rendered.truncated}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.jsonl"]


def test_check_cli_bad_file_exits_2_with_one_error_line(tok_dir, tmp_path):
    path = write_json(tmp_path / "bad.json", [GOOD_CONV, {"type": "conversation", "rounds": [["user", "x"]]}])
    proc = run_check("--data", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", "64")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {path}: sample 1 (conversation): rounds[0][0]: "
                                        "unknown role 'user' (expected ask, ans)"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--tokenizer", "{tmp}/no_tokenizer"], "tokenizer directory not found"),
    (["--data", "{tmp}/absent.json"], "no such file"),
    (["--show", "999"], "--show 999"),
    (["--dump", "{tmp}/no_dir/out.jsonl"], "does not exist"),
])
def test_check_main_user_errors(tok_dir, tmp_path, capsys, args, message):
    from data.check import main

    argv = {"--data": str(EXAMPLE_JSON), "--tokenizer": str(tok_dir), "--max-seq-len": "128"}
    argv.update(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2])))
    assert main([item for pair in argv.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
