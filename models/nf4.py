"""NF4 (4-bit NormalFloat, QLoRA's format) frozen base weights, with torchao's `NF4Tensor` (pure PyTorch, any device).

`quantize_frozen_linears(module, lora_cfg)` replaces, in place, every frozen `nn.Linear` of a pipeline layer (or of a
`SequentialModel`) by an `Nf4Linear`: the weight [out, in] held as an NF4Tensor (4 bits per value, one absmax per 64
values, the absmaxes themselves quantized to 8 bits per block of up to 256: ~4.13 bits per weight), the bias kept as
it is. Which linears: `nf4_linear_names` — those of the blocks that do not train (not the LM head, not embeddings, not
`modules_to_save`) and whose size NF4 can block (a multiple of 64 values). The LoRA adapters (models/lora.py) then wrap
the `Nf4Linear`s they target, as they wrap an `nn.Linear`.

The weight is a plain attribute, neither a parameter nor a buffer: `module.to(dtype)` (DeepSpeed's bf16 cast) would
otherwise dequantize it, the optimizer never sees it, and `state_dict` leaves it out (LoRA checkpoints hold adapters
only). Quantization always starts from the fp32 values of the base weights (the trainers build layers in fp32 and
load the layer files into them), so `nf4_roundtrip` reproduces exactly the weights training saw: merged exports use it.

Forward: y = x · dequant(W)ᵀ + b, dequantized to the input's dtype per call (`_LinearNF4`); backward gives the
input's gradient only (W is frozen).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import ModelError

BLOCK = 64  # values per absmax: QLoRA's and torchao's default
SCALER_BLOCK = 256  # absmaxes per 8-bit block of the double quantization (torchao's default)
NEVER = ("lm_head", "embed_tokens", "word_embeddings", "output_layer")


def _nf4():
    from .torchao_import import torchao

    return torchao("quantization")


def scaler_block(numel: int) -> int:
    """Absmaxes per double-quantization block: 256 where the block count allows it (every released width), else the
    largest power of two dividing the number of blocks (tiny test models)."""
    blocks = numel // BLOCK
    return math.gcd(blocks, SCALER_BLOCK)


def can_quantize(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.numel() % BLOCK == 0


def to_nf4(weight: torch.Tensor):
    """The NF4Tensor of `weight` [out, in], quantized from its fp32 values."""
    w = weight.detach().to(torch.float32).contiguous()
    return _nf4().to_nf4(w, block_size=BLOCK, scaler_block_size=scaler_block(w.numel()))


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(to_nf4(weight)) in fp32: the base weight a QLoRA run trains against."""
    return to_nf4(weight).to(torch.float32)


class _LinearNF4(torch.autograd.Function):
    """x · dequant(W)ᵀ; the gradient flows to x only (W frozen). Only the NF4 weight is saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None


def linear_nf4(x: torch.Tensor, weight) -> torch.Tensor:
    return _LinearNF4.apply(x, weight)


class Nf4Linear(nn.Module):
    """A frozen `nn.Linear` whose weight is an NF4Tensor (see the module docstring); state_dict: `bias` only."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = to_nf4(base.weight)  # a plain attribute (nn.Module keeps non-Parameter tensors as such)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def _own(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def nf4_linear_names(module: nn.Module, lora_cfg) -> list[str]:
    """Qualified names of the `nn.Linear`s of `module` that QLoRA holds in NF4: frozen (not inside a
    `modules_to_save` module), not the head or an embedding, and of a size NF4 blocks (numel % 64 == 0)."""
    saved = [q for q, _ in module.named_modules() if q and _own(q) in lora_cfg.modules_to_save]
    names = []
    for qualified, sub in module.named_modules():
        if type(sub) is not nn.Linear or _own(qualified) in NEVER or _own(qualified) in lora_cfg.modules_to_save:
            continue
        if any(qualified.startswith(s + ".") for s in saved) or not can_quantize(sub.weight):
            continue
        names.append(qualified)
    return names


def check_nf4(module: nn.Module, family: str) -> None:
    """ModelError for what NF4 cannot hold: a family's stacked MoE experts (3-D weights)."""
    for qualified, sub in module.named_modules():
        if hasattr(sub, "lora_targets"):
            raise ModelError(f"lora.quantize: nf4 holds 2-D linear weights; {family}'s stacked experts ({qualified}, "
                             f"[experts, out, in]) are not covered: remove lora.quantize for {family}")


@torch.no_grad()
def quantize_frozen_linears(module: nn.Module, lora_cfg) -> list[str]:
    """In place: the linears of `nf4_linear_names` -> `Nf4Linear` (the full-precision weights are freed as each is
    replaced). Returns their qualified names."""
    names = nf4_linear_names(module, lora_cfg)
    for qualified in names:
        parent_name, _, own = qualified.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, own, Nf4Linear(getattr(parent, own)))
    return names


def nf4_bytes(numel: int) -> float:
    """Bytes of one NF4 weight of `numel` values: 4 bits each, an int8 absmax per 64, an fp32 factor per scaler
    block, one fp32 mean."""
    blocks = numel // BLOCK
    return numel / 2 + blocks + 4 * (blocks // max(scaler_block(numel), 1)) + 4


__all__ = ["Nf4Linear", "check_nf4", "linear_nf4", "nf4_bytes", "nf4_linear_names", "nf4_roundtrip",
           "quantize_frozen_linears", "to_nf4"]
