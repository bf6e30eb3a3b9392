"""ZeroTrainer: data-parallel training of a whole HF causal LM (transformers' own class) under DeepSpeed ZeRO
(stage 3 by default).

`model_path` is an HF directory (or any dir with config.json and a tokenizer when `from_scratch`), every rank
is a data-parallel replica (`model_topo` is optional and ignored), and `save_path/checkpoint_final` also holds
an HF export (safetensors + tokenizer) next to DeepSpeed's files. Attention is PyTorch SDPA, or eager where
transformers' class has no SDPA path. TFLOP/s counts FLOPs as the pipeline trainer does for the model
types it knows (MoE: active experts only).

The model is built under `deepspeed.zero.Init` (through transformers' DeepSpeed integration), so a 7B
model never materialises on one rank. ZeRO++ (`zero_quantized_weights`, `zero_hpz_partition_size`,
`zero_quantized_gradients`) and offload keys inside `zero_optimization` are passed to DeepSpeed as given.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from training.plan import DTYPE
from training.transforms import Transforms
from utils.config import ConfigError, TrainConfig
from utils.metrics import log



@dataclass
class ZeroModel:
    """The model half of the plan: config.json and the attention implementation (with why, if not SDPA)."""
    hf_cfg: dict
    stage: int
    attn: str = "sdpa"
    attn_note: str | None = None
    transform_lines: tuple = ()  # one summary line per enabled transform (training/transforms.py)

    @property
    def vocab_size(self) -> int:
        return self.hf_cfg["vocab_size"]


class ZeroTrainer:
    """Every rank a replica of the whole model (ZeRO partitions its states); rank 0 reports. The same parts
    as training.pipeline.PipelineTrainer."""
    name = "zero"

    def __init__(self):
        self.engine = self.engine_view = self.loss_fn = None
        self.reporter, self.stage, self.dp_rank = False, 0, 0

    # -- before the process group
    def check(self, cfg: TrainConfig, world: int) -> None:
        if cfg.data.packing:
            raise ConfigError("packing: true is a train_ds.py (pipeline) feature: transformers' SDPA attention "
                              "ignores the document boundaries in position_ids, so packed samples would attend "
                              "to each other here")
        zero_stage(cfg.ds)  # a mapping, or the error

    def dims(self, cfg: TrainConfig, world: int) -> list[int]:
        return [1, world]

    def prepare_model(self, cfg: TrainConfig, resuming: bool) -> ZeroModel:
        hf_cfg = read_model_config(cfg, resuming)
        attn, attn_note = choose_attention(cfg, causal_lm_class(cfg, hf_cfg))
        return ZeroModel(hf_cfg, zero_stage(cfg.ds), attn, attn_note, tuple(Transforms(cfg).check_hf(cfg, hf_cfg)))

    # -- the engine
    def build(self, cfg: TrainConfig, plan, device: torch.device, rank: int) -> None:
        import deepspeed

        from models.common import CausalLMLoss
        from training.ds import safe_load
        from training.ds.engine import EngineView
        from training.setup import param_groups

        m, ds = plan.model, plan.ds
        ds.setdefault("zero_optimization", {})["stage"] = m.stage
        self.dp_rank, self.reporter = rank, rank == 0
        note_ignored_topology(cfg, plan.world, rank)
        if rank == 0 and m.attn_note:
            log(m.attn_note, rank)
        self.transforms = transforms = Transforms(cfg)  # LoRA's checkpoints hold the adapters only: base from model_path
        model = build_model(cfg, ds, from_weights=not cfg.model.from_scratch and (plan.resume_tag is None
                                                                               or transforms.trained_only),
                            attn=m.attn)
        if transforms:
            transforms.convert_model(model, cfg.schedule.seed)
            if rank == 0:
                for line in m.transform_lines:
                    log(line, rank)
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=ds,
                                                    model_parameters=param_groups(model, cfg.optimizer.no_wd_kws))
        safe_load.install(self.engine)  # checkpoint files are read with torch.load(weights_only=True)
        self.engine_view = EngineView(self.engine)
        self.loss_fn = CausalLMLoss(float(cfg.model.z_loss_weight))
        self.device, self.gas, self.zero_stage = device, plan.gas, m.stage
        if rank == 0:
            attn = getattr(self.engine.module.config, "_attn_implementation", None) or m.attn
            log(f"{m.hf_cfg.get('model_type')}: {count_params(self.engine.module) / 1e6:.1f}M parameters, ZeRO stage "
                f"{m.stage} over {plan.world} ranks, attention {attn}, {DTYPE[cfg.precision]}", rank)
        self.engine.train()

    def make_feeder(self, cfg: TrainConfig, plan, device):
        from data import pad_id_of
        from training.distributed import summer
        from data.batching import BatchPlan, PipeFeeder

        pad_id = pad_id_of(plan.tokenizer) if plan.tokenizer is not None else 0
        batches = BatchPlan(len(plan.dataset), plan.tbs, plan.mbs, plan.gas, self.dp_rank, plan.world,
                            cfg.schedule.seed)
        return PipeFeeder(plan.dataset, batches, pad_id, cfg.data.max_seq_len, cfg.data.num_workers,
                          sum_over_dp=summer(device) if plan.world > 1 else None,
                          pad_multiple=cfg.data.pad_to_multiple_of)

    def make_eval_feeder(self, cfg: TrainConfig, plan, eval_plan, device):
        from data import pad_id_of
        from training.distributed import summer
        from data.batching import EvalFeeder

        return EvalFeeder(plan.eval_dataset, eval_plan, pad_id_of(plan.tokenizer), cfg.data.max_seq_len,
                          cfg.data.num_workers, sum_over_dp=summer(device) if plan.world > 1 else None,
                          pad_multiple=cfg.data.pad_to_multiple_of)

    def flops_per_token(self, cfg: TrainConfig, plan) -> float:
        return model_flops_per_token(self.engine.module, plan.model.hf_cfg, cfg.data.max_seq_len)

    # -- per step
    def step(self, feeder) -> float:
        from deepspeed.accelerator import get_accelerator

        from training.distributed import mean_over_ranks

        loss = mean_over_ranks(train_step(self.engine, feeder, self.loss_fn, self.gas, self.device))
        get_accelerator().synchronize()
        return loss

    def eval_chunk(self, batches, k: int) -> float:
        """`k` eval micro-batches forward under no_grad (dropout off), CE only; the mean of their scaled losses
        over `k` and the ranks is `sum(CE) / tokens` of these micro-batches (see EvalFeeder)."""
        from training.distributed import mean_over_ranks
        from training.evaluate import eval_loss_fn

        ce = eval_loss_fn(self.loss_fn)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        self.engine.eval()
        try:
            with torch.no_grad():
                for _ in range(k):
                    total += micro_batch_loss(self.engine, ce, next(batches), self.device).float()
        finally:
            self.engine.train()
        return mean_over_ranks(total / k)

    def step_metrics(self) -> dict:
        return {}

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # -- checkpoints
    def save_extras(self, cfg: TrainConfig, plan, tag_dir: str, final: bool) -> None:
        if final:
            export_hf(self.engine.module, plan.tokenizer, tag_dir, edit_state=self.transforms.export_state)

    def checkpoint_info(self) -> dict:
        return {"zero_stage": self.zero_stage}


# ----------------------------------------------------------------------------------------------
# Checks made before any process group exists


HF_WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                      "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")


def zero_stage(ds) -> int:
    """`zero_optimization.stage`, 3 when not given (this trainer's default)."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization: expected a mapping, got {zero!r}")
    return int(zero.get("stage", 3))


# Switches of our pipeline layers, noted when set explicitly to true (compile_blocks' default "auto" is silent).
# Pipeline switches that default on (fused_head_loss, moe_grouped_gemm) are ignored here without a note.
def note_ignored_topology(cfg: TrainConfig, world: int, rank: int) -> None:
    if rank != 0:
        return
    dims = cfg.topology.dims  # optional here
    if dims is not None and list(dims) != [1, world]:
        log(f"model_topo.process_topology.dims {list(dims)} ignored: ZeRO runs all {world} ranks as "
            f"data-parallel replicas (dims [1, {world}])", rank)
    # transformers' model keeps its router biases (no moe_bias_update_rate)
    ignored = (["compile_blocks"] if cfg.model.compile_blocks is True else []) + (
        ["moe_bias_update_rate"] if cfg.model.moe_bias_update_rate else [])
    if ignored:
        log(f"{', '.join(ignored)}: apply to train_ds.py's pipeline layers only; ignored for the HF model here",
            rank)


def has_hf_weights(model_dir: str) -> bool:
    return any(glob.glob(os.path.join(model_dir, pat)) for pat in HF_WEIGHT_PATTERNS)


def read_model_config(cfg: TrainConfig, resuming: bool) -> dict:
    """config.json of `model_path` as a dict; refuses a pipeline dir without HF weights."""
    path = os.path.join(cfg.model.path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"model_path: no config.json in {cfg.model.path}")
    with open(path) as f:
        hf_cfg = json.load(f)
    if not (cfg.model.from_scratch or resuming or has_hf_weights(cfg.model.path)):
        hint = (" (it looks like a pipeline dir: convert it with convert_model.py pp_to_hg)"
                if glob.glob(os.path.join(cfg.model.path, "layer_*-model_states.pt")) else "")
        raise ConfigError(f"model_path: {cfg.model.path} holds no HF weights (model.safetensors or "
                          f"pytorch_model.bin){hint}; or set from_scratch: true")
    return hf_cfg


# transformers' ValueError when a class has no SDPA path (PreTrainedModel._sdpa_can_dispatch)
SDPA_UNSUPPORTED = ("does not support an attention implementation through "
                    "torch.nn.functional.scaled_dot_product_attention")


def causal_lm_class(cfg: TrainConfig, hf_cfg: dict):
    """transformers' built-in class that `AutoModelForCausalLM` builds for this config.json, or None when
    that is only known while building (remote code, or a model_type transformers lacks: build_model says)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.model.trust_remote_code and "AutoModelForCausalLM" in (hf_cfg.get("auto_map") or {}):
        return None
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_cfg.get("model_type"))
    return getattr(transformers, name, None) if name else None


def sdpa_fallback_note(class_name: str) -> str:
    import transformers

    return (f"attention: {class_name} has no SDPA support in transformers {transformers.__version__}; "
            f"using eager attention")


def choose_attention(cfg: TrainConfig, model_cls=None) -> tuple[str, str | None]:
    """(attn_implementation, note to log or None): flash-attn when asked (or a ConfigError saying why not),
    else SDPA, or eager with a note when `model_cls` (see causal_lm_class) has no SDPA path."""
    import transformers

    if cfg.model.use_flash_attn:
        if model_cls is not None and not (getattr(model_cls, "_supports_flash_attn", False)
                                          or getattr(model_cls, "_supports_flash_attn_2", False)):
            raise ConfigError(f"use_flash_attn: {model_cls.__name__} has no flash-attention support in "
                              f"transformers {transformers.__version__}; set use_flash_attn: false")
        from models.common import flash_attn_available

        if not flash_attn_available():
            raise ConfigError("use_flash_attn: true but flash-attn is not installed")
        return "flash_attention_2", None
    if model_cls is not None and not getattr(model_cls, "_supports_sdpa", False):
        return "eager", sdpa_fallback_note(model_cls.__name__)
    return "sdpa", None


# ----------------------------------------------------------------------------------------------
# Model under zero.Init


class _ZeroConfigRef:
    """What transformers reads from `HfDeepSpeedConfig` (`.config`, `.is_zero3()`), for hosts without
    `accelerate`, which transformers' own class needs; registered the same way (a weak reference)."""

    def __init__(self, ds: dict):
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        self.config = ds
        set_hf_deepspeed_config(self)

    def is_zero3(self) -> bool:
        return int(self.config.get("zero_optimization", {}).get("stage", 0)) == 3


def hf_deepspeed_config(ds: dict):
    """Tell transformers about the DeepSpeed config so `from_pretrained`/`from_config` partition the
    model while building it (ZeRO-3). Keep the returned object alive until the model is built."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(ds)
    return _ZeroConfigRef(ds)


def init_device(ds: dict) -> torch.device:
    """Where random init runs: this rank's GPU below ZeRO-3 (on the CPU, HF's init of a 7B-width model took
    minutes on the benchmark host: one did not finish in 180 s); ZeRO-3 partitions while building."""
    if zero_stage(ds) >= 3 or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def build_model(cfg: TrainConfig, ds: dict, from_weights: bool, attn: str = "sdpa"):
    """The HF model, partitioned at construction under ZeRO-3; weights from `model_path` if `from_weights`,
    else HF's random init (seeded by `seed`). `attn` comes from choose_attention; a class only known while
    building (remote code) that refuses SDPA is built with eager attention instead, with a note."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(attn_impl: str):
        kwargs = dict(attn_implementation=attn_impl, dtype=DTYPE[cfg.precision],
                      trust_remote_code=cfg.model.trust_remote_code)
        torch.manual_seed(cfg.schedule.seed)
        if from_weights:
            return AutoModelForCausalLM.from_pretrained(cfg.model.path, **kwargs)
        hf_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        with init_device(ds):
            return AutoModelForCausalLM.from_config(hf_config, **kwargs)

    keep_alive = hf_deepspeed_config(ds)
    try:
        try:
            model = build(attn)
        except ValueError as e:
            if attn != "sdpa" or SDPA_UNSUPPORTED not in str(e):
                raise
            class_name = str(e).split(" does not support", 1)[0]
            if int(os.environ.get("RANK", "0")) == 0:
                log(sdpa_fallback_note(class_name))
            model = build("eager")
    except (OSError, ValueError) as e:
        key = "use_flash_attn" if attn.startswith("flash") and "Flash Attention" in str(e) else "model_path"
        raise ConfigError(f"{key}: cannot build a causal LM from {cfg.model.path}: {e}") from None
    del keep_alive
    if cfg.model.use_grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_params(model) -> int:
    """All parameters (ZeRO-3 partitioned ones by their full size), shared ones once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += int(getattr(p, "ds_numel", p.numel()))
    return total


def model_flops_per_token(model, hf_cfg: dict, seq_len: int) -> float:
    """Training FLOPs per token for TFLOP/s. A model_type of our registry: the pipeline trainer's count
    (ResolvedModel.flops_per_token: MoE counts the router and top-k experts only); any other
    (a model_type only transformers knows): param_flops_per_token."""
    import models

    try:
        return models.resolve(hf_cfg).flops_per_token(seq_len)
    except models.ModelError:  # not in our registry
        return param_flops_per_token(model, hf_cfg, seq_len)


def param_flops_per_token(model, hf_cfg: dict, seq_len: int) -> float:
    """6N + 12·L·h·s with N = all parameters except the input embedding (a tied head still counts; MoE:
    every expert, so it overcounts by the idle experts)."""
    from utils.metrics import flops_per_token

    hidden = int(hf_cfg.get("hidden_size", 0))
    embed = int(hf_cfg["vocab_size"]) * hidden
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    n_no_embed = count_params(model) - (0 if tied else embed)
    return flops_per_token(n_no_embed, int(hf_cfg.get("num_hidden_layers", 0)), hidden, seq_len)


# ----------------------------------------------------------------------------------------------
# One optimizer step


def micro_batch_loss(engine, loss_fn, batch, device) -> torch.Tensor:
    """Forward one micro-batch from PipeFeeder, `((ids, pos), (labels, scale))`, and return its scaled loss."""
    (ids, pos), labels = batch
    out = engine(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False)
    return loss_fn(out.logits, labels)


def train_step(engine, feeder, loss_fn, gas: int, device) -> torch.Tensor:
    """`gas` forward/backward passes and one optimizer step; returns this rank's mean micro-batch loss.

    Each micro-batch loss carries `scale = gas * dp * n_i / N`; DeepSpeed divides by `gas` in backward and
    averages gradients over the replicas, so the gradient is that of `sum(CE) / N` over the global batch.
    """
    total = torch.zeros((), dtype=torch.float32, device=device)
    for _ in range(gas):
        loss = micro_batch_loss(engine, loss_fn, next(feeder), device)
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return total / gas


# ----------------------------------------------------------------------------------------------
# The HF export


def gather_state_dict(module: torch.nn.Module) -> dict | None:
    """Full weights on rank 0 (CPU), gathered one module at a time; None on other ranks. Every rank must
    call it. Parameters that ZeRO does not partition (stages 0-2) are read as they are."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank()
    state: dict | None = {} if rank == 0 else None
    first_key: dict[int, str] = {}

    def visit(mod: torch.nn.Module, prefix: str) -> None:
        with deepspeed.zero.GatheredParameters(list(mod.parameters(recurse=False)), modifier_rank=None):
            if state is not None:
                for name, prm in mod.named_parameters(recurse=False):
                    key = first_key.setdefault(id(prm), prefix + name)
                    state[prefix + name] = state[key] if key != prefix + name else prm.detach().cpu().clone()
                for name, buf in mod.named_buffers(recurse=False):
                    if buf is not None and name not in mod._non_persistent_buffers_set:
                        state[prefix + name] = buf.detach().cpu().clone()
        for name, child in mod.named_children():
            visit(child, prefix + name + ".")

    visit(module, "")
    return state


def export_hf(module, tokenizer, out_dir: str, edit_state=None) -> None:
    """All ranks: gather; rank 0: `save_pretrained` (safetensors shards) + tokenizer (if any) into `out_dir`;
    `edit_state(module, state) -> state` first (the transforms': LoRA merges its adapters into the base weights)."""
    import torch.distributed as dist

    state = gather_state_dict(module)
    if dist.get_rank() == 0:
        if edit_state is not None:
            state = edit_state(module, state)
        module.save_pretrained(out_dir, state_dict=state, max_shard_size="5GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
