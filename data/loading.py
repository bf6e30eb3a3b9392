"""Reading training files: a JSON array (`.json`), one object per line (`.jsonl`) or a `.parquet` table.

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

Records come in our format or the ecosystem's (OpenAI/TRL `messages`, ShareGPT `conversations`, Alpaca),
told apart per record (`schema.record_kind`); one file holds one kind (the first record's), and every
record is handed on normalized (`schema.normalize_record`): our sample dict, or `{"messages", "tools"?}`.
A `.parquet` file is read with pyarrow by record batches (rows as dicts, null fields dropped);
`ParquetSamples` keeps a row-group index per sample and reads row groups back on access.
`data_path` may list several files: `open_samples` concatenates them in order (`ConcatSamples`).
"""
from __future__ import annotations

import bisect
import codecs
import contextlib
import itertools
import json
import os
import re
from array import array
from typing import Any, Callable, Iterator, NamedTuple

from .schema import KIND_NAMES, DataError, FieldError, json_type, normalize_record, record_kind

# A JSON string (kept, group 1) or a comment (blanked). Strings cannot span lines in JSON.
_STRING = r'("(?:[^"\\\n]|\\.)*")'
_COMMENTS = re.compile(_STRING + r"|//[^\n]*|/\*[\s\S]*?\*/")
_TRAILING_COMMAS = re.compile(_STRING + r"|,(?=\s*[\]}])")
LINE_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH = 1024  # rows per record batch read from a parquet file


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


TOO_DEEP = "nested too deeply (arrays/objects more than ~900 levels deep)"


def _parse(text: str, first_line: int, loads: Callable[[str], Any]) -> Any:
    try:
        return _parse_once(text, first_line, loads)
    except RecursionError:  # json's C decoder follows the nesting on the Python stack
        raise JSONSyntaxError(first_line, 1, TOO_DEEP) from None


def _parse_once(text: str, first_line: int, loads: Callable[[str], Any]) -> Any:
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
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(LINE_SUFFIXES)


def is_parquet(path: str | os.PathLike) -> bool:
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(PARQUET_SUFFIXES)


def data_paths(data_path) -> list[str]:
    """`data_path` (one path or a list of them) as a list of path strings; `DataError` for anything else."""
    paths = list(data_path) if isinstance(data_path, (list, tuple)) else [data_path]
    if not paths:
        raise DataError("data_path: empty list of files")
    for i, path in enumerate(paths):
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            where = f"data_path[{i}]" if isinstance(data_path, (list, tuple)) else "data_path"
            raise DataError(f"{where}: expected a file path, got {json_type(path)}")
    return [os.fspath(path) for path in paths]


def _where(path: str, index: int, line: int | None) -> str:
    return f"{path}: line {line}: sample {index}" if line else f"{path}: sample {index}"


def _sample_error(path: str, index: int, sample: Any, err: FieldError, line: int | None = None) -> DataError:
    where = _where(path, index, line)
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
        raise DataError(f"{path}: is a directory, expected a .json, .jsonl or .parquet file") from None


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
    return validate_record(path, record.index, record.line if jsonl else None, sample), repeated


