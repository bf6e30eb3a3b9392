"""`template: builtin | chat`: messages records under the seed's templates, and the tokenizer's own chat template.

Tokenizers are built on the fly (models.tiny) and given a chat template: a llama-3-like one with
`{% generation %}` markers (the template's own assistant mask), a ChatML-like one without (spans found by
prefix renders), and one whose renders are not prefix-stable (refused).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.chat import messages_to_sample, sample_to_messages
from data.dataset import SFTDataset
from data.render import IGNORE_INDEX, load_tokenizer, render_many, render_validated
from data.schema import DataError

REPO = Path(__file__).resolve().parents[1]

LLAMA3_LIKE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\n\nTools: ' + (tools | tojson) + '<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<|python_tag|>' + call['function']['name'] + (call['function']['arguments'] | tojson) }}"
    "{% endfor %}{% endgeneration %}{{ '<|eot_id|>' }}"
    "{% else %}{{ (message['content'] or '') + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATML_LIKE = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# The last message is marked: rendering a prefix changes how earlier turns look, and the last turn's
# header is not the generation prompt, so the last turn cannot be located.
UNSTABLE = ("{% for message in messages %}{% if loop.last %}[last] {% endif %}"
            "{{ message['role'] + ': ' + (message['content'] or '') + '</s>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
# Messages rendered newest first: no assistant turn can be located after the text before it.
REVERSED = ("{% for message in messages | reverse %}"
            "{{ message['role'] + ': ' + (message['content'] or '') + '</s>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|im_start|>", "<|im_end|>"]
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
TEMPLATES = {"llama3": LLAMA3_LIKE, "chatml": CHATML_LIKE, "unstable": UNSTABLE, "reversed": REVERSED}

MESSAGES = {"messages": [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
    {"role": "user", "content": "Who is Cai Xukun?"},
    {"role": "assistant", "content": "A singer, born August 2, 1998."},
]}

TOOL_MESSAGES = {
    "tools": [{"type": "function", "function": {"name": "search", "description": "web search",
                                                "parameters": {"type": "object",
                                                               "properties": {"query": {"type": "string"}}}}}],
    "messages": [
        {"role": "user", "content": "Search Cai Xukun"},
        {"role": "assistant", "content": "I should search.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "search", "arguments": "{\"query\": \"Cai Xukun\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a singer"},
        {"role": "assistant", "content": "He is a singer."},
    ]}

OURS = [
    {"type": "pretrain", "text": "Cai Xukun (born August 2, 1998) is a singer."},
    {"type": "instruct", "instruct": "Fill out the blank", "input": "Cai Xukun loves ______",
     "output": "playing basketball"},
    {"type": "conversation", "rounds": [["ask", "Hello"], ["ans", "Hi!"], ["ask", "Name?"], ["ans", "Cai."]]},
    {"type": "conver_has_api", "api_desc": "search: web search, args query", "rounds": [
        ["ask", "Search Cai Xukun"],
        ["ans-api", {"actions": [{"inner_thought": "I should search.", "api_name": "search",
                                  "api_param": {"query": "Cai Xukun"}, "api_res": "a singer"}],
                     "ans": "He is a singer."}]]},
    {"type": "ref_qa", "reference": "Cai Xukun was born in 1998.",
     "rounds": [["ask", "When was he born?"], ["ans", "1998"]]},
]


def make_tokenizer(out: Path, template: str | None, vocab_size: int = 512):
    from models.tiny import train_tiny_tokenizer

    tok = train_tiny_tokenizer(out, vocab_size=vocab_size)
    tok.add_tokens(SPECIALS, special_tokens=True)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(out)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return {name: make_tokenizer(tmp_path_factory.mktemp(name), template) for name, template in
            [*TEMPLATES.items(), ("none", None)]}


def trained_runs(rendered, tokenizer) -> list[str]:
    """The decoded maximal runs of trained tokens."""
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


# ------------------------------------------------------------------------------------------ chat template

@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_messages_trained_tokens_are_the_assistant_turns(toks, name):
    tok = toks[name]
    rendered = render_validated(MESSAGES, tok, None, "chat")
    assert rendered.type == "messages"
    eot = END_OF_TURN[name]
    assert trained_runs(rendered, tok) == ["Hi there!" + eot, "A singer, born August 2, 1998." + eot]
    # the ids are the template's own rendering, tokenized as apply_chat_template tokenizes it
    text = tok.apply_chat_template(MESSAGES["messages"], tokenize=False)
    assert rendered.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert "".join(segment for segment, _ in rendered.segments) == text


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_tool_calls_train_the_calls_not_the_results(toks, name):
    tok = toks[name]
    rendered = render_validated(TOOL_MESSAGES, tok, None, "chat")
    runs = trained_runs(rendered, tok)
    eot = END_OF_TURN[name]
    assert len(runs) == 2 and runs[1] == "He is a singer." + eot
    assert runs[0].startswith("I should search.") and "search" in runs[0] and runs[0].endswith(eot)
    assert "a singer" not in "".join(runs[:1]) and "web search" not in "".join(runs)
    assert "web search" in tok.decode(rendered.input_ids)  # the tool spec is in the (masked) prompt


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_every_our_type_under_chat(toks, name):
    tok = toks[name]
    eot = END_OF_TURN[name]
    by_type = {sample["type"]: render_validated(sample, tok, None, "chat") for sample in OURS}
    # pretrain documents have no turns: trained as they are, like the builtin template
    assert by_type["pretrain"].input_ids == render_validated(OURS[0], tok).input_ids
    assert trained_runs(by_type["instruct"], tok) == ["playing basketball" + eot]
    assert "Fill out the blank\nCai Xukun loves ______" in tok.decode(by_type["instruct"].input_ids)
    assert trained_runs(by_type["conversation"], tok) == ["Hi!" + eot, "Cai." + eot]
    ref = by_type["ref_qa"]
    assert trained_runs(ref, tok) == ["1998" + eot]
    assert "Cai Xukun was born in 1998." in tok.decode(ref.input_ids)  # the reference: a masked system turn
    api = trained_runs(by_type["conver_has_api"], tok)
    assert api[-1] == "He is a singer." + eot and api[0].startswith("I should search.")
    # api_desc that is not JSON becomes a system message; masked
    assert "search: web search" in tok.decode(by_type["conver_has_api"].input_ids)
    for sample, rendered in zip(OURS, render_many(OURS, tok, None, template="chat")):
        assert rendered.input_ids == by_type[sample["type"]].input_ids
        assert rendered.labels == by_type[sample["type"]].labels


def test_api_desc_json_becomes_tools():
    spec = [{"name": "search", "parameters": {"type": "object", "properties": {}}}]
    sample = dict(OURS[3], api_desc=json.dumps(spec))
    messages, tools = sample_to_messages(sample)
    assert tools == [{"type": "function", "function": spec[0]}]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "search", "arguments": {"query": "Cai Xukun"}}


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_truncation_ends_with_the_end_of_turn_token(toks, name):
    tok = toks[name]
    eot_id = tok.convert_tokens_to_ids(END_OF_TURN[name])
    full = render_validated(MESSAGES, tok, None, "chat")
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = render_validated(MESSAGES, tok, first_trained + 2, "chat")
    assert cut.truncated and cut.full_length == len(full.input_ids) and len(cut.input_ids) == first_trained + 2
    assert cut.input_ids[-1] == eot_id and cut.labels[-1] == eot_id
    assert cut.input_ids[:-1] == full.input_ids[:first_trained + 1]
    masked_cut = render_validated(MESSAGES, tok, 3, "chat")
    assert masked_cut.input_ids[-1] == eot_id and masked_cut.labels == [IGNORE_INDEX] * 3


@pytest.mark.parametrize("name", ["unstable", "reversed"])
def test_template_whose_turns_cannot_be_located_is_refused(toks, name):
    with pytest.raises(DataError, match="cannot be located") as info:
        render_validated(MESSAGES, toks[name], None, "chat")
    assert "\n" not in str(info.value) and "tokenizer" in str(info.value) and "template: builtin" in str(info.value)


def test_tokenizer_without_chat_template(toks, tmp_path):
    with pytest.raises(DataError, match="no chat_template") as info:
        render_validated(MESSAGES, toks["none"], None, "chat")
    assert "\n" not in str(info.value)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(OURS[1]) + "\n")
    with pytest.raises(DataError, match="no chat_template"):
        SFTDataset(path, toks["none"], 64, warn=None, template="chat")
    with pytest.raises(DataError, match="template"):
        SFTDataset(path, toks["none"], 64, warn=None, template="chatml")


def test_dataset_under_chat(toks, tmp_path):
    tok = toks["llama3"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in OURS))
    dataset = SFTDataset(path, tok, 256, warn=None, template="chat")
    assert len(dataset) == len(OURS)
    for i, sample in enumerate(OURS):
        assert dataset[i]["input_ids"].tolist() == render_validated(sample, tok, 256, "chat").input_ids


def test_trainer_datasets_use_the_configured_template(toks, tmp_path):
    """training.setup builds the train and eval sets with the config's `template` (both data_path forms)."""
    from training.setup import sft_dataset
    from utils.config import load_config

    tok = toks["llama3"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in OURS))
    config = str(REPO / "configs" / "tiny_llama_cpu.yml")
    for template in ("chat", "builtin"):
        cfg = load_config(config, {"template": template, "data_path": [str(path)], "eval_data_path": str(path),
                                   "max_seq_len": 256})
        for key in ("data_path", "eval_data_path"):
            dataset = sft_dataset(cfg, tok, key)
            assert [dataset[i]["input_ids"].tolist() for i in range(len(OURS))] == \
                [render_validated(s, tok, 256, template).input_ids for s in OURS], (template, key)


