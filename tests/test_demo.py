"""demo.py: prompts identical to training, instruct/chat/ref_qa/tool-call flows, sampling, devices, user errors.

A tiny random llama (models.tiny) answers gibberish, so the flows are checked through `--show-prompt`
(the exact prompt text) and, for tool calls, through a scripted `generate_ids` run in-process.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
from data.render import load_tokenizer, render_sample
from data.templates import call_expression, conversation_prompt, fill, instruct_prompt
from tests.conftest import deepspeed_bin, free_port
from models.tiny import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
SERVING_DOC = REPO / "docs" / "serving.md"
GREEDY = ("--temperature", "0")
CALL_TEXT = "I should search.\n#### api call\n```python\nsearch(query='Cai Xukun', top_k=3)\n```  "


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "hf"
    make_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return load_tokenizer(hf_dir)


def run_cli(*argv: str, stdin: str = "", launcher: tuple[str, ...] = (sys.executable,), timeout: int = 120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([*launcher, "demo.py", *argv], cwd=REPO, env=env, input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def run_main(monkeypatch, capsys, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    """demo.main in-process with `stdin` piped; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = demo.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def scripted_replies(tokenizer, replies: list[str], prompts: list[list[int]]):
    """A `generate_ids` stand-in: records each prompt's ids and answers the next scripted reply + eos."""
    queue = list(replies)

    def generate_ids(model, prompt_ids, stop_ids, sampling, runtime):
        prompts.append(list(prompt_ids))
        text = queue.pop(0)
        yield from tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    return generate_ids


def split_turns(stdout: str, header: str) -> list[str]:
    """`--show-prompt` chat output, one string per turn (each starts with the prompt's header)."""
    assert stdout.startswith(header)
    return [header + part for part in stdout.split(header)[1:]]


# --------------------------------------------------------------------------------------------------------
# Prompt text and token ids are the training ones


def test_instruct_prompt_ids_are_the_training_ids(tokenizer):
    sample = {"type": "instruct", "instruct": "Fill out the blank", "input": "Cai Xukun loves ______",
              "output": "basketball"}
    rendered = render_sample(sample, tokenizer)
    masked = rendered.labels.index(next(label for label in rendered.labels if label != -100))
    prompt = demo.build_instruct_prompt(tokenizer, sample["instruct"], sample["input"])
    assert prompt.text == instruct_prompt(sample["instruct"], sample["input"])
    assert prompt.ids == rendered.input_ids[:masked]
    assert tokenizer.bos_token_id not in prompt.ids


def test_dialogue_prompt_ids_are_the_training_ids(tokenizer):
    rounds = [["ask", "Say </s> please"], ["ans", "Hello, what can I do for you ?"], ["ask", "Sing"]]
    rendered = render_sample({"type": "conversation", "rounds": rounds + [["ans", "La la"]]}, tokenizer)
    prompt = demo.build_dialogue_prompt(tokenizer, "conversation", rounds)
    assert prompt.text == conversation_prompt(rounds, eos_token=tokenizer.eos_token)
    assert prompt.ids == rendered.input_ids[:len(prompt.ids)]
    assert rendered.labels[len(prompt.ids) - 1] == -100 and rendered.labels[len(prompt.ids)] != -100
    assert prompt.ids.count(tokenizer.eos_token_id) == 1  # the past answer's eos; the user's "</s>" is text


def test_show_prompt_instruct_is_the_template(monkeypatch, capsys, hf_dir):
    code, out, err = run_main(monkeypatch, capsys, ["--model-path", hf_dir, "--instruct", "Name a colour",
                                                    "--input", "  ", "--show-prompt", "--max-new-tokens", "4"])
    assert code == 0, err
    expected = instruct_prompt("Name a colour", "  ")
    assert expected.endswith("### Response:\n") and "### Input:" not in expected
    assert out.startswith(expected) and len(out) > len(expected)


def test_show_prompt_ref_qa(monkeypatch, capsys, hf_dir, tmp_path):
    reference = tmp_path / "ref.txt"
    reference.write_text("Cai Xukun was born on August 2, 1998.\n")
    code, out, err = run_main(monkeypatch, capsys, ["--model-path", hf_dir, "--chat", "--reference", reference,
                                                    "--show-prompt", "--max-new-tokens", "4", *GREEDY],
                              stdin="When was he born?\n")
    assert code == 0, err
    expected = conversation_prompt([("ask", "When was he born?")], "ref_qa",
                                   reference="Cai Xukun was born on August 2, 1998.")
    assert expected.endswith("### Response: ")
    assert out.startswith(expected) and out.count(expected) == 1


