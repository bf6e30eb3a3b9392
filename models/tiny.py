"""Tiny random models and tokenizers, built offline, for tests and the CPU quick start.

Nothing here downloads: the tokenizer is a byte-level BPE trained on the fly with `tokenizers`,
the model is a random `transformers` model of a few hundred thousand parameters.
"""
from __future__ import annotations

import os
from pathlib import Path

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n### Human: ### Assistant: ### Reference: ",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "Answer the following questions as best as you can. You have access to the following tool(s):",
    "Generate responses to the given instruction series according to the reference text.",
    "#### api call\n```python\nsearch(query='x', version='y')\n```\n#### api output\n",
    "Cai Xukun loves singing, dancing, rapping and playing basketball. Today is Wednesday.",
    "The quick brown fox jumps over the lazy dog. 0123456789 {}[]():;,.!?'\"=-+*/\\_",
]


def train_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512, texts: list[str] | None = None,
                         pad: bool = True):
    """Train a byte-level BPE tokenizer and save it as a `PreTrainedTokenizerFast` in `out_dir`.

    `pad=False` leaves the pad token out, to exercise the unk/eos fallback.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = dict(SPECIAL_TOKENS)
    if not pad:
        specials.pop("pad_token")
    tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((texts or _CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_llama_config(vocab_size: int = 512, **overrides):
    """A LlamaConfig small enough to train in seconds on a CPU (GQA by default)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(out_dir: str | os.PathLike, seed: int = 0, tokenizer: bool = True, **overrides):
    """Save a random tiny `LlamaForCausalLM` (fp32 safetensors) plus a tiny tokenizer to `out_dir`."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).float()
    model.save_pretrained(out_dir)
    if tokenizer:
        train_tiny_tokenizer(out_dir, vocab_size=model.config.vocab_size)
    return model


def main(argv=None) -> int:
    """`python -m models.tiny OUT_DIR`: write the quick start's tiny llama (random weights + tokenizer)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_tiny_llama(a.out_dir, seed=a.seed)
    print(f"wrote a tiny random llama + tokenizer to {a.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
