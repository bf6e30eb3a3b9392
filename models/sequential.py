"""Run the pipeline layer specs in one process: parity tests, `verify`, and debugging without DeepSpeed.

The modules are built from exactly the specs the trainer hands to `PipelineModule`, in order, with a
`TiedLayerSpec` key built once and shared, so what is tested here is what trains.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from deepspeed.pipe import TiedLayerSpec

from .common import ModelError, ModelOptions
from .hf_files import read_hf_config
from .layout import check_layer_tensors, check_no_extra_layers, load_layer_file, resolve_pp_dir
from .resolved import resolve


class SequentialModel(nn.Module):
    """All pipeline layers in order. Modules live in `layers[str(spec_index)]`; since files are numbered
    like specs, `layers['3']` is the module of `layer_03-model_states.pt`. A tied spec that repeats a key
    has no module of its own and reuses the first one through its `forward_fn`.
    """

    def __init__(self, specs: list, loss_fn):
        super().__init__()
        self.layers = nn.ModuleDict()
        self.loss_fn = loss_fn
        self._steps: list[tuple[str, object]] = []  # (module key, forward_fn or None)
        tied_keys: dict[str, str] = {}
        for idx, spec in enumerate(specs):
            key = str(idx)
            if isinstance(spec, TiedLayerSpec) and spec.key in tied_keys:
                key = tied_keys[spec.key]
            else:
                self.layers[key] = spec.build()
                if isinstance(spec, TiedLayerSpec):
                    tied_keys[spec.key] = key
            self._steps.append((key, getattr(spec, "forward_fn", None)))

    def outputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """What the last pipeline stage hands the loss: logits [B,S,V], or a tuple led by the logits for
        families with side outputs (mixtral: router probabilities and routes)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = (input_ids, position_ids)
        for key, forward_fn in self._steps:
            module = self.layers[key]
            x = partial(forward_fn, module)(x) if forward_fn is not None else module(x)
        return x

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B,S] int64 (position_ids [B,S], default 0..S-1) -> logits [B,S,V], for every family."""
        out = self.outputs(input_ids, position_ids)
        return out[0] if isinstance(out, tuple) else out

    def module_key(self, spec_index: int) -> str:
        """The key in `layers` of the module that spec `spec_index` runs (a repeated tied spec: the first one's)."""
        return self._steps[spec_index][0]

    def loss(self, input_ids: torch.Tensor, labels, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss of the last pipeline stage; `labels` [B,S] or `(labels, scale)` as in training."""
        return self.loss_fn(self.outputs(input_ids, position_ids), labels)


def build_sequential(hf_cfg: dict, opts: ModelOptions) -> SequentialModel:
    """Randomly initialised SequentialModel for a config dict."""
    model = resolve(hf_cfg)
    return SequentialModel(model.specs(opts), model.loss_fn(opts))


def load_sequential(pp_dir: str | Path, dtype: torch.dtype = torch.float32,
                    opts: ModelOptions | None = None) -> SequentialModel:
    """Build the layers from `pp_dir/config.json` and load every layer file strictly.

    Modules are created on the meta device and the loaded tensors assigned, so a 7B model is not
    randomly initialised first; the result is cast to `dtype`. Missing, extra or mis-shaped tensors
    and missing or surplus layer files raise ModelError naming the file and tensor.
    """
    layer_dir, cfg_dirs = resolve_pp_dir(pp_dir)
    cfg_dir = next((d for d in cfg_dirs if (d / "config.json").is_file()), cfg_dirs[0])
    opts = replace(opts or ModelOptions(), dtype=dtype)
    with torch.device("meta"):
        model = build_sequential(read_hf_config(cfg_dir), opts)
    check_no_extra_layers(layer_dir, len(model.layers))
    for key, module in model.layers.items():
        path, state = load_layer_file(layer_dir, int(key))
        expected = {k: v.shape for k, v in module.state_dict().items()}
        check_layer_tensors(state, expected, path.name)
        module.load_state_dict(state, strict=True, assign=True)
    if any(p.is_meta for p in model.parameters()):
        raise ModelError(f"{pp_dir}: some parameters were not loaded")
    return model.to(dtype)
