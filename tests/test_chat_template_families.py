"""`template: chat` on the chat templates real models ship (tests/fixtures/chat_templates/*.json: the published
template text, its bos/eos and the special tokens it names, each with where it was copied from).

A tiny byte-level BPE is trained on the fly per family and given the family's special tokens, so nothing is
downloaded. For every family and record kind (multi-turn with a system prompt, one turn, unicode and newlines,
an OpenAI tool call with `content: null`, ShareGPT, Alpaca, our `instruct` / `conversation`): the ids equal
`apply_chat_template`'s, and decoding the trained tokens gives each assistant turn as the model must generate
it, its text plus the end-of-turn token, nothing else; or the record is refused in one line that says what to do.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.chat import chat_messages, chat_stop_ids, turn_ends
from data.loading import validate_record
from data.render import IGNORE_INDEX, load_tokenizer, render_validated
from data.schema import DataError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
FAMILIES = sorted(p.stem for p in FIXTURES.glob("*.json"))

SYSTEM = "You are brief."
MULTI = {"messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of Australia?"},
    {"role": "assistant", "content": "Canberra."},
    {"role": "user", "content": "And of France?"},
    {"role": "assistant", "content": "Paris, since 987."},
]}
ONE = {"messages": [{"role": "user", "content": "Capital of Australia?"}, {"role": "assistant", "content": "Canberra."}]}
UNICODE = {"messages": [{"role": "user", "content": "Écris un haïku."},
                        {"role": "assistant", "content": "Lune sur l'eau —\n深い静けさ\n🐸 saute."}]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TOOL_CALL = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call12345", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 C in Paris."},
]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Name a primary colour."},
                              {"from": "gpt", "value": "Blue."}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
INSTRUCT = {"type": "instruct", "instruct": "Fill out the blank", "input": "Cai Xukun loves ______",
            "output": "playing basketball"}
CONVERSATION = {"type": "conversation", "rounds": [["ask", "Hello"], ["ans", "Hi!"], ["ask", "Name?"], ["ans", "Cai."]]}
RECORDS = {"multi_turn_system": MULTI, "one_turn": ONE, "unicode": UNICODE, "tool_call": TOOL_CALL,
           "sharegpt": SHAREGPT, "alpaca": ALPACA, "instruct": INSTRUCT, "conversation": CONVERSATION}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


def family_tokenizer(out: Path, name: str):
    from models.tiny import train_tiny_tokenizer

    spec = fixture(name)
    tok = train_tiny_tokenizer(out, vocab_size=600)
    tok.add_tokens(spec["special_tokens"], special_tokens=True)
    tok.add_tokens(spec["added_tokens"])
    tok.add_special_tokens({"eos_token": spec["eos_token"]})
    if spec["bos_token"]:
        tok.add_special_tokens({"bos_token": spec["bos_token"]})
    tok.chat_template = spec["chat_template"]
    tok.save_pretrained(out)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return {name: family_tokenizer(tmp_path_factory.mktemp(name), name) for name in FAMILIES}


def trained_runs(rendered, tokenizer) -> list[str]:
    runs, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]


def reference_ids(record: dict, tokenizer) -> list[int]:
    """What `apply_chat_template` gives for the messages the record maps to (tool-call arguments as objects,
    or as JSON strings for a template that concatenates them)."""
    messages, tools = chat_messages(validate_record("x.jsonl", 0, 1, record))
    if any(m["role"] == "assistant" and m.get("content") is None for m in messages):
        empty = [{**m, "content": ""} if m.get("content") is None and m["role"] == "assistant" else m
                 for m in messages]
        try:  # None as transformers passes it, "" for a template that cannot take it or prints "None"
            if "None" in tokenizer.apply_chat_template(messages, tools=tools, tokenize=False):
                messages = empty
        except Exception:
            messages = empty
    try:
        out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)
    except Exception:
        messages = [{**m, "tool_calls": [{**c, "function": {**c["function"],
                                                            "arguments": json.dumps(c["function"]["arguments"])}}
                                         for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
        out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)
    return list(out["input_ids"])


# The text of a plain assistant turn (no tool calls) as each family trains it: what the model generates after
# the generation prompt, through the end-of-turn token. `last`: the conversation's last message.
def expected_turn(name: str, content: str, last: bool) -> str:
    if name == "llama3_1":
        return content.strip() + "<|eot_id|>"
    if name == "qwen2_5":
        return content + "<|im_end|>"
    if name == "qwen3":  # the turns after the last user message carry the (empty) thinking block
        return ("<think>\n\n</think>\n\n" if last else "") + content + "<|im_end|>"
    if name == "mistral_v3":
        return " " + content.strip() + "</s>"
    if name in ("gemma2", "gemma3"):
        return content.strip() + "<end_of_turn>"
    if name in ("phi3_mini", "phi4_mini"):
        return content + "<|end|>"  # not the eos the template appends after the last turn
    if name == "deepseek_r1_distill_qwen":
        return content + "<｜end▁of▁sentence｜>"
    if name == "glm4_5":  # no end-of-turn token: the next turn's <|user|>, or an appended eos at the end
        return "\n<think></think>\n" + content.strip() + ("<|endoftext|>" if last else "<|user|>")
    if name == "smollm3":  # its own {% generation %} span: header, text, <|im_end|> and the newline
        return "<|im_start|>assistant\n" + content + "<|im_end|>\n"
    raise KeyError(name)


def assistant_texts(record: dict) -> list[str]:
    messages, _ = chat_messages(validate_record("x.jsonl", 0, 1, record))
    return [m["content"] for m in messages if m["role"] == "assistant"]


# Records a family's template refuses (its own raise_exception), with words of the one-line error.
REFUSED = {
    ("gemma2", "multi_turn_system"): "System role not supported",
    ("gemma2", "tool_call"): "must alternate",
    ("gemma3", "tool_call"): "must alternate",
}


@pytest.mark.parametrize("kind", list(RECORDS))
@pytest.mark.parametrize("name", FAMILIES)
def test_family_record_kinds(toks, name, kind):
    tok = toks[name]
    record = RECORDS[kind]
    if (name, kind) in REFUSED:
        with pytest.raises(DataError, match=REFUSED[name, kind]) as info:
            render_validated(validate_record("x.jsonl", 0, 1, record), tok, None, "chat")
        message = str(info.value)
        assert "\n" not in message and "template: builtin" in message and "refused the record" in message
        return
    rendered = render_validated(validate_record("x.jsonl", 0, 1, record), tok, None, "chat")
    reference = reference_ids(record, tok)
    ends = turn_ends(tok)
    if ends.final_eos:  # the template ends the last turn with nothing: training appends eos
        assert rendered.input_ids == reference + [tok.eos_token_id]
    else:
        assert rendered.input_ids == reference
    runs = trained_runs(rendered, tok)
    if kind == "tool_call":
        check_tool_call(name, tok, rendered, runs)
        return
    texts = assistant_texts(record)
    assert runs == [expected_turn(name, text, i == len(texts) - 1) for i, text in enumerate(texts)]
    assert not rendered.lost or (name == "mistral_v3" and rendered.lost == ["messages[0] (system) content"])


def check_tool_call(name: str, tok, rendered, runs: list[str]) -> None:
    """The call turn trains the call (name and arguments) and its end, never the tool's result."""
    # No place for tool calls (Phi-3, Phi-4-mini, SmolLM3 render only `content`; DeepSeek-R1 renders them only
    # for `content: null`, a key transformers drops, so the template fails on it and gets "" instead):
    # the render drops the call, which is counted, not silent.
    if name in ("phi3_mini", "phi4_mini", "smollm3", "deepseek_r1_distill_qwen"):
        assert "messages[1] tool call get_weather" in rendered.lost
        assert runs == [expected_turn(name, "", False), expected_turn(name, "Sunny and 21 C in Paris.", True)]
        return
    assert not rendered.lost
    assert len(runs) == 2, runs
    call, answer = runs
    assert "get_weather" in call and "Paris" in call and "sunny, 21 C" not in call
    assert "sunny, 21 C" not in answer and "Weather in Paris?" not in call + answer
    assert answer == expected_turn(name, "Sunny and 21 C in Paris.", True)
    stops = {tok.convert_ids_to_tokens(i) for i in chat_stop_ids(tok)} | {tok.eos_token}
    assert any(call.endswith(stop) for stop in stops) or name == "deepseek_r1_distill_qwen", call


