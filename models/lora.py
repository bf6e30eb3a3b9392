"""LoRA: frozen base weights plus trained low-rank updates, injected into any family's layers by HF module name.

`LoraConfig` is the config's `lora:` section. `apply_lora(module, cfg)` walks a module tree (a pipeline
stage, a `SequentialModel`, or a transformers model): every `nn.Linear` whose own name is in
`cfg.target_modules` becomes a `LoraLinear` (same `weight`/`bias` parameters and state_dict keys, plus
`lora_A` [r, in] and `lora_B` [out, r]); modules whose own name is in `cfg.modules_to_save` train in full;
every other parameter is frozen (`requires_grad=False`). A family's stacked MoE experts (`Experts` with
`w1/w2/w3`, mixtral) take LoRA through the `lora_targets` hook of the module (see `models/mixtral.py`).

Math (PEFT's LoRA): y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ, scaling = alpha / r; A ~ kaiming-uniform(√5),
B = 0, so a fresh adapter leaves the model unchanged. Merged: W' = W + scaling · B A.

Names: adapter parameters end in `.lora_A` / `.lora_B` (`is_lora_name`); `valid_targets(module)` lists the
names a model accepts (its `nn.Linear` names, the LM head and embeddings excluded, plus expert weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import ModelError
from .nf4 import Nf4Linear

LORA_PARAM_NAMES = ("lora_A", "lora_B")
NEVER_TARGETS = ("lm_head", "embed_tokens", "word_embeddings", "output_layer")  # full-train these via modules_to_save


@dataclass(frozen=True)
class LoraConfig:
    """The config's `lora:` section. `quantize: 'nf4'` holds the frozen base linears in 4-bit NF4 (QLoRA,
    models/nf4.py); the adapters are the same."""
    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    quantize: str | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        return cls(r=int(d["r"]), alpha=float(d.get("alpha", d["r"])), dropout=float(d.get("dropout", 0.0)),
                   target_modules=tuple(d.get("target_modules") or ()),
                   modules_to_save=tuple(d.get("modules_to_save") or ()), quantize=d.get("quantize"))

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules),
                "modules_to_save": list(self.modules_to_save), "quantize": self.quantize}


def merged_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling · B A computed in fp32, returned in W's dtype; batched over leading dims (stacked experts:
    W [E, out, in], A [E, r, in], B [E, out, r])."""
    return (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)


def init_lora_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """PEFT's default init: A kaiming-uniform (a=√5, as nn.Linear), B zeros."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b.zero_()


class LoraLinear(nn.Module):
    """An `nn.Linear` (its `weight` and `bias` kept, frozen) plus a trained rank-r update.

    state_dict keys: `weight`, `bias` (as the wrapped linear: layer files and converters see the same names),
    `lora_A` [r, in_features], `lora_B` [out_features, r], both in the base weight's dtype.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # a Parameter; an NF4Tensor plain attribute for an Nf4Linear base (models/nf4.py)
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # The frozen base's forward when it is not plain F.linear (an Nf4Linear, or FP8's Float8Linear sharing these
        # parameters): held outside the module tree, so parameters and state_dict keys stay the wrapped linear's.
        self.__dict__["base_linear"] = None if type(base) is nn.Linear else base
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=w.dtype, device=w.device))
        init_lora_pair(self.lora_A, self.lora_B)
        self.r, self.scaling = r, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.base_linear is None else self.base_linear(x)
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def set_base_linear(self, base: nn.Module | None) -> None:
        """Run the frozen base through `base` (same weight and bias; not registered as a submodule)."""
        self.__dict__["base_linear"] = base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling}"


def _is_nf4_linear(module: nn.Module) -> bool:
    """A 4-bit frozen base linear (models/nf4.py, QLoRA), wrapped like an nn.Linear."""
    return isinstance(module, Nf4Linear)


def is_lora_name(name: str) -> bool:
    """Whether a parameter / state_dict name is an adapter tensor."""
    own = name.rsplit(".", 1)[-1]
    return any(p in own for p in LORA_PARAM_NAMES)  # `lora_A`, or an expert weight's `w1_lora_A`


