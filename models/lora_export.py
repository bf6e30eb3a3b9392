"""LoRA checkpoints -> Hugging Face: the merged model (`pp_to_hg`) or a PEFT adapter (`pp_to_hg --adapter-only`).

A LoRA run's checkpoint tag dir holds `LORA.json` (`utils/lora_ckpt.py`: the `lora:` config, the base model's
path and fingerprint) and per pipeline layer a `layer_XX-model_states.pt` with only the trained tensors under
the layer's state_dict names: `q_proj.lora_A` [r, in], `q_proj.lora_B` [out, r] (mixtral experts per expert:
`experts.3.w1.lora_A`) and the full tensors of `modules_to_save`. Other keys of the layer's state_dict in those
files (buffers DeepSpeed keeps, frozen weights) are ignored: the base's values are used.

Merged: every layer is built on the meta device, `apply_lora`'d, loaded with the base layer file plus the trained
tensors and `merge_lora`'d (W + scaling·B·A in fp32, PEFT's math), so the result has the base's names, shapes and
dtypes and goes through the same weight map (and `--format`) as any pipeline model. A QLoRA checkpoint (`quantize:
nf4`) merges into the NF4-dequantized base, the weights its adapters were trained against: every linear the trainer
held in NF4 is exported as dequant(NF4(W)) (+ scaling·B·A where it has an adapter).

Adapter: PEFT's LoRA format, loadable with `peft.PeftModel.from_pretrained(AutoModelForCausalLM..., DIR)`:
`adapter_config.json` and `adapter_model.safetensors` with keys `base_model.model.{HF module}.lora_A.weight` /
`.lora_B.weight` and `base_model.model.{HF name}` for `modules_to_save` tensors. HF names come from the family's
weight map (an adapter pair rides along with its linear's `.weight`) and `--format`'s per-tensor rewrite:
`HfFormat.tensors` acts on the rows of a weight (renames, splits of a fused projection into q/k/v), and since
W + s·B·A restricted to some rows is W[rows] + s·B[rows]·A, B goes through the same rewrite and every part keeps
the whole A. Where transformers can build the target model (no remote code), every adapter module is checked to
be an `nn.Linear` of it and every `modules_to_save` module to exist, before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .common import ModelError, ModelOptions
from .family import TIED_WEIGHT_ATTR, HfFormat
from .hf_files import error_reason
from .layout import check_layer_tensors, check_no_extra_layers, layer_file_name, load_layer_file
from .lora import LoraConfig, apply_lora, is_lora_name, lora_state_dict, merge_lora

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_AUX_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                        "*.model", "*.tiktoken", "chat_template*")
BASE_PATH_HINT = "pass --base-path DIR naming the pipeline base model (hg_to_pp output) the run was trained on"


# ----------------------------------------------------------------------------------------------
# The checkpoint


@dataclass(frozen=True)
class LoraCheckpoint:
    """A LoRA tag dir: its layer files' directory, LORA.json and the parsed `lora:` config."""
    layer_dir: Path
    meta: dict
    config: LoraConfig

    @property
    def recorded_base(self) -> Path:
        return Path(self.meta["base_model_path"])


def read_checkpoint(layer_dir: Path) -> LoraCheckpoint | None:
    """The LoRA checkpoint in `layer_dir`, or None when it has no LORA.json (a full fine-tuning one)."""
    from utils.lora_ckpt import LORA_META, read_lora_meta

    path = Path(layer_dir) / LORA_META
    try:
        meta = read_lora_meta(str(layer_dir))
        if meta is None:
            return None
        if meta.get("version") != 1:
            raise ModelError(f"{path}: version {meta.get('version')!r} is not supported (this code reads 1)")
        config = LoraConfig.from_dict(meta["lora"])
        if not isinstance(meta["base_model_path"], str) or not isinstance(meta["base_fingerprint"], str):
            raise TypeError("base_model_path and base_fingerprint must be strings")
    except ModelError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelError(f"{path} is unreadable: {error_reason(err)}") from None
    return LoraCheckpoint(Path(layer_dir), meta, config)


def verified_base(ckpt: LoraCheckpoint, base_path: str | Path | None = None) -> Path:
    """The base model dir (LORA.json's, or `base_path`) once its fingerprint matches LORA.json's."""
    from utils.lora_ckpt import base_mismatch

    base = Path(base_path) if base_path is not None else ckpt.recorded_base
    source = "--base-path" if base_path is not None else f"the base model recorded in {ckpt.layer_dir}/LORA.json"
    if not (base / "config.json").is_file():
        what = "does not exist" if not base.exists() else "is not a converted pipeline model (no config.json)"
        raise ModelError(f"{source}: {base} {what}; " + (BASE_PATH_HINT if base_path is None else
                                                          "name the pipeline base model (hg_to_pp output)"))
    try:
        reason = base_mismatch(ckpt.meta, str(base))
    except OSError as err:
        raise ModelError(f"cannot read the base model {base}: {error_reason(err)}") from None
    if reason is not None:
        hint = BASE_PATH_HINT if base_path is None else "--base-path must name the base the run was trained on"
        raise ModelError(f"{reason}; {hint}")
    return base


