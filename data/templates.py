"""Prompt templates: the exact text of every sample type, as data, shared by training and inference.

Training (`data.render`) and the inference prompts (`instruct_prompt`, `conversation_prompt`, used by
demo.py) are built from the same `TEMPLATES` table, so a trained model is prompted character for
character the way it was trained. Change a string here and bump `TEMPLATE_VERSION`: models trained on
the old text expect the old prompts.

A template is split on the literal marker `<eos>`; the tokenizer's eos *id* is inserted between the
pieces. User text is substituted into the pieces afterwards, so a sample that happens to contain the
text "<eos>" or "</s>" never produces an eos token.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .schema import ROLES, check_api_answer, parse_api_param

TEMPLATE_VERSION = 1
EOS = "<eos>"

TEMPLATES: dict[str, dict[str, str]] = {
    "pretrain": {
        "document": "{text}<eos>",
    },
    "instruct": {
        "header": "Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n",
        "instruction": "### Instruction:\n{instruct}\n\n",
        "input": "### Input:\n{input}\n\n",
        "response_tag": "### Response:\n",
        "answer": "{output}\n<eos>",
    },
    "conversation": {
        "header": "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the human's questions. \n\n",
        "system": "{system}\n\n",
        "ask": "### Human: {text} \n",
        "ans_tag": "### Assistant: ",
        "ans": "{text} <eos>\n",
    },
    "conver_has_api": {
        "header": "Answer the following questions as best as you can. You have access to the following "
                  "tool(s):\n{api_desc}\n",
        "system": "{system}\n\n",
        "ask": "### Human: {text} \n",
        "ans_tag": "### Assistant: ",
        "ans": "{text} <eos>\n",
        "action_tag": "### Assistant: ",
        "action_call": "{inner_thought}\n#### api call\n```python\n{call}\n```  <eos>",
        "action_result": "\n#### api output\n{api_res}\n",
        "api_ans_tag": "### Assistant: ",
        "api_ans": "{ans}  <eos>",
    },
    "ref_qa": {
        "header": "Generate responses to the given instruction series according to the reference text. \n\n"
                  "### Reference: \n{reference}\n\n",
        "ask": "### Instruction: {text} \n",
        "ans_tag": "### Response: ",
        "ans": "{text} <eos>\n",
    },
}

# Template keys whose text is trained (labels = ids); every other key is masked (-100).
TRAINED = frozenset({"document", "answer", "ans", "action_call", "api_ans"})

# Segments of one conversational round, by role (`ans-api` is expanded per action by `_api_round`).
ROUND_LAYOUT: dict[str, tuple[str, ...]] = {"ask": ("ask",), "ans": ("ans_tag", "ans")}
ACTION_LAYOUT = ("action_tag", "action_call", "action_result")
API_ANSWER_LAYOUT = ("api_ans_tag", "api_ans")

# The masked tag right before the model's next turn: where an inference prompt stops.
NEXT_ANSWER_TAG = {"instruct": "response_tag", "conversation": "ans_tag", "conver_has_api": "ans_tag",
                   "ref_qa": "ans_tag"}


@dataclass(frozen=True)
class Segment:
    """One template piece after substitution. An eos token belongs between consecutive `chunks`."""

    chunks: tuple[str, ...]
    trained: bool

    def text(self, eos_token: str) -> str:
        return eos_token.join(self.chunks)


def fill(kind: str, key: str, **fields: Any) -> Segment:
    """Substitute `fields` into template `key` of sample type `kind`, keeping the eos positions."""
    template = TEMPLATES[kind][key]
    return Segment(tuple(part.format(**fields) for part in template.split(EOS)), key in TRAINED)


def call_expression(api_name: str, api_param: Any) -> str:
    """`search(query='XiaoHuangShu', version='King James Version')`: a Python call, values via repr()."""
    params = parse_api_param(api_param)
    return f"{api_name}({', '.join(f'{key}={value!r}' for key, value in params.items())})"


def format_api_res(api_res: Any) -> str:
    """Tool output as the model sees it: strings verbatim, any other JSON value as indented JSON."""
    if isinstance(api_res, str):
        return api_res
    return json.dumps(api_res, indent=2, ensure_ascii=False)


def has_input(value: Any) -> bool:
    """An empty or blank `input` is treated as absent (spec)."""
    return isinstance(value, str) and bool(value.strip())


def _instruct_head(instruct: str, input: str | None) -> list[Segment]:
    """Everything of an instruct sample before the answer (all masked)."""
    keys = ("header", "instruction") + (("input",) if has_input(input) else ()) + ("response_tag",)
    return [fill("instruct", key, instruct=instruct, input=input) for key in keys]


def _api_round(kind: str, value: dict) -> list[Segment]:
    """An `ans-api` round: tag, call (trained), output (masked) per action; then the final answer.

    Without `ans` (only in inference prompts, while the model is still calling tools) it stops after
    the last tool output, and the prompt's closing tag asks for the next call or the answer.
    """
    segments = []
    for action in value["actions"]:
        fields = dict(inner_thought=action["inner_thought"],
                      call=call_expression(action["api_name"], action["api_param"]),
                      api_res=format_api_res(action["api_res"]))
        segments += [fill(kind, key, **fields) for key in ACTION_LAYOUT]
    if "ans" in value:
        segments += [fill(kind, key, ans=value["ans"]) for key in API_ANSWER_LAYOUT]
    return segments


def _round(kind: str, role: str, value: Any) -> list[Segment]:
    if role == "ans-api":
        return _api_round(kind, value)
    return [fill(kind, key, text=value) for key in ROUND_LAYOUT[role]]


def _dialogue(kind: str, header_fields: dict, rounds: Iterable[Sequence], system: str | None = None) -> list[Segment]:
    segments = [fill(kind, "header", **header_fields)]
    if system:  # a `messages` record's system text (data.chat.messages_to_sample), right after the header
        segments.append(fill(kind, "system", system=system))
    for role, value in rounds:
        segments += _round(kind, role, value)
    return segments


def _pretrain_segments(sample: dict) -> list[Segment]:
    return [fill("pretrain", "document", text=sample["text"])]


def _instruct_segments(sample: dict) -> list[Segment]:
    return _instruct_head(sample["instruct"], sample.get("input")) + [
        fill("instruct", "answer", output=sample["output"])]


def _dialogue_segments(sample: dict) -> list[Segment]:
    kind = sample["type"]
    header_fields = {name: sample[name] for name in HEADER_FIELDS[kind]}
    return _dialogue(kind, header_fields, sample["rounds"], sample.get("system"))


# Sample fields substituted into the header of each conversational type.
HEADER_FIELDS = {"conversation": (), "conver_has_api": ("api_desc",), "ref_qa": ("reference",)}

SEGMENT_BUILDERS = {
    "pretrain": _pretrain_segments,
    "instruct": _instruct_segments,
    "conversation": _dialogue_segments,
    "conver_has_api": _dialogue_segments,
    "ref_qa": _dialogue_segments,
}


def segments_of(sample: dict) -> list[Segment]:
    """The text segments of a validated sample, in order, each marked trained or masked."""
    return SEGMENT_BUILDERS[sample["type"]](sample)


def instruct_prompt(instruct: str, input: str | None = None) -> str:
    """Inference prompt for an instruction: the training text up to and including `### Response:\\n`."""
    return "".join(segment.text("") for segment in _instruct_head(instruct, input))


def conversation_prompt(rounds: Sequence[Sequence], kind: str = "conversation", reference: str | None = None,
                        api_desc: str | None = None, eos_token: str = "</s>", system: str | None = None) -> str:
    """Inference prompt for a dialogue: header, past `(role, text)` rounds, then the next answer's tag.

    Past answers end with `eos_token` as in training; pass the tokenizer's `eos_token` so that tokenizing
    the prompt (special tokens parsed) yields the eos id there. For `conver_has_api` a round may be
    `("ans-api", {"actions": [...]})` without `ans`: the tool calls made so far in the current turn.
    `system`: a system text placed after the header, as training places a `messages` record's system messages.
    """
    if kind not in HEADER_FIELDS:
        raise ValueError(f"unknown dialogue kind {kind!r} (expected {', '.join(HEADER_FIELDS)})")
    header_fields = {"reference": reference, "api_desc": api_desc}
    for name in HEADER_FIELDS[kind]:
        if not isinstance(header_fields[name], str):
            raise ValueError(f"conversation_prompt(kind={kind!r}) needs {name}= as a string")
    rounds = [tuple(pair) for pair in rounds]
    for i, (role, value) in enumerate(rounds):
        if role not in ROLES[kind]:
            raise ValueError(f"rounds[{i}]: unknown role {role!r} for {kind} (expected {', '.join(ROLES[kind])})")
        if role == "ans-api":
            check_api_answer(value, f"rounds[{i}][1]", need_ans=i != len(rounds) - 1)
    if system and "system" not in TEMPLATES[kind]:
        raise ValueError(f"conversation_prompt(kind={kind!r}) takes no system= text")
    segments = _dialogue(kind, header_fields, rounds, system) + [fill(kind, NEXT_ANSWER_TAG[kind])]
    return "".join(segment.text(eos_token) for segment in segments)
