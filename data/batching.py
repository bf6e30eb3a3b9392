"""Feeding the pipeline: which samples make each micro-batch, and the per-token loss normaliser.

Order is a pure function of (seed, epoch, step), so resuming at step s replays nothing and skips
nothing: global batch s of an epoch is `perm[s*B:(s+1)*B]`, and data-parallel rank r takes the
r-th contiguous slice of it, cut into micro-batches.

The loss is a mean over the trained tokens of the whole global batch, not a mean of per-micro-batch
means: each micro-batch's labels travel with `scale = gas * dp * n_i / N`, where `n_i` are its trained
tokens and `N` those of the global batch (all micro-batches of all data-parallel ranks, summed by an
all-reduce on the last stage). DeepSpeed averages the micro-batch losses over `gas` and the gradients
over `dp`, which gives `sum(CE) / N` whatever the topology.

With sequence packing the plan's samples are `PackedDataset` rows (several whole documents each,
position ids restarting at 0 per document); everything above applies to rows unchanged.

Evaluation (`EvalPlan`, `EvalFeeder`) runs every eval sample once, split over the data-parallel ranks and
padded with empty samples to equal micro-batch counts, with the same scale rule per eval call.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.metrics import log
from utils.preempt import workers_ignore_stop_signals

IGNORE = -100


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    train_batch_size: int
    micro_batch: int
    grad_accum: int
    dp_rank: int
    dp_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.train_batch_size


class StepSampler(Sampler):
    """Yields the index lists of this rank's micro-batches from `start_step` to the end of `epoch`."""

    def __init__(self, plan: BatchPlan, epoch: int, start_step: int = 0):
        self.plan, self.epoch, self.start_step = plan, epoch, start_step

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start_step) * self.plan.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        p = self.plan
        g = torch.Generator().manual_seed(p.seed * 1000003 + self.epoch)
        perm = torch.randperm(p.num_samples, generator=g).tolist()
        per_rank = p.micro_batch * p.grad_accum
        for step in range(self.start_step, p.steps_per_epoch):
            batch = perm[step * p.train_batch_size:(step + 1) * p.train_batch_size]
            mine = batch[p.dp_rank * per_rank:(p.dp_rank + 1) * per_rank]
            for m in range(p.grad_accum):
                yield mine[m * p.micro_batch:(m + 1) * p.micro_batch]


