"""Feeding the pipeline: which samples make each micro-batch, and the per-token loss normaliser.

Order is a pure function of (seed, epoch, step), so resuming at step s replays nothing and skips
nothing: global batch s of an epoch is `perm[s*B:(s+1)*B]`, and data-parallel rank r takes the
r-th contiguous slice of it, cut into micro-batches.

The loss is a mean over the trained tokens of the whole global batch, not a mean of per-micro-batch
means: each micro-batch's labels travel with `scale = gas * dp * n_i / N`, where `n_i` are its trained
tokens and `N` those of the global batch (all micro-batches of all data-parallel ranks, summed by an
all-reduce on the last stage). DeepSpeed averages the micro-batch losses over `gas` and the gradients
over `dp`, which gives `sum(CE) / N` whatever the topology.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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
    """Random full-length samples (every token trained), deterministic per index: the benchmark workload."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0):
        self.n, self.seq_len, self.vocab, self.seed = num_samples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


def pad_collate(batch: list[dict], pad_id: int, seq_len: int, multiple: int = 0):
    """Right-pad: ((input_ids, position_ids), labels), int64 [B, S].

    `multiple` 0: S = `seq_len` for every micro-batch (fixed shapes). Otherwise S = the longest sample
    rounded up to `multiple` (at most `seq_len`): short fine-tuning samples then cost what they
    contain, not `max_seq_len` (the pipeline sends shapes with every micro-batch in that mode).
    """
    b = len(batch)
    if multiple:
        longest = max(min(len(s["input_ids"]), seq_len) for s in batch)
        seq_len = min(seq_len, -(-longest // multiple) * multiple)
    ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), IGNORE, dtype=torch.long)
    for i, s in enumerate(batch):
        n = min(len(s["input_ids"]), seq_len)
        ids[i, :n] = s["input_ids"][:n]
        labels[i, :n] = s["labels"][:n]
    pos = torch.arange(seq_len, dtype=torch.long).expand(b, seq_len).contiguous()
    return (ids, pos), labels


class _Collate:
    """Picklable collate for DataLoader workers."""

    def __init__(self, pad_id: int, seq_len: int, multiple: int = 0):
        self.pad_id, self.seq_len, self.multiple = pad_id, seq_len, multiple

    def __call__(self, batch):
        return pad_collate(batch, self.pad_id, self.seq_len, self.multiple)


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: label at t+1 is predicted from position t."""
    return int((labels[:, 1:] != IGNORE).sum())


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
        loader = DataLoader(self.dataset, batch_sampler=StepSampler(self.plan, epoch, start_step),
                            collate_fn=self.collate, num_workers=self.num_workers,
                            persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        self._it = iter(loader)
        self._pending = []

    def _load_step(self) -> None:
        micro = [next(self._it) for _ in range(self.plan.grad_accum)]
        counts = [trained_tokens(labels) for _, labels in micro]
        total = torch.tensor([float(sum(counts))])
        if self.sum_over_dp is not None:
            total = self.sum_over_dp(total)
        total = max(float(total), 1.0)
        gas = self.plan.grad_accum * self.plan.dp_size
        self.last_step_trained = sum(counts)
        self.last_step_tokens = sum(int(inputs[0].numel()) for inputs, _ in micro)
        self._pending = [(inputs, (labels, torch.tensor([gas * n / total], dtype=torch.float32)))
                         for (inputs, labels), n in zip(micro, counts)]
        self._pending.reverse()

    def __iter__(self):
        return self

    def __next__(self):
        if not self._pending:
            self._load_step()
        return self._pending.pop()
