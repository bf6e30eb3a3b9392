"""What a valid training sample looks like, checked before any tokenization.

Validation is cheap and runs over every sample at load time, so a typo in sample 90 000 stops the
run on the login node instead of an hour into training on the GPUs. The shapes are tables
(`FIELDS`, `ROLES`, `ACTION_FIELDS`); the functions only walk them. Every problem is reported as a
`FieldError` carrying a JSON-path-like field name (`rounds[3][1].actions[0].api_param`); the loader
adds the file and sample index and turns it into a `DataError`.
"""
from __future__ import annotations

import json
from typing import Any

REQUIRED, OPTIONAL = True, False

STRING = (str,)
ROUNDS = "rounds"  # marker: a list of [role, value] pairs, checked by `_check_rounds`

# type -> {field: (kind, required)}; "type" itself is implied.
FIELDS: dict[str, dict[str, tuple[Any, bool]]] = {
    "pretrain": {"text": (STRING, REQUIRED)},
    "instruct": {"instruct": (STRING, REQUIRED), "input": (STRING, OPTIONAL), "output": (STRING, REQUIRED)},
    "conversation": {"rounds": (ROUNDS, REQUIRED)},
    "conver_has_api": {"api_desc": (STRING, REQUIRED), "rounds": (ROUNDS, REQUIRED)},
    "ref_qa": {"reference": (STRING, REQUIRED), "rounds": (ROUNDS, REQUIRED)},
}
SAMPLE_TYPES = tuple(FIELDS)

# Roles accepted in the rounds of each conversational type.
ROLES: dict[str, tuple[str, ...]] = {
    "conversation": ("ask", "ans"),
    "conver_has_api": ("ask", "ans", "ans-api"),
    "ref_qa": ("ask", "ans"),
}
ANSWER_ROLES = ("ans", "ans-api")

# The object that is the value of an `ans-api` round, and each of its actions.
API_ANSWER_FIELDS = {"actions": REQUIRED, "ans": REQUIRED}
ACTION_FIELDS: dict[str, tuple[Any, bool]] = {
    "inner_thought": (STRING, REQUIRED),
    "api_name": (STRING, REQUIRED),
    "api_param": (None, REQUIRED),  # an object or a JSON string holding one: `parse_api_param`
    "api_res": (None, REQUIRED),  # any JSON value
}