# ----------------------------------------------------------------------------------------------
# Layers with adapters


class LoraLayers:
    """The pipeline layers of a model (`ModelInfo`) built on the meta device with the run's adapters."""

    def __init__(self, info: Any, config: LoraConfig):
        self.info, self.config = info, config
        self.specs = info.model.specs(ModelOptions())

    def module(self, idx: int) -> nn.Module:
        with torch.device("meta"):
            module = self.specs[idx].build()
        apply_lora(module, self.config)
        return module

    def nf4_names(self, idx: int) -> list[str]:
        """QLoRA (`quantize: nf4`): the linears of layer `idx` the trainer held in NF4 (models/nf4.py), else []."""
        if self.config.quantize != "nf4":
            return []
        from .nf4 import nf4_linear_names

        with torch.device("meta"):
            return nf4_linear_names(self.specs[idx].build(), self.config)

    def trained_shapes(self, idx: int) -> dict[str, torch.Size]:
        """What the checkpoint's file of layer `idx` must hold: adapters and `modules_to_save` tensors."""
        module = self.module(idx)
        return {k: v.shape for k, v in lora_state_dict(module).items()}

    def trained(self, layer_dir: Path, idx: int) -> dict[str, torch.Tensor]:
        """The trained tensors of layer `idx` from the checkpoint, checked against the layer with adapters."""
        module = self.module(idx)
        known = {k: v.shape for k, v in module.state_dict().items()}
        expected = {k: v.shape for k, v in lora_state_dict(module).items()}
        try:
            path, state = load_layer_file(layer_dir, idx)
        except ModelError:
            if expected or any(layer_dir.glob(f"layer_{idx:02d}-*model_states.pt")):
                raise
            return {}  # a layer without trained tensors may have no file
        for key in expected:
            if key not in state:
                raise ModelError(f"{path.name}: missing adapter tensor '{key}' (LoRA targets "
                                 f"{', '.join(self.config.target_modules)}; modules_to_save "
                                 f"{', '.join(self.config.modules_to_save) or 'none'})")
        for key, tensor in state.items():
            if key not in known:
                raise ModelError(f"{path.name}: unexpected tensor '{key}' (not a tensor of this layer with the "
                                 f"LoRA config of {layer_dir}/LORA.json)")
            if key in expected and tuple(tensor.shape) != tuple(expected[key]):
                raise ModelError(f"{path.name}: tensor '{key}' has shape {tuple(tensor.shape)}, config.json and "
                                 f"LORA.json imply {tuple(expected[key])}")
        return {key: state[key] for key in expected}

    def merged(self, base_dir: Path, layer_dir: Path, idx: int) -> dict[str, torch.Tensor]:
        """The state_dict of layer `idx` with its adapters merged: the base layer file's keys, shapes and dtypes;
        `modules_to_save` tensors replace the base's (cast to the base's dtype)."""
        base_path, base = load_layer_file(base_dir, idx)
        check_layer_tensors(base, {k: v.shape for k, v in self.info.layer_tensors[idx].items()},
                            f"{base_dir}/{base_path.name}")
        trained = self.trained(layer_dir, idx)
        module = self.module(idx)
        module.load_state_dict({**base, **trained}, strict=True, assign=True)
        for name in self.nf4_names(idx):  # QLoRA trained against dequant(NF4(W)): merge into that base
            from .nf4 import nf4_roundtrip

            sub = module.get_submodule(name)
            sub.weight = nn.Parameter(nf4_roundtrip(sub.weight).to(sub.weight.dtype), requires_grad=False)
        merge_lora(module)
        merged = module.state_dict()
        if set(merged) != set(base):
            raise ModelError(f"layer {idx}: merging the adapters gave tensors {sorted(set(merged) ^ set(base))} "
                             "that the base layer file does not have")
        return {k: v.detach().to(base[k].dtype) for k, v in merged.items()}  # expert weights: views of stacked ones


# ----------------------------------------------------------------------------------------------
# PEFT adapter