def _own_name(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def valid_targets(module: nn.Module) -> list[str]:
    """Sorted names `target_modules` may use in this module tree: the own names of its `nn.Linear` modules
    (LM head and embeddings excluded) plus what modules declare through `lora_targets()` (MoE expert weights;
    such a module also has `add_lora(names, cfg)` and `merge_lora()`, and names its adapters `{w}_lora_A/B`)."""
    names = set()
    for qualified, sub in module.named_modules():
        own = _own_name(qualified)
        if (isinstance(sub, (nn.Linear, LoraLinear)) or _is_nf4_linear(sub)) and own not in NEVER_TARGETS:
            names.add(own)
        if hasattr(sub, "lora_targets"):
            names.update(sub.lora_targets())
    return sorted(names)


def check_targets(cfg: LoraConfig, module: nn.Module, family: str) -> None:
    """ModelError naming the valid names when `target_modules` is empty or names one this model lacks."""
    valid = valid_targets(module)
    if not cfg.target_modules:
        raise ModelError(f"lora.target_modules is empty; {family} accepts: {', '.join(valid)}")
    unknown = [t for t in cfg.target_modules if t not in valid]
    if unknown:
        raise ModelError(f"lora.target_modules: {', '.join(map(repr, unknown))} not in {family}; valid names: "
                         f"{', '.join(valid)}")
    names = sorted({_own_name(q) for q, m in module.named_modules()
                    if q and not _own_name(q).isdigit() and next(m.parameters(), None) is not None})
    missing = [m for m in cfg.modules_to_save if m not in names]
    if missing:
        import difflib

        hints = [f"{m!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(m, names, n=1)) else repr(m)
                 for m in missing]
        raise ModelError(f"lora.modules_to_save: {', '.join(hints)} not in {family}; modules with weights: "
                         f"{', '.join(names)}")
    saved = _saved_modules(module, cfg)
    inside = sorted({_own_name(q) for q, _ in module.named_modules()
                     if _own_name(q) in cfg.target_modules and any(q.startswith(s + ".") for s in saved)})
    if inside:
        raise ModelError(f"lora.modules_to_save: {', '.join(cfg.modules_to_save)} contains the targets "
                         f"{', '.join(inside)}; a module is either trained in full or given adapters")


def _saved_modules(module: nn.Module, cfg: LoraConfig) -> list[str]:
    """Qualified names of the modules `cfg.modules_to_save` names (by own name): trained in full."""
    return [q for q, _ in module.named_modules() if q and _own_name(q) in cfg.modules_to_save]


def apply_lora(module: nn.Module, cfg: LoraConfig) -> list[str]:
    """In place: targeted `nn.Linear`s -> `LoraLinear`, experts given their adapters, everything frozen but the
    adapters and `modules_to_save`. Returns the qualified names of the modules that got adapters.

    Call it after the base weights are in place or before they are loaded (`load_state_dict(strict=False)`
    keeps the fresh adapters: the base keys are unchanged). Idempotent on already wrapped linears.
    """
    targets = set(cfg.target_modules)
    wrapped = []
    for qualified, parent in list(module.named_modules()):
        for own, child in list(parent.named_children()):
            name = f"{qualified}.{own}" if qualified else own
            if own in targets and (type(child) is nn.Linear or _is_nf4_linear(child)):
                setattr(parent, own, LoraLinear(child, cfg.r, cfg.alpha, cfg.dropout))
                wrapped.append(name)
            elif hasattr(child, "add_lora") and targets & set(child.lora_targets()):
                child.add_lora(sorted(targets & set(child.lora_targets())), cfg)
                wrapped.append(name)
    trained_prefixes = _saved_modules(module, cfg)
    for pname, p in module.named_parameters():
        trained = is_lora_name(pname) or any(pname.startswith(prefix + ".") for prefix in trained_prefixes)
        p.requires_grad_(trained)
    return wrapped


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """In place: every `LoraLinear` -> a plain `nn.Linear` with W + scaling·BA (computed in fp32, stored in the
    base dtype), experts merged through their `merge_lora()`. Returns `module`."""
    for qualified, parent in list(module.named_modules()):
        for own, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                dtype=child.weight.dtype, device=child.weight.device)
                lin.weight.copy_(merged_weight(child.weight, child.lora_A, child.lora_B, child.scaling))
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
                setattr(parent, own, lin)
            elif hasattr(child, "merge_lora"):
                child.merge_lora()
    return module


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors only: adapters and `modules_to_save` parameters, by state_dict name (adapter keys
    that are not parameter names included: stacked experts write theirs per expert)."""
    keep = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in keep or is_lora_name(k)}


__all__ = ["LoraConfig", "LoraLinear", "apply_lora", "check_targets", "init_lora_pair", "is_lora_name",
           "lora_state_dict", "merge_lora", "merged_weight", "valid_targets"]
