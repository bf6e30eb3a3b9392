"""torchao, imported without its noise.

torchao 0.18 loads its CUDA kernel libraries at import and logs a "Failed to load ..." warning for each one that
cannot load (every one on a CPU-only torch), and registers an Enum with torch's pytree, which torch 2.13 answers
with a deprecation warning. Neither matters for what we use (Float8 training's Python path and NF4Tensor), so both
loggers are raised to ERROR for the duration of the first import. Everything that uses torchao imports it through
`torchao()`; a missing torchao is a ModelError naming the package.
"""
from __future__ import annotations

import importlib
import logging

from .common import ModelError

_QUIET = ("torchao", "torch.utils._pytree")
# What torchao logs at import that says nothing to our users (transformers imports torchao too, when it is installed,
# e.g. in save_pretrained): logger name -> message prefixes dropped by `_Drop`, installed when this module is imported.
_NOISE = {"torchao": ("Failed to load ", "Skipping import of cpp extensions"),
          "torchao.kernel.intmm": ("Warning: Detected no triton",),
          "torch.utils._pytree": ("<enum ",)}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes) and not record.getMessage().startswith(self.prefixes)


def install_filters() -> None:
    """Drop the import-time noise above wherever torchao gets imported from (idempotent)."""
    for name, prefixes in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))


install_filters()


def torchao(submodule: str = ""):
    """`import torchao[.submodule]` with the import-time warnings above silenced; returns the module."""
    name = "torchao" + (f".{submodule}" if submodule else "")
    loggers = [logging.getLogger(n) for n in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ModelError(f"{name} is needed (pip install torchao==0.18.0; it is in requirements.txt): {e}") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
