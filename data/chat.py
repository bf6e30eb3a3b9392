"""`messages` records and the tokenizer's own chat template (`template: chat`).

Two templates render every record kind (config key `template`, `data.check --template`, `demo.py --template`):

- `builtin` (default): the seed's templates (`data.templates`). A `messages` record is mapped onto our
  `conversation` type, or `conver_has_api` when it has `tools` or assistant `tool_calls`
  (`messages_to_sample`): user -> `ask`, assistant -> `ans`; assistant tool calls -> the actions of an
  `ans-api` round (api_name / api_param), the following `tool` messages -> their `api_res`, the next plain
  assistant message -> its `ans`; `tools` -> `api_desc` (indented JSON). Leading system messages go into the
  prompt prefix, right after the fixed header (template key `system`), where ref_qa puts its reference.
- `chat`: the tokenizer's `chat_template` through `apply_chat_template`. Our types are mapped onto messages
  (`sample_to_messages`). `pretrain` documents have no turns: they are trained as they are under both
  templates (the text and a closing eos), so pretraining and chat data can be mixed. Labels cover each
  assistant message's tokens and the end-of-turn token right after it; system, user and tool text and the
  assistant header are masked. A template with `{% generation %}` markers gives that mask itself
  (`return_assistant_tokens_mask`); otherwise each assistant message is located by rendering prefixes
  (`messages[:i]` with the generation prompt, then `messages[:i+1]`), and a template whose renders are not
  prefixes of each other is refused (`DataError`).
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

from .schema import DataError, FieldError, json_type, parse_api_param
from .templates import format_api_res, has_input

TEMPLATE_CHOICES = ("builtin", "chat")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")
_NO_RESULT = object()


def check_template_name(name: Any) -> str:
    if name not in TEMPLATE_CHOICES:
        raise DataError(f"template: expected one of {', '.join(TEMPLATE_CHOICES)}, got {name!r}")
    return name


def is_messages(record: Any) -> bool:
    return isinstance(record, dict) and "messages" in record and "type" not in record


def located(path: str, index: int, line: int | None, error: Exception) -> DataError:
    """A rendering error of one record with the file and the record's line / index in front."""
    where = f"line {line}: sample {index}" if line is not None else f"sample {index}"
    return DataError(f"{path}: {where}: {error}")


def record_kind(record: dict) -> str:
    """What `Rendered.type` and `data.check` call the record: our `type`, or `messages`."""
    return "messages" if is_messages(record) else record["type"]


# ------------------------------------------------------------------------------------- message fields

def _text(value: Any, field: str, allow_none: bool = False) -> str:
    """A message content: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts."""
    if value is None and allow_none:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise FieldError(field, f"expected a string (or a list of text parts), got {json_type(value)}")


def _function_of(call: Any, field: str) -> dict:
    if not isinstance(call, dict):
        raise FieldError(field, f"expected an object, got {json_type(call)}")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise FieldError(f"{field}.function.name", "a tool call needs a function name (string)")
    return function


def _arguments(function: dict, field: str) -> dict:
    return parse_api_param(function.get("arguments", {}), f"{field}.function.arguments")


def _messages_of(record: dict) -> list:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "expected a non-empty array of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise FieldError(f"messages[{i}]", f"expected an object, got {json_type(message)}")
        if message.get("role") not in MESSAGE_ROLES:
            raise FieldError(f"messages[{i}].role",
                             f"expected one of {', '.join(MESSAGE_ROLES)}, got {message.get('role')!r}")
    return messages


# ---------------------------------------------------------------------------- builtin: messages -> ours

