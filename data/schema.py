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
    """Raise `FieldError` for the first problem in `sample`; return its type. No tokenizer needed."""
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
