"""Check a training file before spending GPU time on it.

    python -m data.check --data FILE --tokenizer DIR --max-seq-len N [--template builtin|chat] [--workers W]
                         [--dump OUT.jsonl] [--show I]

Validates every sample, renders each with the real tokenizer, and prints counts per type, token
lengths (before truncation, which is what `max_seq_len` should be chosen from), how many samples get
truncated and the share of tokens that are trained. `--show I` prints sample I as the model sees it,
trained spans marked; `--dump` writes the exact ids and labels the trainer will use.
Samples that load but will not train as meant (no trained token left after truncation, a dialogue
ending with `ask` or starting with an answer, a repeated JSON key) get one `warning:` line per kind on
stderr, with a count and the first lines/samples. User errors print one `error: ...` line and exit with
status 2; so does a file in which no sample keeps a trained token (training refuses it too).

Large files: the file is streamed (flat memory), samples are tokenized in batches with the fast
tokenizer, `--workers W` spreads chunks of samples over W processes, and a progress bar with the
throughput goes to stderr when it is a terminal. Long samples: memory is bounded by the longest one (its
JSON line, its parsed text and a chunk of it in the tokenizer; `data.render`, "Long texts").
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TextIO

from .loading import Record, is_jsonl, iter_array_records, iter_jsonl_records, parse_sample
from .notes import Notes, key_detail, lost_detail, nothing_trains_message, round_notes
from .chat import TEMPLATE_CHOICES, chat_template_of, located, turn_ends
from .render import (IGNORE_INDEX, Rendered, first_trained_positions, load_tokenizer, render_many,
                     render_validated)
from .schema import SAMPLE_TYPES, DataError
from .templates import TEMPLATE_VERSION

EXIT_USER_ERROR = 2
# How `--show` marks trained text: ANSI green on a terminal, brackets when piped or captured.
MARKERS = {True: ("\033[32m", "\033[0m"), False: ("[[", "]]")}
# A chunk (one batch call to the tokenizer, one task for a worker): this many samples or bytes of JSON.
CHUNK_SAMPLES = 512
CHUNK_BYTES = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="training file (.json array or .jsonl)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (anything AutoTokenizer loads)")
    parser.add_argument("--max-seq-len", type=int, required=True, help="truncation length used in training")
    parser.add_argument("--template", choices=TEMPLATE_CHOICES, default="builtin",
                        help="builtin: the seed's templates (default); chat: the tokenizer's own chat_template")
    parser.add_argument("--workers", type=int, default=1, metavar="W",
                        help="processes that parse and tokenize (default 1; each uses one core)")
    parser.add_argument("--dump", metavar="OUT.jsonl", help="write every rendered sample (ids, labels)")
    parser.add_argument("--show", type=int, metavar="I", help="print sample I with its trained spans marked")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the tokenizer's own Python code (only for tokenizers you trust)")
    return parser.parse_args(argv)


@dataclass
class Chunk:
    """What checking one chunk of samples found (summed over chunks, in file order)."""

    count: int = 0
    types: Counter = field(default_factory=Counter)
    lengths: array = field(default_factory=lambda: array("q"))
    truncated: int = 0
    tokens: int = 0
    trained: int = 0
    shortest_untrained: int | None = None  # fewest prompt tokens before the first trained one, among untrained
    notes: Notes | None = None
    dump: str = ""
    shown: Rendered | None = None


class Stats:
    """Running totals over rendered samples."""

    def __init__(self, path: str, jsonl: bool):
        self.types: Counter[str] = Counter()
        self.lengths = array("q")
        self.truncated = 0
        self.tokens = 0
        self.trained = 0
        self.shortest_untrained: int | None = None
        self.notes = Notes(path, by_line=jsonl)
        self.template = "builtin"

    @property
    def count(self) -> int:
        return len(self.lengths)

    def add(self, rendered: Rendered) -> None:
        self.types[rendered.type] += 1
        self.lengths.append(rendered.full_length)
        self.truncated += rendered.truncated
        self.tokens += len(rendered.labels)
        self.trained += len(rendered.labels) - rendered.labels.count(IGNORE_INDEX)

    def add_chunk(self, chunk: Chunk) -> None:
        self.types.update(chunk.types)
        self.lengths.extend(chunk.lengths)
        self.truncated += chunk.truncated
        self.tokens += chunk.tokens
        self.trained += chunk.trained
        if chunk.shortest_untrained is not None:
            self.shortest_untrained = min(chunk.shortest_untrained, self.shortest_untrained or math.inf)
        self.notes.merge(chunk.notes)

    def report(self, path: str, max_seq_len: int, out: TextIO) -> None:
        import numpy as np

        count = self.count
        lengths = np.sort(np.frombuffer(self.lengths, dtype=np.int64)) if count else np.zeros(1, np.int64)
        p95 = int(lengths[math.ceil(0.95 * count) - 1])
        middle = count // 2
        median = int(lengths[middle]) if count % 2 else (int(lengths[middle - 1]) + int(lengths[middle])) / 2
        used = f"template version {TEMPLATE_VERSION}" if self.template == "builtin" else "the tokenizer's chat_template"
        print(f"{path}: {count} samples, all valid ({used})", file=out)
        for kind in (*SAMPLE_TYPES, "messages"):
            if self.types[kind]:
                print(f"  {kind:<16}{self.types[kind]:>8}", file=out)
        print(f"tokens per sample (before truncation): min {int(lengths[0])}, median {median:g}, "
              f"p95 {p95}, max {int(lengths[-1])}", file=out)
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


def chat_rule(tokenizer) -> str:
    """The line under `--show` with `--template chat`: what is trained, with this template's end-of-turn tokens."""
    ends = turn_ends(tokenizer)
    tokens = ", ".join(ends.texts) or "none"
    eos = f"; an eos ({tokenizer.eos_token}) is appended after the last turn" if ends.final_eos else ""
    return (f"trained: each assistant turn as the model generates it, through its end-of-turn token ({tokens}){eos};"
            f" system, user and tool text, and anything the template appends after the last turn, are masked")


