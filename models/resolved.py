"""`models.resolve(config.json dict) -> ResolvedModel`: the one way from a model's config to everything the
trainers, the converter, the memory planner and the benchmarks need to know about it.

    model = models.resolve(models.read_hf_config(model_dir))
    specs = model.specs(opts)                 # what PipelineModule gets
    loss_fn = model.loss_fn(opts)             # the last stage's loss
    bounds = model.stage_bounds(parts)        # PipelineModule's stage boundaries over `specs`
    fpt = model.flops_per_token(seq_len)      # TFLOP/s accounting
    row.update(model.step_metrics(loss_fn))   # after each optimizer step, on the last stage
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from utils.metrics import flops_per_token as training_flops_per_token

from .common import ModelError, ModelOptions
from .family import Family, parts_to_boundaries
from .hf_files import read_hf_config
from .registry import get_family

TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")


@dataclass(frozen=True, eq=False)
class ResolvedModel:
    """A `Family` together with its parsed args and the config.json dict they came from.

    Sizes: `num_blocks` L transformer blocks; `num_pipeline_layers` L+2 logical layers (Enter, blocks, Exit:
    one layer file each, what `parts` counts); `num_specs` L+2, or L+3 when `tied` (the trailing tied head).
    """
    family: Family
    args: Any
    hf_config: dict

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def num_blocks(self) -> int:
        return int(self.family.num_layers(self.args))

    @property
    def num_pipeline_layers(self) -> int:
        return self.num_blocks + 2

    @property
    def tied(self) -> bool:
        return bool(self.family.tied(self.args))

    @property
    def num_specs(self) -> int:
        return self.num_pipeline_layers + int(self.tied)

    @property
    def vocab_size(self) -> int:
        return int(self.args.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.args.hidden_size)

    @property
    def head_dim(self) -> int:
        return int(self.args.head_dim)

    # -- layers, loss, partitions ---------------------------------------------------------------

    def specs(self, opts: ModelOptions | None = None) -> list:
        """DeepSpeed layer specs (Enter, Block x L, Exit[, tied head]), `models.build_pipeline_layers`."""
        return self.family.build_layers(self.args, opts or ModelOptions())

    def loss_fn(self, opts: ModelOptions | None = None) -> Callable:
        """The last stage's `loss_fn(outputs, labels)`, `models.build_loss_fn`."""
        return self.family.loss_fn(self.args, opts or ModelOptions())

    def layer_flops(self, seq_len: int) -> list[float]:
        """Forward FLOPs of one sequence per logical layer [Enter, Block x L, Exit] (len L+2): the costs
        `parts: auto` balances."""
        return self.family.layer_flops(self.args, seq_len)

    def default_parts(self, num_stages: int) -> list[int]:
        """The family's split of the L+2 logical layers over `num_stages` by count."""
        return self.family.default_parts(num_stages, self.num_blocks)

    def stage_bounds(self, parts: list[int]) -> list[int]:
        """Logical layers per stage (sum L+2) -> `PipelineModule` boundaries over `specs()` (len num_stages+1);
        a tied head rides with the last stage."""
        return parts_to_boundaries(parts, self.num_specs)

    # -- accounting ------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (both trainers' TFLOP/s): 6·N + 12·L·h·s, N = the active parameters outside
        the input embedding (MoE: the router and the top-k experts a token runs, not all experts), taken as half
        the family's forward FLOPs of one token at seq 1, where attention is negligible; attention is then added
        causal-unaware as usual."""
        active_params = sum(self.layer_flops(1)) / 2
        return training_flops_per_token(active_params, self.num_blocks, self.hidden_size, seq_len)

    def step_metrics(self, loss_fn: Callable) -> dict:
        """Extra metrics of the optimizer step just taken, read (and reset) from the last stage's `loss_fn`
        (mixtral: `moe_aux_loss`, `expert_load_min`/`_max`); {} for families without any. Call it on every
        last-stage rank after each step, log it from the reporting rank."""
        if self.family.step_metrics is None:
            return {}
        return self.family.step_metrics(loss_fn)

    def after_step(self, module: Any, rate: float, group: Any = None) -> None:
        """The family's per-step update of state that is not trained by gradient (`Family.after_step`; deepseek_v3's
        router biases), on every stage after each optimizer step; nothing for other families."""
        if self.family.after_step is not None:
            self.family.after_step(module, rate, group)

    # -- config.json at another width (memory planner) -----------------------------------------------

    @property
    def widths(self) -> list[int]:
        """The config's widths (hidden, MLP, head) that scale together, as spelled by this family."""
        return [self.hf_config[k] for k in self.family.width_keys if isinstance(self.hf_config.get(k), int)]

    def shrunk_config(self, width_divisor: int, max_vocab: int) -> dict:
        """config.json with every width divided by `width_divisor` and the vocabulary cut to `max_vocab`
        (token ids that no longer fit become None); the layer count is kept."""
        cfg = dict(self.hf_config)
        for key in self.family.width_keys:
            if isinstance(cfg.get(key), int):
                cfg[key] //= width_divisor
        for key in self.family.vocab_keys:
            if isinstance(cfg.get(key), int):
                cfg[key] = min(cfg[key], max_vocab)
        for key in TOKEN_ID_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key] >= max_vocab:
                cfg[key] = None
        return cfg


def resolve(hf_config: dict, source: str | Path | None = None) -> ResolvedModel:
    """config.json dict -> ResolvedModel. An unknown `model_type` or a config the family cannot use is a
    ModelError naming the key; with `source` (the config.json path) config errors name that file instead of
    'config.json'."""
    if not isinstance(hf_config, dict):
        raise ModelError(f"config.json must be an object, got {type(hf_config).__name__}")
    family = get_family(hf_config.get("model_type"))
    try:
        args = family.read_config(hf_config)
    except ModelError as err:
        if source is None:
            raise
        raise ModelError(f"{source}: {str(err).removeprefix('config.json: ')}") from None
    return ResolvedModel(family, args, dict(hf_config))


def resolve_dir(model_dir: str | Path) -> ResolvedModel:
    """`resolve` of `model_dir/config.json` (an HF or a pipeline directory); errors name that file."""
    return resolve(read_hf_config(model_dir), source=Path(model_dir) / "config.json")
