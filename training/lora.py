"""LoRA in both trainers (the config's `lora:` section; the math and the wrapping are models/lora.py's).

Before any process group the targets are checked on the model built on the meta device (an unknown name is one
`error:` line listing the names this model accepts), and so is every pipeline stage having something to train.
After the base weights are loaded, `apply_to_layers` (pipeline: per layer, adapters seeded by the global layer
index, so any partition starts from the same adapters) or `apply_to_model` (the HF model) wraps the targeted
linears; everything but the adapters and `modules_to_save` is frozen, so the optimizer (training.setup's
param_groups) never sees the base weights. Checkpoints keep the trained tensors only
(`exclude_frozen_parameters`) plus `LORA.json` (utils/lora_ckpt.py: the lora section, the base dir and its
content fingerprint); `resume: true` refuses another base, another lora section or a full fine-tuning
checkpoint, and loads the base weights from `model_path` again.
"""
from __future__ import annotations

import json
import os

import torch

from training.plan import lora_config
from training.transform import Transform
from utils.config import ConfigError, TrainConfig

_FINGERPRINTS: dict[str, str] = {}  # abs model_path -> fingerprint, hashed once per process


def _millions(n: int) -> str:
    return str(n) if n < 10_000 else f"{n / 1e6:.2f} M" if n < 1e7 else f"{n / 1e6:.0f} M"


def summary(lcfg, module: torch.nn.Module, wrapped: int) -> str:
    """`lora: r=16 alpha=32 on q_proj,v_proj: 12 modules, 0.52 M trainable of 110 M (0.47 %)` (shared
    parameters counted once)."""
    params = {id(p): p for p in module.parameters()}.values()
    total = sum(p.numel() for p in params)
    trained = sum(p.numel() for p in params if p.requires_grad)
    text = (f"lora: r={lcfg.r} alpha={lcfg.alpha:g} on {','.join(lcfg.target_modules)}: {wrapped} modules, "
            f"{_millions(trained)} trainable of {_millions(total)} ({100 * trained / max(total, 1):.2f} %)")
    return text + (f"; trained in full: {','.join(lcfg.modules_to_save)}" if lcfg.modules_to_save else "")


def _checked_apply(lcfg, module: torch.nn.Module, model_type: str) -> int:
    from models import ModelError
    from models.lora import apply_lora, check_targets

    try:
        check_targets(lcfg, module, model_type)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    return len(apply_lora(module, lcfg))


def check_pipeline(lcfg, resolved, opts, parts: list[int]) -> str:
    """Before the process group: every layer built on the meta device, the target names checked against it,
    adapters applied, and each stage of `parts` left with a trained parameter (a stage with none would have
    nothing to optimize, and a first stage of frozen layers nothing to send gradients through). Returns the
    summary line of the whole model."""
    from models.sequential import SequentialModel

    with torch.device("meta"):
        model = SequentialModel(resolved.specs(opts), None)
    wrapped = _checked_apply(lcfg, model, resolved.model_type)
    bounds = resolved.stage_bounds(parts)
    for stage in range(len(parts)):
        keys = {model.module_key(i) for i in range(bounds[stage], bounds[stage + 1])}
        if not any(p.requires_grad for k in keys for p in model.layers[k].parameters()):
            first = sum(parts[:stage])
            raise ConfigError(f"lora: pipeline stage {stage} (layers {first}..{first + parts[stage] - 1} of "
                              f"model_topo.parts {list(parts)}) has no adapter and nothing in modules_to_save: "
                              f"give it blocks (model_topo.parts) or add its modules to lora.modules_to_save")
    return summary(lcfg, model, wrapped)