def messages_to_sample(record: dict) -> dict:
    """Our `conversation` / `conver_has_api` sample for a `messages` record (the builtin template).

    The result may carry `system` (leading system messages, joined by a blank line), which the seed's
    dialogue templates place right after their header; it is built valid, not checked by `validate_sample`.
    """
    messages = _messages_of(record)
    tools = record.get("tools")
    system: list[str] = []
    rounds: list[list] = []
    pending: dict | None = None  # the ans-api round being built: tool calls waiting for results / an answer

    def close_pending(field: str, why: str) -> None:
        if pending is not None:
            raise FieldError(field, f"{why}: the tool calls before it have no final assistant answer")

    for i, message in enumerate(messages):
        role, where = message["role"], f"messages[{i}]"
        if role == "system":
            if rounds or pending is not None:
                raise FieldError(f"{where}.role", "a system message after the conversation started "
                                                  "(the builtin template has system text only in its header)")
            system.append(_text(message.get("content"), f"{where}.content"))
        elif role == "user":
            close_pending(where, "user message")
            rounds.append(["ask", _text(message.get("content"), f"{where}.content")])
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            content = _text(message.get("content"), f"{where}.content", allow_none=bool(calls))
            if not isinstance(calls, list):
                raise FieldError(f"{where}.tool_calls", f"expected an array, got {json_type(calls)}")
            if calls:
                if pending is None:
                    pending = {"actions": []}
                elif any(action["api_res"] is _NO_RESULT for action in pending["actions"]):
                    raise FieldError(where, "new tool calls before the results of the previous ones")
                for k, call in enumerate(calls):
                    field = f"{where}.tool_calls[{k}]"
                    function = _function_of(call, field)
                    pending["actions"].append({"inner_thought": content if k == 0 else "",
                                               "api_name": function["name"],
                                               "api_param": _arguments(function, field),
                                               "api_res": _NO_RESULT, "id": call.get("id")})
            elif pending is not None:
                if any(action["api_res"] is _NO_RESULT for action in pending["actions"]):
                    raise FieldError(where, "an assistant answer before the results of its tool calls")
                pending["ans"] = content
                rounds.append(["ans-api", pending])
                pending = None
            else:
                rounds.append(["ans", content])
        else:  # tool
            waiting = [a for a in (pending or {"actions": []})["actions"] if a["api_res"] is _NO_RESULT]
            if not waiting:
                raise FieldError(where, "a tool message without a pending assistant tool call")
            call_id = message.get("tool_call_id")
            target = next((a for a in waiting if call_id is not None and a["id"] == call_id), waiting[0])
            content = message.get("content")
            target["api_res"] = content if content is not None else ""
    close_pending(f"messages[{len(messages) - 1}]", "end of the conversation")
    for round_ in rounds:
        if round_[0] == "ans-api":
            for action in round_[1]["actions"]:
                del action["id"]
    has_api = tools is not None or any(role == "ans-api" for role, _ in rounds)
    sample: dict[str, Any] = {"type": "conver_has_api" if has_api else "conversation", "rounds": rounds}
    if has_api:
        sample["api_desc"] = "" if tools is None else json.dumps(tools, indent=2, ensure_ascii=False)
    if system:
        sample["system"] = "\n\n".join(system)
    return sample


# ------------------------------------------------------------------------------- chat: ours -> messages

def _tools_from_api_desc(api_desc: str) -> list | None:
    """`api_desc` as a list of tool specs when it is JSON holding function specs; else None."""
    try:
        value = json.loads(api_desc)
    except (json.JSONDecodeError, TypeError):
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        return None
    tools = []
    for spec in value:
        if spec.get("type") == "function" and isinstance(spec.get("function"), dict):
            tools.append(spec)
        elif isinstance(spec.get("name"), str):
            tools.append({"type": "function", "function": spec})
        else:
            return None
    return tools


def sample_to_messages(sample: dict) -> tuple[list[dict], list | None]:
    """(messages, tools) of one of our samples, for `apply_chat_template` (not for `pretrain`)."""
    kind = sample["type"]
    if kind == "instruct":
        user = sample["instruct"] + ("\n" + sample["input"] if has_input(sample.get("input")) else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": sample["output"]}], None
    messages: list[dict] = []
    tools = None
    if kind == "ref_qa":
        messages.append({"role": "system", "content": sample["reference"]})
    elif kind == "conver_has_api":
        tools = _tools_from_api_desc(sample["api_desc"])
        if tools is None and sample["api_desc"].strip():
            messages.append({"role": "system", "content": sample["api_desc"]})
    calls = 0
    for role, value in sample["rounds"]:
        if role == "ask":
            messages.append({"role": "user", "content": value})
        elif role == "ans":
            messages.append({"role": "assistant", "content": value})
        else:  # ans-api
            for action in value["actions"]:
                calls += 1
                call_id = f"call_{calls}"
                messages.append({"role": "assistant", "content": action["inner_thought"], "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": action["api_name"], "arguments": parse_api_param(action["api_param"])}}]})
                messages.append({"role": "tool", "tool_call_id": call_id, "name": action["api_name"],
                                 "content": format_api_res(action["api_res"])})
            if "ans" in value:
                messages.append({"role": "assistant", "content": value["ans"]})
    return messages, tools