@dataclass
class AdapterPlan:
    """PEFT names of every tensor of the adapter, and what they say about the adapter's config."""
    lora_modules: dict[str, str]  # HF module name with a LoRA pair -> where it comes from (for messages)
    saved_modules: dict[str, str]  # HF module name of modules_to_save tensors -> where they come from
    tie_weights: bool = False

    @property
    def target_modules(self) -> list[str]:
        """Own names: PEFT matches `name == t or name.endswith('.' + t)`, one name per kind of linear."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.lora_modules})

    @property
    def modules_to_save(self) -> list[str]:
        """Full module names: PEFT matches these by plain `name.endswith(m)`, so an own name such as `norm` would
        also take every `input_layernorm`."""
        return sorted(self.saved_modules)


class AdapterNamer:
    """Pipeline tensors of one layer file -> PEFT tensors, through the weight map and an optional `HfFormat`."""

    def __init__(self, info: Any, mapper: Any, export: HfFormat | None):
        self.info, self.mapper, self.export = info, mapper, export
        if info.family.to_hf_hook is not None:  # no family has one; a new one must say how adapters ride along
            raise ModelError(f"--adapter-only is not available for model_type '{info.family.model_type}' "
                             "(its export hook has no rule for LoRA adapters); export the merged model instead")

    def hf_tensors(self, idx: int, local: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        kind, block = self.info.kind_of(idx)
        name = self.mapper.to_hf(kind, block, local)
        return self.export.tensors(self.info.args, name, tensor) if self.export else {name: tensor}

    def layer(self, idx: int, trained: dict[str, torch.Tensor], plan: AdapterPlan) -> dict[str, torch.Tensor]:
        """PEFT tensors of layer file `idx`'s trained tensors; records the modules in `plan`."""
        out = {}
        where = layer_file_name(idx)
        for key, tensor in trained.items():
            if key.endswith(".lora_B"):
                continue
            if key.endswith(".lora_A"):
                stem = key[: -len(".lora_A")]
                b = trained[f"{stem}.lora_B"]
                parts = self.hf_tensors(idx, f"{stem}.weight", b)
                if not parts:
                    raise ModelError(f"{where}: the LoRA target '{stem}' has no weight in this export format")
                for name, b_part in parts.items():
                    if not name.endswith(".weight") or b_part.dim() != 2 or b_part.shape[1] != tensor.shape[0]:
                        raise ModelError(f"{where}: cannot write the adapter of '{stem}' as PEFT LoRA "
                                         f"(exported as '{name}')")
                    module = name[: -len(".weight")]
                    out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = tensor.clone()
                    out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_part.clone()
                    plan.lora_modules[module] = f"the LoRA target '{stem.rsplit('.', 1)[-1]}' ({where}: {stem})"
            elif is_lora_name(key):
                raise ModelError(f"{where}: the adapter tensor '{key}' is not a LoRA pair of an nn.Linear and has "
                                 "no PEFT form; export the merged model instead (without --adapter-only)")
            else:
                parts = self.hf_tensors(idx, key, tensor)
                if self.info.kind_of(idx)[0] == "enter" and key == TIED_WEIGHT_ATTR and self.info.model.tied:
                    parts.update(self.tied_head(tensor, plan))
                for name, part in parts.items():
                    out[PEFT_PREFIX + name] = part.clone()
                    plan.saved_modules[name.rsplit(".", 1)[0]] = f"the modules_to_save tensor {where}: {key}"
        return out

    def tied_head(self, embedding: torch.Tensor, plan: AdapterPlan) -> dict[str, torch.Tensor]:
        """A trained embedding of a tied model is the head too: saved under the head's name as well, as PEFT's own
        save_pretrained writes it with `ensure_weight_tying` (PEFT then wraps both and ties them; without tying,
        two modules_to_save with equal tensors still compute the same)."""
        heads = {}
        for head_name in self.info.family.tied_hf_names:
            heads.update(self.export.tensors(self.info.args, head_name, embedding) if self.export
                         else {head_name: embedding})
        plan.tie_weights = plan.tie_weights or bool(heads)
        return heads


