"""Talk to an exported model (Hugging Face format) with exactly the prompts it was trained on.

    python demo.py --model-path HF_DIR --instruct "Fill out the blank" [--input "Cai Xukun loves ______"]
    python demo.py --model-path HF_DIR --chat                       # multi-turn, one user line per turn
    python demo.py --model-path HF_DIR --chat --reference ref.txt   # ref_qa: answer from a reference text
    python demo.py --model-path HF_DIR --chat --tools api_desc.txt  # conver_has_api: tool calls
    deepspeed --num_gpus N demo.py --model-path HF_DIR --chat       # tensor parallel over N GPUs (AutoTP)
    python demo.py --model-path BASE_HF_DIR --adapter ADAPTER_DIR --chat   # base model + a LoRA adapter

HF_DIR is the output of `convert_model.py pp_to_hg`. `--adapter` takes a PEFT LoRA adapter directory (`pp_to_hg
--adapter-only` of a LoRA checkpoint, or any PEFT LoRA adapter of that base) and merges it into the base model of
`--model-path` once, after loading (with peft when it is installed, else with the LoRA math written here).
Prompts come from `data.templates` and are tokenized segment by segment like the training data (no BOS, the eos
id where the template has `<eos>`).
`--chat` reads user lines from stdin (a terminal or a pipe) until end of input (Ctrl-D) and streams
the answers. With `--tools`, when the model answers with an api call block, the next stdin line is
taken as the api output and the model continues. `--template chat` (for a model trained with
`template: chat`) prompts with the tokenizer's own chat template instead: the conversation so far mapped onto
messages exactly as training maps it, rendered with the generation prompt; tool calls are then shown as
the model writes them, not executed. `--show-prompt` prints each rendered prompt before
the answer. User errors print one line `error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data.chat import TEMPLATE_CHOICES, chat_prompt, chat_stop_ids as _chat_stop_ids, chat_template_of, sample_to_messages
from data.render import _segment_ids, eos_id_of, load_tokenizer
from data.schema import DataError
from data.templates import (EOS, NEXT_ANSWER_TAG, TEMPLATES, Segment, call_expression, conversation_prompt,
                            fill, instruct_prompt, segments_of)

DTYPES = ("bf16", "fp16", "fp32")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
PIPELINE_FILES = ("layer_*-model_states.pt", "global_step*/layer_*-model_states.pt", "latest")


class DemoError(Exception):
    """A problem the user must fix (exit 2) or a run that cannot go on (exit 1); the message is one line."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse that raises `DemoError` instead of printing usage, so every user error is one line."""

    def error(self, message: str):
        raise DemoError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="Hugging Face model directory (convert_model.py pp_to_hg)")
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter directory (convert_model.py pp_to_hg "
                                                    "--adapter-only) applied to --model-path, its base model")
    p.add_argument("--any-base", action="store_true",
                   help="apply --adapter even when the base weights it records (adapter_base.json) differ from "
                        "--model-path's")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--instruct", metavar="TEXT", help="answer one instruction (instruct template)")
    mode.add_argument("--chat", action="store_true", help="multi-turn conversation, user lines from stdin")
    p.add_argument("--input", metavar="TEXT", help="optional context for --instruct")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--reference", metavar="FILE", help="with --chat: reference text (ref_qa template)")
    kind.add_argument("--tools", metavar="FILE", help="with --chat: api description (conver_has_api template)")
    p.add_argument("--template", choices=TEMPLATE_CHOICES, default="builtin",
                   help="the template the model was trained with (config key template; default builtin)")
    p.add_argument("--show-prompt", action="store_true", help="print each rendered prompt before the answer")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1] (default 0.9)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--max-tool-calls", type=int, default=5, help="api calls allowed in one answer (default 5)")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="single-process device (default: cuda if available); under `deepspeed` each rank "
                        "uses its local accelerator")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow Python code shipped with the model/tokenizer to run (off unless given)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def check_args(args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; raises DemoError."""
    if args.input is not None and args.instruct is None:
        raise DemoError("--input goes with --instruct")
    if (args.reference or args.tools) and not args.chat:
        raise DemoError(f"{'--reference' if args.reference else '--tools'} goes with --chat")
    if args.max_new_tokens < 1:
        raise DemoError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise DemoError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise DemoError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_tool_calls < 0:
        raise DemoError(f"--max-tool-calls must be >= 0, got {args.max_tool_calls}")


def check_model_dir(path: str) -> Path:
    """`path` as a Path if it holds a Hugging Face model (config.json and weights), else DemoError."""
    model_dir = Path(path).expanduser()
    if not model_dir.exists():
        raise DemoError(f"--model-path {path}: no such directory")
    if not model_dir.is_dir():
        raise DemoError(f"--model-path {path}: not a directory (expected a Hugging Face model directory)")
    if any(any(model_dir.glob(pattern)) for pattern in PIPELINE_FILES):
        raise DemoError(f"--model-path {path} is a pipeline checkpoint; export it first: python convert_model.py "
                        f"pp_to_hg --input-path {path} --save-path HF_DIR")
    if not (model_dir / "config.json").is_file():
        raise DemoError(f"--model-path {path}: not a Hugging Face model directory (no config.json)")
    if not any(any(model_dir.glob(pattern)) for pattern in WEIGHT_FILES):
        raise DemoError(f"--model-path {path}: no weights (*.safetensors or pytorch_model*.bin)")
    return model_dir


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def check_adapter_dir(path: str) -> Path:
    """`path` as a Path if it holds a PEFT adapter (adapter_config.json and adapter_model.safetensors)."""
    adapter_dir = Path(path).expanduser()
    if not adapter_dir.is_dir():
        raise DemoError(f"--adapter {path}: no such directory")
    if any(any(adapter_dir.glob(pattern)) for pattern in PIPELINE_FILES):
        raise DemoError(f"--adapter {path} is a training checkpoint; export its adapter first: python "
                        f"convert_model.py pp_to_hg --input-path {path} --save-path ADAPTER_DIR --adapter-only")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise DemoError(f"--adapter {path}: not a PEFT adapter directory (no {name})")
    return adapter_dir


def read_text_file(path: str, flag: str) -> str:
    """The text of a --reference/--tools file without trailing newlines; DemoError when unusable."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DemoError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise DemoError(f"{flag} {path}: is a directory, expected a text file") from None
    except UnicodeDecodeError as exc:
        raise DemoError(f"{flag} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DemoError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None
    text = text.rstrip("\n")
    if not text.strip():
        raise DemoError(f"{flag} {path}: file is empty")
    return text


# ---------------------------------------------------------------------------------------------------------
# Prompts: the training templates, tokenized the way data.render tokenizes training samples


@dataclass
class Prompt:
    """A rendered prompt: its exact text (eos written as the tokenizer's eos text) and its token ids."""

    text: str
    ids: list[int]


def encode_segments(tokenizer, segments: list[Segment]) -> list[int]:
    """Token ids of template segments, exactly as `data.render.render_validated` builds training ids."""
    eos_id = eos_id_of(tokenizer)
    ids: list[int] = []
    for segment in segments:
        ids += _segment_ids(tokenizer, segment, eos_id, at_start=not ids)
    return ids


def _checked_prompt(text: str, segments: list[Segment], tokenizer) -> Prompt:
    rendered = "".join(segment.text(tokenizer.eos_token) for segment in segments)
    if rendered != text:  # the string helpers and the segments come from the same table; guard the pairing
        raise RuntimeError("prompt segments disagree with data.templates prompt text")
    return Prompt(text, encode_segments(tokenizer, segments))


def build_instruct_prompt(tokenizer, instruct: str, input: str | None = None, template: str = "builtin") -> Prompt:
    """`data.templates.instruct_prompt` and its ids: the instruct sample up to `### Response:\\n`."""
    sample = {"type": "instruct", "instruct": instruct, "input": input, "output": ""}
    if template == "chat":
        return build_chat_prompt(tokenizer, sample)
    segments = segments_of(sample)[:-1]  # everything but the (trained) answer segment
    return _checked_prompt(instruct_prompt(instruct, input), segments, tokenizer)


def build_chat_prompt(tokenizer, sample: dict) -> Prompt:
    """`--template chat`: `sample` (an instruct sample without its answer, or a dialogue whose rounds end
    before the next answer) mapped onto messages exactly as training maps it (`data.chat.sample_to_messages`)
    and rendered by the tokenizer's chat template with the generation prompt; ids as training tokenizes."""
    messages, tools = sample_to_messages(sample)
    if sample["type"] == "instruct":
        messages = messages[:-1]  # the empty answer
    try:
        text = chat_prompt(messages, tokenizer, tools)
    except DataError as exc:
        raise DemoError(str(exc)) from None
    return Prompt(text, [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]])


def chat_stop_ids(tokenizer) -> frozenset[int]:
    """The tokens training taught to end an assistant turn (`data.chat.chat_stop_ids`: the template's
    end-of-turn tokens, and eos where the template ends a conversation's last turn with nothing); nothing
    when the template shows none."""
    try:
        return _chat_stop_ids(tokenizer)
    except DataError:
        return frozenset()


def build_dialogue_prompt(tokenizer, kind: str, rounds: list, reference: str | None = None,
                          api_desc: str | None = None, template: str = "builtin") -> Prompt:
    """`data.templates.conversation_prompt` and its ids: header, rounds, then the next answer's tag."""
    if template == "chat":
        return build_chat_prompt(tokenizer, {"type": kind, "rounds": [list(r) for r in rounds],
                                             "reference": reference, "api_desc": api_desc})
    text = conversation_prompt(rounds, kind, reference=reference, api_desc=api_desc,
                               eos_token=tokenizer.eos_token)
    sample = {"type": kind, "rounds": rounds, "reference": reference, "api_desc": api_desc}
    segments = segments_of(sample) + [fill(kind, NEXT_ANSWER_TAG[kind])]
    return _checked_prompt(text, segments, tokenizer)


# ---------------------------------------------------------------------------------------------------------
# Tool calls: the `action_call` template read backwards


@dataclass(frozen=True)
class ApiCall:
    """An api call block the model emitted: `{inner_thought}\\n#### api call\\n```python\\n{call}\\n```  <eos>`."""

    inner_thought: str
    call: str
    api_name: str
    api_param: dict

    def action(self, api_res: Any) -> dict:
        """This call as an action of an `ans-api` round, with the tool's output."""
        return {"inner_thought": self.inner_thought, "api_name": self.api_name, "api_param": self.api_param,
                "api_res": api_res}


def _template_regex(template: str) -> re.Pattern:
    """A regex for text rendered from `template` (up to its `<eos>`), one named group per field.

    Trailing whitespace of the template is matched loosely, as models and decoders vary there.
    """
    literal_then_fields = string.Formatter().parse(template.split(EOS)[0].rstrip())
    pattern = "".join(re.escape(literal) + (f"(?P<{name}>.*?)" if name else "")
                      for literal, name, _, _ in literal_then_fields)
    return re.compile(r"\A" + pattern + r"\s*\Z", re.DOTALL)


API_CALL_BLOCK = _template_regex(TEMPLATES["conver_has_api"]["action_call"])


def parse_call_expression(call: str) -> tuple[str, dict] | None:
    """`search(query='x', n=3)` -> ("search", {"query": "x", "n": 3}); None unless name(key=literal, ...)."""
    try:
        node = ast.parse(call.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    params = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return None
        try:
            params[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError):
            return None
    return node.func.id, params


def find_api_call(text: str) -> ApiCall | None:
    """The api call in a model answer (the text before its eos), or None when it is a plain answer."""
    match = API_CALL_BLOCK.match(text)
    if match is None:
        return None
    parsed = parse_call_expression(match["call"])
    if parsed is None:
        return None
    return ApiCall(match["inner_thought"].strip(), match["call"].strip(), *parsed)


# ---------------------------------------------------------------------------------------------------------
# Devices, ranks and terminal I/O


@dataclass
class Runtime:
    """Where the model runs: one process, or `world_size` tensor-parallel ranks started by `deepspeed`."""

    device: Any  # torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, value: int) -> int:
        """Rank 0's `value` on every rank (each rank must feed the same next token)."""
        if self.world_size == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def share(self, obj: Any) -> Any:
        """Rank 0's Python object (a stdin line) on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the environment the deepspeed/torchrun launcher sets."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def setup_runtime(device_flag: str) -> Runtime:
    """One device for a plain `python demo.py`; under `deepspeed --num_gpus N`, one accelerator per rank."""
    import torch

    rank, local_rank, world_size = launched_ranks()
    if world_size == 1:
        if device_flag == "cuda" and not torch.cuda.is_available():
            raise DemoError("--device cuda: no CUDA device is available")
        use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
        return Runtime(torch.device("cuda" if use_cuda else "cpu"))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if accelerator.device_name() == "cpu" else None)
    return Runtime(torch.device(accelerator.device_name(local_rank)), rank, world_size)


@dataclass
class Console:
    """Output on rank 0 only; answers on stdout, interactive hints on stderr (only when stdin is a tty)."""

    runtime: Runtime
    stdin: Any = None
    stdout: Any = None
    stderr: Any = None

    def __post_init__(self):
        self.stdin = self.stdin or sys.stdin
        self.stdout = self.stdout or sys.stdout
        self.stderr = self.stderr or sys.stderr
        self.interactive = self.runtime.is_main and self.stdin.isatty()

    def write(self, text: str) -> None:
        if text and self.runtime.is_main:
            self.stdout.write(text)
            self.stdout.flush()

    def note(self, text: str) -> None:
        if self.runtime.is_main:
            print(text, file=self.stderr, flush=True)

    def read_line(self, hint: str) -> str | None:
        """One line from stdin (rank 0 reads, every rank gets it); None at end of input."""
        line = None
        if self.runtime.is_main:
            if self.interactive:
                print(hint, end="", file=self.stderr, flush=True)
            raw = self.stdin.readline()
            line = raw.rstrip("\r\n") if raw else None
        return self.runtime.share(line)


# ---------------------------------------------------------------------------------------------------------
# Model loading


def resolve_dtype(name: str | None, device) -> Any:
    import torch

    if name is None:
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(model_dir: Path, dtype, trust_remote_code: bool):
    """`AutoModelForCausalLM` on the CPU in `dtype`, eval mode; load failures become DemoError."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for unusable dirs
        hint = " (pass --trust-remote-code if you trust the code in that directory)" \
            if "trust_remote_code" in str(exc) and not trust_remote_code else ""
        raise DemoError(f"--model-path {model_dir}: cannot load model: {_first_line(exc)}{hint}") from None
    return model.eval()


def check_adapter_base(model, adapter_dir: Path, any_base: bool) -> None:
    """DemoError when the adapter records its base weights (adapter_base.json, written by pp_to_hg --adapter-only)
    and --model-path's differ (another model of the same shapes would take the adapter without complaint);
    a warning instead with --any-base. Adapters without the file are not checked."""
    import json

    from utils.lora_ckpt import ADAPTER_BASE, sampled_fingerprint

    try:
        recorded = json.loads((adapter_dir / ADAPTER_BASE).read_text())
        expected, modules = recorded["base_weights"], list(recorded["modules"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DemoError(f"--adapter {adapter_dir}: unreadable {ADAPTER_BASE} ({_first_line(exc)})") from None
    if not expected:
        return
    try:
        actual = sampled_fingerprint({m: model.get_submodule(m).weight for m in modules})
    except AttributeError:
        actual = None
    if actual == expected:
        return
    base = recorded.get("base_model_name_or_path") or "the base it was exported from"
    message = (f"--adapter {adapter_dir} was trained on other base weights ({base}) than --model-path's"
               + ("" if actual else f" (it has no module {next(iter(modules), '?')} of the adapter)"))
    if not any_base:
        raise DemoError(f"{message}; give its base as --model-path, or --any-base to apply it anyway")
    print(f"warning: {message}; applying it anyway (--any-base)", file=sys.stderr)


def apply_adapter(model, adapter_dir: Path):
    """The model with the PEFT LoRA adapter of `adapter_dir` merged into its weights: through peft when it is
    installed (`PeftModel.from_pretrained(...).merge_and_unload()`), else `merge_lora_adapter`."""
    try:
        from peft import PeftModel
    except ImportError:
        merge_lora_adapter(model, adapter_dir)
        return model
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
    except Exception as exc:  # peft raises ValueError, KeyError, RuntimeError, ... for an adapter of another base
        raise DemoError(f"--adapter {adapter_dir}: cannot apply it to --model-path with peft: {_first_line(exc)}") \
            from None


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a plain LoRA adapter (what `merge_lora_adapter` computes), else DemoError."""
    import json

    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DemoError(f"--adapter {adapter_dir}: unreadable {ADAPTER_CONFIG} ({_first_line(exc)})") from None
    unsupported = [key for key in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "rank_pattern",
                                   "alpha_pattern", "target_parameters") if cfg.get(key)]
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or unsupported or rank < 1:
        what = ", ".join(unsupported) or f"peft_type {cfg.get('peft_type')!r}, bias {cfg.get('bias')!r}"
        raise DemoError(f"--adapter {adapter_dir}: this adapter ({what}) needs peft: pip install peft")
    return {"scaling": alpha / rank}


def merge_lora_adapter(model, adapter_dir: Path) -> None:
    """In place, PEFT's LoRA math without peft: W += (lora_alpha / r) · B · A (in fp32) for every
    `base_model.model.{module}.lora_A/B.weight` pair, and every other tensor (modules_to_save) copied over the
    model's tensor of that name (a tied head follows its embedding)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    scaling = read_adapter_config(adapter_dir)["scaling"]
    try:
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise DemoError(f"--adapter {adapter_dir}: cannot read {ADAPTER_WEIGHTS} ({_first_line(exc)})") from None
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in sorted(tensors.items()):
            name = key.removeprefix(PEFT_PREFIX)
            if name.endswith(".lora_B.weight"):
                if key.replace(".lora_B.weight", ".lora_A.weight") not in tensors:
                    raise DemoError(f"--adapter {adapter_dir}: '{key}' has no lora_A")
                continue
            if name.endswith(".lora_A.weight"):
                module = modules.get(name.removesuffix(".lora_A.weight"))
                b = tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
                if not isinstance(module, torch.nn.Linear) or b is None or \
                        tuple(module.weight.shape) != (b.shape[0], value.shape[1]):
                    raise DemoError(f"--adapter {adapter_dir}: '{key}' does not fit a linear layer of --model-path "
                                    f"(an adapter of another base model?)")
                delta = (b.float() @ value.float()) * scaling
                module.weight.copy_((module.weight.float() + delta.to(module.weight.device)).to(module.weight.dtype))
                continue
            target = state.get(name)
            if target is None or tuple(target.shape) != tuple(value.shape):
                raise DemoError(f"--adapter {adapter_dir}: '{key}' does not fit --model-path (an adapter of another "
                                "base model?)")
            target.copy_(value.to(target.dtype))


def shard_tensor_parallel(model, runtime: Runtime, dtype):
    """DeepSpeed AutoTP over all ranks; returns the inference engine (callable like the model)."""
    import deepspeed

    from models import REGISTRY

    model_type = getattr(model.config, "model_type", None)
    tested = model_type in REGISTRY and REGISTRY[model_type].autotp_tested
    if not tested and runtime.is_main:
        print(f"warning: DeepSpeed AutoTP has not been tried with model_type {model_type!r} here; "
              f"trying tp_size={runtime.world_size}", file=sys.stderr, flush=True)
    try:
        return deepspeed.init_inference(model, tensor_parallel={"tp_size": runtime.world_size}, dtype=dtype,
                                        replace_with_kernel_inject=False)
    except Exception as exc:  # DeepSpeed raises many types for an unsupported layout; report, do not guess
        raise DemoError(f"tensor-parallel inference failed (deepspeed.init_inference, tp_size="
                        f"{runtime.world_size}, model_type {model_type!r}): {_first_line(exc)}; run it on one "
                        f"device instead: python demo.py ...", code=1) from None


def place_model(model, runtime: Runtime, dtype):
    """The callable that runs the model: itself on one device, a DeepSpeed engine across ranks."""
    if runtime.world_size > 1:
        return shard_tensor_parallel(model, runtime, dtype)
    return model.to(runtime.device)


def stop_ids_of(tokenizer, model_config, generation_config) -> frozenset[int]:
    """The tokenizer's eos id plus any eos ids the model's generation config lists."""
    ids = {eos_id_of(tokenizer)}
    for source in (generation_config, model_config):
        extra = getattr(source, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return frozenset(int(i) for i in ids)


# ---------------------------------------------------------------------------------------------------------
# Generation: a KV-cached token loop that streams


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    generator: Any  # torch.Generator on the CPU


def make_sampling(args: argparse.Namespace) -> Sampling:
    import torch

    generator = torch.Generator()
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
        torch.manual_seed(args.seed)
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, generator)


def pick_token(logits, sampling: Sampling) -> int:
    """Greedy at temperature 0, else temperature + top-p (nucleus) sampling."""
    import torch

    logits = logits.float().cpu()
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=0) - sorted_probs < sampling.top_p  # always keeps the top token
    choice = torch.multinomial(sorted_probs * keep, 1, generator=sampling.generator)
    return int(order[choice])


def cache_argument(model) -> str:
    """The KV cache's argument (and output field) name: transformers 5.x renamed `past_key_values` to `cache`
    (the old name warns and goes in 5.40); older 5.x releases and remote-code models take `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate_ids(model, prompt_ids: list[int], stop_ids: frozenset[int], sampling: Sampling,
                 runtime: Runtime) -> Iterator[int]:
    """Yield new token ids one by one; the last one is a stop id unless `max_new_tokens` ran out."""
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=runtime.device)
    key = cache_argument(model)
    past = None
    for _ in range(sampling.max_new_tokens):
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=True, **{key: past})
        past = getattr(out, key)
        token = runtime.agree(pick_token(out.logits[0, -1], sampling))
        yield token
        if token in stop_ids:
            return
        input_ids = torch.tensor([[token]], dtype=torch.long, device=runtime.device)


class TextStream:
    """Decoded text of a growing id list, handed out in increments (holding back half a UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new

    def finish(self) -> str:
        """The rest of the text, plus a newline when the answer does not end with one."""
        text = self.text
        rest = text[self.shown:]
        self.shown = len(text)
        return rest + ("" if text.endswith("\n") else "\n")


@dataclass
class Reply:
    text: str  # the decoded answer, without the stop token
    at_eos: bool  # ended with a stop token (False: cut by --max-new-tokens)


@dataclass
class Demo:
    """Everything a turn needs: model, tokenizer, sampling, devices, console and the options."""

    model: Any
    tokenizer: Any
    sampling: Sampling
    stop_ids: frozenset[int]
    context_len: int | None
    runtime: Runtime
    console: Console
    show_prompt: bool = False
    max_tool_calls: int = 5
    template: str = "builtin"

    def room_for(self, prompt: Prompt) -> int:
        """New tokens that fit after `prompt` (0: the prompt alone fills the context)."""
        if self.context_len is None:
            return self.sampling.max_new_tokens
        return max(0, min(self.sampling.max_new_tokens, self.context_len - len(prompt.ids)))

    def respond(self, prompt: Prompt) -> Reply:
        """Generate an answer to `prompt`, streaming it to stdout."""
        if self.show_prompt:
            self.console.write(prompt.text)
        limit = self.room_for(prompt)
        sampling = Sampling(limit, self.sampling.temperature, self.sampling.top_p, self.sampling.generator)
        stream = TextStream(self.tokenizer)
        at_eos = False
        for token in generate_ids(self.model, prompt.ids, self.stop_ids, sampling, self.runtime):
            if token in self.stop_ids:
                at_eos = True
                break
            self.console.write(stream.push(token))
        self.console.write(stream.finish())
        return Reply(stream.text, at_eos)


# ---------------------------------------------------------------------------------------------------------
# Modes


def run_instruct(demo: Demo, instruct: str, input: str | None) -> int:
    prompt = build_instruct_prompt(demo.tokenizer, instruct, input, demo.template)
    if demo.room_for(prompt) == 0:
        raise DemoError(f"the prompt is {len(prompt.ids)} tokens; the model's context is {demo.context_len}")
    demo.respond(prompt)
    return 0


@dataclass
class Dialogue:
    """A conversation's template kind, header fields and the rounds so far (training-data shape)."""

    kind: str
    reference: str | None = None
    api_desc: str | None = None
    rounds: list = field(default_factory=list)
    template: str = "builtin"

    def prompt(self, tokenizer, pending: list) -> Prompt:
        return build_dialogue_prompt(tokenizer, self.kind, self.rounds + pending, self.reference, self.api_desc,
                                     self.template)

    def drop_oldest_exchange(self) -> None:
        """Forget the oldest question and everything up to the next question."""
        del self.rounds[0]
        while self.rounds and self.rounds[0][0] != "ask":
            del self.rounds[0]


def dialogue_kind(args: argparse.Namespace) -> Dialogue:
    template = getattr(args, "template", "builtin")
    if args.tools:
        return Dialogue("conver_has_api", api_desc=read_text_file(args.tools, "--tools"), template=template)
    if args.reference:
        return Dialogue("ref_qa", reference=read_text_file(args.reference, "--reference"), template=template)
    return Dialogue("conversation", template=template)


def fitting_prompt(demo: Demo, dialogue: Dialogue, pending: list) -> Prompt | None:
    """The prompt for `pending`, dropping the oldest exchanges while it leaves no room for an answer."""
    prompt = dialogue.prompt(demo.tokenizer, pending)
    while demo.context_len is not None and dialogue.rounds and \
            len(prompt.ids) + demo.sampling.max_new_tokens > demo.context_len:
        dialogue.drop_oldest_exchange()
        demo.console.note("note: the conversation is longer than the model's context; dropped the oldest exchange")
        prompt = dialogue.prompt(demo.tokenizer, pending)
    if demo.room_for(prompt) == 0:
        demo.console.note(f"error: this turn is {len(prompt.ids)} tokens; the model's context is "
                          f"{demo.context_len}; it was skipped")
        return None
    return prompt


def final_round(actions: list[dict], answer: str) -> tuple:
    """The answer as a round of the history: `ans`, or `ans-api` with the tool calls it made."""
    if actions:
        return ("ans-api", {"actions": actions, "ans": answer.strip()})
    return ("ans", answer.strip())


def chat_turn(demo: Demo, dialogue: Dialogue, question: str) -> bool:
    """Answer one user line (with tool calls in between for conver_has_api); False at end of input."""
    turn = [("ask", question)]
    actions: list[dict] = []
    while True:
        pending = turn + ([("ans-api", {"actions": actions})] if actions else [])
        prompt = fitting_prompt(demo, dialogue, pending)
        if prompt is None:
            return True
        reply = demo.respond(prompt)
        call = find_api_call(reply.text) if dialogue.kind == "conver_has_api" and reply.at_eos and \
            dialogue.template == "builtin" else None
        if call is None:
            dialogue.rounds += turn + [final_round(actions, reply.text)]
            return True
        if len(actions) == demo.max_tool_calls:
            demo.console.note(f"note: more than {demo.max_tool_calls} api calls in one answer (--max-tool-calls); "
                              "this turn is left out of the history")
            return True
        demo.console.note(f"[api call] {call_expression(call.api_name, call.api_param)}")
        api_res = demo.console.read_line("api output> ")
        if api_res is None:
            return False
        actions.append(call.action(api_res))


def run_chat(demo: Demo, dialogue: Dialogue) -> int:
    while True:
        question = demo.console.read_line("you> ")
        if question is None:
            return 0
        if question.strip() and not chat_turn(demo, dialogue, question):
            return 0


# ---------------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> tuple[Path, Dialogue | None]:
    """Every check that needs no model: arguments, model directory, --reference/--tools files."""
    check_args(args)
    model_dir = check_model_dir(args.model_path)
    if args.adapter is not None:
        check_adapter_dir(args.adapter)
    return model_dir, (dialogue_kind(args) if args.chat else None)


def start(args: argparse.Namespace, model_dir: Path) -> Demo:
    """Load tokenizer and model onto the device(s)."""
    try:
        tokenizer = load_tokenizer(model_dir, trust_remote_code=args.trust_remote_code)
        if args.template == "chat":
            chat_template_of(tokenizer)
    except DataError as exc:
        raise DemoError(str(exc)) from None
    runtime = setup_runtime(args.device)
    dtype = resolve_dtype(args.dtype, runtime.device)
    model = load_model(model_dir, dtype, args.trust_remote_code)
    if args.adapter is not None:
        check_adapter_base(model, check_adapter_dir(args.adapter), args.any_base)
        model = apply_adapter(model, check_adapter_dir(args.adapter))
    config, generation_config = model.config, getattr(model, "generation_config", None)
    runner = place_model(model, runtime, dtype)
    return Demo(model=runner, tokenizer=tokenizer, sampling=make_sampling(args),
                stop_ids=stop_ids_of(tokenizer, config, generation_config) |
                (chat_stop_ids(tokenizer) if args.template == "chat" else frozenset()),
                context_len=getattr(config, "max_position_embeddings", None), runtime=runtime,
                console=Console(runtime), show_prompt=args.show_prompt, max_tool_calls=args.max_tool_calls,
                template=args.template)


def report(err: DemoError) -> None:
    """The `error:` line. Under `deepspeed` every rank prints it: the launcher kills the other ranks as soon
    as one exits, so a message left to rank 0 alone could be lost."""
    print(f"error: {err}", file=sys.stderr, flush=True)


def finish(runtime: Runtime | None) -> None:
    """Leave the process group cleanly (NCCL warns about leaked resources otherwise)."""
    if runtime is not None and runtime.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        model_dir, dialogue = prepare(args)
        demo = start(args, model_dir)
        code = run_instruct(demo, args.instruct, args.input) if dialogue is None else run_chat(demo, dialogue)
        finish(demo.runtime)
        return code
    except DemoError as err:
        report(err)
        return err.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)


if __name__ == "__main__":
    sys.exit(main())
