"""FP8 in both trainers (the config's `fp8:` section; the module swap is models/fp8.py's).

Before any process group: the recipe is known and torchao imports (utils/config.py checked the keys), the GPU can
run FP8 matmuls (compute capability >= 8.9) unless `fp8.emulate`, and the model built on the meta device has
linears FP8 would convert (the count goes into the summary line). After the base weights are loaded (and LoRA
applied), each pipeline stage's blocks (or the HF model's decoder layers) get torchao's Float8Linear. The weights
stay in the training dtype, so checkpoints, resume and `pp_to_hg` are unchanged, and a run may be resumed with or
without FP8.
"""
from __future__ import annotations

import os

import torch

from training.transform import Transform
from utils.config import ConfigError, TrainConfig


def fp8_ready(emulate: bool) -> str | None:
    """Why FP8 matmuls cannot run here (None when they can, or `emulate`)."""
    if emulate:
        return None
    from models.fp8 import MIN_CAPABILITY

    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda" or not torch.cuda.is_available():
        return "no CUDA GPU here"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]}"
    return None


def _block_layers(layers, num_blocks: int):
    """The (idx, module) pairs of blocks: pipeline layer 1..L (0 is the embedding, L+1 the head)."""
    return [(idx, layer) for idx, layer in layers if 1 <= idx <= num_blocks]


class Fp8Transform(Transform):
    section = "fp8"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.recipe, self.emulate = cfg.fp8.recipe, bool(cfg.fp8.emulate)
        self.num_blocks = None

    @property
    def enabled(self) -> bool:
        return self.cfg.fp8.enabled

    def _check(self) -> None:
        from models import ModelError
        from models.fp8 import linear_config

        why = fp8_ready(self.emulate)
        if why:
            raise ConfigError(f"fp8: FP8 matmuls need a GPU of compute capability >= 8.9 (H100, H200, L40S, RTX 40xx) "
                              f"and {why}; remove the fp8 section, or set fp8.emulate: true to run torchao's "
                              f"emulation (slow, for tests)")
        try:
            linear_config(self.recipe, self.emulate)
        except ModelError as e:
            raise ConfigError(str(e)) from None

    def _line(self, names: list[str], total: int) -> str:
        mode = "emulated" if self.emulate else "torch._scaled_mm"
        if not names:
            raise ConfigError(f"fp8: no linear layer of this model qualifies for FP8 {self.recipe} (dims must be "
                              f"multiples of 16 and, on the GPU, large enough to be faster in FP8); remove the fp8 "
                              f"section")
        return (f"fp8: {self.recipe} ({mode}) on {len(names)} of {total} linear layers of the blocks; LM head, "
                f"embeddings and router stay in the compute dtype")

    def check_pipeline(self, resolved, opts, parts: list[int]) -> str:
        from models.fp8 import eligible
        from models.sequential import SequentialModel

        self._check()
        with torch.device("meta"):
            model = SequentialModel(resolved.specs(opts), None)
        blocks = _block_layers(((int(k), m) for k, m in model.layers.items()), resolved.num_blocks)
        linears = [(f"{i}.{q}", m) for i, layer in blocks for q, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear)]
        names = [q for q, m in linears if eligible(q, m, self.recipe, self.emulate)]
        return self._line(names, len(linears))

    def check_hf(self, cfg: TrainConfig, hf_cfg: dict) -> str:
        from transformers import AutoConfig, AutoModelForCausalLM

        from models.fp8 import eligible

        self._check()
        config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        linears = [(q, m) for q, m in _decoder_layers(model) if isinstance(m, torch.nn.Linear)]
        return self._line([q for q, m in linears if eligible(q, m, self.recipe, self.emulate)], len(linears))

    def convert_layers(self, layers, seed: int) -> None:
        from models.fp8 import convert_fp8

        num_blocks = self.cfg_num_blocks(layers)
        for _, layer in _block_layers(layers, num_blocks):
            convert_fp8(layer, self.recipe, self.emulate)

    def cfg_num_blocks(self, layers) -> int:
        """The block count of the model (config.json's), for telling blocks from the embedding and head."""
        if self.num_blocks is None:
            import models

            self.num_blocks = models.resolve_dir(self.cfg.model.path).num_blocks
        return self.num_blocks

    def convert_model(self, model: torch.nn.Module, seed: int) -> None:
        from models.fp8 import convert_fp8

        layers = _hf_layer_list(model)
        for layer in layers:
            convert_fp8(layer, self.recipe, self.emulate)


def _hf_layer_list(model: torch.nn.Module):
    """transformers' decoder layers (`model.layers`, `transformer.h`, `transformer.encoder.layers`, ...): the
    ModuleList holding most parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    return max(lists, key=lambda ml: sum(getattr(p, "ds_numel", p.numel()) for p in ml.parameters()))


def _decoder_layers(model: torch.nn.Module):
    for i, layer in enumerate(_hf_layer_list(model)):
        for q, m in layer.named_modules():
            yield f"{i}.{q}", m
