"""The torch side: a lazily tokenizing dataset and the collate function the pipeline engine consumes.

Tokenizing a large set up front would cost minutes and one tokenized copy per rank; instead the
dataset keeps validated raw samples (or byte offsets of a .jsonl) and renders in `__getitem__`,
which DataLoader workers run in parallel.
"""
from __future__ import annotations

import os

import torch

from .loading import open_samples
from .render import IGNORE_INDEX, eos_id_of, load_tokenizer, render_validated


class SFTDataset(torch.utils.data.Dataset):
    """Samples of one training file, each item `{"input_ids", "labels"}` (1-D int64, unpadded, truncated).

    `tokenizer` is a tokenizer object or a directory/hub name for `AutoTokenizer`. Every sample is
    validated here, so a bad file fails before any GPU work.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, max_seq_len: int, trust_remote_code: bool = False):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        eos_id_of(tokenizer)
        self.path = os.fspath(path)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.samples = open_samples(self.path)
        self._num_truncated: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def render(self, index: int):
        """The full `Rendered` record of sample `index` (ids, labels, segment texts, truncation)."""
        return render_validated(self.samples[index], self.tokenizer, self.max_seq_len)

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


def collate(batch: list[dict], pad_id: int, max_seq_len: int | None = None, pad_to_max: bool = False):
    """Right-pad a list of items into `((input_ids, position_ids), labels)`, each int64 `[B, S]`, contiguous.

    S is the longest item, or `max_seq_len` with `pad_to_max=True` (pipeline stages need one fixed shape).
    Padding gets `pad_id` and label -100. Position ids are `0..S-1` in every row: real tokens count from 0
    within their sample, and padding sits after them, where causal attention never lets real tokens look,
    so no attention mask is needed.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    lengths = [len(item["input_ids"]) for item in batch]
    if pad_to_max and max_seq_len is None:
        raise ValueError("collate: pad_to_max=True needs max_seq_len")
    if max_seq_len is not None and max(lengths) > max_seq_len:
        raise ValueError(f"collate: an item has {max(lengths)} tokens, more than max_seq_len={max_seq_len}")
    width = max_seq_len if pad_to_max else max(lengths)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (item, length) in enumerate(zip(batch, lengths)):
        input_ids[row, :length] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.as_tensor(item["labels"], dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).expand(len(batch), width).contiguous()
    return (input_ids, position_ids), labels
