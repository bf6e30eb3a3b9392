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


def _apply(tokenizer, messages, tools, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # jinja2 errors, `raise_exception(...)` in the template, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"chat_template of tokenizer {_name(tokenizer)!r} failed: {first}") from None


def _ids_of(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _by_mask(messages, tools, tokenizer) -> tuple[list[int], list[bool]]:
    """Ids and trained flags from the template's own `{% generation %}` mask, each span extended by the
    special token (the end of turn) the template emits right after it when the span does not hold it."""
    out = _apply(tokenizer, messages, tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = _ids_of(out)
    mask = out["assistant_masks"]
    if mask and isinstance(mask[0], list):
        mask = mask[0]
    trained = [bool(m) for m in mask]
    special = _special_ids(tokenizer)
    for i in range(len(ids) - 1):
        if trained[i] and not trained[i + 1] and ids[i] not in special and ids[i + 1] in special:
            trained[i + 1] = True
    return ids, trained


def _by_prefixes(messages, tools, tokenizer) -> tuple[list[int], list[bool]]:
    """Ids and trained flags from prefix renders: assistant message i spans from the end of
    `messages[:i]` + generation prompt to the end of `messages[:i+1]`, minus whitespace after its last
    special token (ChatML's newline after `<|im_end|>`)."""
    def render(upto: int, generation: bool) -> str:
        return _apply(tokenizer, messages[:upto], tools, tokenize=False, add_generation_prompt=generation)

    full = render(len(messages), False)
    specials = _special_texts(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(i, True), render(i + 1, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"chat_template of tokenizer {_name(tokenizer)!r} is not prefix-stable: rendering messages[:{i}] "
                f"with the generation prompt, then messages[:{i + 1}], does not extend the text (the template "
                f"changes earlier turns), so the assistant turns cannot be located; add {{% generation %}} "
                f"markers to the template or use template: builtin")
        start, end = len(before), len(through)
        kept = full[start:end].rstrip()
        if any(kept.endswith(s) for s in specials):
            end = start + len(kept)
        spans.append((start, end))
    try:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(f"template: chat with a chat_template without {{% generation %}} markers needs a fast "
                        f"tokenizer (offsets); {_name(tokenizer)!r} is not one") from None
    ids = [int(i) for i in encoded["input_ids"]]
    trained = [any(s <= begin < e for s, e in spans) for begin, _ in encoded["offset_mapping"]]
    return ids, trained


def uses_generation_mask(tokenizer) -> bool:
    return bool(_GENERATION.search(chat_template_of(tokenizer)))


def chat_ids(record: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a record (not `pretrain`) rendered with the tokenizer's chat template, and which are trained."""
    try:
        messages, tools = chat_messages(record)
    except FieldError as err:
        raise DataError(f"sample ({record_kind(record)}): {err}") from None
    if uses_generation_mask(tokenizer):
        return _by_mask(messages, tools, tokenizer)
    return _by_prefixes(messages, tools, tokenizer)


def end_of_turn_id(ids: list[int], trained: list[bool], tokenizer, eos_id: int) -> int:
    """The template's end-of-turn token: the last token of the first trained span when it is a special
    token (`<|eot_id|>`, `<|im_end|>`, `</s>`), else eos. A truncated chat sample ends with it."""
    special = _special_ids(tokenizer)
    for i, flag in enumerate(trained):
        if flag and (i + 1 == len(trained) or not trained[i + 1]):
            return ids[i] if ids[i] in special else eos_id
    return eos_id


def chat_prompt(messages: list[dict], tokenizer, tools: list | None = None) -> str:
    """The inference prompt: the conversation so far rendered with the generation prompt, exactly the
    text training renders before the next assistant message."""
    chat_template_of(tokenizer)
    return _apply(tokenizer, messages, tools, tokenize=False, add_generation_prompt=True)
