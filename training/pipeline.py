"""PipelineTrainer: the family's pipeline layers (models/) in DeepSpeed's PipelineModule, trained by its
PipelineEngine (`train_batch`: the 1F1B schedule over the micro-batches of one optimizer step)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from training.transforms import Transforms
from utils.config import ConfigError, TrainConfig
from utils.metrics import log


@dataclass
class PipelineModel:
    """The model half of the plan: the resolved family config (models.resolve), layer options, per-layer costs
    and the layers per stage."""
    resolved: Any
    opts: Any
    costs: list
    parts: list
    transform_lines: tuple = ()  # one summary line per enabled transform (training/transforms.py)

    @property
    def vocab_size(self) -> int:
        return self.resolved.vocab_size


def resolve_compile_blocks(value: bool | str) -> bool:
    """`compile_blocks: auto` compiles when training on CUDA GPUs (A/B in benchmarks/results/families-*) and
    runs eagerly on CPU, where compiling costs more than it saves."""
    if value != "auto":
        return bool(value)
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def varying_shapes(cfg: TrainConfig) -> bool:
    """Whether micro-batch shapes can change between micro-batches. If so DeepSpeed sends each boundary
    tensor's shape before the tensor (small blocking p2p messages per micro-batch) and compiled blocks see
    several shapes; if not, shapes are sent once. Packed rows are nearly full: they are padded to
    max_seq_len, as are full-length synthetic samples."""
    full_length_only = cfg.data.synthetic_data and not cfg.data.synthetic_min_len
    return cfg.data.pad_to_multiple_of > 0 and not full_length_only and not cfg.data.packing


def local_layers(pipe_module):
    """(global layer index, module) for every layer with weights on this stage, tied copies included
    (a tied module is indexed by the first spec that uses it, where its weights are stored)."""
    from training.ds.pipeline_module import layer_specs, local_start

    seen = set()
    start = local_start(pipe_module)
    for local_idx, layer in enumerate(pipe_module.forward_funcs):
        if isinstance(layer, torch.nn.Module):
            seen.add(id(layer))
            yield start + local_idx, layer
    for key, module in pipe_module.tied_modules.items():
        if id(module) not in seen:
            yield next(i for i, s in enumerate(layer_specs(pipe_module)) if getattr(s, "key", None) == key), module


def init_from_scratch(pipe_module, hf_cfg: dict, seed: int) -> None:
    """HF-style init (normal(0, initializer_range), norm scales 1, biases 0) seeded per global layer
    index, so every partition of the same model starts from the same weights."""
    std = float(hf_cfg.get("initializer_range", 0.02))
    for idx, layer in local_layers(pipe_module):
        torch.manual_seed(seed + idx)
        for mod in layer.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(mod.weight, 0.0, std)
            for name, prm in mod.named_parameters(recurse=False):
                if name == "bias":
                    torch.nn.init.zeros_(prm)
                elif prm.ndim == 1:  # norm scales
                    torch.nn.init.ones_(prm)
                elif prm.ndim == 3:  # stacked expert weights [E, out, in]
                    torch.nn.init.normal_(prm, 0.0, std)


def load_layer_weights(pipe_module, model_path: str, skip: set | None = None) -> None:
    """Load this stage's `layer_XX-model_states.pt` files (weights only, never pickled objects); layers whose
    index is in `skip` were loaded as they were built (hook_layer_builds)."""
    for idx, layer in local_layers(pipe_module):
        if idx not in (skip or ()):
            load_layer_file_into(model_path, idx, layer)


def load_layer_file_into(model_path: str, idx: int, layer: torch.nn.Module) -> None:
    from models.layout import load_layer_file

    path, state = load_layer_file(model_path, idx)
    try:
        layer.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"model_path: {path} does not match config.json: {str(e).splitlines()[0]}") from None


def hook_layer_builds(specs: list, transforms, model_path: str, loaded: set) -> None:
    """Make each layer spec's `build()` hand the new module to `transforms.build_layer` (which may load its weights
    and convert it at once), recording in `loaded` the indices whose weights it loaded. A tied module is indexed
    by the first spec that uses it, where its weights are stored (as local_layers does)."""
    first = {}
    for i, spec in enumerate(specs):
        if not hasattr(spec, "build"):
            continue
        key = getattr(spec, "key", None)
        idx = first.setdefault(key, i) if key is not None else i

        def build(original=spec.build, idx=idx):
            module = original()
            if transforms.build_layer(idx, module, lambda j, mod: load_layer_file_into(model_path, j, mod)):
                loaded.add(idx)
            return module

        spec.build = build


def cpu_lion(ds: dict, groups: list[dict], device: torch.device):
    """DeepSpeed's `Lion` is a fused GPU kernel (or its CPU version under ZeRO offload); on CPU without
    offload, hand DeepSpeed the PyTorch implementation (lion-pytorch) with the same hyper-parameters (and
    take `optimizer` out of `ds`, the run's DeepSpeed dict)."""
    opt = ds.get("optimizer")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if device.type != "cpu" or not isinstance(opt, dict) or str(opt.get("type", "")).lower() != "lion" \
            or offload != "none":
        return None
    from lion_pytorch import Lion

    p = opt.get("params", {})
    del ds["optimizer"]
    return Lion(groups, lr=p.get("lr", 1e-4), betas=tuple(p.get("betas", (0.9, 0.99))),
                weight_decay=p.get("weight_decay", 0.0))


class PipelineTrainer:
    """`dims [stages, replicas]`; the last stage's first replica reports. Its parts, in the order the loop
    calls them: check, data_parallel, dims, prepare_model (before the process group); build; make_feeder,
    make_eval_feeder, flops_per_token; per step: step, step_metrics, grad_norm; eval_chunk (training.evaluate);
    save_extras, checkpoint_info."""
    name = "pipeline"

    def __init__(self):
        self.engine = self.engine_view = self.loss_fn = self.eval_loss_fn = self.guard = None
        self.reporter, self.stage, self.dp_rank = False, 0, 0

    # -- before the process group
    def check(self, cfg: TrainConfig, world: int) -> None:
        pipe, data = cfg.dims
        if pipe * data != world:
            raise ConfigError(f"model_topo.process_topology.dims: {[pipe, data]} needs {pipe * data} processes, "
                              f"but {world} were launched (set dims so that pipe x data = {world})")
        bf16 = cfg.ds.get("bf16") or {}
        zero = int((cfg.ds.get("zero_optimization") or {}).get("stage", 0))
        if (cfg.precision == "bf16" and bf16.get("immediate_grad_update") is False and cfg.model.fused_head_loss
                and not zero):
            # DeepSpeed's BF16_Optimizer zeroes the bf16 gradients once backward has started, after the fused
            # head has already handed autograd its weight gradient: that gradient would be lost every step.
            raise ConfigError("bf16.immediate_grad_update: false drops the LM head's gradient with "
                              "fused_head_loss: true (DeepSpeed clears bf16 gradients after the fused head wrote "
                              "its own); remove the key (default true) or set fused_head_loss: false")

    def dims(self, cfg: TrainConfig, world: int) -> list[int]:
        return list(cfg.dims)

    def prepare_model(self, cfg: TrainConfig, resuming: bool) -> PipelineModel:
        import models
        from models.layout import find_layer_file
        from training.partition import resolve_parts

        try:
            resolved = models.resolve_dir(cfg.model.path)
        except (models.ModelError, FileNotFoundError) as e:
            raise ConfigError(f"model_path: {e}") from None
        opts = models.ModelOptions(use_grad_ckpt=cfg.model.use_grad_ckpt, use_flash_attn=cfg.model.use_flash_attn,
                                   aux_max_z_loss_weight=float(cfg.model.z_loss_weight),
                                   packed_sequences=cfg.data.packing, fused_head_loss=cfg.model.fused_head_loss,
                                   compile_blocks=resolve_compile_blocks(cfg.model.compile_blocks),
                                   moe_grouped_gemm=cfg.model.moe_grouped_gemm)
        try:
            models.common.check_attention_backend(opts)
        except models.ModelError as e:
            raise ConfigError(str(e)) from None
        if cfg.model.moe_bias_update_rate < 0:
            raise ConfigError(f"moe_bias_update_rate: must be >= 0, got {cfg.model.moe_bias_update_rate}")
        costs = resolved.layer_flops(cfg.data.max_seq_len)
        parts = resolve_parts(cfg.topology.parts, costs, cfg.dims[0])
        lines = tuple(Transforms(cfg).check_pipeline(resolved, opts, parts))
        if not cfg.model.from_scratch:
            try:
                for i in range(len(costs)):
                    find_layer_file(cfg.model.path, i)
            except models.ModelError as e:
                raise ConfigError(f"model_path: {e}; convert the HF model first (convert_model.py hg_to_pp) "
                                  f"or set from_scratch: true") from None
        return PipelineModel(resolved, opts, costs, parts, lines)

    # -- the engine
    def build(self, cfg: TrainConfig, plan, device: torch.device, rank: int) -> None:
        """PipelineModule over this stage's layers (weights initialised or loaded), then DeepSpeed's engine."""
        import deepspeed
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        from training.ds import bf16_grads, safe_load
        from training.ds.engine import EngineView
        from training.ds.pipeline_module import PartitionedPipelineModule
        from training.partition import describe_parts
        from training.setup import param_groups
        from training.guard import StepGuard

        m = plan.model
        self.resolved = m.resolved
        num_stages, dp = cfg.dims
        self.loss_fn = m.resolved.loss_fn(m.opts)
        transforms = Transforms(cfg)
        load_base = not cfg.model.from_scratch and (plan.resume_tag is None or transforms.trained_only)
        specs, built_loaded = m.resolved.specs(m.opts), set()
        if load_base and transforms:  # a transform may load and convert each layer as it is built (NF4: before the
            # next one is built)
            hook_layer_builds(specs, transforms, cfg.model.path, built_loaded)
        with torch.device(device):  # build (and init) this stage's layers directly on its accelerator
            module = PartitionedPipelineModule(specs, m.resolved.stage_bounds(m.parts),
                                               topology=PipeDataParallelTopology(num_pp=num_stages, num_dp=dp),
                                               loss_fn=self.loss_fn, seed_layers=True, base_seed=cfg.schedule.seed,
                                               dynamic_shape=varying_shapes(cfg))
        if rank == 0:
            log(f"{m.resolved.model_type}: {m.resolved.num_blocks} blocks, partition {m.parts}: "
                f"{describe_parts(m.parts, m.costs)}", rank)
            log(f"compile_blocks: {'on (torch.compile; the first step compiles)' if m.opts.compile_blocks else 'off'}"
                f", fused_head_loss: {'on' if m.opts.fused_head_loss else 'off'}", rank)
        if cfg.model.from_scratch:
            init_from_scratch(module, m.resolved.hf_config, cfg.schedule.seed)
        elif load_base:  # a checkpoint of a transform that trains a subset (LoRA) holds that subset only
            load_layer_weights(module, cfg.model.path, skip=built_loaded)
        if transforms:
            transforms.convert_layers(list(local_layers(module)), cfg.schedule.seed)
            transforms.finish_pipeline(module)
            if rank == 0:
                for line in m.transform_lines:
                    log(line, rank)
        module.to(device)

        # A stage's parameters are this stage's alone: marking them model-parallel makes DeepSpeed's
        # gradient norms (fp32 clipping, ZeRO-1) sum over all stages instead of counting stage 0 only.
        for prm in module.parameters():
            prm.model_parallel = not getattr(prm, "ds_pipe_replicated", False)
        ds = plan.ds
        plain_fp32 = cfg.precision == "fp32" and not int(ds.get("zero_optimization", {}).get("stage", 0))
        max_norm = float(ds.get("gradient_clipping", 1.0))  # DeepSpeed's default is 1.0
        if plain_fp32:
            ds["gradient_clipping"] = 0.0  # StepGuard measures the norm before clipping, then clips
        groups = param_groups(module, cfg.optimizer.no_wd_kws)
        optimizer = cpu_lion(ds, groups, device)
        bf16_grads.install()  # fp32 gradient accumulation without a temporary copy per micro-batch
        self.engine, _, _, _ = deepspeed.initialize(model=module, config=ds, optimizer=optimizer,
                                                    model_parameters=None if optimizer else groups)
        safe_load.install(self.engine)  # checkpoint files are read with torch.load(weights_only=True)
        self.engine_view = EngineView(self.engine)
        if plain_fp32:
            self.guard = StepGuard(self.engine.optimizer, module.parameters(),
                                   self.engine.grid.get_pipe_parallel_group(), max_norm)
        self.stage, self.dp_rank = self.engine.stage_id, self.engine.grid.data_parallel_id
        self.bias_rate = float(cfg.model.moe_bias_update_rate)
        self.dp_group = self.engine.grid.get_data_parallel_group() if dp > 1 else None
        self.reporter = self.engine.is_last_stage() and self.dp_rank == 0

    def make_feeder(self, cfg: TrainConfig, plan, device):
        """Micro-batches for the first stage (inputs) and the last (labels); middle stages take none."""
        from data import pad_id_of
        from training.distributed import summer
        from data.batching import BatchPlan, PipeFeeder

        engine = self.engine
        if not (engine.is_first_stage() or engine.is_last_stage()):
            return None
        batches = BatchPlan(len(plan.dataset), plan.tbs, plan.mbs, plan.gas, self.dp_rank, plan.dp, cfg.schedule.seed)
        return PipeFeeder(plan.dataset, batches, pad_id_of(plan.tokenizer) if plan.tokenizer is not None else 0,
                          cfg.data.max_seq_len, cfg.data.num_workers,
                          sum_over_dp=summer(device, engine.grid.get_data_parallel_group())
                          if engine.is_last_stage() and plan.dp > 1 else None,
                          pad_multiple=0 if not varying_shapes(cfg) else cfg.data.pad_to_multiple_of)

    def make_eval_feeder(self, cfg: TrainConfig, plan, eval_plan, device):
        """Eval micro-batches for the first and last stage (data.batching.EvalFeeder); None elsewhere."""
        from data import pad_id_of
        from training.distributed import summer
        from data.batching import EvalFeeder

        engine = self.engine
        if not (engine.is_first_stage() or engine.is_last_stage()):
            return None
        return EvalFeeder(plan.eval_dataset, eval_plan, pad_id_of(plan.tokenizer), cfg.data.max_seq_len,
                          cfg.data.num_workers, sum_over_dp=summer(device, engine.grid.get_data_parallel_group())
                          if engine.is_last_stage() and plan.dp > 1 else None,
                          pad_multiple=0 if not varying_shapes(cfg) else cfg.data.pad_to_multiple_of)

    def flops_per_token(self, cfg: TrainConfig, plan) -> float:
        """Active parameters outside the input embedding (MoE: only the top-k experts), from the family's cost
        model at seq 1 where attention is negligible; attention is added causal-unaware as usual."""
        return plan.model.resolved.flops_per_token(cfg.data.max_seq_len)

    # -- per step
    def step(self, feeder) -> float:
        loss = float(self.engine.train_batch(data_iter=feeder))
        self.resolved.after_step(self.engine.module, self.bias_rate, self.dp_group)  # e.g. MoE router biases
        return loss

    def eval_chunk(self, batches, k: int) -> float:
        """`k` eval micro-batches through `eval_batch` (forward only, no_grad), with the CE-only loss in place of
        the training loss (which also keeps eval out of the MoE load metrics). `eval_batch` averages the
        micro-batch losses over `k` and the replicas (`reduce_output='avg'`) and broadcasts the result from the
        last stage; EvalFeeder's scale makes that average `sum(CE) / tokens` of these micro-batches."""
        from training.evaluate import eval_loss_fn

        module = self.engine.module
        if self.eval_loss_fn is None:
            self.eval_loss_fn = eval_loss_fn(self.loss_fn)
        module.loss_fn = self.eval_loss_fn
        try:
            loss = self.engine.eval_batch(batches, return_logits=False, compute_loss=True, reduce_output="avg",
                                          bcast_loss=True, num_micro_batches=k)
        finally:
            module.loss_fn = self.loss_fn
        return float(loss)

    def step_metrics(self) -> dict:
        return self.resolved.step_metrics(self.loss_fn) if self.engine.is_last_stage() else {}

    def grad_norm(self) -> float | None:
        norm = self.guard.last_norm if self.guard is not None else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # -- checkpoints
    def save_extras(self, cfg: TrainConfig, plan, tag_dir: str, final: bool) -> None:
        pass

    def checkpoint_info(self) -> dict:
        return {}
