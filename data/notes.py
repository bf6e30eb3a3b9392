"""Warnings about samples that load and render but probably do not train as their author meant.

None of these stops loading (the samples are valid), but each used to pass without a word:

- `untrained`: a sample whose every trained token lies past `max_seq_len`; after truncation it
  contributes nothing to the loss (a file made only of such samples trains with loss 0.0).
- `trailing_ask`: a dialogue that ends with an `ask` round; that last question is never answered.
- `leading_ans`: a dialogue that starts with an answer (`ans` / `ans-api`), an answer to no question.
- `duplicate_key`: a JSON object with the same key twice; JSON keeps only the last value.
- `lost_content`: under `template: chat`, record text the chat template does not render (`data.chat.lost_parts`):
  an assistant's reasoning that a reasoning template drops from earlier turns, a tool call a template has no
  place for, a system message a template moves or drops.

A `Notes` collects, per kind, how many samples have the problem and where the first few are (line
numbers for `.jsonl`, sample indices and lines for `.json`). Notes of consecutive chunks of a file
merge in order, so parallel checking reports exactly what a sequential one does.
"""
from __future__ import annotations

from typing import Any

from .schema import ANSWER_ROLES

FIRST = 3  # positions listed per kind

MESSAGES = {
    "untrained": "have no trained token after truncation to max_seq_len {max_seq_len}",
    "trailing_ask": "end with an 'ask' round, which is never answered or trained",
    "leading_ans": "start with an answer round ('ans' or 'ans-api') that answers no question",
    "duplicate_key": "repeat a key in one JSON object; only the last value is kept",
    "lost_content": "have message text the chat template does not render (assistant reasoning, content or tool "
                    "calls; system or user text), which is therefore not trained or not seen",
}
KINDS = tuple(MESSAGES)


def round_notes(sample: dict) -> list[str]:
    """The dialogue-shape kinds (`trailing_ask`, `leading_ans`) that apply to a validated sample."""
    rounds = sample.get("rounds")
    if not rounds or sample.get("type") == "pretrain":
        return []
    kinds = []
    if rounds[0][0] in ANSWER_ROLES:
        kinds.append("leading_ans")
    if rounds[-1][0] == "ask":
        kinds.append("trailing_ask")
    return kinds


class Notes:
    """Counts and first positions of noted samples, per kind, for one file."""

    def __init__(self, path: str, by_line: bool):
        self.path = path
        self.by_line = by_line  # .jsonl: positions are lines; .json: sample indices (with lines when known)
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.first: dict[str, list[tuple[int, int | None, Any]]] = {kind: [] for kind in KINDS}

    def add(self, kind: str, index: int, line: int | None, detail: Any = None) -> None:
        self.counts[kind] += 1
        if len(self.first[kind]) < FIRST:
            self.first[kind].append((index, line, detail))

    def merge(self, other: "Notes") -> None:
        """Append the notes of the chunk that follows this one in the file."""
        for kind in KINDS:
            self.counts[kind] += other.counts[kind]
            room = FIRST - len(self.first[kind])
            if room > 0:
                self.first[kind].extend(other.first[kind][:room])

    def count(self, kind: str) -> int:
        return self.counts[kind]

    def positions(self, kind: str) -> str:
        """`lines 1, 2, 5` (.jsonl) or `samples 0 (line 3), 4 (line 20)` (.json), details appended."""
        items = self.first[kind]
        if self.by_line:
            parts = [str(line) for _, line, _ in items]
            label = "line" if len(parts) == 1 else "lines"
        else:
            parts = [f"{index}" + (f" (line {line})" if line else "") for index, line, _ in items]
            label = "sample" if len(parts) == 1 else "samples"
        parts = [part + (f" {detail}" if detail else "") for part, (_, _, detail) in zip(parts, items)]
        return f"{label} {', '.join(parts)}"

    def warnings(self, total: int, max_seq_len: int | None = None, skip: tuple[str, ...] = ()) -> list[str]:
        """One `warning: FILE: N of TOTAL samples ... (first: ...)` line per kind that occurred."""
        lines = []
        for kind in KINDS:
            count = self.counts[kind]
            if not count or kind in skip or (kind == "untrained" and max_seq_len is None):
                continue
            text = MESSAGES[kind].format(max_seq_len=max_seq_len)
            lines.append(f"warning: {self.path}: {count} of {total} samples {text} (first: {self.positions(kind)})")
        return lines


def lost_detail(parts: list[str]) -> str:
    """`(messages[1] reasoning, messages[3] tool call search)`: what of one record the template dropped."""
    return "(" + ", ".join(parts[:3]) + (", ..." if len(parts) > 3 else "") + ")"


def key_detail(keys: list[str]) -> str:
    names = ", ".join(repr(key) for key in keys)
    return f"(key {names})" if len(keys) == 1 else f"(keys {names})"


def nothing_trains_message(path: str, count: int, max_seq_len: int, shortest: int | None, where: str) -> str:
    """The error when no sample keeps a trained token: training on such a file would report loss 0.0."""
    hint = (f"the shortest prompt before a trained token is {shortest} tokens, so raise max_seq_len above "
            f"{shortest} or shorten the prompts" if shortest is not None else "raise max_seq_len")
    return (f"{path}: no sample has a trained token after truncation to max_seq_len {max_seq_len}: all {count} "
            f"samples are cut before their first trained token (first: {where}); {hint}")