# ---------------------------------------------------------------------------------------------- builtin

def test_messages_under_builtin_is_the_mapped_conversation(toks):
    tok = toks["llama3"]
    sample = messages_to_sample(MESSAGES)
    assert sample == {"type": "conversation", "system": "You are brief.",
                      "rounds": [["ask", "Hello"], ["ans", "Hi there!"], ["ask", "Who is Cai Xukun?"],
                                 ["ans", "A singer, born August 2, 1998."]]}
    rendered = render_validated(MESSAGES, tok)
    eos = tok.eos_token
    assert trained_runs(rendered, tok) == [f"Hi there! {eos}\n", f"A singer, born August 2, 1998. {eos}\n"]
    text = "".join(segment for segment, _ in rendered.segments)
    assert text.startswith("A chat between a curious human") and "questions. \n\nYou are brief.\n\n### Human: Hello" in text
    # without the system message: exactly the seed's conversation rendering
    plain = {"messages": MESSAGES["messages"][1:]}
    ours = {"type": "conversation", "rounds": sample["rounds"]}
    assert render_validated(plain, tok).input_ids == render_validated(ours, tok).input_ids
    many = render_many([MESSAGES, plain, ours], tok)
    assert [r.input_ids for r in many] == [rendered.input_ids, render_validated(ours, tok).input_ids,
                                           render_validated(ours, tok).input_ids]
    assert [r.type for r in many] == ["messages", "messages", "conversation"]