def _dump_record(index: int, rendered: Rendered) -> str:
    return json.dumps({"index": index, "type": rendered.type, "input_ids": rendered.input_ids,
                       "labels": rendered.labels, "truncated": rendered.truncated})


# ---------------------------------------------------------------------------------------------- one chunk

@dataclass
class Job:
    """What every chunk is checked against; each worker gets a copy and loads the tokenizer itself."""

    path: str
    jsonl: bool
    tokenizer: object
    max_seq_len: int
    dump: bool
    show: int | None
    template: str = "builtin"


_JOB: Job | None = None


def check_chunk(records: list[Record], error: DataError | None = None, job: Job | None = None) -> Chunk:
    """Parse, validate, render and count one chunk of records (in a worker or in-process).

    `error` is what reading the file raised right after these records: it is raised once they are
    validated, so the first problem in file order is the one reported, with any number of workers.
    """
    job = job or _JOB
    notes = Notes(job.path, by_line=job.jsonl)
    samples = []
    for record in records:
        sample, repeated = parse_sample(job.path, record, job.jsonl)
        if repeated:
            notes.add("duplicate_key", record.index, record.line, key_detail(repeated))
        for kind in round_notes(sample):
            notes.add(kind, record.index, record.line)
        samples.append(sample)
    if error is not None:
        raise error
    chunk = Chunk(count=len(samples), notes=notes)
    dump = []
    untrained = []
    try:
        rendered_all = render_many(samples, job.tokenizer, job.max_seq_len, keep_segments=False, template=job.template)
    except DataError:  # a record the template cannot take: find it, name its line
        for record, sample in zip(records, samples):
            try:
                render_many([sample], job.tokenizer, job.max_seq_len, keep_segments=False, template=job.template)
            except DataError as exc:
                raise located(job.path, record.index, record.line, exc) from None
        raise
    for record, sample, rendered in zip(records, samples, rendered_all):
        chunk.types[rendered.type] += 1
        chunk.lengths.append(rendered.full_length)
        chunk.truncated += rendered.truncated
        chunk.tokens += len(rendered.labels)
        trained = len(rendered.labels) - rendered.labels.count(IGNORE_INDEX)
        chunk.trained += trained
        if rendered.lost:
            notes.add("lost_content", record.index, record.line, lost_detail(rendered.lost))
        if not trained:
            notes.add("untrained", record.index, record.line)
            untrained.append(sample)
        if job.dump:
            dump.append(_dump_record(record.index, rendered) + "\n")
        if record.index == job.show:
            chunk.shown = render_validated(sample, job.tokenizer, job.max_seq_len, job.template)
    if untrained:
        chunk.shortest_untrained = min(p for p in first_trained_positions(untrained, job.tokenizer, job.template)
                                      if p is not None)
    chunk.dump = "".join(dump)
    return chunk


def _init_worker(job: Job, tokenizer_path: str, trust_remote_code: bool) -> None:
    """Pool initializer of a (forkserver or spawned) worker: the job, with the tokenizer loaded here."""
    global _JOB
    job.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    _JOB = job


