"""Sequence packing, data side: `PackedDataset` rows, `pad_collate` with position ids, and the loss equality
that makes packing safe (a packed row's summed cross entropy = its documents' run alone, with the
model's `packed_sequences` attention)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.batching import (IGNORE, BatchPlan, PackedDataset, PipeFeeder, SyntheticDataset, pad_collate,
                              trained_tokens)


def docs(lengths: list[int], vocab: int = 512, seed: int = 0) -> list[dict]:
    """Samples of the given lengths, the first third of each masked like a prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[:n // 3] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


def all_rows(ds: PackedDataset) -> list[list[int]]:
    return [ds.samples_in_row(r) for r in range(len(ds))]


@pytest.fixture(scope="module")
def mixed():
    """2000 synthetic samples of 50..1500 tokens packed into rows of 4096."""
    data = SyntheticDataset(2000, 1500, 1000, seed=3, min_len=50)
    return data, PackedDataset(data, 4096, seed=1, lengths=data.lengths())


def test_synthetic_lengths_and_default_unchanged():
    data = SyntheticDataset(50, 64, 100, seed=2, min_len=10)
    lengths = data.lengths()
    assert lengths == [len(data[i]["input_ids"]) for i in range(50)]
    assert min(lengths) >= 10 and max(lengths) <= 64 and len(set(lengths)) > 10
    assert torch.equal(data[7]["labels"], data[7]["input_ids"]) and torch.equal(data[7]["input_ids"],
                                                                               data[7]["input_ids"])
    full = SyntheticDataset(5, 64, 100, seed=2)
    expected = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(2 * 7919 + 4))
    assert torch.equal(full[4]["input_ids"], expected) and full.lengths() == [64] * 5
    with pytest.raises(ValueError, match="min_len"):
        SyntheticDataset(5, 64, 100, min_len=65)


def test_every_sample_once_rows_fit_and_fill(mixed):
    data, packed = mixed
    rows = all_rows(packed)
    assert sorted(i for row in rows for i in row) == list(range(len(data)))
    assert packed.num_samples == len(data)
    lengths = data.lengths()
    assert max(sum(lengths[i] for i in row) for row in rows) <= 4096
    assert packed.fill_ratio > 0.9
    assert packed.fill_ratio == pytest.approx(sum(lengths) / (len(packed) * 4096))
    assert packed.docs_per_row == pytest.approx(2000 / len(packed))
    assert f"packed 2000 samples into {len(packed)} rows" in packed.describe()


def test_deterministic_per_seed(mixed):
    data, packed = mixed
    again = PackedDataset(data, 4096, seed=1, lengths=data.lengths())
    assert all_rows(again) == all_rows(packed)
    other = PackedDataset(data, 4096, seed=2, lengths=data.lengths())
    assert all_rows(other) != all_rows(packed)
    assert sorted(map(sorted, all_rows(other))) != sorted(map(sorted, all_rows(packed)))  # not only row order


def test_lengths_measured_when_not_given():
    items = docs([5, 9, 3, 14, 7, 2, 11])
    assert all_rows(PackedDataset(items, 16, seed=4)) == all_rows(
        PackedDataset(items, 16, seed=4, lengths=[len(s["input_ids"]) for s in items]))


def test_row_contents_positions_and_labels():
    items = docs([5, 9, 3, 14, 7, 2, 11, 16, 1])
    packed = PackedDataset(items, 16, seed=0)
    for r in range(len(packed)):
        row, members = packed[r], packed.samples_in_row(r)
        starts = [0]
        for i in members[:-1]:
            starts.append(starts[-1] + len(items[i]["input_ids"]))
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 16
        assert row["position_ids"].dtype == torch.long
        assert (row["position_ids"] == 0).nonzero().flatten().tolist() == starts
        for start, i in zip(starts, members):
            n = len(items[i]["input_ids"])
            assert torch.equal(row["input_ids"][start:start + n], items[i]["input_ids"])
            assert torch.equal(row["position_ids"][start:start + n], torch.arange(n))
            assert row["labels"][start] == IGNORE
            assert torch.equal(row["labels"][start + 1:start + n], items[i]["labels"][1:])
    assert items[0]["labels"][0] == IGNORE and items[8]["labels"][0] != IGNORE  # the source is not modified


