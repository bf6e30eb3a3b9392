"""Training data: load and validate sample files, render them to token ids with exact masking, batch them.

The text format is specified in docs (data-format spec); the strings live in `data.templates`.
"""
from .dataset import SFTDataset, collate
from .loading import load_samples, open_samples
from .render import IGNORE_INDEX, Rendered, load_tokenizer, pad_id_of, render_sample
from .schema import DataError, SAMPLE_TYPES, validate_sample
from .templates import TEMPLATE_VERSION, conversation_prompt, instruct_prompt

__all__ = [
    "DataError", "IGNORE_INDEX", "Rendered", "SAMPLE_TYPES", "SFTDataset", "TEMPLATE_VERSION", "collate",
    "conversation_prompt", "instruct_prompt", "load_samples", "load_tokenizer", "open_samples", "pad_id_of",
    "render_sample", "validate_sample",
]
