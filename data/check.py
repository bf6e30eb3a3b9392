"""Check a training file before spending GPU time on it.

    python -m data.check --data FILE --tokenizer DIR --max-seq-len N [--dump OUT.jsonl] [--show I]

Validates every sample, renders each with the real tokenizer, and prints counts per type, token
lengths (before truncation, which is what `max_seq_len` should be chosen from), how many samples get
truncated and the share of tokens that are trained. `--show I` prints sample I as the model sees it,
trained spans marked; `--dump` writes the exact ids and labels the trainer will use.
User errors print one `error: ...` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from collections import Counter
from typing import TextIO

from .loading import open_samples
from .render import IGNORE_INDEX, Rendered, load_tokenizer, render_validated
from .schema import SAMPLE_TYPES, DataError
from .templates import TEMPLATE_VERSION

EXIT_USER_ERROR = 2
# How `--show` marks trained text: ANSI green on a terminal, brackets when piped or captured.
MARKERS = {True: ("\033[32m", "\033[0m"), False: ("[[", "]]")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="training file (.json array or .jsonl)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (anything AutoTokenizer loads)")
    parser.add_argument("--max-seq-len", type=int, required=True, help="truncation length used in training")
    parser.add_argument("--dump", metavar="OUT.jsonl", help="write every rendered sample (ids, labels)")
    parser.add_argument("--show", type=int, metavar="I", help="print sample I with its trained spans marked")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the tokenizer's own Python code (only for tokenizers you trust)")
    return parser.parse_args(argv)


class Stats:
    """Running totals over rendered samples."""

    def __init__(self):
        self.types: Counter[str] = Counter()
        self.lengths: list[int] = []
        self.truncated = 0
        self.tokens = 0
        self.trained = 0

    def add(self, rendered: Rendered) -> None:
        self.types[rendered.type] += 1
        self.lengths.append(rendered.full_length)
        self.truncated += rendered.truncated
        self.tokens += len(rendered.labels)
        self.trained += sum(label != IGNORE_INDEX for label in rendered.labels)

    def report(self, path: str, max_seq_len: int, out: TextIO) -> None:
        count = len(self.lengths)
        lengths = sorted(self.lengths)
        p95 = lengths[math.ceil(0.95 * count) - 1]
        print(f"{path}: {count} samples, all valid (template version {TEMPLATE_VERSION})", file=out)
        for kind in SAMPLE_TYPES:
            if self.types[kind]:
                print(f"  {kind:<16}{self.types[kind]:>8}", file=out)
        print(f"tokens per sample (before truncation): min {lengths[0]}, median {statistics.median(lengths):g}, "
              f"p95 {p95}, max {lengths[-1]}", file=out)
        print(f"truncated to {max_seq_len} tokens: {self.truncated} of {count} samples "
              f"({100 * self.truncated / count:.1f}%)", file=out)
        print(f"trained tokens: {self.trained} of {self.tokens} ({100 * self.trained / max(self.tokens, 1):.1f}%)",
              file=out)


def show(index: int, rendered: Rendered, out: TextIO) -> None:
    """Print one rendered sample; trained text is wrapped in the markers for this output."""
    tty = out.isatty()
    start, end = MARKERS[tty]
    cut = f", truncated from {rendered.full_length}" if rendered.truncated else ""
    legend = "trained text in green" if tty else "trained text in [[ ]]"
    print(f"--- sample {index} ({rendered.type}): {len(rendered.input_ids)} tokens{cut}; {legend} ---", file=out)
    print("".join(f"{start}{text}{end}" if trained else text for text, trained in rendered.segments), file=out)


def _dump_record(index: int, rendered: Rendered) -> str:
    return json.dumps({"index": index, "type": rendered.type, "input_ids": rendered.input_ids,
                       "labels": rendered.labels, "truncated": rendered.truncated})


def run(args: argparse.Namespace, out: TextIO) -> None:
    if args.max_seq_len < 2:
        raise DataError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
    samples = open_samples(args.data)
    if args.show is not None and not 0 <= args.show < len(samples):
        raise DataError(f"--show {args.show}: {args.data} has samples 0..{len(samples) - 1}")
    dump = _open_dump(args.dump) if args.dump else None
    stats = Stats()
    shown = None
    try:
        for index in range(len(samples)):
            rendered = render_validated(samples[index], tokenizer, args.max_seq_len)
            stats.add(rendered)
            if dump:
                dump.write(_dump_record(index, rendered) + "\n")
            if index == args.show:
                shown = rendered
    except BaseException:
        if dump:
            dump.close()
            os.unlink(dump.name)
        raise
    if dump:
        dump.close()
        os.replace(dump.name, args.dump)
    stats.report(args.data, args.max_seq_len, out)
    if dump:
        print(f"wrote {len(samples)} rendered samples to {args.dump}", file=out)
    if shown is not None:
        show(args.show, shown, out)


def _open_dump(path: str) -> TextIO:
    """A temp file beside `path`, renamed over it at the end: a crash never leaves a half-written dump."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DataError(f"--dump {path}: directory {directory} does not exist")
    return tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, delete=False,
                                       prefix=os.path.basename(path) + ".", suffix=".tmp")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args, sys.stdout)
    except (DataError, OSError) as exc:
        message = str(exc).replace("\n", "\\n")
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