def _chunks(path: str, jsonl: bool) -> Iterator[tuple[list[Record], DataError | None, int]]:
    """Records in chunks of about CHUNK_SAMPLES samples or CHUNK_BYTES bytes, with the error that ended
    the reading (None but for the last chunk) and the bytes read so far."""
    position = [0]
    if jsonl:
        def records():
            for offset, record in iter_jsonl_records(path):
                if record is not None:
                    position[0] = offset + len(record.text)
                    yield record
                del record  # a checked line is not held while the next one is read
    else:
        def records():
            return iter_array_records(path, progress=lambda read: position.__setitem__(0, read))
    chunk, size = [], 0
    try:
        for record in records():
            chunk.append(record)
            size += len(record.text)
            del record
            if len(chunk) >= CHUNK_SAMPLES or size >= CHUNK_BYTES:
                yield chunk, None, position[0]
                chunk, size = [], 0
    except DataError as exc:  # a syntax error: reported after the samples before it
        yield chunk, exc, position[0]
        return
    if chunk:
        yield chunk, None, os.path.getsize(path)


def _results(chunks: Iterable[tuple[list[Record], DataError | None, int]], workers: int, job: Job,
             args) -> Iterator[tuple[Chunk, int]]:
    """Checked chunks in file order; with workers, at most a few chunks in flight (flat memory), and a chunk
    larger than they hold together (a very long sample) only once those before it are done."""
    if workers == 1:
        for records, error, position in chunks:
            yield check_chunk(records, error, job), position
            del records  # not held while the next chunk is read
        return
    # Never fork: the parent may hold threads (torch's pool, the tokenizer's, a process group's when called
    # in-process) whose locks a forked child inherits held, and a worker that deadlocks hangs `result.get()`.
    # forkserver/spawn workers start clean and load the tokenizer once each (_init_worker).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    worker_job = Job(job.path, job.jsonl, None, job.max_seq_len, job.dump, job.show, job.template)
    with context.Pool(workers, initializer=_init_worker,
                      initargs=(worker_job, args.tokenizer, args.trust_remote_code)) as pool:
        pending: deque = deque()
        in_flight = 0  # bytes of JSON of the pending chunks: a few chunks' worth, or one very long sample
        for records, error, position in chunks:
            size = sum(len(record.text) for record in records)
            while pending and (len(pending) >= 2 * workers + 1 or in_flight + size > 4 * workers * CHUNK_BYTES):
                result, at, done = pending.popleft()
                in_flight -= done
                yield result.get(), at
            pending.append((pool.apply_async(check_chunk, (records, error)), position, size))
            in_flight += size
        while pending:
            result, at, _ = pending.popleft()
            yield result.get(), at


def _progress_bar(path: str):
    from tqdm import tqdm

    return tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                disable=None, desc=os.path.basename(path), dynamic_ncols=True, smoothing=0.1)


def run(args: argparse.Namespace, out: TextIO, err: TextIO | None = None) -> None:
    err = err or sys.stderr
    if args.max_seq_len < 2:
        raise DataError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
    template = getattr(args, "template", "builtin")
    if template == "chat":
        chat_template_of(tokenizer)
    path, jsonl = args.data, is_jsonl(args.data)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl file")
    dump = _open_dump(args.dump) if args.dump else None
    job = Job(path, jsonl, tokenizer, args.max_seq_len, dump is not None, args.show, template)
    stats = Stats(path, jsonl)
    stats.template = template
    shown = None
    bar = _progress_bar(path)
    start, done = time.perf_counter(), 0
    try:
        for chunk, position in _results(_chunks(path, jsonl), args.workers, job, args):
            stats.add_chunk(chunk)
            if dump:
                dump.write(chunk.dump)
            if chunk.shown is not None:
                shown = chunk.shown
            bar.update(position - done)
            done = position
            bar.set_postfix_str(f"{stats.count} samples, {stats.count / (time.perf_counter() - start):,.0f} samples/s",
                                refresh=False)
    except BaseException:
        bar.close()
        if dump:
            dump.close()
            os.unlink(dump.name)
        raise
    bar.close()
    if dump:
        dump.close()
    if not stats.count:
        if dump:
            os.unlink(dump.name)
        raise DataError(f"{path}: no samples")
    if args.show is not None and not 0 <= args.show < stats.count:
        if dump:
            os.unlink(dump.name)
        raise DataError(f"--show {args.show}: {path} has samples 0..{stats.count - 1}")
    if dump:
        os.replace(dump.name, args.dump)
    stats.report(path, args.max_seq_len, out)
    if dump:
        print(f"wrote {stats.count} rendered samples to {args.dump}", file=out)
    if shown is not None:
        show(args.show, shown, out)
        if template == "chat":
            print(chat_rule(tokenizer), file=out)
    out.flush()
    for line in stats.notes.warnings(stats.count, args.max_seq_len):
        print(line, file=err)
    if stats.notes.count("untrained") == stats.count:
        raise DataError(nothing_trains_message(path, stats.count, args.max_seq_len, stats.shortest_untrained,
                                               stats.notes.positions("untrained")))


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