class SyntheticDataset(Dataset):
    """Random samples (every token trained), deterministic per index: the benchmark workload.

    Full length by default; with `min_len`, sample i is `uniform[min_len, seq_len]` tokens long (drawn
    from its own generator), the variable-length workload that sequence packing is for.
    """

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0, min_len: int | None = None):
        if min_len is not None and not 1 <= min_len <= seq_len:
            raise ValueError(f"min_len must be in [1, seq_len={seq_len}], got {min_len}")
        self.n, self.seq_len, self.vocab, self.seed, self.min_len = num_samples, seq_len, vocab_size, seed, min_len

    def __len__(self) -> int:
        return self.n

    def _generator_and_len(self, i: int) -> tuple[torch.Generator, int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        if self.min_len is None:
            return g, self.seq_len
        return g, int(torch.randint(self.min_len, self.seq_len + 1, (1,), generator=g))

    def lengths(self) -> list[int]:
        """Token count of every sample without drawing the tokens (for `PackedDataset(lengths=...)`)."""
        return [self._generator_and_len(i)[1] for i in range(self.n)]

    def __getitem__(self, i: int) -> dict:
        g, n = self._generator_and_len(i)
        ids = torch.randint(0, self.vocab, (n,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


def pack_rows(lengths: torch.Tensor, seq_len: int, order: torch.Tensor) -> list[list[int]]:
    """Sample indices of each row: worst-fit decreasing, rows of at most `seq_len` tokens.

    Samples go longest first (ties in `order`) into the open row with the most room, or a new row
    when none has room (then none can fit it, as the rest are shorter): one heap, O(n log n),
    a few seconds for 1e6 samples, fill ~0.99+ on mixed lengths.
    """
    order = order[torch.argsort(lengths[order], descending=True, stable=True)].tolist()
    sizes = lengths.tolist()
    rows: list[list[int]] = []
    heap: list[tuple[int, int]] = []  # (-room, row)
    for i in order:
        if heap and -heap[0][0] >= sizes[i]:
            room, r = heap[0]
            rows[r].append(i)
            heapq.heapreplace(heap, (room + sizes[i], r))
        else:
            rows.append([i])
            heapq.heappush(heap, (sizes[i] - seq_len, len(rows) - 1))
    return rows


class PackedDataset(Dataset):
    """Rows of several whole samples (documents), at most `seq_len` tokens each, built once, deterministically.

    Item r: `input_ids`, `labels` (each document's first label -100: it must not be predicted from the
    previous document, so a row's summed loss equals its documents' losses run alone) and `position_ids`
    (0..len-1 per document: a position 0 starts a new document, which is what the model's
    `packed_sequences` attention and `pad_collate` go by). `lengths` (tokens per sample) skips
    measuring them by indexing every sample once. Which samples share a row, and the row order,
    depend on `seed`.
    """

    def __init__(self, dataset: Dataset, seq_len: int, seed: int = 0, lengths: list[int] | None = None):
        self.dataset, self.seq_len = dataset, seq_len
        if lengths is None:
            lengths = measure_lengths(dataset)
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        if len(self.lengths) != len(dataset):
            raise ValueError(f"lengths has {len(self.lengths)} entries, the dataset {len(dataset)} samples")
        bad = ((self.lengths < 1) | (self.lengths > seq_len)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"sample {i} has {int(self.lengths[i])} tokens; packing needs 1..seq_len={seq_len}")
        g = torch.Generator().manual_seed(seed)
        rows = pack_rows(self.lengths, seq_len, torch.randperm(len(dataset), generator=g))
        rows = [rows[r] for r in torch.randperm(len(rows), generator=g).tolist()]
        # CSR layout: row r holds samples _flat[_start[r]:_start[r + 1]] (small to pickle into workers)
        self._flat = torch.tensor([i for row in rows for i in row], dtype=torch.long)
        self._start = torch.tensor([0] + [len(row) for row in rows], dtype=torch.long).cumsum(0)

    def __len__(self) -> int:
        return len(self._start) - 1

    @property
    def num_samples(self) -> int:
        return len(self._flat)

    def samples_in_row(self, r: int) -> list[int]:
        """Original dataset indices of row r's documents, in row order."""
        return self._flat[self._start[r]:self._start[r + 1]].tolist()

    @property
    def docs_per_row(self) -> float:
        return self.num_samples / max(len(self), 1)

    @property
    def fill_ratio(self) -> float:
        """Real tokens / (rows * seq_len)."""
        return int(self.lengths.sum()) / max(len(self) * self.seq_len, 1)

    def describe(self) -> str:
        """One log line: samples, rows, documents per row (mean, max), fill."""
        most = int((self._start[1:] - self._start[:-1]).max()) if len(self) else 0
        return (f"packed {self.num_samples} samples into {len(self)} rows of {self.seq_len} tokens: "
                f"{self.docs_per_row:.2f} docs/row (max {most}), {100 * self.fill_ratio:.1f}% filled")

    def __getitem__(self, r: int) -> dict:
        ids, labels, pos = [], [], []
        for i in self.samples_in_row(r):
            item = self.dataset[i]
            n = len(item["input_ids"])
            if n != int(self.lengths[i]):
                raise ValueError(f"sample {i} has {n} tokens but lengths[{i}] = {int(self.lengths[i])}")
            ids.append(item["input_ids"])
            labels.append(item["labels"].clone())
            labels[-1][0] = IGNORE
            pos.append(torch.arange(n, dtype=torch.long))
        return {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "position_ids": torch.cat(pos)}


def measure_lengths(dataset: Dataset) -> list[int]:
    """Token count of every sample, by indexing each once (logged when slow: pass `lengths` instead)."""
    t0 = time.perf_counter()
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    if time.perf_counter() - t0 > 5:
        log(f"packing: measured {len(lengths)} sample lengths in {time.perf_counter() - t0:.1f} s")
    return lengths


def pad_collate(batch: list[dict], pad_id: int, seq_len: int, multiple: int = 0):
    """Right-pad: ((input_ids, position_ids), labels), int64 [B, S].

    `multiple` 0: S = `seq_len` for every micro-batch (fixed shapes). Otherwise S = the longest sample
    rounded up to `multiple` (at most `seq_len`): short fine-tuning samples then cost what they
    contain, not `max_seq_len` (the pipeline sends shapes with every micro-batch in that mode).

    An item's own "position_ids" (a `PackedDataset` row: 0 at each document start) are kept, and its
    padding continues the last document (last + 1, + 2, ...), so padding never looks like a new
    document; items without them get 0..S-1.
    """
    b = len(batch)
    if multiple:  # (at least one multiple: an eval micro-batch can be all padding samples)
        longest = max(1, max(min(len(s["input_ids"]), seq_len) for s in batch))
        seq_len = min(seq_len, -(-longest // multiple) * multiple)
    ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), IGNORE, dtype=torch.long)
    pos = torch.arange(seq_len, dtype=torch.long).expand(b, seq_len).contiguous()
    for i, s in enumerate(batch):
        n = min(len(s["input_ids"]), seq_len)
        ids[i, :n] = s["input_ids"][:n]
        labels[i, :n] = s["labels"][:n]
        if "position_ids" in s and n:
            pos[i, :n] = s["position_ids"][:n]
            pos[i, n:] = pos[i, n - 1] + 1 + torch.arange(seq_len - n)
    return (ids, pos), labels


class _Collate:
    """Picklable collate for DataLoader workers."""

    def __init__(self, pad_id: int, seq_len: int, multiple: int = 0):
        self.pad_id, self.seq_len, self.multiple = pad_id, seq_len, multiple

    def __call__(self, batch):
        return pad_collate(batch, self.pad_id, self.seq_len, self.multiple)


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: label at t+1 is predicted from position t.

    Packed rows count the same as their documents alone: each document's first label is -100.
    """
    return int((labels[:, 1:] != IGNORE).sum())


def micro_batch_loader(dataset: Dataset, batch_sampler, collate, num_workers: int) -> Iterator:
    """Collated micro-batches of `batch_sampler`'s index lists; workers (if any) ignore stop signals."""
    return iter(DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                           persistent_workers=False, prefetch_factor=4 if num_workers else None,
                           worker_init_fn=workers_ignore_stop_signals if num_workers else None))


def with_scales(micro: list, dp_size: int, sum_over_dp=None) -> tuple[list, list[int], float]:
    """`(inputs, labels)` micro-batches -> `(inputs, (labels, scale))` with scale `k·dp·n_i / N`: `k` micro-batches,
    `n_i` trained tokens of micro-batch i, `N` those of all `k` summed over the data-parallel ranks (at least 1).
    Averaging the micro-batch losses over `k` and `dp` then gives `sum(CE) / N`. Returns (scaled, n_i, N)."""
    counts = [trained_tokens(labels) for _, labels in micro]
    total = torch.tensor([float(sum(counts))])
    if sum_over_dp is not None:
        total = sum_over_dp(total)
    total = float(total)
    gas = len(micro) * dp_size
    scaled = [(inputs, (labels, torch.tensor([gas * n / max(total, 1.0)], dtype=torch.float32)))
              for (inputs, labels), n in zip(micro, counts)]
    return scaled, counts, total


class PipeFeeder:
    """Iterator handed to `engine.train_batch`: one optimizer step's micro-batches, labels with their scale.

    Also records, per step, the samples, total tokens and trained tokens it fed (for throughput).
    """

    def __init__(self, dataset: Dataset, plan: BatchPlan, pad_id: int, seq_len: int, num_workers: int = 0,
                 sum_over_dp=None, pad_multiple: int = 0):
        self.dataset, self.plan = dataset, plan
        self.sum_over_dp = sum_over_dp  # callable(float tensor [1]) -> summed over data-parallel ranks
        self.collate = _Collate(pad_id, seq_len, pad_multiple)
        self.num_workers = num_workers
        self._it: Iterator | None = None
        self._pending: list = []
        self.last_step_tokens = 0
        self.last_step_trained = 0

    def start_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._it = micro_batch_loader(self.dataset, StepSampler(self.plan, epoch, start_step), self.collate,
                                      self.num_workers)
        self._pending = []

    def _load_step(self) -> None:
        micro = [next(self._it) for _ in range(self.plan.grad_accum)]
        self._pending, counts, _ = with_scales(micro, self.plan.dp_size, self.sum_over_dp)
        self.last_step_trained = sum(counts)
        self.last_step_tokens = sum(int(inputs[0].numel()) for inputs, _ in micro)
        self._pending.reverse()

    def __iter__(self):
        return self

    def __next__(self):
        if not self._pending:
            self._load_step()
        return self._pending.pop()


# ----------------------------------------------------------------------------------------------
# Evaluation: every held-out sample exactly once, split over the data-parallel ranks


@dataclass(frozen=True)
class EvalPlan:
    """Which eval samples each data-parallel rank runs, in how many micro-batches, in which eval calls.

    Rank r takes samples r, r + dp, r + 2·dp, ... padded with empty samples (index -1: no token, no
    label) to `micro_batches · micro_batch`, the same count on every rank, so every rank runs the same
    number of forward passes (pipeline schedules, ZeRO-3 gathers). The micro-batches go in calls of at
    most `chunk` (`chunks()`: one `PipelineEngine.eval_batch` each), so memory does not grow with the set.
    """
    num_samples: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    chunk: int = 64

    @property
    def micro_batches(self) -> int:
        per_rank = -(-self.num_samples // self.dp_size)
        return -(-per_rank // self.micro_batch)

    def chunks(self) -> list[int]:
        """Micro-batches per eval call, summing to `micro_batches`."""
        m = self.micro_batches
        return [min(self.chunk, m - i) for i in range(0, m, self.chunk)]

    def batches(self) -> list[list[int]]:
        """This rank's micro-batches as sample indices (-1 = an empty padding sample)."""
        mine = list(range(self.dp_rank, self.num_samples, self.dp_size))
        mine += [-1] * (self.micro_batches * self.micro_batch - len(mine))
        return [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]


class _WithEmpty(Dataset):
    """`dataset` plus index -1: an empty sample (padding that contributes no token to the eval loss)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            empty = torch.zeros(0, dtype=torch.long)
            return {"input_ids": empty, "labels": empty.clone()}
        return self.dataset[i]


class EvalFeeder:
    """One evaluation's micro-batches, `((input_ids, position_ids), (labels, scale))` as PipeFeeder's.

    `chunk(k)` loads the next `k` micro-batches and returns an iterator over them; their scale is
    `k · dp · n_i / N_c` with `N_c` the trained tokens of this call summed over the data-parallel ranks
    (`tokens` afterwards), so averaging the micro-batch losses over `k` and `dp` (what `eval_batch` does)
    gives `sum(CE) / N_c`; `training.evaluate` weights the calls by `N_c`.
    """

    def __init__(self, dataset: Dataset, plan: EvalPlan, pad_id: int, seq_len: int, num_workers: int = 0,
                 sum_over_dp=None, pad_multiple: int = 0):
        self.dataset, self.plan, self.sum_over_dp = _WithEmpty(dataset), plan, sum_over_dp
        self.collate = _Collate(pad_id, seq_len, pad_multiple)
        self.num_workers = num_workers
        self._it: Iterator | None = None
        self.tokens = 0

    def start(self) -> None:
        self._it = micro_batch_loader(self.dataset, self.plan.batches(), self.collate, self.num_workers)

    def chunk(self, k: int) -> Iterator:
        scaled, _, total = with_scales([next(self._it) for _ in range(k)], self.plan.dp_size, self.sum_over_dp)
        self.tokens = int(round(total))
        return iter(scaled)