def test_tool_messages_under_builtin_are_conver_has_api(toks):
    tok = toks["llama3"]
    sample = messages_to_sample(TOOL_MESSAGES)
    assert sample["type"] == "conver_has_api"
    assert json.loads(sample["api_desc"]) == TOOL_MESSAGES["tools"]
    assert sample["rounds"] == [["ask", "Search Cai Xukun"], ["ans-api", {
        "actions": [{"inner_thought": "I should search.", "api_name": "search", "api_param": {"query": "Cai Xukun"},
                     "api_res": "a singer"}], "ans": "He is a singer."}]]
    rendered = render_validated(TOOL_MESSAGES, tok)
    eos = tok.eos_token
    assert trained_runs(rendered, tok) == [
        f"I should search.\n#### api call\n```python\nsearch(query='Cai Xukun')\n```  {eos}", f"He is a singer.  {eos}"]


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "messages[1]"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "content": "r"}], "messages[2]"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
])
def test_bad_messages_under_builtin(toks, messages, field):
    with pytest.raises(DataError, match=r"sample \(messages\): " + field.replace("[", r"\[").replace("]", r"\]")):
        render_validated({"messages": messages}, toks["llama3"])


# ------------------------------------------------------------------------------------- demo and data.check

@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_demo_chat_prompt_is_the_training_render(toks, name):
    import demo

    tok = toks[name]
    prompt = demo.build_instruct_prompt(tok, "Fill out the blank", "Cai Xukun loves ______", "chat")
    trained = render_validated(OURS[1], tok, None, "chat")
    first = next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)
    assert prompt.ids == trained.input_ids[:first]
    assert prompt.text == tok.decode(trained.input_ids[:first], skip_special_tokens=False)
    for sample in OURS[2:]:
        rounds = sample["rounds"]
        trained = render_validated(sample, tok, None, "chat")
        last_answer = max(i for i, label in enumerate(trained.labels) if label == IGNORE_INDEX and i + 1 < len(
            trained.labels) and trained.labels[i + 1] != IGNORE_INDEX)
        history = rounds[:-1] if rounds[-1][0] == "ans" else \
            rounds[:-1] + [["ans-api", {"actions": rounds[-1][1]["actions"]}]]
        prompt = demo.build_dialogue_prompt(tok, sample["type"], history, sample.get("reference"),
                                            sample.get("api_desc"), template="chat")
        assert prompt.ids == trained.input_ids[:last_answer + 1], sample["type"]
    assert demo.chat_stop_ids(tok) == {tok.convert_tokens_to_ids(END_OF_TURN[name])}


