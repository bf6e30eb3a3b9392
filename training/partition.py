"""Partitioning a family's layer list into pipeline stages (the PipelineModule that honours a partition is
training/ds/pipeline_module.py's).

`parts` counts *logical* layers (embedding, L blocks, head = L + 2), as in the seed's README. A tied
model's spec list has one more entry (the head that reuses the embedding, `TiedLayerSpec` with a
`forward_fn`); it carries no weights of its own and always rides with the last stage
(`models.family.parts_to_boundaries`).
"""
from __future__ import annotations

from utils.config import ConfigError, check_parts_sum


def balanced_parts(costs: list[float], num_stages: int) -> list[int]:
    """Contiguous split of `costs` into `num_stages` non-empty groups minimising the largest group sum.

    Exact dynamic programme over prefix sums: O(stages * layers^2), trivial for a few hundred layers.
    """
    n = len(costs)
    if num_stages > n:
        raise ConfigError(f"model_topo.process_topology.dims: {num_stages} pipeline stages but the model has "
                          f"only {n} pipeline layers; use at most {n} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max-stage cost splitting the first i layers into s stages; cut[s][i]: last cut.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                cand = max(best[s - 1][j], prefix[i] - prefix[j])
                if cand < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = cand, j
    bounds, i = [n], n
    for s in range(num_stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    bounds.reverse()
    return [bounds[k + 1] - bounds[k] for k in range(num_stages)]


def resolve_parts(parts, costs: list[float], num_stages: int) -> list[int]:
    """`parts` from the config ('auto' or a list) -> a validated list of logical layer counts."""
    if parts == "auto":
        return balanced_parts(costs, num_stages)
    check_parts_sum(parts, len(costs))
    return list(parts)


def describe_parts(parts: list[int], costs: list[float]) -> str:
    total = sum(costs) or 1.0
    out, start = [], 0
    for stage, p in enumerate(parts):
        share = sum(costs[start:start + p]) / total
        out.append(f"stage {stage}: layers {start}..{start + p - 1} ({p}, {share:.1%} of compute)")
        start += p
    return "; ".join(out)