# --------------------------------------------------------------------------------------------------------
# The command line, as users run it


def test_instruct_one_shot_cli(hf_dir):
    res = run_cli("--model-path", str(hf_dir), "--instruct", "Fill out the blank", "--input", "I love ___",
                  "--max-new-tokens", "8", "--seed", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "Traceback" not in res.stderr


def test_piped_chat_two_turns_keeps_history(hf_dir, tokenizer):
    res = run_cli("--model-path", str(hf_dir), "--chat", "--show-prompt", "--max-new-tokens", "6", *GREEDY,
                  stdin="Hello\n\nHow are you?\n")
    assert res.returncode == 0, res.stderr
    eos = tokenizer.eos_token
    first_prompt = conversation_prompt([("ask", "Hello")], eos_token=eos)
    header = first_prompt[:first_prompt.index("### Human:")]
    turns = split_turns(res.stdout, header)
    assert len(turns) == 2  # the blank line is no turn
    assert turns[0].startswith(first_prompt)
    answer = turns[0][len(first_prompt):]
    assert answer.strip()
    second_prompt = conversation_prompt([("ask", "Hello"), ("ans", answer.strip()), ("ask", "How are you?")],
                                        eos_token=eos)
    assert turns[1].startswith(second_prompt) and turns[1][len(second_prompt):].strip()


def test_bad_model_path_cli(tmp_path):
    res = run_cli("--model-path", str(tmp_path / "missing"), "--instruct", "x")
    assert res.returncode == 2 and not res.stdout
    assert "no such directory" in one_error_line(res.stderr)


def test_tensor_parallel_two_ranks_matches_one_process(monkeypatch, capsys, hf_dir):
    """`deepspeed --num_gpus 2 demo.py`: AutoTP on two CPU ranks gives the single-process greedy answers."""
    if not deepspeed_bin():
        pytest.skip("deepspeed launcher not installed")
    argv = ["--model-path", str(hf_dir), "--chat", "--show-prompt", "--max-new-tokens", "6", *GREEDY]
    stdin = "Hello\nHow are you?\n"
    code, single, _ = run_main(monkeypatch, capsys, argv, stdin)
    launcher = (deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()))
    sharded = run_cli(*argv, stdin=stdin, launcher=launcher, timeout=300)
    assert code == 0 and sharded.returncode == 0, sharded.stderr[-3000:]
    assert "AutoTP" in sharded.stdout + sharded.stderr
    assert single.count("### Human:") == 3 and single in sharded.stdout  # the launcher logs around it


# --------------------------------------------------------------------------------------------------------
# Tool calls


def test_find_api_call_reads_the_training_call_block():
    segment = fill("conver_has_api", "action_call", inner_thought="I should search.",
                   call=call_expression("search", {"query": "Cai Xukun", "top_k": 3}))
    generated = segment.chunks[0]  # the text the model emits before its eos
    call = demo.find_api_call(generated)
    assert call == demo.ApiCall("I should search.", "search(query='Cai Xukun', top_k=3)", "search",
                                {"query": "Cai Xukun", "top_k": 3})
    assert demo.find_api_call(generated.rstrip()) == call
    assert demo.find_api_call("\n#### api call\n```python\nnow()\n```").api_name == "now"


@pytest.mark.parametrize("text", [
    "Cai Xukun likes basketball.",
    "#### api call\n```python\nsearch(query='x')\n```",  # no newline before the marker
    "ok\n#### api call\n```python\nsearch('positional')\n```",
    "ok\n#### api call\n```python\nsearch(query=open('f'))\n```",
    "ok\n#### api call\n```python\nsearch(query='x')\n``` and more text",
])
def test_find_api_call_rejects_other_text(text):
    assert demo.find_api_call(text) is None


