"""The torch side: a lazily tokenizing dataset (its rows are batched by `data.batching`).

Tokenizing a large set up front would cost minutes and one tokenized copy per rank; instead the
dataset keeps validated raw samples (or byte offsets of a .jsonl) and renders in `__getitem__`,
which DataLoader workers run in parallel.

Loading does tokenize one thing up front, in batches: the masked prompt before each sample's first
trained token (nothing for `pretrain` documents), to find the samples that truncation to
`max_seq_len` leaves with no trained token. They are counted in a warning; when no sample trains at
all the dataset refuses the file (`DataError`), since training on it would report loss 0.0.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable

import torch

from .loading import is_jsonl, open_samples
from .notes import Notes, key_detail, lost_detail, nothing_trains_message, round_notes
from .chat import chat_template_of, check_template_name, located
from .render import IGNORE_INDEX, eos_id_of, first_trained_positions, load_tokenizer, render_validated
from .schema import DataError

SCAN_BATCH = 512
SCAN_CHARS = 1 << 20  # a scan batch also ends once its samples hold this many characters of text


def _chars(sample) -> int:
    """Characters of text in a parsed sample (its strings, dict keys included; any nesting depth)."""
    total, stack = 0, [sample]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return total


def warn_on_rank0(line: str) -> None:
    """Print a warning line to stderr from the first rank only (every rank loads the same file)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)


class _TrainedScan:
    """Collects the warnings of a file while it loads: repeated keys, dialogue shape, untrained samples."""

    def __init__(self, path: str, tokenizer, max_seq_len: int, by_line: bool, template: str = "builtin"):
        self.path = path
        self.tokenizer = tokenizer
        self.template = template
        self.max_seq_len = max_seq_len
        self.notes = Notes(path, by_line=by_line)
        self.pending: list[tuple[int, int | None, dict]] = []
        self.pending_chars = 0
        self.shortest_untrained = math.inf

    def visit(self, index: int, line: int | None, sample: dict, repeated: list[str]) -> None:
        if repeated:
            self.notes.add("duplicate_key", index, line, key_detail(repeated))
        for kind in round_notes(sample):
            self.notes.add(kind, index, line)
        self.pending.append((index, line, sample))
        self.pending_chars += _chars(sample)
        if len(self.pending) >= SCAN_BATCH or self.pending_chars >= SCAN_CHARS:
            self.flush()

    def flush(self) -> None:
        lost: list = []
        try:
            positions = first_trained_positions([sample for _, _, sample in self.pending], self.tokenizer,
                                                self.template, lost)
        except DataError:  # a messages record the template cannot take: find it, name its line
            for index, line, sample in self.pending:
                try:
                    first_trained_positions([sample], self.tokenizer, self.template)
                except DataError as exc:
                    raise located(self.path, index, line, exc) from None
            raise
        for (index, line, _), parts in zip(self.pending, lost):
            if parts:
                self.notes.add("lost_content", index, line, lost_detail(parts))
        for (index, line, _), position in zip(self.pending, positions):
            if position is None or position >= self.max_seq_len:
                self.notes.add("untrained", index, line)
                if position is not None:
                    self.shortest_untrained = min(self.shortest_untrained, position)
        self.pending = []
        self.pending_chars = 0


class SFTDataset(torch.utils.data.Dataset):
    """Samples of one training file, each item `{"input_ids", "labels"}` (1-D int64, unpadded, truncated).

    `tokenizer` is a tokenizer object or a directory/hub name for `AutoTokenizer`. Every sample is
    validated here, so a bad file fails before any GPU work; so does a file in which no sample keeps a
    trained token after truncation (`DataError`). Warnings (samples that train nothing, dialogues that
    end with `ask` or start with an answer, repeated JSON keys) are kept in `warnings` and passed to
    `warn` (default: printed to stderr by rank 0; None: not printed). `template`: `builtin` (the seed's
    templates) or `chat` (the tokenizer's own chat template, `data.chat`).
    """

    def __init__(self, path: str | os.PathLike, tokenizer, max_seq_len: int, trust_remote_code: bool = False,
                 warn: Callable[[str], None] | None = warn_on_rank0, template: str = "builtin"):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        eos_id_of(tokenizer)
        self.template = check_template_name(template)
        if self.template == "chat":
            chat_template_of(tokenizer)  # no chat_template: one line before reading the file
        self.path = os.fspath(path)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        scan = _TrainedScan(self.path, tokenizer, max_seq_len, by_line=is_jsonl(self.path), template=self.template)
        self.samples = open_samples(self.path, visit=scan.visit)
        scan.flush()
        self.notes = scan.notes
        nothing_trains = scan.notes.count("untrained") == len(self.samples)
        # `warning: FILE: N of M samples ...` lines; when nothing trains, the error below says so instead
        self.warnings = scan.notes.warnings(len(self.samples), max_seq_len, skip=("untrained",) * nothing_trains)
        for line in self.warnings if warn else ():
            warn(line)
        if nothing_trains:
            shortest = None if scan.shortest_untrained == math.inf else scan.shortest_untrained
            raise DataError(nothing_trains_message(self.path, len(self.samples), max_seq_len, shortest,
                                                   scan.notes.positions("untrained")))
        self._num_truncated: int | None = None

    @property
    def num_untrained(self) -> int:
        """Samples left with no trained token after truncation to `max_seq_len` (counted at load)."""
        return self.notes.count("untrained")

    def __len__(self) -> int:
        return len(self.samples)

    def render(self, index: int):
        """The full `Rendered` record of sample `index` (ids, labels, segment texts, truncation)."""
        return render_validated(self.samples[index], self.tokenizer, self.max_seq_len, self.template)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rendered = self.render(index)
        return {"input_ids": torch.tensor(rendered.input_ids, dtype=torch.long),
                "labels": torch.tensor(rendered.labels, dtype=torch.long)}

    def count_truncated(self) -> int:
        """Tokenize every sample once and count those longer than `max_seq_len` (for the start-up report)."""
        self._num_truncated = sum(self.render(i).truncated for i in range(len(self)))
        return self._num_truncated

    @property
    def num_truncated(self) -> int:
        """Number of samples cut to `max_seq_len`; the first access scans the whole set."""
        if self._num_truncated is None:
            self.count_truncated()
        return self._num_truncated
