"""Reading training files: a JSON array (`.json`) or one object per line (`.jsonl`).

Users paste the README example, which has `//` comments and trailing commas, so both are accepted.
Rather than a JSON5 parser (pure Python, slow on large files) the text is first tried as plain JSON;
only if that fails are comments and trailing commas blanked out *in place* (same length, newlines
kept) and the text parsed again. Because positions do not move, the line and column of any remaining
syntax error are those of the user's file.

Both kinds of file are streamed, so memory stays flat however large the file: a `.jsonl` line by line,
a `.json` array element by element (`iter_array`: `json.JSONDecoder.raw_decode` over a chunked buffer,
with the comment-tolerant parse applied to one element at a time). A file that does not stream cleanly
(a syntax error, a top level that is not an array) is parsed whole once more, so its error message is
exactly the one of the whole-file parser (file, line, column).

Every sample is validated here, before any tokenization. A `.jsonl` file is kept as byte offsets
(`JsonlSamples`), so a rank holds a few bytes per sample instead of the whole parsed set. Objects with
a repeated key are reported (`parse_record` returns the repeated keys) rather than silently losing a value.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
from array import array
from typing import Any, Callable, Iterator, NamedTuple

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


class _KeyTracker:
    """A JSON decoder whose objects record repeated keys (`json.loads` keeps the last value silently)."""

    def __init__(self):
        self.repeated: list[str] = []
        self.decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            for key, _ in pairs:
                if key in seen and key not in self.repeated:
                    self.repeated.append(key)
                seen.add(key)
        return obj

    def loads(self, text: str) -> Any:
        return self.decoder.decode(text)


_KEYS = _KeyTracker()


def parse_json(text: str, first_line: int = 1) -> Any:
    """Parse JSON that may contain comments and trailing commas; `JSONSyntaxError` on failure.

    Returns `...` (Ellipsis) for a document that is empty or only comments.
    """
    return _parse(text, first_line, json.loads)


def parse_record(text: str, first_line: int = 1) -> tuple[Any, list[str]]:
    """`parse_json`, plus the keys that some object of the document repeats (first occurrence order)."""
    del _KEYS.repeated[:]
    value = _parse(text, first_line, _KEYS.loads)
    repeated = list(_KEYS.repeated)
    del _KEYS.repeated[:]
    return value, repeated


def _parse(text: str, first_line: int, loads: Callable[[str], Any]) -> Any:
    with contextlib.suppress(json.JSONDecodeError):  # plain JSON: the fast path
        return loads(text)
    cleaned = strip_comments(text)
    if not cleaned.strip():
        return ...
    del _KEYS.repeated[:]  # the failed fast path may have seen a part of the document
    try:
        return loads(strip_trailing_commas(cleaned))
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
    """The whole-file parse: the reference for error messages (and the fallback of `iter_array`)."""
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


# ---------------------------------------------------------------------------------------------- records

class Record(NamedTuple):
    """One sample's source: its index among the samples, its (first) line, and its JSON text.

    `text` is the raw line (bytes) of a `.jsonl` file, or the element's text (str) of a `.json`
    array; `line` is None when unknown. `parse_sample` turns it into a validated sample.
    """
    index: int
    line: int | None
    text: bytes | str


def parse_sample(path: str, record: Record, jsonl: bool) -> tuple[dict, list[str]]:
    """Parse and validate one record; `(sample, repeated keys)` or `DataError` naming file, line, sample, field."""
    if jsonl:
        sample, repeated = _parse_line(path, record.text, record.line, record.index, parse_record)
    else:
        try:
            sample, repeated = parse_record(record.text)
        except JSONSyntaxError as exc:  # cannot happen for text cut by `iter_array`; kept for safety
            raise DataError(f"{path}: sample {record.index}: {exc}") from None
    try:
        validate_sample(sample)
    except FieldError as err:
        raise _sample_error(path, record.index, sample, err, record.line if jsonl else None) from None
    return sample, repeated


def _parse_line(path: str, raw: bytes, line_no: int, index: int, parse=None) -> Any:
    try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: line {line_no}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    if parse is None:
        if not text.strip():
            return ...
        parse = parse_json
    try:
        return parse(text, first_line=line_no)
    except JSONSyntaxError as exc:
        raise DataError(f"{path}: {exc} (sample {index})") from None


def _is_object_line(raw: bytes) -> bool:
    return raw[:1] == b"{" or raw.lstrip()[:1] == b"{"


def iter_jsonl_records(path: str) -> Iterator[tuple[int, Record | None]]:
    """`(byte offset, Record)` per line of a `.jsonl` file; Record is None for blank and comment-only lines.

    Only lines that do not start with `{` are parsed here (to tell a comment from a sample); the rest
    are handed on as bytes, so parsing can run elsewhere (in parallel).
    """
    index, offset = 0, 0
    with _open(path) as handle:
        for line_no, raw in enumerate(handle, 1):
            start, offset = offset, offset + len(raw)
            if not _is_object_line(raw) and _parse_line(path, raw, line_no, index) is ...:
                yield start, None
                continue
            yield start, Record(index, line_no, raw)
            index += 1


class _StreamFallback(Exception):
    """The streaming array parser met something it leaves to the whole-file parser (errors, odd layout)."""


_SPACE = re.compile(r"(?:\s+|//[^\n]*(?:\n|\Z)|/\*[\s\S]*?\*/)*")
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|//[^\n]*|/\*[\s\S]*?\*/|[{}\[\]]|[^"/{}\[\]]+|["/]')
_CHUNK = 1 << 20


class _ArrayStream:
    """The elements of a top-level JSON array, read in chunks: `(line, text)` per element.

    Plain elements are cut with `raw_decode`; an element with comments or trailing commas is cut by
    bracket depth and cleaned (`strip_comments`, `strip_trailing_commas`). Anything else (a syntax
    error, a non-array top level) raises `_StreamFallback`.
    """

    def __init__(self, handle):
        self.handle = handle
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.plain = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.line = 1  # line number at `line_pos`
        self.line_pos = 0
        self.bytes_read = 0

    def _refill(self, size: int | None = None) -> None:
        if self.eof:
            raise _StreamFallback()
        raw = self.handle.read(size or _CHUNK)
        self.bytes_read += len(raw)
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError:
            raise _StreamFallback() from None
        if not raw:
            self.eof = True
        self.buf += text

    def _compact(self) -> None:
        """Drop the consumed text (only between elements, where no position is held elsewhere)."""
        if self.pos > _CHUNK:
            self._line_at(self.pos)
            self.buf = self.buf[self.pos:]
            self.line_pos = self.pos = 0

    def _line_at(self, pos: int) -> int:
        self.line += self.buf.count("\n", self.line_pos, pos)
        self.line_pos = pos
        return self.line

    def _skip_space(self) -> str:
        """Skip whitespace and comments; the next character, or '' at the end of the file."""
        while True:
            end = _SPACE.match(self.buf, self.pos).end()
            if end < len(self.buf) and not (self.buf[end] == "/" and not self.eof):
                self.pos = end
                return self.buf[end]
            if self.eof:
                self.pos = end
                if end < len(self.buf):  # an unclosed comment
                    raise _StreamFallback()
                return ""
            self._refill()

    def _element(self) -> str:
        """Text of the element at `pos` (cleaned when it needs the lenient parse); advances past it."""
        start, size = self.pos, _CHUNK
        while True:
            try:
                _, end = self.plain.raw_decode(self.buf, start)
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.buf) - 32
                if cut and not self.eof:
                    self._refill(size)
                    size *= 2
                    continue
                return self._lenient_element(start)
            if end < len(self.buf) or self.eof:  # a number may continue in the next chunk
                self.pos = end
                return self.buf[start:end]
            self._refill(size)
            size *= 2

    def _lenient_element(self, start: int) -> str:
        if self.buf[start] not in "{[":
            raise _StreamFallback()
        size = _CHUNK
        while True:
            depth, end = 0, None
            for match in _TOKEN.finditer(self.buf, start):
                if match.end() == len(self.buf) and not self.eof:
                    break
                token = match.group()
                if token in "{[":
                    depth += 1
                elif token in "}]":
                    depth -= 1
                    if depth == 0:
                        end = match.end()
                        break
            if end is not None:
                break
            if self.eof:
                raise _StreamFallback()
            self._refill(size)
            size *= 2
        text = strip_trailing_commas(strip_comments(self.buf[start:end]))
        try:
            json.loads(text)
        except json.JSONDecodeError:
            raise _StreamFallback() from None
        self.pos = end
        return text

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self._skip_space() != "[":
            raise _StreamFallback()
        self.pos += 1
        first = True
        while True:
            self._compact()
            char = self._skip_space()
            if char == "]":
                break
            if not first:
                if char != ",":
                    raise _StreamFallback()
                self.pos += 1
                char = self._skip_space()
                if char == "]":  # trailing comma
                    break
            if char in ("", ",", "]"):
                raise _StreamFallback()
            first = False
            line = self._line_at(self.pos)
            yield line, self._element()
        self.pos += 1
        if self._skip_space() != "":
            raise _StreamFallback()  # extra data after the array


def iter_array_records(path: str, progress: Callable[[int], None] | None = None) -> Iterator[Record]:
    """A Record per element of a `.json` array file, streamed; the element texts are plain JSON.

    `progress(bytes_read)` is called as the file is read. Errors are those of the whole-file parser.
    """
    index = 0
    with _open(path) as handle:
        stream = _ArrayStream(handle)
        read = 0
        try:
            for line, text in stream:
                yield Record(index, line, text)
                index += 1
                if progress is not None and stream.bytes_read != read:
                    read = stream.bytes_read
                    progress(read)
        except _StreamFallback:
            values = _load_array(path)  # raises the whole-file parser's error; else the stream's limit
            for value in values[index:]:
                yield Record(index, None, json.dumps(value))
                index += 1


# ---------------------------------------------------------------------------------------------- samples

# visit(index, line, sample, repeated_keys): called once per validated sample, in file order.
Visitor = Callable[[int, "int | None", dict, "list[str]"], None]


def _scan_jsonl(path: str, visit: Visitor | None = None) -> Iterator[tuple[int, int, dict]]:
    """Yield `(byte offset, line number, validated sample)` for every sample line of a .jsonl file."""
    for offset, record in iter_jsonl_records(path):
        if record is None:
            continue
        sample, repeated = parse_sample(path, record, jsonl=True)
        if visit is not None:
            visit(record.index, record.line, sample, repeated)
        yield offset, record.line, sample


def _array_samples(path: str, visit: Visitor | None = None) -> list[dict]:
    samples = []
    for record in iter_array_records(path):
        sample, repeated = parse_sample(path, record, jsonl=False)
        if visit is not None:
            visit(record.index, record.line, sample, repeated)
        samples.append(sample)
    return samples


def load_samples(path: str | os.PathLike, visit: Visitor | None = None) -> list[dict]:
    """Parse and validate every sample of a `.json` or `.jsonl` file; `DataError` names the first problem.

    `visit(index, line, sample, repeated_keys)` sees each sample as it is read (for warnings).
    """
    path = os.fspath(path)
    if is_jsonl(path):
        samples = [sample for _, _, sample in _scan_jsonl(path, visit)]
    else:
        samples = _array_samples(path, visit)
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


class JsonlSamples:
    """The samples of a validated `.jsonl` file, read back by byte offset on access.

    Holds 8 bytes per sample. The file handle is opened per process (DataLoader workers fork or
    spawn) and is never pickled.
    """

    def __init__(self, path: str | os.PathLike, visit: Visitor | None = None):
        self.path = os.fspath(path)
        self._offsets = array("q", (offset for offset, _, _ in _scan_jsonl(self.path, visit)))
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


def open_samples(path: str | os.PathLike, visit: Visitor | None = None):
    """Validated samples as an indexable sequence: offsets for `.jsonl`, parsed objects for `.json`.

    `visit(index, line, sample, repeated_keys)` sees each sample once while the file is read.
    """
    return JsonlSamples(path, visit) if is_jsonl(path) else load_samples(path, visit)
