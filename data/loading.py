"""Reading training files: a JSON array (`.json`) or one object per line (`.jsonl`).

Users paste the README example, which has `//` comments and trailing commas, so both are accepted.
Rather than a JSON5 parser (pure Python, slow on large files) the text is first tried as plain JSON;
only if that fails are comments and trailing commas blanked out *in place* (same length, newlines
kept) and the text parsed again. Because positions do not move, the line and column of any remaining
syntax error are those of the user's file.

Every sample is validated here, before any tokenization. A `.jsonl` file is kept as byte offsets
(`JsonlSamples`), so a rank holds a few bytes per sample instead of the whole parsed set.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from array import array
from typing import Any, Iterator

from .schema import DataError, FieldError, json_type, validate_sample

# A JSON string (kept, group 1) or a comment (blanked). Strings cannot span lines in JSON.
_STRING = r'("(?:[^"\\\n]|\\.)*")'
_COMMENTS = re.compile(_STRING + r"|//[^\n]*|/\*[\s\S]*?\*/")
_TRAILING_COMMAS = re.compile(_STRING + r"|,(?=\s*[\]}])")
LINE_SUFFIXES = (".jsonl", ".ndjson")


class JSONSyntaxError(ValueError):
    """Where (1-based line and column) and why a document failed to parse."""

    def __init__(self, line: int, column: int, message: str):
        super().__init__(f"line {line}, column {column}: invalid JSON: {message}")
        self.line, self.column, self.message = line, column, message


def _blank(match: re.Match) -> str:
    if match.group(1) is not None:
        return match.group(1)
    text = match.group(0)
    return re.sub(r"[^\n]", " ", text) if "\n" in text else " " * len(text)


def strip_comments(text: str) -> str:
    """Blank `//` and `/* */` comments outside strings, keeping every character position."""
    return _COMMENTS.sub(_blank, text)


def strip_trailing_commas(text: str) -> str:
    """Blank commas directly before `]` or `}` (after comments are gone), keeping positions."""
    return _TRAILING_COMMAS.sub(_blank, text)


def parse_json(text: str, first_line: int = 1) -> Any:
    """Parse JSON that may contain comments and trailing commas; `JSONSyntaxError` on failure.

    Returns `...` (Ellipsis) for a document that is empty or only comments.
    """
    with contextlib.suppress(json.JSONDecodeError):  # plain JSON: the fast path
        return json.loads(text)
    cleaned = strip_comments(text)
    if not cleaned.strip():
        return ...
    try:
        return json.loads(strip_trailing_commas(cleaned))
    except json.JSONDecodeError as exc:
        raise JSONSyntaxError(exc.lineno + first_line - 1, exc.colno, exc.msg) from None


def is_jsonl(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(LINE_SUFFIXES)


def _sample_error(path: str, index: int, sample: Any, err: FieldError, line: int | None = None) -> DataError:
    where = f"{path}: line {line}: sample {index}" if line else f"{path}: sample {index}"
    kind = sample.get("type") if isinstance(sample, dict) else None
    if isinstance(kind, str) and err.field != "type":
        where += f" ({kind})"
    return DataError(f"{where}: {err}")


def _open(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl file") from None


def _read_text(path: str) -> str:
    with _open(path) as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None


def _load_array(path: str) -> list:
    try:
        value = parse_json(_read_text(path))
    except JSONSyntaxError as exc:
        hint = ""
        if exc.message == "Extra data":
            hint = " (one object per line? name the file .jsonl)"
        raise DataError(f"{path}: {exc}{hint}") from None
    if value is ...:
        raise DataError(f"{path}: empty file, expected a JSON array of samples")
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of samples, got {json_type(value)}"
                        " (for one object per line, name the file .jsonl)")
    return value


def _scan_jsonl(path: str) -> Iterator[tuple[int, int, dict]]:
    """Yield `(byte offset, line number, validated sample)` for every sample line of a .jsonl file."""
    index, offset = 0, 0
    with _open(path) as handle:
        for line_no, raw in enumerate(handle, 1):
            start, offset = offset, offset + len(raw)
            sample = _parse_line(path, raw, line_no, index)
            if sample is ...:
                continue
            try:
                validate_sample(sample)
            except FieldError as err:
                raise _sample_error(path, index, sample, err, line_no) from None
            yield start, line_no, sample
            index += 1


def _parse_line(path: str, raw: bytes, line_no: int, index: int) -> Any:
    try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: line {line_no}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    if not text.strip():
        return ...
    try:
        return parse_json(text, first_line=line_no)
    except JSONSyntaxError as exc:
        raise DataError(f"{path}: {exc} (sample {index})") from None


def _validated(path: str, samples: list) -> list[dict]:
    for index, sample in enumerate(samples):
        try:
            validate_sample(sample)
        except FieldError as err:
            raise _sample_error(path, index, sample, err) from None
    return samples


def load_samples(path: str | os.PathLike) -> list[dict]:
    """Parse and validate every sample of a `.json` or `.jsonl` file; `DataError` names the first problem."""
    path = os.fspath(path)
    if is_jsonl(path):
        samples = [sample for _, _, sample in _scan_jsonl(path)]
    else:
        samples = _validated(path, _load_array(path))
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


class JsonlSamples:
    """The samples of a validated `.jsonl` file, read back by byte offset on access.

    Holds 8 bytes per sample. The file handle is opened per process (DataLoader workers fork or
    spawn) and is never pickled.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._offsets = array("q", (offset for offset, _, _ in _scan_jsonl(self.path)))
        if not self._offsets:
            raise DataError(f"{self.path}: no samples")
        self._handle = None
        self._pid = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        offset = self._offsets[index]
        handle = self._file()
        handle.seek(offset)
        return parse_json(handle.readline().decode("utf-8-sig"))

    def _file(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle = open(self.path, "rb")
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = state["_pid"] = None
        return state

    def __del__(self):
        if getattr(self, "_handle", None) is not None and self._pid == os.getpid():
            self._handle.close()


def open_samples(path: str | os.PathLike):
    """Validated samples as an indexable sequence: offsets for `.jsonl`, parsed objects for `.json`."""
    return JsonlSamples(path) if is_jsonl(path) else load_samples(path)