@pytest.mark.parametrize("name", FAMILIES)
def test_demo_stops_on_the_trained_end_of_turn_tokens(toks, name):
    import demo

    tok = toks[name]
    stops = demo.chat_stop_ids(tok)
    rendered = render_validated(validate_record("x.jsonl", 0, 1, MULTI if name != "gemma2" else ONE), tok, None,
                                "chat")
    ends_of_runs, run = set(), []
    for token, label in zip(rendered.input_ids + [None], rendered.labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:  # the run's last token that is not whitespace (SmolLM3's span ends with a newline)
            ends_of_runs.add(tok.convert_ids_to_tokens([t for t in run if tok.decode([t]).strip()][-1]))
            run = []
    assert ends_of_runs and {tok.convert_tokens_to_ids(t) for t in ends_of_runs} <= stops
    expected = {"llama3_1": {"<|eot_id|>"}, "qwen2_5": {"<|im_end|>"}, "qwen3": {"<|im_end|>"},
                "mistral_v3": {"</s>"}, "gemma2": {"<end_of_turn>"}, "gemma3": {"<end_of_turn>"},
                "phi3_mini": {"<|end|>"}, "phi4_mini": {"<|end|>"},
                "deepseek_r1_distill_qwen": {"<｜end▁of▁sentence｜>"},
                "glm4_5": {"<|user|>", "<|observation|>", "<|endoftext|>"}, "smollm3": {"<|im_end|>"}}[name]
    assert {tok.convert_ids_to_tokens(i) for i in stops} == expected


def test_reasoning_templates_train_multi_turn_records_with_reasoning(toks):
    """Qwen3 and DeepSeek-R1 rewrite history (earlier turns lose their reasoning): every turn trains as the
    full conversation's render shows it, and the dropped reasoning is counted, not silent."""
    record = {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6"},
    ]}
    qwen = render_validated(validate_record("x.jsonl", 0, 1, record), toks["qwen3"], None, "chat")
    assert trained_runs(qwen, toks["qwen3"]) == ["4<|im_end|>", "<think>\nAdd again.\n</think>\n\n6<|im_end|>"]
    assert qwen.lost == ["messages[1] reasoning"]
    r1 = render_validated(validate_record("x.jsonl", 0, 1, record), toks["deepseek_r1_distill_qwen"], None, "chat")
    assert trained_runs(r1, toks["deepseek_r1_distill_qwen"]) == ["\n\n4<｜end▁of▁sentence｜>",
                                                                   "\n\n6<｜end▁of▁sentence｜>"]
    assert r1.lost == ["messages[1] reasoning", "messages[3] reasoning"]
    one = render_validated(validate_record("x.jsonl", 0, 1, {"messages": record["messages"][:2]}),
                           toks["deepseek_r1_distill_qwen"], None, "chat")  # its prompt ends in <think>\n
    assert trained_runs(one, toks["deepseek_r1_distill_qwen"]) == ["\n\n4<｜end▁of▁sentence｜>"]