def validate_record(path: str, index: int, line: int | None, value: Any) -> dict:
    """Validate and normalize one parsed record, checking it is of its file's kind; `DataError` if not."""
    try:
        kind, normalized = normalize_record(value)
        _check_text(normalized, "")
    except FieldError as err:
        raise _sample_error(path, index, value, err, line) from None
    except RecursionError:
        raise DataError(f"{_where(path, index, line)}: {TOO_DEEP}") from None
    _check_file_kind(path, index, line, kind)
    return normalized


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: Any, field: str) -> None:
    """FieldError naming the field of a string holding a lone surrogate (`"\\ud800"` in the JSON: valid JSON, not
    text: no tokenizer or UTF-8 encoder takes it)."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found:
            raise FieldError(field or "(record)", f"holds a lone surrogate (\\u{ord(found.group()):04x}) at character "
                                                  f"{found.start()}: not valid Unicode text")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{field}[{i}]")


# path -> (file identity, kind of its first record): one file holds one kind of record. Per process, so
# each `data.check` worker learns a file's kind from its first record (read once) wherever its chunks start.
_FILE_KINDS: dict[str, tuple[tuple, str]] = {}


def _identity(path: str) -> tuple:
    with contextlib.suppress(OSError):
        st = os.stat(path)
        return st.st_ino, st.st_size, st.st_mtime_ns
    return ()


def _first_kind(path: str) -> str | None:
    """The kind of the first record of `path` (None when it is not a recognizable record)."""
    for record in iter_records(path):
        try:
            value = (_parse_line(path, record.text, record.line, record.index) if is_jsonl(path)
                     else parse_json(record.text))
            return record_kind(value)
        except (DataError, FieldError):
            return None
    return None


def _check_file_kind(path: str, index: int, line: int | None, kind: str) -> None:
    identity = _identity(path)
    if index == 0:
        _FILE_KINDS[path] = identity, kind
        return
    known = _FILE_KINDS.get(path)
    if known is None or known[0] != identity:
        known = identity, _first_kind(path)
        _FILE_KINDS[path] = known
    first = known[1]
    if first is not None and kind != first:
        raise DataError(f"{_where(path, index, line)}: a {KIND_NAMES[kind]} record in a file of "
                        f"{KIND_NAMES[first]} records (the kind of its first sample); one file holds one kind "
                        "of record (split it and list the files in data_path)")


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
    index, offset, line_no = 0, 0, 0
    with _open(path) as handle:
        for raw in handle:  # not enumerate(): it would hold the last line while reading the next
            line_no += 1
            start, offset = offset, offset + len(raw)
            if not _is_object_line(raw) and _parse_line(path, raw, line_no, index) is ...:
                yield start, None
                continue
            yield start, Record(index, line_no, raw)
            del raw  # not held while the next line is read (a long line is then in memory once, with the caller)
            index += 1


class _StreamFallback(Exception):
    """The streaming array parser met something it leaves to the whole-file parser (errors, odd layout)."""


class _TooDeep(Exception):
    """An element nested deeper than the JSON decoder can follow; `args[0]`: its line."""


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
            except RecursionError:
                raise _TooDeep(self._line_at(start)) from None
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
    A `.parquet` file is handed to `iter_parquet_records` (a Record's text is then its row as JSON).
    """
    if is_parquet(path):
        yield from iter_parquet_records(path, progress)
        return
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
        except _TooDeep as exc:
            raise DataError(f"{path}: line {exc.args[0]}: sample {index}: {TOO_DEEP}") from None
        except _StreamFallback:
            values = _load_array(path)  # raises the whole-file parser's error; else the stream's limit
            for value in values[index:]:
                yield Record(index, None, json.dumps(value))
                index += 1