def test_bad_lengths_refused():
    items = docs([5, 20])
    with pytest.raises(ValueError, match="sample 1 has 20 tokens"):
        PackedDataset(items, 16)
    with pytest.raises(ValueError, match="lengths"):
        PackedDataset(items, 32, lengths=[5])
    with pytest.raises(ValueError, match=r"lengths\[0\] = 4"):
        PackedDataset(items, 32, lengths=[4, 20])[0]


def test_pad_collate_keeps_positions_and_pads_increasing():
    packed = {"input_ids": torch.arange(7), "labels": torch.arange(7),
              "position_ids": torch.tensor([0, 1, 2, 0, 1, 0, 1])}
    plain = {"input_ids": torch.arange(5), "labels": torch.arange(5)}
    (ids, pos), labels = pad_collate([packed, plain], pad_id=99, seq_len=12)
    assert pos[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5, 6]
    assert pos[1].tolist() == list(range(12))
    assert ids[0, 7:].eq(99).all() and labels[0, 7:].eq(IGNORE).all()
    assert pos.is_contiguous()
    (_, pos), _ = pad_collate([packed], pad_id=99, seq_len=16, multiple=4)  # S = 8
    assert pos[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    (_, pos), _ = pad_collate([packed], pad_id=99, seq_len=5)  # cut: its positions cut too
    assert pos[0].tolist() == [0, 1, 2, 0, 1]


def test_trained_tokens_match_unpacked():
    items = docs([5, 9, 3, 14, 7, 2, 11, 16, 1])
    for s in items:
        s["labels"][0] = 7  # a trained first label must not count (nothing predicts it)
    packed = PackedDataset(items, 32, seed=0)
    _, packed_labels = pad_collate([packed[r] for r in range(len(packed))], 0, 32)
    _, alone_labels = pad_collate(items, 0, 32)
    expected = sum(int((s["labels"][1:] != IGNORE).sum()) for s in items)
    assert trained_tokens(packed_labels) == trained_tokens(alone_labels) == expected


def test_feeder_serves_packed_rows():
    data = SyntheticDataset(64, 32, 100, min_len=4)
    packed = PackedDataset(data, 64, lengths=data.lengths())
    feeder = PipeFeeder(packed, BatchPlan(len(packed), 4, 2, 2, 0, 1, 0), pad_id=0, seq_len=64, pad_multiple=16)
    feeder.start_epoch(0)
    (ids, pos), (labels, scale) = next(feeder)
    assert ids.shape == pos.shape == labels.shape and ids.shape[0] == 2
    assert (pos == 0).sum() > 2  # several documents per row
    starts = pos == 0
    assert labels[starts].eq(IGNORE).all()  # document starts untrained
    assert ((pos[:, 1:] == pos[:, :-1] + 1) | starts[:, 1:]).all()  # padding continues the last document
    assert 0 < float(scale) <= 2


# ---------------------------------------------------------------------------------------------- loss equality

def loss_sums(model, packed_row: dict, items: list[dict], seq_len: int) -> tuple[float, float]:
    """(summed CE of the packed row, padded to `seq_len`; summed CE of its documents each run alone)."""
    (ids, pos), labels = pad_collate([packed_row], pad_id=3, seq_len=seq_len)
    logits = model(ids, pos)
    packed = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
    alone = 0.0
    for s in items:
        logits = model(s["input_ids"][None], torch.arange(len(s["input_ids"]))[None])
        alone = alone + F.cross_entropy(logits[0, :-1], s["labels"][1:], ignore_index=IGNORE, reduction="sum")
    return float(packed), float(alone)


def test_packed_loss_equals_documents_alone():
    import models
    from models.sequential import build_sequential
    from models.tiny import tiny_llama_config

    cfg = tiny_llama_config().to_dict()
    torch.manual_seed(0)
    model = build_sequential(cfg, models.ModelOptions(packed_sequences=True)).eval()
    plain = build_sequential(cfg, models.ModelOptions()).eval()
    plain.load_state_dict(model.state_dict())
    items = docs([9, 17, 5, 12])
    packed = PackedDataset(items, 48, seed=0)
    assert len(packed) == 1
    members = [items[i] for i in packed.samples_in_row(0)]
    with torch.no_grad():
        together, alone = loss_sums(model, packed[0], members, 48)
        assert together == pytest.approx(alone, rel=1e-5)
        across, alone_plain = loss_sums(plain, packed[0], members, 48)
    assert alone_plain == pytest.approx(alone, rel=1e-5)  # one document: same attention either way
    assert abs(across - alone) > 1e-3 * abs(alone)  # plain causal attention leaks across documents