def test_generation_mask_is_the_template_own(toks):
    """SmolLM3: exactly its {% generation %} span per turn, never the next turn's <|im_start|>."""
    tok = toks["smollm3"]
    rendered = render_validated(validate_record("x.jsonl", 0, 1, MULTI), tok, None, "chat")
    messages, _ = chat_messages(validate_record("x.jsonl", 0, 1, MULTI))
    own = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert [label != IGNORE_INDEX for label in rendered.labels] == [bool(m) for m in own["assistant_masks"]]


def test_lost_content_and_template_errors_in_files(toks, tmp_path, capsys):
    """data.check and the dataset count records whose render drops text; a template's own error names the
    file, the line, the sample, the template's message and what to do, in one line."""
    from data import check
    from data.dataset import SFTDataset

    tok_dir = tmp_path / "phi3"
    family_tokenizer(tok_dir, "phi3_mini")
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(ONE) + "\n" + json.dumps(TOOL_CALL) + "\n")
    code = check.main(["--data", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", "256",
                       "--template", "chat", "--show", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning:" in err and "1 of 2 samples have message text the chat template does not render" in err
    assert "line 2 (messages[1] tool call get_weather" in err
    assert "[[Sunny and 21 C in Paris.<|end|>]]" in out and "[[<|end|>]]" in out
    warnings = []
    SFTDataset(path, load_tokenizer(tok_dir), 256, warn=warnings.append, template="chat")
    assert any("tool call get_weather" in w for w in warnings)

    gemma = tmp_path / "gemma2"
    family_tokenizer(gemma, "gemma2")
    bad = tmp_path / "system.jsonl"
    bad.write_text(json.dumps(ONE) + "\n" + json.dumps(MULTI) + "\n")
    code = check.main(["--data", str(bad), "--tokenizer", str(gemma), "--max-seq-len", "256", "--template", "chat"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "system.jsonl: line 2: sample 1: chat_template" in err and "System role not supported" in err
    assert "merge the system text into the first user message" in err
    with pytest.raises(DataError, match=r"system\.jsonl: line 2: sample 1: .*System role not supported.*merge"):
        SFTDataset(bad, load_tokenizer(gemma), 256, warn=None, template="chat")
