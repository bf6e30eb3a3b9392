"""FP8 training of the blocks' linear layers with torchao's Float8 (`torchao.float8`), from outside the model.

`convert_fp8(module, recipe, emulate)` swaps, in place, each eligible `nn.Linear` of a module tree for torchao's
`Float8Linear` (same `weight` / `bias` parameters, so state_dict keys, dtypes and checkpoints do not change) and
gives each eligible `LoraLinear` an FP8 forward for its frozen base (the adapters stay in the compute dtype).
Inputs, weights and output gradients are cast to float8 (e4m3; e5m2 for tensorwise gradients) with dynamic scales
per tensor (`tensorwise`) or per row (`rowwise`; `rowwise_with_gw_hp` keeps the weight-gradient matmul in high
precision), the matmuls run in `torch._scaled_mm`, outputs come back in the input's dtype. `emulate=True` runs
the same casts with a high-precision matmul (torchao's emulation: any device, what the CPU tests use).

Eligible (`eligible`): a linear of a block, not the MoE router (`gate`, `router`), not an embedding, not the LM
head (the fused head + loss keeps its own path); both dims multiples of 16 (what the FP8 kernels take); and, on
hardware, large enough that FP8 is faster than bf16 by torchao's measured H100 thresholds for the recipe
(tensorwise: not (in <= 4096 and out <= 1024); rowwise: out > 2048, in > 1024, not (out <= 4096 and in <= 2048)).
Emulation skips only the shapes FP8 cannot run, so tiny test models still convert.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from .common import ModelError

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
NEVER = ("lm_head", "embed_tokens", "word_embeddings", "output_layer", "gate", "router")
MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later have FP8 tensor cores


def _float8():
    from .torchao_import import torchao

    return torchao("float8")


def linear_config(recipe: str, emulate: bool):
    """torchao's `Float8LinearConfig` of `recipe`, emulated or not."""
    if recipe not in RECIPES:
        raise ModelError(f"fp8.recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    config = _float8().Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=emulate) if emulate else config


def fast_enough(recipe: str, n_in: int, n_out: int) -> bool:
    """torchao's H100 thresholds (torchao.float8 `_auto_filter_for_recipe`): below them the casts cost more than the
    FP8 matmul saves. `rowwise_with_gw_hp` uses rowwise's."""
    if recipe == "tensorwise":
        return not (n_in <= 4096 and n_out <= 1024)
    return n_out > 2048 and n_in > 1024 and not (n_out <= 4096 and n_in <= 2048)


def eligible(qualified: str, module: nn.Module, recipe: str, emulate: bool) -> bool:
    """Whether the linear (or LoRA-wrapped linear) at `qualified` runs in FP8 (see the module docstring)."""
    own = qualified.rsplit(".", 1)[-1]
    if own in NEVER:
        return False
    n_in, n_out = module.in_features, module.out_features
    if n_in % 16 or n_out % 16:
        return False
    return emulate or fast_enough(recipe, n_in, n_out)


def convert_fp8(module: nn.Module, recipe: str, emulate: bool) -> list[str]:
    """In place (see the module docstring). Returns the qualified names of the linears that now run in FP8."""
    from .lora import LoraLinear

    f8 = _float8()
    config = linear_config(recipe, emulate)
    converted = []
    for qualified, sub in list(module.named_modules()):
        if isinstance(sub, LoraLinear) and sub.base_linear is None and eligible(qualified, sub, recipe, emulate):
            from torchao.float8.float8_linear import Float8Linear

            sub.set_base_linear(Float8Linear.from_float(sub, config=config))  # shares sub.weight / sub.bias
            converted.append(qualified)
    picked = set()

    def pick(mod: nn.Module, fqn: str) -> bool:
        if type(mod) is nn.Linear and eligible(fqn, mod, recipe, emulate):
            picked.add(fqn)
            return True
        return False

    f8.convert_to_float8_training(module, module_filter_fn=pick, config=config)
    return sorted(converted + sorted(picked))


__all__ = ["MIN_CAPABILITY", "RECIPES", "convert_fp8", "eligible", "fast_enough", "linear_config"]