def record_to_messages(record: dict) -> tuple[list[dict], list | None]:
    """(messages, tools) of a `messages` record, as templates expect them: text contents, tool-call
    arguments as objects (templates serialise them with `tojson`)."""
    out = []
    for i, message in enumerate(_messages_of(record)):
        where = f"messages[{i}]"
        message = dict(message)
        calls = message.get("tool_calls")
        if not message.get("content") and calls:
            # OpenAI's `content: null` (loading normalizes it to ""): passed on as None, which transformers
            # drops, so templates see no content (DeepSeek-R1 branches on it); `_none_safe` falls back to ""
            message["content"] = None
        else:
            message["content"] = _text(message.get("content"), f"{where}.content",
                                       allow_none=bool(calls) or message["role"] == "tool")
        if calls:
            if not isinstance(calls, list):
                raise FieldError(f"{where}.tool_calls", f"expected an array, got {json_type(calls)}")
            fixed = []
            for k, call in enumerate(calls):
                field = f"{where}.tool_calls[{k}]"
                function = _function_of(call, field)
                fixed.append({**call, "type": "function",
                              "function": {**function, "arguments": _arguments(function, field)}})
            message["tool_calls"] = fixed
        out.append(message)
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise FieldError("tools", f"expected an array of tool specs, got {json_type(tools)}")
    return out, tools


def chat_messages(record: dict) -> tuple[list[dict], list | None]:
    return record_to_messages(record) if is_messages(record) else sample_to_messages(record)


# ------------------------------------------------------------------------------------- chat rendering
#
# The rule, for every template: the trained tokens of an assistant turn are what the model generates at
# inference for that turn, its text (reasoning, content, tool calls, as the template renders them) and the
# token that ends it (the template's end-of-turn token; where a template has none, the token that starts
# the next turn, or an eos appended after the last turn), nothing of system / user / tool text and nothing
# the template appends after the last turn (Phi-3's eos after `<|end|>`). A template with
# `{% generation %}` markers gives the span itself (`return_assistant_tokens_mask`), extended by the
# end-of-turn token when the span stops before it.
#
# Without markers each turn is located in the render of the whole conversation ("final render"), which is
# what the model sees in a conversation at inference: it starts where the render of the conversation before
# it plus the generation prompt stops matching (`messages[:i]` with `add_generation_prompt`), and ends at
# the template's first end-of-turn token. Reasoning templates that rewrite history (those that drop
# earlier turns' thinking blocks) render earlier turns without their reasoning, so earlier turns train without
# it, as the model sees them; a reasoning text the render drops is counted in a warning (`lost_content`).

SENTINEL = "\u2063"  # invisible separator: not whitespace (survives trim/strip), in no template's syntax
_PROBE_WORDS = ("zqa1", "zqb2", "zqc3", "zqd4", "zqe5")