def hf_meta_modules(hf_cfg: dict) -> tuple[str, dict[str, nn.Module]] | None:
    """(class name, named modules) of transformers' model for `hf_cfg`, built on the meta device; None when
    that needs remote code or transformers cannot build it (then the adapter is written unchecked)."""
    if "auto_map" in hf_cfg:
        return None
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        kwargs = {k: v for k, v in hf_cfg.items()
                  if k not in ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype")}
        config = AutoConfig.for_model(hf_cfg["model_type"], **kwargs)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001 - any failure: no check, as for remote code
        return None
    return type(model).__name__, dict(model.named_modules())


def check_against_transformers(plan: AdapterPlan, hf_cfg: dict) -> None:
    """Every LoRA module an `nn.Linear` of transformers' model and every modules_to_save module one of its
    modules (else PEFT could not load the adapter); skipped where transformers cannot build the model."""
    built = hf_meta_modules(hf_cfg)
    if built is None:
        return
    cls, modules = built
    advice = "a PEFT adapter holds LoRA on nn.Linear modules only; export the merged model instead (without " \
             "--adapter-only)"
    for name, source in sorted(plan.lora_modules.items()):
        module = modules.get(name)
        if module is None:
            raise ModelError(f"--adapter-only: {source} would be LoRA on '{name}', which transformers' {cls} "
                             f"does not have (it stores those weights differently); {advice}")
        if not isinstance(module, nn.Linear):
            raise ModelError(f"--adapter-only: {source} would be LoRA on '{name}', a {type(module).__name__} in "
                             f"transformers' {cls}, not an nn.Linear; {advice}")
    for name, source in sorted(plan.saved_modules.items()):
        if name not in modules:
            raise ModelError(f"--adapter-only: {source} would be saved as module '{name}', which transformers' {cls} "
                             "does not have; export the merged model instead (without --adapter-only)")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def adapter_config(cfg: LoraConfig, plan: AdapterPlan, base_name: str | None) -> dict:
    """PEFT's adapter_config.json for a LoRA of PEFT's math (scaling alpha/r, no rslora/dora/bias)."""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.r, "lora_alpha": _number(cfg.alpha), "lora_dropout": cfg.dropout,
        "target_modules": plan.target_modules, "modules_to_save": plan.modules_to_save or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None,
    }
    if plan.tie_weights:
        config["ensure_weight_tying"] = True  # the head shares the trained embedding, as in training
    return config


def write_adapter(ckpt: LoraCheckpoint, info: Any, mapper: Any, export: HfFormat | None, out_dir: Path,
                  target_cfg: dict, writing: Callable) -> AdapterPlan:
    """Write the PEFT adapter of `ckpt` into the (staging) dir `out_dir`."""
    from safetensors.torch import save_file

    layers = LoraLayers(info, ckpt.config)
    namer = AdapterNamer(info, mapper, export)
    check_no_extra_layers(ckpt.layer_dir, len(info.layer_tensors))
    plan = AdapterPlan({}, {})
    with torch.device("meta"):  # names first (no data read): refuse an inexpressible adapter before writing
        for idx in range(len(info.layer_tensors)):
            namer.layer(idx, {k: torch.empty(s) for k, s in layers.trained_shapes(idx).items()}, plan)
    if not plan.lora_modules and not plan.saved_modules:
        raise ModelError(f"{ckpt.layer_dir}: the LoRA config of LORA.json matches no module of this model")
    check_against_transformers(plan, target_cfg)
    plan = AdapterPlan({}, {})
    tensors: dict[str, torch.Tensor] = {}
    for idx in range(len(info.layer_tensors)):
        tensors.update(namer.layer(idx, layers.trained(ckpt.layer_dir, idx), plan))
    with writing(out_dir / ADAPTER_WEIGHTS):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
    from utils.lora_ckpt import ADAPTER_BASE, converted_from

    base_name = target_cfg.get("_name_or_path") or converted_from(str(ckpt.recorded_base)) or None
    with writing(out_dir / ADAPTER_CONFIG):
        (out_dir / ADAPTER_CONFIG).write_text(
            json.dumps(adapter_config(ckpt.config, plan, base_name), indent=2, sort_keys=True) + "\n")
    base = {"base_model_name_or_path": base_name, "base_weights": base_weights_fingerprint(ckpt, info, namer, plan),
            "modules": sorted(plan.lora_modules)}
    with writing(out_dir / ADAPTER_BASE):
        (out_dir / ADAPTER_BASE).write_text(json.dumps(base, indent=1) + "\n")
    return plan


def base_weights_fingerprint(ckpt: LoraCheckpoint, info: Any, namer: "AdapterNamer", plan: AdapterPlan) -> str | None:
    """utils.lora_ckpt.sampled_fingerprint of the base weights the adapter's modules modify, in the export's HF
    names (what `demo.py --adapter` compares with the model it is given); None when the recorded base dir is gone
    or no longer the one LORA.json fingerprints."""
    from utils.lora_ckpt import sampled_fingerprint

    try:
        verified_base(ckpt)
    except ModelError:
        return None
    weights: dict[str, torch.Tensor] = {}
    layers = LoraLayers(info, ckpt.config)
    for idx in range(len(info.layer_tensors)):
        stems = [k[: -len(".lora_A")] for k in layers.trained_shapes(idx) if k.endswith(".lora_A")]
        if not stems:
            continue
        _, state = load_layer_file(ckpt.recorded_base, idx)
        for stem in stems:
            for name, part in namer.hf_tensors(idx, f"{stem}.weight", state[f"{stem}.weight"]).items():
                module = name[: -len(".weight")]
                if module in plan.lora_modules:
                    weights[module] = part
        del state
    return sampled_fingerprint(weights) if weights else None