def test_demo_template_chat_show_prompt(tmp_path):
    from models.tiny import make_tiny_llama

    model_dir = tmp_path / "hf"
    make_tiny_llama(model_dir, tokenizer=False, vocab_size=512 + len(SPECIALS))
    tok = make_tokenizer(model_dir, LLAMA3_LIKE)
    env_run = [sys.executable, "demo.py", "--model-path", str(model_dir), "--instruct", "Name a colour",
               "--template", "chat", "--show-prompt", "--max-new-tokens", "2", "--temperature", "0"]
    result = subprocess.run(env_run, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    expected = tok.apply_chat_template([{"role": "user", "content": "Name a colour"}], tokenize=False,
                                       add_generation_prompt=True)
    assert result.stdout.startswith(expected)
    no_template = tmp_path / "plain"
    make_tiny_llama(no_template)
    bad = subprocess.run(env_run[:3] + [str(no_template)] + env_run[4:], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "no chat_template" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_data_check_template_chat(tmp_path, capsys):
    from data import check

    tok_dir = tmp_path / "tok"
    make_tokenizer(tok_dir, CHATML_LIKE)
    tok = load_tokenizer(tok_dir)
    files = {"ours": OURS, "messages": [MESSAGES, TOOL_MESSAGES]}  # one kind of record per file
    for name, samples in files.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
        dump = tmp_path / f"{name}.dump.jsonl"
        code = check.main(["--data", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", "512",
                           "--template", "chat", "--dump", str(dump), "--show", "0"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "chat_template" in out.out
        if name == "messages":
            assert "messages" in out.out and "[[Hi there!<|im_end|>]]" in out.out
        rows = [json.loads(line) for line in dump.read_text().splitlines()]
        assert len(rows) == len(samples)
        for row, sample in zip(rows, samples):
            rendered = render_validated(sample, tok, 512, "chat")
            assert row["input_ids"] == rendered.input_ids and row["labels"] == rendered.labels
    make_tokenizer(tmp_path / "plain", None)
    code = check.main(["--data", str(tmp_path / "ours.jsonl"), "--tokenizer", str(tmp_path / "plain"),
                       "--max-seq-len", "64", "--template", "chat"])
    err = capsys.readouterr().err
    assert code == 2 and "no chat_template" in err and len(err.strip().splitlines()) == 1


def test_config_key_template():
    from utils.config import ConfigError, load_config

    config = str(REPO / "configs" / "tiny_llama_cpu.yml")
    assert load_config(config)["template"] == "builtin"
    assert load_config(config, {"template": "chat"})["template"] == "chat"
    with pytest.raises(ConfigError, match="template: expected builtin or chat, got 'chatml'"):
        load_config(config, {"template": "chatml"})


def test_render_errors_name_the_line(toks, tmp_path, capsys):
    from data import check

    path = tmp_path / "m.jsonl"
    first = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(first) + "\n" + json.dumps(MESSAGES) + "\n")  # builtin renders both
    SFTDataset(path, toks["reversed"], 64, warn=None)
    with pytest.raises(DataError, match=r"m\.jsonl: line 1: sample 0: chat_template .* cannot be located"):
        SFTDataset(path, toks["reversed"], 64, warn=None, template="chat")
    tok_dir = tmp_path / "reversed"
    make_tokenizer(tok_dir, REVERSED)
    code = check.main(["--data", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", "64", "--template", "chat"])
    err = capsys.readouterr().err
    assert code == 2 and "line 1: sample 0: chat_template" in err and len(err.strip().splitlines()) == 1