def chat_template_of(tokenizer) -> str:
    """The tokenizer's chat template text; a one-line `DataError` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if not isinstance(template, str) or not template.strip():
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer {name!r} has no chat_template (template: chat needs one in its "
                        f"tokenizer_config.json or chat_template.jinja); use template: builtin")
    return template


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _special_ids(tokenizer) -> frozenset[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return frozenset(ids)


def _special_texts(tokenizer) -> list[str]:
    texts = set(t for t in (getattr(tokenizer, "all_special_tokens", []) or []) if isinstance(t, str) and t)
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False) and str(token):
            texts.add(str(token))
    return sorted(texts, key=len, reverse=True)


def _hint(message: str) -> str:
    """What to do about an error a template raised (`raise_exception(...)` or a jinja error)."""
    low = message.lower()
    if "system" in low and ("support" in low or "allow" in low):
        return "merge the system text into the first user message (this template has no system role), " \
               "or use template: builtin"
    if "alternate" in low:
        return "make the roles alternate user/assistant (merge consecutive messages of one role, tool " \
               "turns only where the template allows them), or use template: builtin"
    if "id" in low and "tool" in low:
        return "give tool calls and tool results the ids this template requires, or use template: builtin"
    return "reshape the record the way this model's chat template expects, or use template: builtin"


def _string_arguments(messages: list[dict]) -> list[dict] | None:
    """The messages with tool-call arguments as JSON strings (for templates that concatenate them, such as
    DeepSeek-R1's), or None when no call has object arguments."""
    out, changed = [], False
    for message in messages:
        calls = message.get("tool_calls")
        if calls and any(isinstance(c.get("function", {}).get("arguments"), dict) for c in calls):
            changed = True
            message = {**message, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"],
                                                                              ensure_ascii=False)}}
                if isinstance(c.get("function", {}).get("arguments"), dict) else c for c in calls]}
        out.append(message)
    return out if changed else None


