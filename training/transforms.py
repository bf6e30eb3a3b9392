"""The one place where model transforms plug into both trainers (torchtitan's model converters, adapted to
pipeline stages and DeepSpeed checkpoints).

A transform (LoRA, FP8, ...) is one object built from the validated config. It checks itself against the model
built on the meta device before any process group (a ConfigError, one line), rewrites each built pipeline stage
(or the ZeRO trainer's HF model) in place, says whether checkpoints hold the trained tensors only (the base then
comes from `model_path` again on resume), writes what its checkpoints must carry, verifies it on resume, and
edits the ZeRO trainer's HF export. The trainers and the checkpoint code call `Transforms` and never name a
transform; adding one is one class plus one line in `REGISTRY`.

Hooks run in `REGISTRY` order (LoRA, with its 4-bit base, before FP8, so FP8 sees the adapters' frozen bases).

    check_pipeline(resolved, opts, parts) -> summary line | None      before the process group (pipeline)
    check_hf(cfg, hf_cfg) -> summary line | None                      before the process group (ZeRO)
    build_layer(idx, module, load) -> bool                            as each pipeline layer is built: True when
                                                                      it loaded the layer's weights itself
    convert_layers([(global idx, module)], seed)                      after the base weights are in place
    convert_model(model, seed)                                        the ZeRO trainer's whole HF model
    finish_pipeline(pipe_module)                                      after conversion, before deepspeed.initialize
    trained_only                                                      checkpoints skip frozen tensors
    write_meta(tag_dir) / check_resume(cfg, tag_dir)                  what a checkpoint carries, and its check
    export_state(module, state) -> state                              ZeRO's HF export (merge adapters)
"""
from __future__ import annotations

import torch

from training.fp8 import Fp8Transform
from training.lora import LoraTransform
from training.transform import Transform
from utils.config import TrainConfig


def registry() -> list[type[Transform]]:
    """The transform classes, in the order their hooks run."""
    return [LoraTransform, Fp8Transform]


class Transforms:
    """Every registered transform for one run; the hooks of the enabled ones, in registry order."""

    def __init__(self, cfg: TrainConfig):
        self.all = [cls(cfg) for cls in registry()]
        self.active = [t for t in self.all if t.enabled]

    def __bool__(self) -> bool:
        return bool(self.active)

    @property
    def trained_only(self) -> bool:
        """Checkpoints hold the trained tensors only (and resume loads the base from model_path)."""
        return any(t.trained_only for t in self.active)

    def check_pipeline(self, resolved, opts, parts: list[int]) -> list[str]:
        return [line for t in self.active if (line := t.check_pipeline(resolved, opts, parts))]

    def check_hf(self, cfg: TrainConfig, hf_cfg: dict) -> list[str]:
        return [line for t in self.active if (line := t.check_hf(cfg, hf_cfg))]

    def build_layer(self, idx: int, module: torch.nn.Module, load) -> bool:
        loaded = False
        for t in self.active:
            loaded = t.build_layer(idx, module, load) or loaded
        return loaded

    def convert_layers(self, layers: list, seed: int) -> None:
        for t in self.active:
            t.convert_layers(layers, seed)

    def convert_model(self, model: torch.nn.Module, seed: int) -> None:
        for t in self.active:
            t.convert_model(model, seed)

    def finish_pipeline(self, pipe_module) -> None:
        for t in self.active:
            t.finish_pipeline(pipe_module)

    def write_meta(self, tag_dir: str) -> None:
        for t in self.active:
            t.write_meta(tag_dir)

    def check_resume(self, cfg: TrainConfig, tag_dir: str) -> None:
        for t in self.all:
            t.check_resume(cfg, tag_dir)

    def export_state(self, module: torch.nn.Module, state: dict) -> dict:
        for t in self.active:
            state = t.export_state(module, state)
        return state