def check_hf(lcfg, cfg: TrainConfig, hf_cfg: dict) -> str:
    """Before the process group: transformers' model built on the meta device, the target names checked against
    it; returns the summary line."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return summary(lcfg, model, _checked_apply(lcfg, model, str(hf_cfg.get("model_type"))))


def apply_to_layers(layers, lcfg, seed: int) -> int:
    """In place, after the base weights are loaded: adapters in each `(global layer index, module)` of a
    pipeline stage, seeded by the index as training.pipeline.init_from_scratch seeds weights. Returns the
    number of wrapped modules."""
    from models.lora import apply_lora

    wrapped = 0
    for idx, layer in layers:
        torch.manual_seed(seed + idx)
        wrapped += len(apply_lora(layer, lcfg))
    return wrapped


def apply_to_model(model: torch.nn.Module, lcfg, seed: int) -> int:
    """In place, after the base weights are loaded: adapters in a whole model (the ZeRO trainer's)."""
    from models.lora import apply_lora

    torch.manual_seed(seed)
    return len(apply_lora(model, lcfg))


def skip_frozen_tied_grads(pipe_module) -> None:
    """DeepSpeed's pipeline all-reduces each tied weight's gradient between the stages that share it, reading
    the fp32 gradient under its bf16 optimizer, which a frozen weight never gets: mark it None (no gradient)."""
    from training.ds.bf16_grads import drop_hp_grad

    for weight, _group in pipe_module.get_tied_weights_and_groups():
        if not weight.requires_grad:
            drop_hp_grad(weight)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def fingerprint(model_path: str) -> str:
    """utils.lora_ckpt.base_fingerprint of the base dir (a pipeline dir or the ZeRO trainer's HF dir), hashed
    once per process."""
    from utils.lora_ckpt import base_fingerprint

    key = os.path.abspath(model_path)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = base_fingerprint(model_path)
    return _FINGERPRINTS[key]


def write_meta(cfg: TrainConfig, lcfg, tag_dir: str) -> None:
    """LORA.json into a checkpoint tag dir (rank 0)."""
    from utils.lora_ckpt import write_lora_meta

    with open(os.path.join(cfg.model.path, "config.json")) as f:
        model_type = str(json.load(f).get("model_type"))
    write_lora_meta(tag_dir, lcfg.to_dict(), cfg.model.path, fingerprint(cfg.model.path), model_type)


SAME_KEYS = ("r", "alpha", "target_modules", "modules_to_save", "quantize")  # dropout may change on resume


def check_resume(cfg: TrainConfig, tag_dir: str) -> None:
    """ConfigError unless checkpoint `tag_dir` and this run agree: both LoRA (same lora section but dropout,
    same base weights) or both full fine-tuning."""
    from utils.lora_ckpt import base_mismatch, read_lora_meta

    lcfg, meta = lora_config(cfg), read_lora_meta(tag_dir)
    if lcfg is None and meta is None:
        return
    if lcfg is None:
        raise ConfigError(f"resume: checkpoint {tag_dir} holds LoRA adapters (LORA.json) without their base "
                          f"weights; resume it with its lora section ({meta['lora']})")
    if meta is None:
        raise ConfigError(f"resume: checkpoint {tag_dir} is a full fine-tuning checkpoint; this run has a lora "
                          f"section: remove it to resume, or use another save_path")
    ours = lcfg.to_dict()
    changed = [k for k in SAME_KEYS if ours.get(k) != meta["lora"].get(k)]
    if changed:
        raise ConfigError(f"resume: checkpoint {tag_dir} was trained with lora "
                          f"{ {k: meta['lora'].get(k) for k in changed} }, this run has "
                          f"{ {k: ours[k] for k in changed} }: resume with the same lora section")
    reason = base_mismatch(meta, cfg.model.path, fingerprint(cfg.model.path))
    if reason:
        raise ConfigError(f"resume: model_path {reason}")


def merged_state_dict(module: torch.nn.Module, state: dict) -> dict:
    """A gathered state dict of `module` with every adapter merged, W + scaling·BA (in fp32, stored in W's
    dtype), and the adapter keys dropped: what transformers loads as a plain model (the ZeRO trainer's export)."""
    from models.lora import LoraLinear, is_lora_name, merged_weight

    for name, sub in module.named_modules():
        if isinstance(sub, LoraLinear):
            w, a, b = state[f"{name}.weight"], state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            state[f"{name}.weight"] = merged_weight(w, a, b, sub.scaling)
    return {k: v for k, v in state.items() if not is_lora_name(k)}


def nf4_summary(lcfg, resolved, opts) -> str:
    """Before the process group: the model on the meta device checked for what NF4 cannot hold (ConfigError), and
    the `; base in NF4: ...` tail of the summary line."""
    from models import ModelError
    from models.nf4 import check_nf4, nf4_bytes, nf4_linear_names
    from models.sequential import SequentialModel

    with torch.device("meta"):
        model = SequentialModel(resolved.specs(opts), None)
    try:
        check_nf4(model, resolved.model_type)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    names = nf4_linear_names(model, lcfg)
    if not names:
        raise ConfigError("lora.quantize: nf4 finds no frozen linear layer of a size NF4 can hold (a multiple of 64 "
                          "values) in this model; remove lora.quantize")
    numel = [model.get_submodule(n).weight.numel() for n in names]
    return (f"; base in 4-bit NF4: {len(names)} linear layers, {sum(numel) * 2 / 2**30:.2f} GiB in bf16 -> "
            f"{sum(map(nf4_bytes, numel)) / 2**30:.2f} GiB")


# ----------------------------------------------------------------------------------------------
# The transform (training/transforms.py): the functions above, called through the trainers' one interface


class LoraTransform(Transform):
    """The `lora:` section: adapters on frozen base weights; checkpoints hold the trained tensors plus LORA.json.
    With `lora.quantize: nf4` the frozen base linears of every block are held as 4-bit NF4 (models/nf4.py),
    quantized as each pipeline layer is built and loaded, before the next one is built."""
    section = "lora"
    trained_only = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.lcfg = lora_config(cfg)

    @property
    def enabled(self) -> bool:
        return self.lcfg is not None

    @property
    def nf4(self) -> bool:
        return self.lcfg is not None and self.lcfg.quantize == "nf4"

    def check_pipeline(self, resolved, opts, parts: list[int]) -> str:
        line = check_pipeline(self.lcfg, resolved, opts, parts)
        return line + (nf4_summary(self.lcfg, resolved, opts) if self.nf4 else "")

    def check_hf(self, cfg: TrainConfig, hf_cfg: dict) -> str:
        if self.nf4:
            raise ConfigError("lora.quantize: nf4 runs in train_ds.py (pipeline stages quantize each layer as it "
                              "loads); train_ds_zero.py builds transformers' model under ZeRO, which partitions the "
                              "weights NF4 would replace: use train_ds.py, or remove lora.quantize")
        return check_hf(self.lcfg, cfg, hf_cfg)

    def build_layer(self, idx: int, module: torch.nn.Module, load) -> bool:
        """NF4: the layer's base weights loaded now and its frozen linears quantized, so a stage never holds all
        its full-precision weights at once."""
        if not self.nf4:
            return False
        from models.nf4 import quantize_frozen_linears

        load(idx, module)
        quantize_frozen_linears(module, self.lcfg)
        return True

    def convert_layers(self, layers, seed: int) -> None:
        apply_to_layers(layers, self.lcfg, seed)

    def convert_model(self, model: torch.nn.Module, seed: int) -> None:
        apply_to_model(model, self.lcfg, seed)

    def finish_pipeline(self, pipe_module) -> None:
        skip_frozen_tied_grads(pipe_module)

    def write_meta(self, tag_dir: str) -> None:
        write_meta(self.cfg, self.lcfg, tag_dir)

    def check_resume(self, cfg: TrainConfig, tag_dir: str) -> None:
        check_resume(cfg, tag_dir)

    def export_state(self, module: torch.nn.Module, state: dict) -> dict:
        return merged_state_dict(module, state)