def _apply(tokenizer, messages, tools, **kwargs):
    """`apply_chat_template`; a template error becomes one line with the template's message and what to do.
    Tool-call arguments go in as objects (transformers' documented shape); a template that fails on them
    and renders them as JSON strings instead (DeepSeek-R1 concatenates them) gets strings."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # jinja2 errors, `raise_exception(...)` in the template, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        retry = _string_arguments(messages)
        if retry is not None:
            try:
                return tokenizer.apply_chat_template(retry, tools=tools, **kwargs)
            except Exception:
                pass
    raise DataError(f"chat_template of tokenizer {_name(tokenizer)!r} refused the record: {first!r}; "
                    f"{_hint(first)}") from None


def _ids_of(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


def _snap(text: str, position: int, specials: list[str]) -> int:
    """`position`, moved back to the start of a special token's text it falls inside of (a character-level
    match can end in the middle of `<｜end▁of▁sentence｜>` where the other text has `<｜tool▁calls▁begin｜>`)."""
    for s in specials:
        k = text.rfind(s, max(0, position - len(s) + 1), position + len(s) - 1)
        if 0 <= k < position < k + len(s):
            return k
    return position


def _special_at(text: str, position: int, specials: list[str]) -> str | None:
    return next((s for s in specials if text.startswith(s, position)), None)


@dataclass(frozen=True)
class TurnEnds:
    """How a template ends an assistant turn: the end-of-turn token texts and ids (`<|im_end|>`,
    `<|eot_id|>`, `</s>`; with none, the next turn's start such as `<|user|>` / `<|observation|>`), and whether the last
    turn of a conversation ends with nothing (then training appends eos and `demo.py` stops on it)."""

    texts: tuple[str, ...]
    ids: frozenset[int]
    final_eos: bool


_TURN_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def turn_ends(tokenizer) -> TurnEnds:
    """`TurnEnds` of the tokenizer's chat template, read off probe conversations (cached per template)."""
    template = chat_template_of(tokenizer)
    cached = _TURN_ENDS.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    specials = _special_texts(tokenizer)
    q1, a1, q2, a2, r1 = _PROBE_WORDS
    found: list[str] = []
    final_eos = False

    def after(text: str, word: str):
        k = text.find(word)
        if k < 0:
            return None, False
        rest = text[k + len(word):]
        stripped = rest.lstrip()
        return _special_at(stripped, 0, specials), not stripped

    probes = [([{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                {"role": "user", "content": q2}, {"role": "assistant", "content": a2}], (a1, a2)),
              ([{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                {"role": "tool", "content": r1}], (a1,))]
    for messages, words in probes:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template without tool turns, or one refusing the probe: nothing learned
            continue
        for word in words:
            token, at_end = after(text, word)
            if token is not None and token not in found:
                found.append(token)
            final_eos = final_eos or (at_end and word == words[-1] and len(words) > 1)
    ids = frozenset(int(tokenizer.convert_tokens_to_ids(t)) for t in found)
    ends = TurnEnds(tuple(sorted(found, key=len, reverse=True)), ids, final_eos)
    _TURN_ENDS[tokenizer] = (template, ends)
    return ends


def _not_located(tokenizer, i: int, why: str) -> DataError:
    return DataError(f"chat_template of tokenizer {_name(tokenizer)!r}: assistant turn messages[{i}] cannot be "
                     f"located in the render of the whole conversation ({why}); add {{% generation %}} markers "
                     f"to the template or use template: builtin")


class _Turns:
    """Locates every assistant turn of one conversation in its final render (see the section comment)."""

    def __init__(self, messages: list[dict], tools, tokenizer):
        self.messages, self.tools, self.tokenizer = messages, tools, tokenizer
        self.full = self.render(messages)
        self.ends = turn_ends(tokenizer)
        self.specials = _special_texts(tokenizer)

    def render(self, messages: list[dict], generation: bool = False) -> str:
        return _apply(self.tokenizer, messages, self.tools, tokenize=False, add_generation_prompt=generation)

    def content_end(self, messages: list[dict], k: int, text: str, generation: bool) -> int | None:
        """Where message k's content ends in `text` (the render of `messages`): found by rendering it with
        an invisible character appended; None when the template does not render it there."""
        altered = list(messages)
        altered[k] = {**messages[k], "content": (messages[k].get("content") or "") + SENTINEL}
        try:
            other = self.render(altered, generation)
        except DataError:
            return None
        end = len(text) - _common_suffix(text, other)
        if len(other) != len(text) + len(SENTINEL) or other[:end] != text[:end] or \
                other[end:end + len(SENTINEL)] != SENTINEL:
            return None
        return end

    def content_start(self, k: int) -> int | None:
        """Where message k's content starts in the full render (an invisible character put in front)."""
        altered = list(self.messages)
        altered[k] = {**self.messages[k], "content": SENTINEL + (self.messages[k].get("content") or "")}
        try:
            other = self.render(altered)
        except DataError:
            return None
        start = _common_prefix(self.full, other)
        return start if other[start:start + len(SENTINEL)] == SENTINEL else None

    def start(self, i: int) -> int:
        """Where assistant turn i starts: the end of `messages[:i]` rendered with the generation prompt, as
        far as the full render shows it (DeepSeek-R1's prompt ends in `<think>\\n`, which its full render
        drops); a template that renders earlier turns differently (a system text that moves to the
        last user message) is matched from the end of the previous message's content."""
        before = self.render(self.messages[:i], generation=True)
        if self.full.startswith(before):
            return len(before)
        base = self.render(self.messages[:i]) if i else ""
        prompt_from = _common_prefix(before, base)  # the generation prompt: before[prompt_from:]
        matched = _snap(self.full, _common_prefix(before, self.full), self.specials)
        if matched >= prompt_from:
            return matched
        if i == 0:
            raise _not_located(self.tokenizer, i, "the generation prompt does not match the render")
        end_full = self.content_end(self.messages, i - 1, self.full, False)
        end_before = self.content_end(self.messages[:i], i - 1, before, True)
        if end_full is None or end_before is None:
            raise _not_located(self.tokenizer, i, "the template renders earlier turns differently when more follow")
        tail = before[end_before:]
        k = _snap(self.full, end_full + _common_prefix(tail, self.full[end_full:]), self.specials) - end_full
        content = self.content_start(i)
        reached = end_before + k > prompt_from or prompt_from == len(before)  # into the generation prompt
        if end_before + k < prompt_from or not reached or (content is not None and end_full + k > content):
            raise _not_located(self.tokenizer, i, "the template renders earlier turns differently when more follow")
        return end_full + k

    def end(self, i: int, start: int, limit: int) -> tuple[int, bool]:
        """(end, append_eos) of assistant turn i: through its first end-of-turn token before `limit` (the next
        message's content); a turn without one ends where the render of `messages[:i+1]` stops matching,
        plus the special token that follows (the next turn's start), or, at the very end, with an appended eos."""
        positions = [(self.full.find(t, start, limit), t) for t in self.ends.texts]
        positions = [(p, t) for p, t in positions if p >= 0]
        if positions:
            p, t = min(positions)
            return p + len(t), False
        through = self.render(self.messages[:i + 1])
        e = max(_snap(self.full, _common_prefix(through, self.full), self.specials), start)
        e = start + len(self.full[start:e].rstrip())
        rest = self.full[e:]
        stripped = rest.lstrip()
        if not stripped:
            return e, True
        token = _special_at(stripped, 0, self.specials)
        if token is not None:
            return e + len(rest) - len(stripped) + len(token), False
        if e <= start:
            raise _not_located(self.tokenizer, i, "no end-of-turn token follows it")
        return e, False

    def spans(self) -> tuple[list[tuple[int, int]], bool, dict[int, tuple[int, int]]]:
        assistants = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]
        starts = {i: self.start(i) for i in assistants}
        spans, by_message, append_eos = [], {}, False
        for n, i in enumerate(assistants):
            start = starts[i]
            limit = starts[assistants[n + 1]] if n + 1 < len(assistants) else len(self.full)
            if i + 1 < len(self.messages) and self.messages[i + 1]["role"] != "assistant":
                content = self.content_start(i + 1)
                if content is not None and start < content < limit:
                    limit = content
            end, eos = self.end(i, start, limit)
            if eos and end < len(self.full.rstrip()):
                eos = False
            spans.append((start, end))
            by_message[i] = (start, end)
            append_eos = append_eos or eos
        return spans, append_eos, by_message


def _reasoning_and_answer(message: dict) -> tuple[str, str]:
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") if isinstance(message.get("reasoning_content"), str) else ""
    if "</think>" in content:
        head, content = content.split("</think>", 1)[0], content.split("</think>")[-1]
        reasoning = reasoning or head.split("<think>")[-1]
    return reasoning, content


def lost_parts(messages: list[dict], full: str, turns: dict[int, tuple[int, int]] | None = None,
               trained_text: str | None = None) -> list[str]:
    """Record text the render does not show: assistant reasoning, content or tool calls (looked for in the
    turn's own span when `turns` gives it, else in `trained_text`), system / user / tool contents.
    `messages[2] reasoning`, ..."""
    lost = []
    for i, message in enumerate(messages):
        role = message["role"]
        where = full
        if role == "assistant":
            if turns is not None and i in turns:
                where = full[turns[i][0]:turns[i][1]]
            elif trained_text is not None:
                where = trained_text
            reasoning, answer = _reasoning_and_answer(message)
            parts = [("reasoning", reasoning), ("content", answer)]
            for call in message.get("tool_calls") or []:
                name = call.get("function", {}).get("name", "")
                parts.append((f"tool call {name}", name))
        else:
            parts = [("content", message.get("content") or "")]
        for label, text in parts:
            if text.strip() and text.strip() not in where:
                lost.append(f"messages[{i}] {label}" if role == "assistant" else f"messages[{i}] ({role}) content")
    return lost


@dataclass
class ChatRender:
    """A record under its chat template: token ids, which are trained, and what of the record the render
    lost (`lost_parts`)."""

    ids: list[int]
    trained: list[bool]
    lost: list[str]


def _by_mask(messages, tools, tokenizer) -> ChatRender:
    """Ids and trained flags from the template's own `{% generation %}` mask, each span extended by the
    end-of-turn token right after it (whitespace between skipped) when the span stops before it."""
    out = _apply(tokenizer, messages, tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = _ids_of(out)
    mask = out["assistant_masks"]
    if mask and isinstance(mask[0], list):
        mask = mask[0]
    trained = [bool(m) for m in mask]
    ends = turn_ends(tokenizer)

    def blank(k: int) -> bool:
        return not tokenizer.decode([ids[k]], skip_special_tokens=False).strip()

    n = len(ids)
    for j in range(n):
        if not trained[j] or (j + 1 < n and trained[j + 1]):
            continue
        last = j
        while last > 0 and trained[last - 1] and blank(last):
            last -= 1
        if ids[last] in ends.ids:
            continue
        k = j + 1
        while k < n and blank(k) and ids[k] not in ends.ids:
            k += 1
        if k < n and ids[k] in ends.ids:
            trained[k] = True
    if trained and trained[-1] and ids[-1] not in ends.ids and ends.final_eos:
        ids.append(int(tokenizer.eos_token_id))
        trained.append(True)
    text = _apply(tokenizer, messages, tools, tokenize=False)
    trained_text = tokenizer.decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    return ChatRender(ids, trained, lost_parts(messages, text, trained_text=trained_text))


def _by_turns(messages, tools, tokenizer) -> ChatRender:
    """Ids and trained flags of the final render, each assistant turn located by `_Turns`."""
    turns = _Turns(messages, tools, tokenizer)
    spans, append_eos, by_message = turns.spans()
    try:
        encoded = tokenizer(turns.full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(f"template: chat with a chat_template without {{% generation %}} markers needs a fast "
                        f"tokenizer (offsets); {_name(tokenizer)!r} is not one") from None
    ids = [int(i) for i in encoded["input_ids"]]
    trained = [any(s <= begin < e for s, e in spans) for begin, _ in encoded["offset_mapping"]]
    if append_eos:  # the last turn ends with nothing (no end-of-turn token): the model learns to stop on eos
        ids.append(int(tokenizer.eos_token_id))
        trained.append(True)
    return ChatRender(ids, trained, lost_parts(messages, turns.full, by_message))


def uses_generation_mask(tokenizer) -> bool:
    return bool(_GENERATION.search(chat_template_of(tokenizer)))


def _none_safe(messages: list[dict], tools, tokenizer) -> list[dict]:
    """An assistant `content: null` (with tool calls) goes in as None, OpenAI's shape as transformers passes
    it (DeepSeek-R1 renders its tool calls only then); a template that cannot take None, or prints it as the
    text "None" (some tool-call templates), gets "" instead."""
    if not any(m["role"] == "assistant" and m.get("content") is None for m in messages):
        return messages
    empty = [{**m, "content": ""} if m["role"] == "assistant" and m.get("content") is None else m for m in messages]
    try:
        with_none = _apply(tokenizer, messages, tools, tokenize=False)
    except DataError:
        return empty
    try:
        with_empty = _apply(tokenizer, empty, tools, tokenize=False)
    except DataError:
        return messages
    return empty if with_none.count("None") > with_empty.count("None") else messages


def chat_render(record: dict, tokenizer) -> ChatRender:
    """A record (not `pretrain`) rendered with the tokenizer's chat template (see the section comment)."""
    try:
        messages, tools = chat_messages(record)
    except FieldError as err:
        raise DataError(f"sample ({record_kind(record)}): {err}") from None
    messages = _none_safe(messages, tools, tokenizer)
    if uses_generation_mask(tokenizer):
        return _by_mask(messages, tools, tokenizer)
    return _by_turns(messages, tools, tokenizer)


def chat_ids(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a record (not `pretrain`) rendered with the tokenizer's chat template, and which are trained."""
    rendered = chat_render(record, tokenizer)
    return rendered.ids, rendered.trained


def end_of_turn_id(ids: list[int], trained: list[bool], tokenizer, eos_id: int) -> int:
    """The token a truncated chat sample ends with: the last token of the first trained span when it is an
    end-of-turn (or other special) token, else eos."""
    stops = turn_ends(tokenizer).ids | _special_ids(tokenizer)
    for i, flag in enumerate(trained):
        if flag and (i + 1 == len(trained) or not trained[i + 1]):
            return ids[i] if ids[i] in stops else eos_id
    return eos_id


def chat_stop_ids(tokenizer) -> frozenset[int]:
    """The tokens `demo.py --template chat` stops on: the end-of-turn tokens training teaches (`TurnEnds`),
    and eos where the template ends a conversation's last turn with nothing (training appends eos there)."""
    ends = turn_ends(tokenizer)
    return ends.ids | (frozenset({int(tokenizer.eos_token_id)}) if ends.final_eos else frozenset())


def chat_prompt(messages: list[dict], tokenizer, tools: list | None = None) -> str:
    """The inference prompt: the conversation so far rendered with the generation prompt, exactly the
    text training renders before the next assistant message."""
    chat_template_of(tokenizer)
    return _apply(tokenizer, messages, tools, tokenize=False, add_generation_prompt=True)