def test_tools_flow_end_to_end(monkeypatch, capsys, hf_dir, tokenizer, tmp_path):
    tools = tmp_path / "tools.txt"
    tools.write_text("search(query: str, top_k: int): search the web\n")
    prompts: list[list[int]] = []
    replies = [CALL_TEXT, "He was born in 1998.", "You are welcome."]
    monkeypatch.setattr(demo, "generate_ids", scripted_replies(tokenizer, replies, prompts))
    stdin = "When was Cai Xukun born?\n{\"born\": \"1998-08-02\"}\nThanks\n"
    code, out, err = run_main(monkeypatch, capsys, ["--model-path", hf_dir, "--chat", "--tools", tools], stdin)
    assert code == 0, err
    assert "[api call] search(query='Cai Xukun', top_k=3)" in err
    assert out == CALL_TEXT + "\nHe was born in 1998.\nYou are welcome.\n"

    desc = "search(query: str, top_k: int): search the web"
    action = {"inner_thought": "I should search.", "api_name": "search",
              "api_param": {"query": "Cai Xukun", "top_k": 3}, "api_res": '{"born": "1998-08-02"}'}
    ask = ("ask", "When was Cai Xukun born?")
    expected = [[ask], [ask, ("ans-api", {"actions": [action]})],
                [ask, ("ans-api", {"actions": [action], "ans": "He was born in 1998."}), ("ask", "Thanks")]]
    assert prompts == [demo.build_dialogue_prompt(tokenizer, "conver_has_api", rounds, api_desc=desc).ids
                       for rounds in expected]
    continued = tokenizer.decode(prompts[1])
    assert continued.endswith("```  </s>\n#### api output\n{\"born\": \"1998-08-02\"}\n### Assistant: ")


def test_tool_call_limit_drops_the_turn(monkeypatch, capsys, hf_dir, tokenizer, tmp_path):
    tools = tmp_path / "tools.txt"
    tools.write_text("search(query: str)")
    prompts: list[list[int]] = []
    monkeypatch.setattr(demo, "generate_ids", scripted_replies(tokenizer, [CALL_TEXT, CALL_TEXT, "Hi."], prompts))
    code, _, err = run_main(monkeypatch, capsys, ["--model-path", hf_dir, "--chat", "--tools", tools,
                                                  "--max-tool-calls", "1"], "first\nresult\nsecond\n")
    assert code == 0 and "--max-tool-calls" in err
    assert prompts[2] == demo.build_dialogue_prompt(tokenizer, "conver_has_api", [("ask", "second")],
                                                    api_desc="search(query: str)").ids


def test_chat_drops_oldest_exchange_beyond_context(monkeypatch, capsys, tmp_path):
    short = tmp_path / "short"
    make_tiny_llama(short, max_position_embeddings=96)
    tokenizer = load_tokenizer(short)
    prompts: list[list[int]] = []
    answer = "The quick brown fox jumps over the lazy dog. " * 2
    monkeypatch.setattr(demo, "generate_ids", scripted_replies(tokenizer, [answer] * 3, prompts))
    code, _, err = run_main(monkeypatch, capsys, ["--model-path", short, "--chat", "--max-new-tokens", "8"],
                            "one\ntwo\nthree\n")
    assert code == 0 and "dropped the oldest exchange" in err
    assert all(len(ids) + 8 <= 96 for ids in prompts)
    assert "### Human: one" not in tokenizer.decode(prompts[-1])


# --------------------------------------------------------------------------------------------------------
# Sampling, options, errors


