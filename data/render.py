"""Turning one sample into token ids and labels, with exact token-level masking.

Each template segment is tokenized on its own (`add_special_tokens=False`) and the pieces are
concatenated, so a label is never shared between a masked and a trained span. Tokenizers that mark the
start of every text (SentencePiece's `▁`) encode later segments as mid-text pieces (`encode`), so no
spurious space token appears at segment boundaries. The eos id is
inserted where the template says `<eos>`; special-token text inside user strings (`</s>`,
`<|im_end|>`) is split into ordinary tokens, so data cannot inject control tokens.

Labels are aligned with `input_ids` (not shifted): label[i] == input_ids[i] on trained tokens and
-100 elsewhere; the loss does the shift.
"""
from __future__ import annotations

import contextlib
import os
import re
import weakref
from dataclasses import dataclass, field, replace

from .chat import chat_render, check_template_name, end_of_turn_id, is_messages, messages_to_sample, record_kind
from .schema import DataError, FieldError, validate_sample
from .templates import Segment, segments_of

IGNORE_INDEX = -100


@dataclass
class Rendered:
    """One sample as the model sees it. `segments` are the text pieces and whether each is trained
    (after truncation, with the eos token written as its text); `full_length` counts tokens before it."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    type: str
    segments: list[tuple[str, bool]] = field(default_factory=list)
    full_length: int = 0
    lost: list[str] = field(default_factory=list)  # record text the chat template does not render


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained`, with user errors turned into a one-line `DataError`.

    `trust_remote_code` runs Python shipped with the tokenizer, so it is off unless asked for.
    """
    from transformers import AutoTokenizer

    name = os.path.expanduser(os.fspath(name_or_path))
    looks_local = os.path.isabs(name) or name.startswith(".") or name.count("/") > 1  # else maybe a hub id
    if looks_local and not os.path.isdir(name):
        raise DataError(f"{name}: tokenizer directory not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for unusable dirs
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{name}: cannot load tokenizer: {first_line}") from None
    eos_id_of(tokenizer)
    return tokenizer


def eos_id_of(tokenizer) -> int:
    """Every rendered sample needs an eos id; a tokenizer without one cannot be trained on this format."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token")
    return int(tokenizer.eos_token_id)


def pad_id_of(tokenizer) -> int:
    """The id used for right padding: pad, else unk, else eos (many SentencePiece tokenizers have no pad).

    The choice does not matter for the loss (padded labels are -100) nor for causal attention.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, unk or eos token")


def _encode_raw(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


# Candidate texts to put before a mid-sample piece so the tokenizer does not see it as the start of a
# text; a newline is a single byte-fallback token in SentencePiece vocabularies, the others are rare enough
# to have no merges with what follows. The first one that never merges with the probes is used.
_ANCHORS = ("\n", "\u2603", "\u00a7", "\x00")
_PROBES = ("###", "a", "A", "{", "\n", ".", " ", "1")
_ANCHOR_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _strip_anchor(tokenizer, anchor: str, text: str, anchor_ids: list[int] | None = None) -> list[int] | None:
    """Ids of `text` encoded after `anchor`, or None when anchor and text merged into shared tokens."""
    if anchor_ids is None:
        anchor_ids = _encode_raw(tokenizer, anchor)
    ids = _encode_raw(tokenizer, anchor + text)
    return ids[len(anchor_ids):] if ids[:len(anchor_ids)] == anchor_ids else None


def _find_anchor(tokenizer) -> str | None:
    """The anchor for mid-sample pieces, or None when the tokenizer encodes them exactly on their own.

    SentencePiece-style tokenizers mark the start of every text
    they encode (a dummy-prefix `▁`), so tokenizing segments one by one would put a spurious space
    token at every segment boundary, which whole-prompt tokenization at inference never produces.
    Detected by behaviour: "a" encodes differently after an anchor than alone.
    """
    for anchor in _ANCHORS:
        after = _strip_anchor(tokenizer, anchor, "a")
        if after is not None:
            if after == _encode_raw(tokenizer, "a"):
                return None
            break
    for anchor in _ANCHORS:
        if all(_strip_anchor(tokenizer, anchor, probe) is not None for probe in _PROBES):
            return anchor
    return None


def mid_text_anchor(tokenizer) -> tuple[str, list[int]] | None:
    """`_find_anchor` and the anchor's ids, computed once per tokenizer object."""
    try:
        return _ANCHOR_OF[tokenizer]
    except KeyError:
        anchor = _find_anchor(tokenizer)
        found = _ANCHOR_OF[tokenizer] = None if anchor is None else (anchor, _encode_raw(tokenizer, anchor))
        return found


def encode(tokenizer, text: str, at_start: bool = True, keep: int | None = None) -> list[int]:
    """Token ids of one piece of text: no bos/eos added, special-token text treated as plain text.

    `at_start=False` encodes the piece as it reads in the middle of a sample (see `_find_anchor`). A text
    longer than `LONG_TEXT` is encoded in chunks, and with `keep` only its first `keep` ids are kept
    (`Ids`; see "Long texts" below).
    """
    if not text:
        return []
    if len(text) > LONG_TEXT:
        ids = batch_encoder(tokenizer).long(text, at_start, keep)
        if ids is not None:
            return ids
    anchor = None if at_start else mid_text_anchor(tokenizer)
    if anchor is not None:
        ids = _strip_anchor(tokenizer, anchor[0], text, anchor[1])
        if ids is not None:
            return ids
    return _encode_raw(tokenizer, text)


def _segment_ids(tokenizer, segment: Segment, eos_id: int, at_start: bool) -> list[int]:
    ids = encode(tokenizer, segment.chunks[0], at_start)
    for chunk in segment.chunks[1:]:
        ids.append(eos_id)
        ids += encode(tokenizer, chunk, at_start=False)
    return ids


def render_sample(sample: dict, tokenizer, max_seq_len: int | None = None, template: str = "builtin") -> Rendered:
    """Validate and render one sample; `max_seq_len` truncates (see `truncate`)."""
    if not is_messages(sample):
        try:
            kind = validate_sample(sample)
        except FieldError as err:
            kind = sample.get("type") if isinstance(sample, dict) else None
            raise DataError(f"sample ({kind}): {err}" if isinstance(kind, str) else f"sample: {err}") from None
    return render_validated(sample, tokenizer, max_seq_len, template)


def builtin_sample(record: dict) -> dict:
    """Our sample for the builtin templates: itself, or a `messages` record mapped onto `conversation` /
    `conver_has_api` (`data.chat.messages_to_sample`)."""
    if not is_messages(record):
        return record
    try:
        return messages_to_sample(record)
    except FieldError as err:
        raise DataError(f"sample (messages): {err}") from None


def _uses_chat(record: dict, template: str) -> bool:
    """Under `template: chat` every record but a `pretrain` document goes through the chat template."""
    return check_template_name(template) == "chat" and (is_messages(record) or record.get("type") != "pretrain")


def render_chat(record: dict, tokenizer, max_seq_len: int | None = None, keep_segments: bool = True) -> Rendered:
    """A record rendered with the tokenizer's chat template (`data.chat`); truncation keeps the template's
    end-of-turn token last (trained iff the token it replaces was)."""
    eos_id = eos_id_of(tokenizer)
    chat = chat_render(record, tokenizer)
    ids, trained = chat.ids, chat.trained
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    rendered = Rendered(ids, labels, False, record_kind(record), [], len(ids), chat.lost)
    if max_seq_len is not None and len(ids) > max_seq_len:
        rendered = replace(_cut(rendered, max_seq_len, end_of_turn_id(ids, trained, tokenizer, eos_id)),
                           lost=chat.lost)
    if keep_segments:
        rendered.segments = _runs(rendered, tokenizer)
    return rendered


def _runs(rendered: Rendered, tokenizer) -> list[tuple[str, bool]]:
    """Segment texts of a chat-rendered sample: maximal runs of trained / masked tokens, decoded."""
    runs: list[tuple[str, bool]] = []
    start = 0
    flags = [label != IGNORE_INDEX for label in rendered.labels]
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((tokenizer.decode(rendered.input_ids[start:i], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False), flags[start]))
            start = i
    return runs


def render_validated(sample: dict, tokenizer, max_seq_len: int | None = None, template: str = "builtin") -> Rendered:
    """`render_sample` for a sample already checked by `validate_sample` (the dataset's hot path).

    `template`: `builtin` (the seed's templates; `messages` records mapped onto ours) or `chat` (the
    tokenizer's chat template, `data.chat`).
    """
    if max_seq_len is not None and max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len}")
    if _uses_chat(sample, template):
        return render_chat(sample, tokenizer, max_seq_len)
    if is_messages(sample):
        rendered = render_validated(builtin_sample(sample), tokenizer, max_seq_len)
        rendered.type = "messages"
        return rendered
    eos_id = eos_id_of(tokenizer)
    segments = segments_of(sample)
    piece_ids = []
    at_start = True  # until a segment encodes to something (`_segment_ids` of each segment, pieces kept apart)
    for segment in segments:
        for number, chunk in enumerate(segment.chunks):
            piece_ids.append(encode(tokenizer, chunk, at_start and number == 0, max_seq_len))
        at_start = at_start and len(segment.chunks) == 1 and not _length(piece_ids[-1])
    input_ids, labels, spans, length = _assemble(segments, piece_ids, eos_id, max_seq_len, first_may_be_empty=True)
    rendered = Rendered(input_ids, labels, False, sample["type"], [], length)
    if max_seq_len is not None and length > max_seq_len:
        return truncate(rendered, spans, max_seq_len, tokenizer, segments)
    rendered.segments = _texts(segments, tokenizer.eos_token)
    return rendered


def _texts(segments: list[Segment], eos_text: str) -> list[tuple[str, bool]]:
    return [(segment.text(eos_text), segment.trained) for segment in segments]


def truncate(rendered: Rendered, spans: list[tuple[int, int]], max_seq_len: int, tokenizer,
             segments: list[Segment]) -> Rendered:
    """Keep the first `max_seq_len` tokens and make the last one eos, so the model still learns to stop.

    That eos is trained iff the token it replaces was trained (the cut fell inside a trained segment);
    a cut inside a prompt leaves it masked. Segment texts are cut to match, for `--show`. `rendered` may
    hold only the first `max_seq_len` ids (`full_length` counts all); `spans` are the segments' (start, end).
    """
    eos_id = eos_id_of(tokenizer)
    last = max_seq_len - 1
    texts = []
    for (start, end), segment in zip(spans, segments):
        if start > last:
            break
        already_ends_in_eos = last == end - 1 and rendered.input_ids[last] == eos_id
        if start <= last < end and not already_ends_in_eos:
            kept = tokenizer.decode(rendered.input_ids[start:last], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            text = kept + tokenizer.eos_token
        else:
            text = segment.text(tokenizer.eos_token)
        texts.append((text, segment.trained))
    return replace(_cut(rendered, max_seq_len, eos_id), segments=texts)


# ---------------------------------------------------------------------------------------------- batches
#
# Rendering one sample costs a few tokenizer calls per segment, each with Python overhead far larger
# than the tokenization itself. `render_many` renders many samples with one batch call to the fast
# tokenizer for all their pieces (identical pieces, such as the template tags, encoded once), then
# assembles each sample exactly as `render_validated` does: same pieces, same at-start/mid-text
# encoding, same eos ids, same truncation. A sample whose layout `render_many` does not predict (its
# first segment encodes to nothing, so the next one would be encoded as a text start) is rendered by
# `render_validated` itself. Tests pin `render_many == [render_validated(...)]` on every sample type.


@contextlib.contextmanager
def _serial_tokenizers():
    """The Rust tokenizer's own thread pool off during a batch call: parallelism comes from processes
    (`data.check --workers`), and a tokenizer that used its pool warns and goes serial in forked
    DataLoader workers."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


_PROBE_TEXTS = ("a", "Hello, world!", " leading space", "trailing space ", "two\nlines\n", "\n", "  ",
                "### Assistant: ", "tab\tand unicode caf\u00e9 \u4f60\u597d \u2603", "1234567890",
                "</s> <s> <unk> <pad> <eos> <|im_end|> <|endoftext|>")


def _backend_of(tokenizer):
    """The `tokenizers.Tokenizer` to batch-encode with directly, or None to go through `tokenizer(list)`.

    Direct use skips transformers' per-text Python conversion. Only for the stock fast-tokenizer class
    (no subclass reworking `_encode_plus` or `__call__`), and only if it agrees with `__call__` on probe
    texts (special-token text included).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if cls._encode_plus is not TokenizersBackend._encode_plus or cls.__call__ is not PreTrainedTokenizerBase.__call__:
        return None
    probes = list(_PROBE_TEXTS) + [t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str)]
    if _backend_encode(backend, probes) != [_encode_raw(tokenizer, text) for text in probes]:
        return None
    return backend


def _backend_encode(backend, texts: list[str]) -> list[list[int]]:
    """What `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)` computes, which also
    switches off any truncation or padding set on the backend before encoding."""
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    old = backend.encode_special_tokens
    backend.encode_special_tokens = True  # special-token text in data is plain text (split_special_tokens)
    try:
        with _serial_tokenizers():
            return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = old


# ---------------------------------------------------------------------------------------------- long texts
#
# A tokenizer holds per-token state (ids, offsets, token strings, alignments of the normalized text) for
# everything it encodes in one call, ~110 bytes per character for a byte-level BPE: one 50 MB document
# took 5.6 GB. A text longer than `LONG_TEXT` characters is encoded in chunks, at most `CHUNK_CHARS` of
# it per tokenizer call, each cut just before a space that sits between two non-space characters
# (`_CUT`). There the pre-tokenizers in use start a new pre-token that no token spans (the byte-level
# BPE split regexes, Metaspace, whitespace splitting; SentencePiece vocabularies have no piece with
# a word marker inside), so the chunks' ids put together are the text's ids. Chunks after the first are
# encoded as mid-text pieces (the anchor of `_find_anchor`, for tokenizers that mark the start of a
# text). This is checked per tokenizer, once, on a probe text cut at every such space
# (`BatchEncoder.chunks_ok`); a tokenizer that fails it, or a text with no such space, is encoded whole
# as before.
#
# A consumer that needs only the first ids (rendering with `max_seq_len`) passes `keep`: the ids after
# the first `keep` are counted, not kept (`Ids`), so a long text's ids are never held whole either.

LONG_TEXT = 1 << 20  # characters: a longer text is encoded in chunks
CHUNK_CHARS = 1 << 18  # characters per tokenizer call; a cut is the first `_CUT` half of this past the last one
_CUT = re.compile(r"(?<=\S) (?=\S)")
# Text of the chunking probe, besides the tokenizer's own special and added tokens and the vocabulary's
# pieces with a word boundary inside.
_CHUNK_PROBE = (
    "The quick brown fox's tail: it's 12,345.67 (approx.) -- \"quoted\" [x] {y} a+b=c; e.g. x/y CamelCase "
    "snake_case https://example.com/a?b=c#d 1234567 89 0.5 ... !!! ?? I'm we'll they've you'd HE'S DON'T "
    "caf\u00e9 cafe\u0301 na\u00efve \u00fcber Stra\u00dfe \u0301x \u4f60\u597d \u4e16\u754c "
    "\u3053\u3093\u306b\u3061\u306f \u0645\u0631\u062d\u0628\u0627 \u043f\u0440\u0438\u0432\u0435\u0442 "
    "\U0001f600 \U0001f44d\U0001f3fd x\u200by tab\tsep new\nline two\n\nlines cr\r\nlf two  spaces   three "
    "\u00a0nbsp \u3000ideographic .\n x ,\n\ny def f(x):\n    return x  # comment\n\tindented 'single' "
    "`code` <tag attr=\"v\"> </tag> &amp; \\ backslash \x00 nul \ufeff bom ")


class Ids(list):
    """Token ids of a text of which only the first ones are kept; `length` counts them all."""

    __slots__ = ("length",)


def _length(ids: list[int]) -> int:
    """How many ids a list stands for (`Ids.length`, else its length)."""
    return getattr(ids, "length", len(ids))


def _chunk_starts(text: str, size: int) -> list[int]:
    """Where the chunks of `text` start: 0, then each `_CUT` at least `size // 2` after the previous one."""
    starts = [0]
    while len(text) - starts[-1] > size:
        cut = _CUT.search(text, starts[-1] + size // 2)
        if cut is None:
            break
        starts.append(cut.start())
    return starts


def _chunk_probe(tokenizer) -> str:
    """The probe text for `BatchEncoder.chunks_ok`: fixed text, the special and added tokens' texts beside
    words, and every vocabulary piece with a space inside after a non-space (a token that could span a cut)."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str)]
    added = [t for t in getattr(tokenizer, "get_added_vocab", dict)() if isinstance(t, str)]
    words = [f"a{t} b {t}c {t} {t}{t} x" for t in dict.fromkeys(specials + added)]
    spanning = []
    with contextlib.suppress(Exception):  # a tokenizer without a vocabulary to read: the fixed probe only
        inner = re.compile("[^\\s\u2581\u0120][\\s\u2581\u0120]")  # a space (or SentencePiece ▁, byte-level Ġ)
        candidates = [i for token, i in tokenizer.get_vocab().items() if inner.search(token)]
        spanning = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in candidates[:2000]]
    return " ".join([_CHUNK_PROBE, *_PROBE_TEXTS, *words, *(f"x{t}x" for t in spanning), "end"])


class BatchEncoder:
    """`encode(tokenizer, text, at_start)` for many pieces at once, with the same ids.

    One per tokenizer object (`batch_encoder`); holds the mid-text anchor and the encoding route.
    """

    def __init__(self, tokenizer):
        self._tokenizer = weakref.ref(tokenizer)  # the cache below is keyed by the tokenizer: no strong ref
        self.anchor = mid_text_anchor(tokenizer)
        self.backend = _backend_of(tokenizer)
        self._chunks_ok: bool | None = None

    @property
    def chunks_ok(self) -> bool:
        """Whether a text cut at `_CUT` spaces, chunks encoded one by one, gets the ids of the whole text (checked
        on `_chunk_probe` cut at every such space, at the start of a sample and in its middle)."""
        if self._chunks_ok is None:
            probe = _chunk_probe(self._tokenizer())
            starts = [0] + [cut.start() for cut in _CUT.finditer(probe)]
            self._chunks_ok = all(self._chunked(probe, starts, at_start) == self._whole([(probe, at_start)])[0]
                                  for at_start in (True, False))
        return self._chunks_ok

    def long(self, text: str, at_start: bool = True, keep: int | None = None) -> list[int] | None:
        """`encode(tokenizer, text, at_start)` of a text encoded in chunks (`_chunk_starts`), its first `keep`
        ids kept (all when None) and the rest counted (`Ids`); None when it cannot be chunked."""
        starts = _chunk_starts(text, CHUNK_CHARS)
        if len(starts) == 1 or not self.chunks_ok:
            return None
        return self._chunked(text, starts, at_start, keep)

    def _chunked(self, text: str, starts: list[int], at_start: bool, keep: int | None = None) -> list[int] | None:
        """The ids of `text` cut at `starts`, chunks encoded in batches of about `CHUNK_CHARS` characters
        (all in one batch for the probe); None when the anchor merges into a chunk."""
        ends = starts[1:] + [len(text)]
        kept: list[int] = []
        length = 0
        group = 0
        while group < len(starts):
            last, size = group, 0
            while last < len(starts) and (last == group or size + ends[last] - starts[last] <= CHUNK_CHARS):
                size += ends[last] - starts[last]
                last += 1
            mid = [self.anchor is not None and (k > 0 or not at_start) for k in range(group, last)]
            texts = [self.anchor[0] + text[starts[k]:ends[k]] if m else text[starts[k]:ends[k]]
                     for k, m in zip(range(group, last), mid)]
            for got, m in zip(self.raw(texts), mid):
                if m:
                    cut = len(self.anchor[1])
                    if got[:cut] != self.anchor[1]:
                        return None
                    got = got[cut:]
                if keep is None or len(kept) < keep:
                    kept += got if keep is None else got[:keep - len(kept)]
                length += len(got)
            del texts
            group = last
        if length == len(kept):
            return kept
        ids = Ids(kept)
        ids.length = length
        return ids

    def raw(self, texts: list[str]) -> list[list[int]]:
        """`_encode_raw` of every text."""
        if not texts:
            return []
        if self.backend is not None:
            return _backend_encode(self.backend, texts)
        tokenizer = self._tokenizer()
        if getattr(tokenizer, "is_fast", False):
            with _serial_tokenizers():
                return [list(ids) for ids in tokenizer(texts, add_special_tokens=False,
                                                       split_special_tokens=True)["input_ids"]]
        return [_encode_raw(tokenizer, text) for text in texts]

    def encode(self, pieces: list[tuple[str, bool]], keep: int | None = None) -> list[list[int]]:
        """`encode(tokenizer, text, at_start, keep)` of every `(text, at_start)`; equal pieces share one list."""
        index: dict[tuple[str, bool], int] = {}
        slots = [index.setdefault(piece, len(index)) if piece[0] else -1 for piece in pieces]
        unique = list(index)
        ids: list[list[int]] = [[]] * len(unique)
        whole = []
        for i, (text, at_start) in enumerate(unique):
            got = self.long(text, at_start, keep) if len(text) > LONG_TEXT else None
            if got is None:
                whole.append(i)
            else:
                ids[i] = got
        for i, got in zip(whole, self._whole([unique[i] for i in whole])):
            ids[i] = got
        return [ids[slot] if slot >= 0 else [] for slot in slots]

    def _whole(self, pieces: list[tuple[str, bool]]) -> list[list[int]]:
        """`encode` of every piece, each text encoded in one call (one batch call for all)."""
        ids: list[list[int]] = [[]] * len(pieces)
        raw_at = [i for i, (_, at_start) in enumerate(pieces) if at_start or self.anchor is None]
        mid_at = [i for i, (_, at_start) in enumerate(pieces) if not at_start and self.anchor is not None]
        if mid_at:
            anchor, anchor_ids = self.anchor
            cut = len(anchor_ids)
            for i, got in zip(mid_at, self.raw([anchor + pieces[i][0] for i in mid_at])):
                if got[:cut] == anchor_ids:
                    ids[i] = got[cut:]
                else:  # anchor and text merged: encode the text alone, as `encode` does
                    raw_at.append(i)
        for i, got in zip(raw_at, self.raw([pieces[i][0] for i in raw_at])):
            ids[i] = got
        return ids


_BATCH_ENCODER_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batch_encoder(tokenizer) -> BatchEncoder:
    try:
        return _BATCH_ENCODER_OF[tokenizer]
    except KeyError:
        encoder = _BATCH_ENCODER_OF[tokenizer] = BatchEncoder(tokenizer)
        return encoder


def _pieces(segments: list[Segment]) -> list[tuple[str, bool]]:
    """The texts `_segment_ids` encodes, assuming the first segment encodes to at least one token."""
    pieces = []
    for number, segment in enumerate(segments):
        pieces.append((segment.chunks[0], number == 0))
        pieces.extend((chunk, False) for chunk in segment.chunks[1:])
    return pieces


def _assemble(segments: list[Segment], piece_ids: list[list[int]], eos_id: int, keep: int | None = None,
              first_may_be_empty: bool = False):
    """(input_ids, labels, spans, length) from the pieces' ids (an eos between the chunks of a segment).

    `input_ids` and `labels` hold the first `keep` tokens (all when None), `spans` each segment's
    (start, end) and `length` counts every token (pieces may be `Ids`, clipped to `keep` themselves).
    None when the first segment came out empty (`_pieces` encoded the next one as mid-text), unless
    `first_may_be_empty` (`render_validated`, which encoded it as a text start).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    length = k = 0
    for segment in segments:
        ids = piece_ids[k]
        size = _length(ids)
        k += 1
        if len(segment.chunks) > 1:
            ids = list(ids)
            for _ in segment.chunks[1:]:
                ids.append(eos_id)
                ids += piece_ids[k]
                size += 1 + _length(piece_ids[k])
                k += 1
        if not size and not length and not first_may_be_empty:
            return None
        if keep is not None and len(input_ids) + len(ids) > keep:
            # a clipped piece holds `keep` ids: the segment's first `keep` are right, and no more are needed
            ids = ids[:max(keep - len(input_ids), 0)]
        spans.append((length, length + size))
        length += size
        input_ids += ids
        labels += ids if segment.trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels, spans, length


def render_many(samples: list[dict], tokenizer, max_seq_len: int | None = None,
                keep_segments: bool = True, template: str = "builtin") -> list[Rendered]:
    """`[render_validated(s, tokenizer, max_seq_len) for s in samples]`, tokenized in one batch.

    `keep_segments=False` leaves `Rendered.segments` empty (no segment texts, no decoding of a cut
    segment): ids, labels, `truncated`, `type` and `full_length` are the same.
    """
    if max_seq_len is not None and max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len}")
    chat = [_uses_chat(sample, template) for sample in samples]
    if any(chat):  # one chat render per sample (the template engine has no batch call); the rest batched
        rest = iter(render_many([s for s, c in zip(samples, chat) if not c], tokenizer, max_seq_len,
                                keep_segments, "builtin"))
        return [render_chat(s, tokenizer, max_seq_len, keep_segments) if c else next(rest)
                for s, c in zip(samples, chat)]
    kinds = [record_kind(sample) for sample in samples]
    samples = [builtin_sample(sample) for sample in samples]
    eos_id = eos_id_of(tokenizer)
    eos_text = tokenizer.eos_token
    encoder = batch_encoder(tokenizer)
    all_segments = [segments_of(sample) for sample in samples]
    layouts = [_pieces(segments) for segments in all_segments]
    flat = encoder.encode([piece for pieces in layouts for piece in pieces], max_seq_len)
    out, k = [], 0
    for sample, kind, segments, pieces in zip(samples, kinds, all_segments, layouts):
        assembled = _assemble(segments, flat[k:k + len(pieces)], eos_id, max_seq_len)
        k += len(pieces)
        if assembled is None:
            rendered = render_validated(sample, tokenizer, max_seq_len)
            rendered.type = kind
            out.append(rendered)
            continue
        input_ids, labels, spans, length = assembled
        rendered = Rendered(input_ids, labels, False, kind, [], length)
        if max_seq_len is not None and length > max_seq_len:
            rendered = truncate(rendered, spans, max_seq_len, tokenizer, segments) if keep_segments else \
                _cut(rendered, max_seq_len, eos_id)
        elif keep_segments:
            rendered.segments = _texts(segments, eos_text)
        out.append(rendered)
    return out


def _cut(rendered: Rendered, max_seq_len: int, eos_id: int) -> Rendered:
    """`truncate` without the segment texts (`eos_id`: the id the cut sample ends with)."""
    last = max_seq_len - 1
    input_ids = rendered.input_ids[:max_seq_len]
    labels = rendered.labels[:max_seq_len]
    input_ids[last] = eos_id
    labels[last] = eos_id if rendered.labels[last] != IGNORE_INDEX else IGNORE_INDEX
    return Rendered(input_ids, labels, True, rendered.type, [], rendered.full_length)


def _masked_prefix(segments: list[Segment]) -> list[Segment] | None:
    """The segments before the first trained token: the masked ones, plus the first trained segment
    when it has no eos of its own (then it may encode to nothing). None when nothing is trained."""
    for number, segment in enumerate(segments):
        if segment.trained:
            return segments[:number] if len(segment.chunks) > 1 else segments[:number + 1]
    return None


def first_trained_positions(samples: list[dict], tokenizer, template: str = "builtin",
                            lost: list | None = None) -> list[int | None]:
    """Index of the first trained token of each sample before truncation (None if nothing is trained).

    A sample keeps a trained token after truncation to `max_seq_len` iff this is `< max_seq_len`
    (`truncate` keeps the label of the last kept position). Only the masked text before the first
    answer is tokenized: for pretraining documents, nothing. Under `template: chat` a record is rendered whole.
    """
    chat = [_uses_chat(sample, template) for sample in samples]
    if any(chat):  # `lost` (when given) gets each sample's `Rendered.lost`
        rest = iter(first_trained_positions([s for s, c in zip(samples, chat) if not c], tokenizer))
        out = []
        for s, c in zip(samples, chat):
            rendered = render_chat(s, tokenizer, keep_segments=False) if c else None
            out.append(_first_trained(rendered) if c else next(rest))
            if lost is not None:
                lost.append(rendered.lost if c else [])
        return out
    if lost is not None:
        lost.extend([] for _ in samples)
    samples = [builtin_sample(sample) for sample in samples]
    eos_id = eos_id_of(tokenizer)
    encoder = batch_encoder(tokenizer)
    prefixes = [_masked_prefix(segments_of(sample)) for sample in samples]
    layouts = [_pieces(prefix) if prefix else [] for prefix in prefixes]
    flat = encoder.encode([piece for pieces in layouts for piece in pieces], keep=0)  # lengths are enough
    out, k = [], 0
    for sample, prefix, pieces in zip(samples, prefixes, layouts):
        ids = flat[k:k + len(pieces)]
        k += len(pieces)
        if prefix == []:  # the first segment is trained and holds an eos: token 0 is trained
            out.append(0)
            continue
        assembled = _assemble(prefix, ids, eos_id, keep=0) if prefix else None
        position = None
        if assembled is not None:
            _, _, spans, length = assembled
            if not prefix[-1].trained:  # the next segment is trained and not empty (it holds an eos)
                position = length
            else:  # the first token of a trained segment
                position = next((start for (start, end), segment in zip(spans, prefix)
                                 if segment.trained and end > start), None)
        if position is None:  # a layout not predicted here: render the whole sample
            position = _first_trained(render_validated(sample, tokenizer))
        out.append(position)
    return out


def _first_trained(rendered: Rendered) -> int | None:
    return next((i for i, label in enumerate(rendered.labels) if label != IGNORE_INDEX), None)
