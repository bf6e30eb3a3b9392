"""The `Family` record (what one `model_type` declares), its weight-map rows, and the pieces every family's
spec list is assembled from: the Enter/blocks/Exit list with the tied head, and the default partitions.

A family module (`models/llama.py`, ...) defines one `FAMILY = Family(...)`; `models/registry.py` lists it;
`models.resolve(config.json dict)` pairs it with its parsed args (`ResolvedModel`) for everything else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from deepspeed.pipe import LayerSpec, TiedLayerSpec

from .common import ModelError, ModelOptions, causal_lm_loss_fn

TIED_KEY = "embed"  # TiedLayerSpec key shared by the Enter layer and the trailing tied head
TIED_WEIGHT_ATTR = "embed_tokens.weight"


@dataclass(frozen=True)
class WeightRule:
    """One row of a weight map: HF name pattern <-> (pipeline layer kind, local state_dict key pattern).

    The first `{}` of `hf` is the transformer layer index (only for kind 'block'); any further `{}`
    (e.g. an expert index) are carried over into `local` in order. `kind is None` marks an HF tensor
    that is dropped on import (e.g. a stale `rotary_emb.inv_freq` buffer) and never written on export.
    """
    hf: str
    kind: str | None
    local: str | None = None


@dataclass(frozen=True)
class HfFormat:
    """Another model_type's checkpoint layout that `pp_to_hg` can write (e.g. chatglm -> transformers' glm).

    config(hf_cfg) -> the config.json dict to write in place of the source one.
    tensors(args, hf_name, tensor) -> {name: tensor} in the other layout ({} drops the tensor); called per
        tensor while streaming, so it may split one fused tensor into several but never needs two inputs.
        It must act on a weight's rows only (rename, split or reorder them): `pp_to_hg --adapter-only` passes a
        LoRA B [out, r] through it under its linear's weight name and gives every part the whole A
        (`models/lora_export.py`), which is exact for row operations.
    layer(args, {hf_name: tensor}) -> {name: tensor}: optional, applied by `pp_to_hg` to one layer file's tensors
        at once before `tensors` (MoE: stack a layer's per-expert weights into transformers 5's fused tensors).
    """
    config: Callable[[dict], dict]
    tensors: Callable[[Any, str, torch.Tensor], dict[str, torch.Tensor]]
    layer: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


# ----------------------------------------------------------------------------------------------
# Partitions by layer count


def even_parts(num_items: int, num_stages: int, ends_first: bool = True) -> list[int]:
    """Split `num_items` logical layers over `num_stages` as evenly as possible, by count.

    `ends_first`: leftover layers go to the end stages first (first, last, second, second-to-last, ...): the
    first stage's embedding is almost free, and the ends are where a user most often rebalances by hand.
    Example: 34 layers (llama-7b: 32 blocks + Enter + Exit) over 8 stages -> [5, 4, 4, 4, 4, 4, 4, 5].
    Else the middle stages first (1 .. P-2 in order, then the first, then the last), keeping the ends light:
    30 layers over 8 stages -> [3, 4, 4, 4, 4, 4, 4, 3].
    (The trainer's `parts: auto` balances estimated compute instead: `training.partition.balanced_parts`.)
    """
    if num_stages < 1 or num_items < num_stages:
        raise ModelError(f"cannot split {num_items} pipeline layers over {num_stages} stages")
    base, extra = divmod(num_items, num_stages)
    parts = [base] * num_stages
    if ends_first:
        order = [i // 2 if i % 2 == 0 else num_stages - 1 - i // 2 for i in range(num_stages)]
    else:
        order = [*range(1, num_stages - 1), 0, num_stages - 1]
    for stage in order[:extra]:
        parts[stage] += 1
    return parts


def even_default_parts(num_stages: int, num_layers: int) -> list[int]:
    """`Family.default_parts` unless a family sets its own: L+2 logical layers split by `even_parts`."""
    return even_parts(num_layers + 2, num_stages)


def parts_to_boundaries(parts: list[int], num_specs: int) -> list[int]:
    """Turn per-stage logical layer counts into DeepSpeed's `PipelineModule.parts` boundaries.

    `sum(parts)` is L+2 (one per layer file); with tied embeddings the spec list has one more entry
    (the tied LM head, no file), which always joins the last stage together with Exit.
    """
    total = sum(parts)
    if num_specs not in (total, total + 1):
        raise ModelError(f"parts {parts} cover {total} layers but the model has {num_specs} layer specs")
    bounds = [0]
    for count in parts:
        bounds.append(bounds[-1] + count)
    bounds[-1] = num_specs
    return bounds


# ----------------------------------------------------------------------------------------------
# The spec list


def pipeline_specs(enter: tuple, blocks: list, exit_spec: LayerSpec, tied: bool = False,
                   tied_head: Callable | None = None) -> list:
    """The spec list every family builds: Enter, the L block specs, Exit (L+2 specs, one file each).

    enter: `(module class, *constructor args)` of the Enter layer. Tied embeddings: Enter becomes a
    `TiedLayerSpec` with key 'embed' and a trailing spec (L+3 specs) repeats it with `forward_fn=tied_head`,
    `tied_head(enter module, Exit's output)`: it has no module of its own (hence no file) and computes the
    head with the embedding matrix on the last stage, DeepSpeed keeping both copies in sync.
    """
    cls, *args = enter
    if not tied:
        return [LayerSpec(cls, *args), *blocks, exit_spec]
    if tied_head is None:
        raise ModelError(f"{cls.__name__}: tied embeddings need a tied_head forward_fn")
    return [TiedLayerSpec(TIED_KEY, cls, *args, tied_weight_attr=TIED_WEIGHT_ATTR), *blocks, exit_spec,
            TiedLayerSpec(TIED_KEY, cls, *args, forward_fn=tied_head, tied_weight_attr=TIED_WEIGHT_ATTR)]


# ----------------------------------------------------------------------------------------------
# Released configs

RELEASED_DIR = Path(__file__).resolve().parent / "released"


def released_config(file_name: str) -> dict:
    """One committed real config.json of a released checkpoint (`models/released/FILE`)."""
    return json.loads((RELEASED_DIR / file_name).read_text())


# ----------------------------------------------------------------------------------------------
# The record


def num_layers_of(args: Any) -> int:
    """`Family.num_layers` default: the args' `num_layers`."""
    return args.num_layers


def tied_of(args: Any) -> bool:
    """`Family.tied` default: the args' `tie_word_embeddings` (False when the args have none)."""
    return bool(getattr(args, "tie_word_embeddings", False))


@dataclass
class Family:
    """Everything the trainer and the converter need to know about one `model_type`.

    Required:
    read_config(hf_cfg) -> args: parse config.json (a dict) into the family's args dataclass (with at least
        `vocab_size`, `hidden_size`, `head_dim`); errors are `ModelError`s naming the key.
    build_layers(args, opts) -> list of DeepSpeed `LayerSpec`/`TiedLayerSpec`: Enter, Block x L, Exit
        (+ a trailing tied-head spec with no file when embeddings are tied): `pipeline_specs`.
    weight_map: tuple of `WeightRule`, the one table used by both conversion directions.
    layer_flops(args, seq_len) -> forward FLOPs per logical layer for one sequence (len L+2).

    With defaults:
    default_parts(num_stages, num_layers) -> logical layers per stage (sums to L+2); `even_default_parts`.
    loss_fn(args, opts) -> callable(outputs, labels) used by the last pipeline stage; `causal_lm_loss_fn`.
    num_layers(args) -> L, the number of transformer blocks; `args.num_layers`.
    tied(args) -> whether the LM head shares the embedding matrix; `args.tie_word_embeddings` or False.
    step_metrics(loss_fn) -> dict: extra per-step metrics read (and reset) from the last stage's loss object
        after each optimizer step (mixtral: expert load); None: none.
    after_step(module, rate, group): optional, called on every stage after each optimizer step with that stage's
        layers, the training config's `moe_bias_update_rate` and the data-parallel group (deepseek_v3: the
        auxiliary-loss-free update of the routers' correction biases, `models.moe.update_expert_bias`).
    width_keys: config.json keys of the widths that scale together (hidden, MLP, head); the memory planner
        measures activations at a fraction of them (`ResolvedModel.shrunk_config`).
    vocab_keys: config.json keys holding the vocabulary size.
    autotp_tested: whether `demo.py`'s tensor-parallel inference (DeepSpeed AutoTP) was run with this family
        (others get a warning, not a refusal).
    tied_hf_names: HF names that duplicate the embedding when tied; dropped on import when present.
    to_pp_hook / to_hf_hook (args, kind, tensors) -> tensors: optional split/fuse step applied to one
        pipeline layer's local tensors after mapping from HF names / before mapping back to HF names.
    reference_model(hf_dir) -> fp32 transformers model with the same math, for `verify`; None means
        `AutoModelForCausalLM` (families whose HF class needs remote code map onto a built-in class).
    hf_formats: extra layouts `pp_to_hg --format NAME` can write instead of the family's own.
    canonical_hf_name(name) -> name: optional respelling of checkpoint tensor names before the weight map
        sees them (BLOOM hub files omit the `transformer.` prefix that transformers writes).
    from_hf_tensor(args, hf_name, tensor) -> {hf_name: tensor}: optional per-tensor rewrite of another
        layout of the same weights into the names of `weight_map`, applied on import after
        `canonical_hf_name` (mixtral: transformers 5's fused `experts.gate_up_proj` -> per-expert w1/w3).
    debug_config(**overrides) -> config.json dict of a tiny random model of the family (a few hundred thousand
        parameters, every feature of the family switched on: windows shorter than the test sequences, biases,
        norms), for the tests, the benchmarks' CPU smoke mode and any check that loops over the registry.
    released_configs: {benchmark name: file name in `models/released/`}: real config.json files of released
        checkpoints (`released_config(name)` reads one); the first is the family's benchmark width.
    carried_hf_prefixes: checkpoint tensor names (as in the files, before `canonical_hf_name`) that are not part
        of the pipeline model but must survive a round trip, e.g. gemma3's vision tower and projector beside the
        language model it trains. `hg_to_pp` stores them verbatim in `extra_tensors.safetensors` (`EXTRA_TENSORS`)
        next to the layer files, together with the checkpoint's own spelling of every name `canonical_hf_name`
        changed; `pp_to_hg` writes them back unchanged and the pipeline's tensors under those original names, so
        the export has the source's layout and the source's config.json.
    """
    model_type: str
    read_config: Callable[[dict], Any]
    build_layers: Callable[[Any, ModelOptions], list]
    weight_map: tuple[WeightRule, ...]
    layer_flops: Callable[[Any, int], list[float]]
    default_parts: Callable[..., list[int]] = even_default_parts
    loss_fn: Callable[[Any, ModelOptions], Callable] = causal_lm_loss_fn
    num_layers: Callable[[Any], int] = num_layers_of
    tied: Callable[[Any], bool] = tied_of
    step_metrics: Callable[[Any], dict] | None = None
    after_step: Callable[[nn.Module, float, Any], Any] | None = None
    width_keys: tuple[str, ...] = ("hidden_size", "intermediate_size", "head_dim")
    vocab_keys: tuple[str, ...] = ("vocab_size",)
    autotp_tested: bool = False
    tied_hf_names: tuple[str, ...] = ()
    to_pp_hook: Callable[[Any, str, dict], dict] | None = None
    to_hf_hook: Callable[[Any, str, dict], dict] | None = None
    reference_model: Callable[[Any], nn.Module] | None = None
    hf_formats: dict[str, HfFormat] = field(default_factory=dict)
    canonical_hf_name: Callable[[str], str] | None = None
    from_hf_tensor: Callable[[Any, str, torch.Tensor], dict[str, torch.Tensor]] | None = None
    debug_config: Callable[..., dict] | None = None
    released_configs: dict[str, str] = field(default_factory=dict)
    carried_hf_prefixes: tuple[str, ...] = ()
