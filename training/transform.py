"""The interface of a model transform (LoRA, FP8, ...): the `Transform` base class, every hook a no-op.

`training.transforms` runs the registered ones and documents the hooks; a transform module imports this one, and
`training.transforms` imports the transform modules (no import cycle).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from utils.config import TrainConfig


class Transform:
    """Base class: every hook a no-op. `section` is the config section the transform reads (for messages);
    `enabled` says whether the config asks for it (a disabled transform still gets `check_resume`, so a
    checkpoint written with it is not resumed without it)."""
    section = ""
    trained_only = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @property
    def enabled(self) -> bool:
        return False

    def check_pipeline(self, resolved, opts, parts: list[int]) -> str | None:
        return None

    def check_hf(self, cfg: TrainConfig, hf_cfg: dict) -> str | None:
        return None

    def build_layer(self, idx: int, module: torch.nn.Module, load: Callable[[int, torch.nn.Module], None]) -> bool:
        return False

    def convert_layers(self, layers: Iterable[tuple[int, torch.nn.Module]], seed: int) -> None:
        pass

    def convert_model(self, model: torch.nn.Module, seed: int) -> None:
        pass

    def finish_pipeline(self, pipe_module) -> None:
        pass

    def write_meta(self, tag_dir: str) -> None:
        pass

    def check_resume(self, cfg: TrainConfig, tag_dir: str) -> None:
        pass

    def export_state(self, module: torch.nn.Module, state: dict) -> dict:
        return state
