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

import os
import weakref
from dataclasses import dataclass, field

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
    """The id used for right padding: pad, else unk, else eos (many LLaMA-style tokenizers have no pad).

    The choice does not matter for the loss (padded labels are -100) nor for causal attention.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, unk or eos token")


def _encode_raw(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


# Candidate texts to put before a mid-sample piece so the tokenizer does not see it as the start of a
# text; a newline is a single byte-fallback token in LLaMA-style vocabularies, the others are rare enough
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

    SentencePiece-style tokenizers (LLaMA-2, Mistral, Baichuan, ChatGLM) mark the start of every text
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


def encode(tokenizer, text: str, at_start: bool = True) -> list[int]:
    """Token ids of one piece of text: no bos/eos added, special-token text treated as plain text.

    `at_start=False` encodes the piece as it reads in the middle of a sample (see `_find_anchor`).
    """
    if not text:
        return []
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


def render_sample(sample: dict, tokenizer, max_seq_len: int | None = None) -> Rendered:
    """Validate and render one sample; `max_seq_len` truncates (see `truncate`)."""
    try:
        kind = validate_sample(sample)
    except FieldError as err:
        kind = sample.get("type") if isinstance(sample, dict) else None
        raise DataError(f"sample ({kind}): {err}" if isinstance(kind, str) else f"sample: {err}") from None
    return render_validated(sample, tokenizer, max_seq_len)


def render_validated(sample: dict, tokenizer, max_seq_len: int | None = None) -> Rendered:
    """`render_sample` for a sample already checked by `validate_sample` (the dataset's hot path)."""
    if max_seq_len is not None and max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len}")
    eos_id = eos_id_of(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    segments = segments_of(sample)
    for segment in segments:
        ids = _segment_ids(tokenizer, segment, eos_id, at_start=not input_ids)
        spans.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids += ids
        labels += ids if segment.trained else [IGNORE_INDEX] * len(ids)
    eos_text = tokenizer.eos_token
    rendered = Rendered(input_ids, labels, False, sample["type"],
                        [(segment.text(eos_text), segment.trained) for segment in segments], len(input_ids))
    if max_seq_len is not None and len(input_ids) > max_seq_len:
        return truncate(rendered, spans, max_seq_len, tokenizer)
    return rendered


def truncate(rendered: Rendered, spans: list[tuple[int, int]], max_seq_len: int, tokenizer) -> Rendered:
    """Keep the first `max_seq_len` tokens and make the last one eos, so the model still learns to stop.

    That eos is trained iff the token it replaces was trained (the cut fell inside a trained segment);
    a cut inside a prompt leaves it masked. Segment texts are cut to match, for `--show`.
    """
    eos_id = eos_id_of(tokenizer)
    last = max_seq_len - 1
    input_ids = rendered.input_ids[:max_seq_len]
    labels = rendered.labels[:max_seq_len]
    input_ids[last] = eos_id
    labels[last] = eos_id if rendered.labels[last] != IGNORE_INDEX else IGNORE_INDEX
    segments = []
    for (start, end), (text, trained) in zip(spans, rendered.segments):
        if start > last:
            break
        already_ends_in_eos = last == end - 1 and rendered.input_ids[last] == eos_id
        if start <= last < end and not already_ends_in_eos:
            kept = tokenizer.decode(rendered.input_ids[start:last], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            text = kept + tokenizer.eos_token
        segments.append((text, trained))
    return Rendered(input_ids, labels, True, rendered.type, segments, rendered.full_length)
