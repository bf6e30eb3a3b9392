"""Partitioning a family's layer list into pipeline stages, and the PipelineModule that honours it.

`parts` counts *logical* layers (embedding, L blocks, head = L + 2), as in the seed's README. A tied
model's spec list has one more entry (the head that reuses the embedding, `TiedLayerSpec` with a
`forward_fn`); it carries no weights of its own and always rides with the last stage.
"""
from __future__ import annotations

from deepspeed.pipe import PipelineModule

from models.family import parts_to_boundaries
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


# Logical layer counts per stage -> DeepSpeed's stage boundaries over the spec list (a trailing tied head belongs
# to the last stage). One function, in models/family.py (`ResolvedModel.stage_bounds` needs no spec count);
# this name is kept for the trainers' current imports.
spec_bounds = parts_to_boundaries


def describe_parts(parts: list[int], costs: list[float]) -> str:
    total = sum(costs) or 1.0
    out, start = [], 0
    for stage, p in enumerate(parts):
        share = sum(costs[start:start + p]) / total
        out.append(f"stage {stage}: layers {start}..{start + p - 1} ({p}, {share:.1%} of compute)")
        start += p
    return "; ".join(out)


class PartitionedPipelineModule(PipelineModule):
    """A PipelineModule whose stage boundaries are given, instead of computed by DeepSpeed."""

    def __init__(self, layers, bounds: list[int], **kwargs):
        self._given_bounds = list(bounds)
        super().__init__(layers=layers, partition_method="uniform", **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._given_bounds)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def _get_frozen_parameter_names(self, layer):
        """The state_dict keys `save_checkpoint(exclude_frozen_parameters=True)` leaves out: every key that is not
        a trained tensor. DeepSpeed's own version lists frozen parameter names, which a layer whose state_dict
        renames its parameters (stacked MoE experts written per expert) does not have as keys (KeyError)."""
        from models.lora import lora_state_dict

        kept = lora_state_dict(layer)
        return [key for key in layer.state_dict() if key not in kept]
