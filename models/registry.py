"""The model families, looked up by config.json's `model_type`.

Adding a family = one new file `models/NAME.py` defining `FAMILY = Family(...)` (see `models/family.py`) plus
its module name in `FAMILY_MODULES`; a module defining several (gemma3: text-only and multimodal) lists them in
`FAMILIES`. Nothing else in the repo names a family: the trainers, the converter,
the memory planner and the benchmarks go through `models.resolve(config.json dict)`.
`register` / `unregister` add or remove a family at run time (tests, out-of-tree families).
"""
from __future__ import annotations

import importlib

from .common import ModelError
from .family import Family

FAMILY_MODULES = ("llama", "bloom", "baichuan", "chatglm", "mixtral", "qwen2", "qwen3", "mistral", "phi3", "olmo2",
                 "glm4", "gemma2", "gemma3", "qwen3_moe", "qwen2_moe", "deepseek_v3")

REGISTRY: dict[str, Family] = {}


def register(family: Family, replace: bool = False) -> Family:
    """Make `family` the one `get_family(family.model_type)` returns; another family already registered under
    that model_type is an error unless `replace`."""
    if not isinstance(family, Family):
        raise ModelError(f"register: expected a models.Family, got {type(family).__name__}")
    known = REGISTRY.get(family.model_type)
    if known is not None and known is not family and not replace:
        raise ModelError(f"model_type '{family.model_type}' is already registered")
    REGISTRY[family.model_type] = family
    return family


def unregister(model_type: str) -> Family | None:
    """Remove the family registered for `model_type`; returns it (None if there was none)."""
    return REGISTRY.pop(model_type, None)


def get_family(model_type: str | None) -> Family:
    """The Family registered for `model_type`; unknown types raise ModelError listing the supported ones."""
    if model_type not in REGISTRY:
        raise ModelError(f"unsupported model_type '{model_type}' (supported: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[model_type]


for _name in FAMILY_MODULES:
    _module = importlib.import_module(f"{__package__}.{_name}")
    for _family in getattr(_module, "FAMILIES", (_module.FAMILY,)):
        register(_family)
