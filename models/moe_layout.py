"""The two checkpoint layouts of stacked experts, for the MoE families whose experts are `mlp.experts`
(qwen2_moe, qwen3_moe, deepseek_v3):

- the hub's per-expert names, `model.layers.{i}.mlp.experts.{e}.gate_proj.weight` [F, H], `up_proj` [F, H],
  `down_proj` [H, F]: what the released checkpoints hold and what transformers 5's `save_pretrained` writes by
  default; the families' weight maps are written in it and `pp_to_hg` writes it;
- transformers 5's in-memory layout (`save_pretrained(save_original_format=False)`), one fused tensor per
  weight and layer: `mlp.experts.gate_up_proj` [E, 2F, H] (expert e's gate rows, then its up rows) and
  `mlp.experts.down_proj` [E, H, F].

`hg_to_pp` reads either (`fused_experts_to_hub`, a per-tensor rewrite: one fused tensor at a time becomes its
per-expert views, so a 30B-A3B checkpoint streams shard by shard as before); `pp_to_hg --format transformers5` writes the
fused one (`FUSED_FORMAT`: one layer's experts are stacked when that layer is written, never more).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .common import ModelError
from .family import HfFormat

_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")
_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight")


def fused_experts_to_hub(args: Any, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """`Family.from_hf_tensor`: one tensor of transformers 5's fused layout -> the hub's per-expert names (views:
    the converter clones each into its own storage when it writes the layer file); any other name unchanged."""
    match = _FUSED.fullmatch(name)
    if match is None:
        return {name: tensor}
    prefix, what = match.groups()
    moe = args.moe
    e, h, f = moe.num_experts, moe.hidden_size, moe.expert_size
    expected = (e, 2 * f, h) if what == "gate_up_proj" else (e, h, f)
    if tuple(tensor.shape) != expected:
        raise ModelError(f"tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies {expected}")
    gate, down, up = moe.expert_names
    if what == "down_proj":
        return {f"{prefix}.{i}.{down}.weight": tensor[i] for i in range(e)}
    out = {}
    for i in range(e):
        out[f"{prefix}.{i}.{gate}.weight"] = tensor[i, :f]
        out[f"{prefix}.{i}.{up}.weight"] = tensor[i, f:]
    return out


def hub_experts_to_fused(args: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`HfFormat.layer` of `FUSED_FORMAT`: one layer's {HF name: tensor} with per-expert names -> the same with
    each layer's experts stacked into `gate_up_proj` / `down_proj` (at the place of its first expert tensor)."""
    moe = args.moe
    gate, down, up = moe.expert_names
    out: dict[str, torch.Tensor | None] = {}
    groups: dict[str, dict] = {}
    for name, tensor in tensors.items():
        match = _PER_EXPERT.fullmatch(name)
        if match is None or match.group(3) not in moe.expert_names:
            out[name] = tensor
            continue
        prefix, e, w = match.group(1), int(match.group(2)), match.group(3)
        if prefix not in groups:
            groups[prefix] = {}
            out[f"{prefix}.gate_up_proj"] = out[f"{prefix}.down_proj"] = None  # keep the place
        groups[prefix][e, w] = tensor
    for prefix, parts in groups.items():
        missing = [f"{prefix}.{e}.{w}.weight" for e in range(moe.num_experts) for w in moe.expert_names
                   if (e, w) not in parts]
        if missing:
            raise ModelError(f"cannot fuse the experts of {prefix}: missing '{missing[0]}'")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[e, gate], parts[e, up]])
                                                     for e in range(moe.num_experts)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[e, down] for e in range(moe.num_experts)])
    return out


def _identity(args: Any, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: tensor}


def _same_config(hf_cfg: dict) -> dict:
    return dict(hf_cfg)


FUSED_FORMAT = HfFormat(config=_same_config, tensors=_identity, layer=hub_experts_to_fused)