def _drop_nulls(value: Any) -> Any:
    """A parquet row as JSON would have it: struct fields that are null (absent in that row) dropped; timestamps,
    dates and times as ISO strings, decimals as numbers' text, binary as UTF-8 text (ValueError if it is not)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("binary data that is not UTF-8 text") from None
    if hasattr(value, "isoformat"):  # datetime, date, time
        return value.isoformat()
    return str(value)  # Decimal, timedelta, ...


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    with _open(path):  # the usual no-such-file / is-a-directory messages
        pass
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...: all mean an unreadable file
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None


def iter_parquet_rows(path: str, progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, dict]]:
    """`(row group, row within it, row dict)` for every row of a parquet file, read by record batches."""
    handle = _parquet_file(path)
    meta = handle.metadata
    total_rows, size = max(meta.num_rows, 1), os.path.getsize(path)
    done = 0
    try:
        for group in range(meta.num_row_groups):
            row = 0
            for batch in handle.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group]):
                for values in batch.to_pylist():
                    try:
                        plain = _drop_nulls(values)
                    except ValueError:
                        column = next((k for k, v in values.items() if isinstance(v, (bytes, bytearray))), "?")
                        raise DataError(f"{path}: row group {group}, row {row}: column {column!r}: binary data that "
                                        f"is not UTF-8 text") from None
                    yield group, row, plain
                    row += 1
                done += batch.num_rows
                if progress is not None:
                    progress(size * done // total_rows)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: row group {group}: cannot read parquet data: {exc}") from None


def iter_parquet_records(path: str, progress: Callable[[int], None] | None = None) -> Iterator[Record]:
    """A Record per row of a parquet file (line None, text the row as JSON), streamed by record batches."""
    for index, (_, _, row) in enumerate(iter_parquet_rows(path, progress)):
        yield Record(index, None, json.dumps(row, ensure_ascii=False))


def iter_records(path: str, progress: Callable[[int], None] | None = None) -> Iterator[Record]:
    """The sample Records of any supported file, in order (blank/comment lines of a .jsonl skipped)."""
    if is_jsonl(path):
        return (record for _, record in iter_jsonl_records(path) if record is not None)
    return iter_array_records(path, progress)


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
        del record, sample  # neither held while the next line is read and parsed


def _array_samples(path: str, visit: Visitor | None = None) -> list[dict]:
    samples = []
    for record in iter_array_records(path):
        sample, repeated = parse_sample(path, record, jsonl=False)
        if visit is not None:
            visit(record.index, record.line, sample, repeated)
        samples.append(sample)
    return samples


def load_samples(path, visit: Visitor | None = None) -> list[dict]:
    """Parse, validate and normalize every sample of a `.json`, `.jsonl` or `.parquet` file (or of a list of
    files, concatenated); `DataError` names the first problem.

    `visit(index, line, sample, repeated_keys)` sees each sample as it is read (for warnings; the index
    and line are those within its file).
    """
    paths = data_paths(path)
    if len(paths) > 1:
        return [sample for one in paths for sample in load_samples(one, visit)]
    path = paths[0]
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
        self._seen = _identity(self.path)
        self._offsets = array("q")
        for scanned in _scan_jsonl(self.path, visit):
            self._offsets.append(scanned[0])
            del scanned  # the sample is not held while the next line is read and parsed
        if not self._offsets:
            raise DataError(f"{self.path}: no samples")
        self._handle = None
        self._pid = None
        self._last = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        offset = self._offsets[index]
        handle = self._file()
        handle.seek(offset)
        try:
            sample = normalize_record(parse_json(handle.readline().decode("utf-8-sig")))[1]
        except (ValueError, FieldError) as exc:  # JSONSyntaxError, UnicodeDecodeError, a foreign record
            if _identity(self.path) != self._seen and self._last is not None:
                # Rewritten during the run: the step finishes on the last good sample, and the loop's DataWatch
                # stops the run at the step boundary with a checkpoint (utils.run_fingerprint).
                return self._last
            raise DataError(f"{self.path}: sample {index} (byte {offset}) no longer reads as it did when the file "
                            f"was loaded ({exc}); was the file changed?") from None
        self._last = sample
        return sample

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


class ParquetSamples:
    """The samples of a validated parquet file: (row group, row) per sample, row groups read back on access.

    Holds 8 bytes per sample plus, per process, the decoded row groups last used (up to `cache_bytes`
    of Arrow data; a file smaller than that is read once). Items are normalized records.
    """

    def __init__(self, path: str | os.PathLike, visit: Visitor | None = None, cache_bytes: int = 256 << 20):
        self.path = os.fspath(path)
        self._seen = _identity(self.path)
        self._last = None
        self._groups, self._rows = array("I"), array("I")
        for index, (group, row, values) in enumerate(iter_parquet_rows(self.path)):
            sample = validate_record(self.path, index, None, values)
            if visit is not None:
                visit(index, None, sample, [])
            self._groups.append(group)
            self._rows.append(row)
        if not self._rows:
            raise DataError(f"{self.path}: no samples")
        self.cache_bytes = cache_bytes
        self._file = self._pid = None
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def _group(self, group: int):
        if self._pid != os.getpid():
            self._file, self._pid, self._cache = _parquet_file(self.path), os.getpid(), {}
        table = self._cache.pop(group, None)
        if table is None:
            table = self._file.read_row_group(group)
            while self._cache and sum(t.nbytes for t in self._cache.values()) + table.nbytes > self.cache_bytes:
                self._cache.pop(next(iter(self._cache)))
        self._cache[group] = table  # most recently used last
        return table

    def __getitem__(self, index: int) -> dict:
        try:
            row = self._group(self._groups[index]).slice(self._rows[index], 1).to_pylist()[0]
            sample = normalize_record(_drop_nulls(row))[1]
        except Exception as exc:  # pyarrow's errors of a file rewritten since it was loaded
            if _identity(self.path) != self._seen and self._last is not None:
                return self._last  # as JsonlSamples: the loop stops at the step boundary
            raise DataError(f"{self.path}: sample {index} no longer reads as it did when the file was loaded "
                            f"({exc}); was the file changed?") from None
        self._last = sample
        return sample

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = None
        state["_cache"] = {}
        return state


class ConcatSamples:
    """Several files' samples as one sequence, in the order of the files."""

    def __init__(self, parts: list):
        self.parts = parts
        self._ends = list(itertools.accumulate(len(part) for part in parts))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self._ends, index)
        return self.parts[part][index - (self._ends[part - 1] if part else 0)]


def open_file_samples(path: str | os.PathLike, visit: Visitor | None = None):
    """One file's validated samples as an indexable sequence: byte offsets for `.jsonl`, row-group indices
    for `.parquet`, parsed objects for `.json`. Items are normalized records."""
    if is_jsonl(path):
        return JsonlSamples(path, visit)
    if is_parquet(path):
        return ParquetSamples(path, visit)
    return load_samples(path, visit)


def open_samples(path, visit: Visitor | None = None):
    """Validated samples of one file or a list of files (concatenated in order) as an indexable sequence.

    `visit(index, line, sample, repeated_keys)` sees each sample once while the file is read (index and
    line within its file).
    """
    paths = data_paths(path)
    if len(paths) == 1:
        return open_file_samples(paths[0], visit)
    return ConcatSamples([open_file_samples(one, visit) for one in paths])