_JSON_NAMES = {str: "string", list: "array", dict: "object", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


class DataError(ValueError):
    """A problem with the training data or tokenizer that the user must fix; message says where."""


class FieldError(ValueError):
    """A problem inside one sample; `field` is the path to it, filled in with file/index by the caller."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages the user can map back to the file."""
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _expect(value: Any, kinds: tuple[type, ...], field: str) -> None:
    if not isinstance(value, kinds):
        names = " or ".join(dict.fromkeys(_JSON_NAMES.get(k, k.__name__) for k in kinds))
        raise FieldError(field, f"expected {names}, got {json_type(value)}")


def _check_keys(obj: dict, allowed: dict, required: list[str], prefix: str) -> None:
    """Unknown keys are errors: a misspelt optional field (`inputs`) would otherwise vanish silently."""
    for key in obj:
        if key not in allowed:
            raise FieldError(f"{prefix}{key}", f"unknown field (expected {', '.join(allowed)})")
    for key in required:
        if key not in obj:
            raise FieldError(f"{prefix}{key}", "missing required field")


def sample_type(sample: Any) -> str:
    """Check that `sample` is an object with a known `type` and return that type."""
    if not isinstance(sample, dict):
        raise FieldError("", f"expected an object, got {json_type(sample)}")
    if "type" not in sample:
        raise FieldError("type", f"missing required field (expected one of {', '.join(SAMPLE_TYPES)})")
    kind = sample["type"]
    if not isinstance(kind, str) or kind not in FIELDS:
        raise FieldError("type", f"unknown type {kind!r} (expected {', '.join(SAMPLE_TYPES)})")
    return kind


def validate_sample(sample: Any) -> str:
    """Raise `FieldError` for the first problem in `sample`; return its type. No tokenizer needed.

    A normalized messages record (`{"messages": [...], "tools"?: [...]}`, see `normalize_record`) is
    accepted too and gives `"messages"`.
    """
    if isinstance(sample, dict) and "type" not in sample and "messages" in sample:
        validate_messages(sample)
        return MESSAGES
    kind = sample_type(sample)
    fields = FIELDS[kind]
    _check_keys(sample, {"type": None, **fields}, [f for f, (_, req) in fields.items() if req], "")
    for name, (shape, _) in fields.items():
        if name not in sample or (sample[name] is None and not fields[name][1]):
            continue
        if shape is ROUNDS:
            _check_rounds(sample[name], ROLES[kind], name)
        else:
            _expect(sample[name], shape, name)
    if kind == "pretrain" and not sample["text"].strip():
        raise FieldError("text", "empty document")
    return kind


def _check_rounds(rounds: Any, roles: tuple[str, ...], field: str) -> None:
    _expect(rounds, (list,), field)
    if not rounds:
        raise FieldError(field, "empty list of rounds")
    for i, pair in enumerate(rounds):
        where = f"{field}[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            raise FieldError(where, f"expected a [role, text] pair, got {_describe(pair)}")
        role, value = pair
        if role not in roles:
            hint = "; 'ans-api' needs type conver_has_api" if role == "ans-api" else ""
            raise FieldError(f"{where}[0]", f"unknown role {role!r} (expected {', '.join(roles)}{hint})")
        if role == "ans-api":
            check_api_answer(value, f"{where}[1]")
        else:
            _expect(value, STRING, f"{where}[1]")
    if not any(role in ANSWER_ROLES for role, _ in rounds):
        raise FieldError(field, "no 'ans' round, so nothing in this sample would be trained")


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"an array of {len(value)}"
    return json_type(value)


def check_api_answer(value: Any, field: str, need_ans: bool = True) -> None:
    """Check the `{"actions": [...], "ans": ...}` object of an `ans-api` round."""
    if not isinstance(value, dict):
        raise FieldError(field, f"'ans-api' needs an object with 'actions' and 'ans', got {json_type(value)}")
    required = [k for k, req in API_ANSWER_FIELDS.items() if req and (need_ans or k != "ans")]
    _check_keys(value, API_ANSWER_FIELDS, required, f"{field}.")
    _expect(value["actions"], (list,), f"{field}.actions")
    if not value["actions"]:
        raise FieldError(f"{field}.actions", "empty list of actions")
    if "ans" in value:
        _expect(value["ans"], STRING, f"{field}.ans")
    for j, action in enumerate(value["actions"]):
        where = f"{field}.actions[{j}]"
        _expect(action, (dict,), where)
        _check_keys(action, ACTION_FIELDS, [k for k, (_, req) in ACTION_FIELDS.items() if req], f"{where}.")
        for name, (kinds, _) in ACTION_FIELDS.items():
            if kinds is not None:
                _expect(action[name], kinds, f"{where}.{name}")
        if not action["api_name"].strip():
            raise FieldError(f"{where}.api_name", "empty tool name")
        parse_api_param(action["api_param"], f"{where}.api_param")


def parse_api_param(value: Any, field: str = "api_param") -> dict:
    """Return the keyword arguments of a tool call: an object, or a JSON string holding one.

    Keys become Python keyword names in the rendered call, so they must be identifiers.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FieldError(field, f"string is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise FieldError(field, f"JSON string must hold an object, got {json_type(value)}")
    elif not isinstance(value, dict):
        raise FieldError(field, f"expected an object or a JSON string holding one, got {json_type(value)}")
    for key in value:
        if not key.isidentifier():
            raise FieldError(field, f"parameter name {key!r} is not a Python identifier")
    return value


# ---------------------------------------------------------------------------------------------- record kinds
# A file's records are ours (`{"type": ...}`) or one of the ecosystem's formats, told apart per record by
# their keys (`record_kind`). `normalize_record` validates a record of any kind and returns what the rest
# of the code sees: our sample dict (Alpaca becomes an `instruct` sample) or a normalized messages record
#     {"messages": [{"role": ..., "content": str, ...}, ...], "tools": [...]}   ("tools" only when given).

OURS, MESSAGES, SHAREGPT, ALPACA = "ours", "messages", "sharegpt", "alpaca"
RECORD_KINDS = (OURS, MESSAGES, SHAREGPT, ALPACA)
KIND_NAMES = {OURS: 'our {"type": ...}', MESSAGES: '{"messages": [...]} (OpenAI/TRL)',
              SHAREGPT: '{"conversations": [...]} (ShareGPT)', ALPACA: '{"instruction", "output"} (Alpaca)'}

MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# message key -> roles that may carry it
MESSAGE_FIELDS = {"role": MESSAGE_ROLES, "content": MESSAGE_ROLES, "tool_calls": ("assistant",),
                  "tool_call_id": ("tool",), "name": MESSAGE_ROLES}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "function_call": "assistant",
                  "observation": "tool"}
TOOL_CALL_FIELDS = ("type", "function", "id")
FUNCTION_FIELDS = ("name", "arguments")


def record_kind(record: Any) -> str:
    """Which format a parsed record is in (`OURS`, `MESSAGES`, `SHAREGPT`, `ALPACA`); `FieldError` if none."""
    if not isinstance(record, dict):
        raise FieldError("", f"expected an object, got {json_type(record)}")
    if "type" in record:
        return OURS
    if "messages" in record:
        return MESSAGES
    if "conversations" in record:
        return SHAREGPT
    if "instruction" in record:
        return ALPACA
    raise FieldError("type", f"missing required field (expected one of {', '.join(SAMPLE_TYPES)}; "
                             "or a record with 'messages', 'conversations' or 'instruction' + 'output')")


def _present(record: dict, key: str) -> bool:
    """A key that holds a value (parquet rows of mixed shapes fill absent fields with null)."""
    return record.get(key) is not None


def _json_field(value: Any, field: str) -> Any:
    """A value that may come as a JSON string (a parquet/CSV column of serialized lists)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise FieldError(field, f"string is not valid JSON: {exc}") from None
    return value


def normalize_record(record: Any) -> tuple[str, dict]:
    """Validate a record of any kind; `(kind, normalized record)`, or `FieldError` naming the field.

    Ours and Alpaca give our sample dict (validated by `validate_sample`); messages and ShareGPT give
    `{"messages": [...], "tools": [...]}` (validated by `validate_messages`). Top-level keys the ecosystem's
    formats do not define (`id`, `source`, a rendered `text`...) are ignored; inside a message nothing unknown
    is accepted.
    """
    kind = record_kind(record)
    if kind == OURS:
        validate_sample(record)
        return kind, record
    if kind == ALPACA:
        return kind, _alpaca(record)
    if kind == SHAREGPT:
        messages = _sharegpt_messages(_json_field(record["conversations"], "conversations"))
    else:
        messages = _json_field(record["messages"], "messages")
    out = {"messages": messages}
    if _present(record, "tools"):
        out["tools"] = _json_field(record["tools"], "tools")
    return kind, validate_messages(out, normalize=True)


def _alpaca(record: dict) -> dict:
    for key in ("instruction", "output"):
        if not _present(record, key):
            raise FieldError(key, "missing required field (an Alpaca record has instruction, input?, output)")
        _expect(record[key], STRING, key)
    sample = {"type": "instruct", "instruct": record["instruction"]}
    if _present(record, "input"):
        _expect(record["input"], STRING, "input")
        sample["input"] = record["input"]
    sample["output"] = record["output"]
    validate_sample(sample)
    return sample


def _sharegpt_messages(turns: Any) -> list[dict]:
    _expect(turns, (list,), "conversations")
    if not turns:
        raise FieldError("conversations", "empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        _expect(turn, (dict,), where)
        turn = {k: v for k, v in turn.items() if v is not None}
        _check_keys(turn, {"from": None, "value": None}, ["from", "value"], f"{where}.")
        source = turn["from"]
        if source not in SHAREGPT_ROLES:
            raise FieldError(f"{where}.from", f"unknown role {source!r} (expected {', '.join(SHAREGPT_ROLES)})")
        role = SHAREGPT_ROLES[source]
        value = turn["value"]
        if source == "function_call":
            call = _json_field(value, f"{where}.value")
            calls = call if isinstance(call, list) else [call]
            tool_calls = []
            for j, one in enumerate(calls):
                at = f"{where}.value" + (f"[{j}]" if isinstance(call, list) else "")
                _expect(one, (dict,), at)
                _check_keys(one, {"name": None, "arguments": None}, ["name"], f"{at}.")
                tool_calls.append({"type": "function",
                                   "function": {"name": one["name"], "arguments": one.get("arguments", {})}})
            messages.append({"role": role, "content": "", "tool_calls": tool_calls})
        else:
            _expect(value, STRING, f"{where}.value")
            messages.append({"role": role, "content": value})
    return messages


def validate_messages(record: Any, normalize: bool = False) -> dict:
    """Check a `{"messages": [...], "tools"?: [...]}` record; with `normalize`, return its normalized copy.

    Normalized: null-valued keys dropped, an assistant's missing/null `content` with `tool_calls` -> "",
    each tool call `{"type": "function", "function": {"name": str, "arguments": object}}` (+ `"id"` if
    given; `arguments` given as a JSON string is parsed), `tools` a list of objects.
    """
    if not isinstance(record, dict):
        raise FieldError("", f"expected an object, got {json_type(record)}")
    if not normalize:
        _check_keys(record, {"messages": None, "tools": None}, ["messages"], "")
    messages = record.get("messages")
    _expect(messages, (list,), "messages")
    if not messages:
        raise FieldError("messages", "empty list of messages")
    out_messages = []
    for i, message in enumerate(messages):
        out_messages.append(_check_message(message, f"messages[{i}]"))
    if not any(m["role"] == "assistant" for m in out_messages):
        raise FieldError("messages", "no assistant message, so nothing in this sample would be trained")
    out = {"messages": out_messages}
    if record.get("tools") is not None:
        out["tools"] = _check_tools(record["tools"])
    return out if normalize else record


def _check_message(message: Any, where: str) -> dict:
    _expect(message, (dict,), where)
    message = {k: v for k, v in message.items() if v is not None}
    if "role" not in message:
        raise FieldError(f"{where}.role", f"missing required field (expected {', '.join(MESSAGE_ROLES)})")
    role = message["role"]
    if role not in MESSAGE_ROLES:
        raise FieldError(f"{where}.role", f"unknown role {role!r} (expected {', '.join(MESSAGE_ROLES)})")
    for key in message:
        if key not in MESSAGE_FIELDS:
            raise FieldError(f"{where}.{key}", f"unknown field (expected {', '.join(MESSAGE_FIELDS)})")
        if role not in MESSAGE_FIELDS[key]:
            raise FieldError(f"{where}.{key}", f"only {' or '.join(MESSAGE_FIELDS[key])} messages may have {key!r}")
    out = {"role": role}
    if "tool_calls" in message:
        out["content"] = message.get("content", "")
    elif "content" not in message:
        raise FieldError(f"{where}.content", "missing required field")
    else:
        out["content"] = message["content"]
    _expect(out["content"], STRING, f"{where}.content")
    for key in ("name", "tool_call_id"):
        if key in message:
            _expect(message[key], STRING, f"{where}.{key}")
            out[key] = message[key]
    if "tool_calls" in message:
        out["tool_calls"] = _check_tool_calls(message["tool_calls"], f"{where}.tool_calls")
    return out


def _check_tool_calls(calls: Any, where: str) -> list[dict]:
    _expect(calls, (list,), where)
    if not calls:
        raise FieldError(where, "empty list of tool calls")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        _expect(call, (dict,), at)
        call = {k: v for k, v in call.items() if v is not None}
        _check_keys(call, dict.fromkeys(TOOL_CALL_FIELDS), ["function"], f"{at}.")
        if call.get("type", "function") != "function":
            raise FieldError(f"{at}.type", f"expected 'function', got {call['type']!r}")
        function = call["function"]
        _expect(function, (dict,), f"{at}.function")
        function = {k: v for k, v in function.items() if v is not None}
        _check_keys(function, dict.fromkeys(FUNCTION_FIELDS), ["name"], f"{at}.function.")
        _expect(function["name"], STRING, f"{at}.function.name")
        if not function["name"].strip():
            raise FieldError(f"{at}.function.name", "empty tool name")
        arguments = _json_field(function.get("arguments", {}), f"{at}.function.arguments")
        if not isinstance(arguments, dict):
            raise FieldError(f"{at}.function.arguments",
                             f"expected an object or a JSON string holding one, got {json_type(arguments)}")
        one = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if "id" in call:
            _expect(call["id"], STRING, f"{at}.id")
            one["id"] = call["id"]
        out.append(one)
    return out


def _check_tools(tools: Any) -> list[dict]:
    tools = _json_field(tools, "tools")
    _expect(tools, (list,), "tools")
    for j, tool in enumerate(tools):
        _expect(tool, (dict,), f"tools[{j}]")
        spec = tool.get("function", tool) if isinstance(tool.get("function"), dict) else tool
        if not isinstance(spec.get("name"), str) or not spec["name"].strip():
            raise FieldError(f"tools[{j}]", "a tool needs a 'name' (or 'function': {'name': ...})")
    return tools