def test_pick_token_greedy_and_top_p():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    greedy = demo.Sampling(1, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert demo.pick_token(logits, greedy) == 1
    narrow = demo.Sampling(1, 1.0, 0.01, torch.Generator().manual_seed(0))  # only the top token survives
    assert {demo.pick_token(logits, narrow) for _ in range(20)} == {1}
    wide = demo.Sampling(1, 5.0, 1.0, torch.Generator().manual_seed(0))
    assert len({demo.pick_token(logits, wide) for _ in range(200)}) == 4


def test_seeded_sampling_repeats(monkeypatch, capsys, hf_dir):
    argv = ["--model-path", hf_dir, "--instruct", "Say something", "--temperature", "1.0", "--seed", "3",
            "--max-new-tokens", "10"]
    first = run_main(monkeypatch, capsys, argv)
    second = run_main(monkeypatch, capsys, argv)
    assert first[0] == 0 and first == second


def test_trust_remote_code_passes_only_when_given(monkeypatch, capsys, hf_dir):
    import transformers

    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    base = ["--model-path", hf_dir, "--instruct", "x", "--max-new-tokens", "1"]
    assert run_main(monkeypatch, capsys, base)[0] == 0
    assert run_main(monkeypatch, capsys, base + ["--trust-remote-code"])[0] == 0
    assert seen == [False, True]


def pipeline_dir(tmp: Path) -> Path:
    (tmp / "pp").mkdir()
    (tmp / "pp" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp / "pp" / "layer_00-model_states.pt").write_bytes(b"")
    return tmp / "pp"


def no_weights_dir(tmp: Path) -> Path:
    (tmp / "cfg").mkdir()
    (tmp / "cfg" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp / "cfg"


def broken_weights_dir(tmp: Path) -> Path:
    make_tiny_llama(tmp / "broken")
    (tmp / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    return tmp / "broken"


def missing_dir(tmp: Path) -> Path:
    return tmp / "missing"


def file_not_dir(tmp: Path) -> Path:
    (tmp / "model.txt").write_text("x")
    return tmp / "model.txt"


@pytest.mark.parametrize("make_dir, message", [
    (missing_dir, "no such directory"),
    (file_not_dir, "not a directory"),
    (lambda tmp: tmp, "no config.json"),
    (pipeline_dir, "convert_model.py pp_to_hg"),
    (no_weights_dir, "no weights"),
    (broken_weights_dir, "cannot load model"),
])
def test_unusable_model_dir(monkeypatch, capsys, tmp_path, make_dir, message):
    code, _, err = run_main(monkeypatch, capsys, ["--model-path", make_dir(tmp_path), "--instruct", "x"])
    assert code == 2 and message in one_error_line(err)


def test_unreadable_tools_and_reference(monkeypatch, capsys, hf_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    cases = [("--tools", tmp_path / "missing.txt", "no such file"), ("--reference", tmp_path, "is a directory"),
             ("--tools", empty, "empty"), ("--reference", latin1, "not UTF-8")]
    for flag, path, message in cases:
        code, out, err = run_main(monkeypatch, capsys, ["--model-path", hf_dir, "--chat", flag, path])
        assert code == 2 and message in one_error_line(err) and not out, (flag, path, err)


@pytest.mark.parametrize("argv, message", [
    ([], "--instruct --chat is required"),
    (["--chat", "--input", "y"], "--input goes with --instruct"),
    (["--instruct", "x", "--tools", "t.txt"], "--tools goes with --chat"),
    (["--chat", "--tools", "a", "--reference", "b"], "not allowed with"),
    (["--chat", "--temperature", "-1"], "--temperature"),
    (["--chat", "--top-p", "0"], "--top-p"),
    (["--chat", "--dtype", "int4"], "invalid choice"),
    (["--chat", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_arguments(monkeypatch, capsys, hf_dir, argv, message):
    code, _, err = run_main(monkeypatch, capsys, ["--model-path", hf_dir, *argv])
    assert code == 2 and message in one_error_line(err)


# --------------------------------------------------------------------------------------------------------
# docs/serving.md shows the training format


def test_serving_doc_requests_use_the_instruct_template():
    bodies = [json.loads(body) for body in re.findall(r"<<'JSON'\n(.*?)\nJSON", SERVING_DOC.read_text(), re.S)]
    expected = instruct_prompt("Fill out the blank", "Cai Xukun loves singing, dancing, rapping and ______")
    assert [body.get("prompt", body.get("inputs")) for body in bodies] == [expected, expected]
    assert bodies[0]["add_special_tokens"] is False


def test_serving_doc_chat_template_renders_the_conversation_prompt(tokenizer):
    template = re.search(r"```jinja\n(.*?)```", SERVING_DOC.read_text(), re.S).group(1)
    rounds = [("ask", "Hello"), ("ans", "Hi! How can I help?"), ("ask", "Sing a song")]
    messages = [{"role": "user" if role == "ask" else "assistant", "content": text} for role, text in rounds]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == conversation_prompt(rounds, eos_token=tokenizer.eos_token)
    with pytest.raises(Exception, match="system prompt"):
        tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}] + messages,
                                      chat_template=template, tokenize=False)
