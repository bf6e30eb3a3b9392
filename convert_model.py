"""Convert between Hugging Face checkpoints and DeepSpeed pipeline layer files.

    python convert_model.py hg_to_pp --input-path HF_DIR_OR_HUB_ID --save-path PP_DIR [--overwrite]
    python convert_model.py pp_to_hg --input-path PP_OR_CHECKPOINT_DIR --save-path HF_DIR [--overwrite]
                                     [--max-shard-size 5GB] [--format NAME] [--adapter-only [--base-name HF_BASE]]
                                     [--base-path PP_DIR]
    python convert_model.py verify --hf-path HF_DIR --pp-path PP_DIR

A LoRA training checkpoint (LORA.json in its tag dir) is merged into the base model it was trained on (the
pipeline dir LORA.json records, checked by fingerprint; `--base-path` names it if it moved); `--adapter-only`
writes a PEFT adapter directory instead (adapter_config.json + adapter_model.safetensors), loadable with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF_DIR), ADAPTER_DIR)`.

The logic lives in `models/convert.py` (LoRA: `models/lora_export.py`) and is driven by each family's weight map.
User errors (bad or unreadable inputs, a full disk) print one line `error: ...` naming the file and exit 2;
an existing output is only replaced once the new one is complete. `verify` exits 1 when the logits differ.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

VERIFY_TOLERANCE = 1e-5


def formats_help() -> str:
    """`--format` choices per family, from the registry (e.g. transformers' native class of a remote-code one)."""
    from models import REGISTRY

    pairs = [f"{t}: {', '.join(sorted(f.hf_formats))}" for t, f in sorted(REGISTRY.items()) if f.hf_formats]
    return "; ".join(pairs) or "none"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    to_pp = sub.add_parser("hg_to_pp", help="HF checkpoint -> pipeline layer files")
    to_pp.add_argument("--input-path", required=True, help="local HF model directory or hub id")
    to_pp.add_argument("--save-path", required=True, help="output directory for layer_XX-model_states.pt")
    to_pp.add_argument("--overwrite", action="store_true", help="replace a non-empty save path")

    to_hf = sub.add_parser("pp_to_hg", help="pipeline layer files -> HF safetensors checkpoint")
    to_hf.add_argument("--input-path", required=True, help="converted directory or training checkpoint")
    to_hf.add_argument("--save-path", required=True, help="output HF model directory")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty save path")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    to_hf.add_argument("--format", default=None, dest="hf_format",
                       help="write another model_type's layout instead: " + formats_help())
    to_hf.add_argument("--adapter-only", action="store_true",
                       help="LoRA checkpoint: write a PEFT adapter (adapter_config.json, adapter_model.safetensors) "
                            "instead of the merged model")
    to_hf.add_argument("--base-name", default=None,
                       help="with --adapter-only: base_model_name_or_path of adapter_config.json, the HF base (hub id "
                            "or directory) the adapter goes with (default: the source hg_to_pp converted the base from)")
    to_hf.add_argument("--base-path", default=None,
                       help="LoRA checkpoint: the pipeline base model it was trained on, if not where LORA.json "
                            "says (its fingerprint must match)")

    check = sub.add_parser("verify", help="compare HF and pipeline logits on random tokens (CPU fp32)")
    check.add_argument("--hf-path", required=True, help="HF model directory")
    check.add_argument("--pp-path", required=True, help="pipeline layer directory")
    return parser


def run(args: argparse.Namespace) -> int:
    from models import convert

    if args.command == "hg_to_pp":
        convert.hg_to_pp(args.input_path, args.save_path, overwrite=args.overwrite)
        record_source(args.input_path, args.save_path)
        return 0
    if args.command == "pp_to_hg":
        if args.base_name is not None and not args.adapter_only:
            raise ValueError("--base-name goes with --adapter-only (it names the base in adapter_config.json)")
        convert.pp_to_hg(args.input_path, args.save_path, overwrite=args.overwrite,
                         max_shard_size=args.max_shard_size, hf_format=args.hf_format,
                         adapter_only=args.adapter_only, base_path=args.base_path)
        if args.adapter_only:
            name_base(args.save_path, args.base_name)
        return 0
    diff = convert.verify(args.hf_path, args.pp_path)
    ok = diff <= VERIFY_TOLERANCE
    print(f"max relative logit diff: {diff:.3e} ({'OK' if ok else 'FAIL'}, tolerance {VERIFY_TOLERANCE:g})")
    return 0 if ok else 1


def record_source(input_path: str, save_path: str) -> None:
    """`save_path/source.json`: the HF model a converted dir came from (a hub id as given, a directory absolute),
    which a PEFT adapter trained on it names as its base_model_name_or_path."""
    from utils.checkpoint import atomic_write_text
    from utils.lora_ckpt import SOURCE

    source = os.path.abspath(input_path) if os.path.isdir(input_path) else input_path
    atomic_write_text(os.path.join(save_path, SOURCE), json.dumps({"source": source}) + "\n")


def name_base(adapter_dir: str, base_name: str | None) -> None:
    """--base-name into adapter_config.json and adapter_base.json (each replaced atomically); a note when the
    adapter's base stays unnamed."""
    from utils.checkpoint import atomic_write_text
    from utils.lora_ckpt import ADAPTER_BASE

    for name in ("adapter_config.json", ADAPTER_BASE):
        path = os.path.join(adapter_dir, name)
        with open(path) as f:
            data = json.load(f)
        if base_name is None:
            if name == "adapter_config.json" and not data.get("base_model_name_or_path"):
                print("note: base_model_name_or_path is unknown (the base dir records no source); pass --base-name "
                      "HUB_ID_OR_HF_DIR to name it")
            continue
        data["base_model_name_or_path"] = base_name
        atomic_write_text(path, json.dumps(data, indent=2 if name == "adapter_config.json" else 1,
                                           sort_keys=name == "adapter_config.json") + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:  # ModelError is a ValueError; FileNotFoundError an OSError
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"error: {'; '.join(lines) or type(err).__name__}", file=sys.stderr)  # one line, never a traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
