"""Training data: load and validate sample files, render them to token ids with exact masking, batch them.

The format follows the data-format spec (sample types, templates, masking, truncation, errors); the
template strings live in `data.templates`, shared with the inference prompts.
"""
from .dataset import SFTDataset
from .loading import load_samples, open_samples
from .render import IGNORE_INDEX, Rendered, load_tokenizer, pad_id_of, render_sample
from .schema import DataError, SAMPLE_TYPES, validate_sample
from .templates import TEMPLATE_VERSION, conversation_prompt, instruct_prompt

__all__ = [
    "DataError", "IGNORE_INDEX", "Rendered", "SAMPLE_TYPES", "SFTDataset", "TEMPLATE_VERSION",
    "conversation_prompt", "instruct_prompt", "load_samples", "load_tokenizer", "open_samples", "pad_id_of",
    "render_sample", "validate_sample",
]
