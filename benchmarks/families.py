"""Every model family at its released width and reduced depth, through both trainers, with A/B runs of
every speed switch of the pipeline.

    python benchmarks/families.py                                   # all visible GPUs, every family, every run
    python benchmarks/families.py --gpus 1 --families llama3 mixtral --variants default hf
    python benchmarks/families.py --budget 500 --skip-done          # one time-limited call of a split benchmark
    python benchmarks/families.py --cpu-smoke                       # the whole orchestration on CPU
    python benchmarks/families.py --report-only benchmarks/results/families-HOST-DATE.json

Workload: each family at its released width (llama-2-7b, llama-3-8b, bloom-7b1, baichuan2-7b, chatglm3-6b,
mixtral-8x7b; the families the registry describes, qwen2, qwen3, mistral, gemma2, gemma3, phi3, ..., from the real
config.json of their first `released_configs` entry, `models/released/`) with 8 blocks (mixtral 2), random init from a config.json written here (`from_scratch`,
`synthetic_data`: no weights, no tokenizer), bf16, seq 2048, micro-batch 2, global batch 16 per GPU, torch
AdamW, gradient clipping 1.0, `max_steps` = warm-up + measured steps. Runs, most important first:
the pipeline with the shipped defaults (`train_ds.py`, dims [N, 1]), transformers' own model under ZeRO-1
(`train_ds_zero.py`; families transformers has natively, chatglm as transformers' `glm`), then the A/B
variants of the pipeline (`fused_head_loss=false`, `compile_blocks=false`, mixtral `moe_grouped_gemm=false`, and
FP8 per recipe `fp8.recipe=tensorwise|rowwise|rowwise_with_gw_hp`: torchao Float8, emulated in --cpu-smoke;
`--plan fp8` runs them against the bf16 default for llama3, qwen3 and mistral at seq 2048 and 8192).
Each run is one `deepspeed` command with its own time limit; tokens/s and TFLOP/s per GPU are what the
trainer wrote to metrics.jsonl, over the steps after the warm-up. The JSON (+ .md table, + .png chart) is
rewritten after every run and merged with an existing file of the same name, so a benchmark split over
several time-limited calls ends in one JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import launch, report, workload  # noqa: E402
from utils.plot import read_metrics  # noqa: E402
from benchmarks import run as pairs  # noqa: E402  (host_and_date, versions, measure_device, tidy_run_dir)

SEED_FAMILIES = ("llama2", "llama3", "bloom", "baichuan", "chatglm", "mixtral")
RELEASED_NAME = {"llama2": "llama-2-7b", "llama3": "llama-3-8b", "bloom": "bloom-7b1", "baichuan": "baichuan2-7b",
                 "chatglm": "chatglm3-6b", "mixtral": "mixtral-8x7b"}
BLOCKS = {"llama2": 8, "llama3": 8, "bloom": 8, "baichuan": 8, "chatglm": 8, "mixtral": 2}
SMOKE_BLOCKS = 2
MODULE = {"llama2": "llama", "llama3": "llama", "bloom": "bloom", "baichuan": "baichuan", "chatglm": "chatglm",
          "mixtral": "mixtral"}
# transformers' native model_type for the hf run; baichuan has none (remote code on the hub)
HF_MODEL_TYPE = {"llama2": "llama", "llama3": "llama", "bloom": "bloom", "chatglm": "glm", "mixtral": "mixtral"}
FAMILY_ONLY_KEYS = {"moe_grouped_gemm": ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3")}  # some families only
VARIANTS = ("default", "hf", "fused_head_loss=false", "compile_blocks=false", "moe_grouped_gemm=false")
# FP8 A/B (issue 27): torchao Float8 on the blocks' linears, one variant per recipe (`--variants` or `--plan fp8`; not
# in the default list); CPU smoke adds fp8.emulate=true
FP8_VARIANTS = ("fp8.recipe=tensorwise", "fp8.recipe=rowwise", "fp8.recipe=rowwise_with_gw_hp")
TRAINER_SCRIPT = {"pipeline": "train_ds.py", "hf": "train_ds_zero.py"}
HF_ZERO_STAGE = 1
PER_GPU_BATCH = 16
TARGET_MFU = 0.60  # the chart's horizontal line

# Tiny configs in each family's own config.json format (the CPU smoke run; the released widths override them).
TINY = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
              "initializer_range": 0.02, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": False},
    "bloom": {"model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": 512, "hidden_size": 64,
              "n_head": 4, "n_layer": 4, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
              "apply_residual_connection_post_layernorm": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
              "pretraining_tp": 1, "slow_but_exact": False, "tie_word_embeddings": True, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 3, "use_cache": False},
    "baichuan": {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"],
                 "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                              "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
                 "tokenizer_class": "BaichuanTokenizer", "vocab_size": 512, "hidden_size": 64,
                 "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "hidden_act": "silu",
                 "initializer_range": 0.02, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                 "model_max_length": 4096, "z_loss_weight": 0, "tie_word_embeddings": False, "pad_token_id": 0,
                 "bos_token_id": 1, "eos_token_id": 2, "use_cache": False},
    "chatglm": {"model_type": "chatglm", "architectures": ["ChatGLMModel"],
                "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                             "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
                "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
                "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
                "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 96,
                "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 64, "kv_channels": 16,
                "layernorm_epsilon": 1e-5, "multi_query_attention": True, "multi_query_group_num": 2,
                "num_attention_heads": 4, "num_layers": 4, "original_rope": True, "padded_vocab_size": 512,
                "post_layer_norm": True, "rmsnorm": True, "seq_length": 512, "rope_ratio": 1.0,
                "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0, "use_cache": False},
}

# The released widths (the block count is set separately).
RELEASED = {
    "llama2": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                   vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "llama3": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                   bos_token_id=128000, eos_token_id=128001, pad_token_id=None),
    "bloom": dict(hidden_size=4096, n_head=32, vocab_size=250880, tie_word_embeddings=True),
    "baichuan": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=125696,
                     rms_norm_eps=1e-6, max_position_embeddings=4096, model_max_length=4096),
    "chatglm": dict(hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32, multi_query_attention=True,
                    multi_query_group_num=2, kv_channels=128, padded_vocab_size=65024, seq_length=8192),
    "mixtral": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
                    max_position_embeddings=32768, router_aux_loss_coef=0.02),
}




# MoE families of the registry: their blocks at the benchmark width (few: a block holds every expert), and the
# config.json of that width where it is not the family's first released one. A family whose width file is not
# committed yet still runs in --cpu-smoke (its debug config); the GPU run asks for the file (`family_config`).
MOE_BLOCKS = {"qwen3_moe": 4, "qwen2_moe": 4, "deepseek_v3": 4}
MOE_WIDTH = {"qwen3_moe": "qwen3-30b-a3b.json", "qwen2_moe": "qwen1.5-moe-a2.7b.json",
             "deepseek_v3": "moonlight-16b-a3b.json"}


def registry_families() -> dict[str, str]:
    """Families the registry describes itself (its `debug_config` and real `released_configs`): benchmark name
    (the model_type) -> the released config.json file of the benchmark width (the first of `released_configs`;
    `MOE_WIDTH` for the MoE families, listed whether or not that file is committed yet)."""
    import models
    from models.family import RELEASED_DIR

    seed_types = {MODULE[f] for f in SEED_FAMILIES}
    found = {mt: next(iter(f.released_configs.values())) for mt, f in models.REGISTRY.items()
             if mt not in seed_types and mt not in MOE_WIDTH and f.debug_config is not None and f.released_configs
             and (RELEASED_DIR / next(iter(f.released_configs.values()))).is_file()}
    found.update({mt: MOE_WIDTH[mt] for mt, f in models.REGISTRY.items()
                  if mt in MOE_WIDTH and f.debug_config is not None})
    return found


REGISTRY_RELEASED = registry_families()
FAMILIES = SEED_FAMILIES + tuple(REGISTRY_RELEASED)
for _fam, _file in REGISTRY_RELEASED.items():
    RELEASED_NAME[_fam] = _file.removesuffix(".json")
    BLOCKS[_fam] = MOE_BLOCKS.get(_fam, 8)
    HF_MODEL_TYPE[_fam] = _fam


# ----------------------------------------------------------------------------------------------
# Model configs


def base_config(family: str, **overrides) -> dict:
    """The family's tiny config.json: its module's `debug_config(**overrides)` where it has one, else TINY."""
    import importlib

    if family in REGISTRY_RELEASED:
        import models

        return models.get_family(family).debug_config(**overrides)
    module = importlib.import_module(f"models.{MODULE[family]}")
    if hasattr(module, "debug_config"):
        return module.debug_config(**overrides)
    return {**TINY[MODULE[family]], **overrides}


def set_blocks(cfg: dict, blocks: int) -> dict:
    """The block count under the family's own key (bloom: also `num_hidden_layers`, which train_ds_zero.py's
    attention FLOP term reads; chatglm: `num_layers`)."""
    mt = cfg["model_type"]
    if isinstance(cfg.get("layer_types"), list):  # per-layer attention kinds, kept for the first `blocks`
        cfg["layer_types"] = cfg["layer_types"][:blocks]
    if mt == "chatglm":
        cfg["num_layers"] = blocks
    elif mt == "bloom":
        cfg["n_layer"] = cfg["num_hidden_layers"] = blocks
    else:
        cfg["num_hidden_layers"] = blocks
    return cfg


def fit_positions(cfg: dict, seq: int) -> dict:
    key = {"chatglm": "seq_length", "bloom": None}.get(cfg["model_type"], "max_position_embeddings")
    if key is not None:
        cfg[key] = max(int(cfg.get(key) or 0), seq)
    return cfg


def family_config(family: str, released: bool = True, blocks: int | None = None, seq: int = 2048) -> dict:
    """config.json (the family's own format) for the pipeline trainer: released width, `blocks` blocks
    (default 8, mixtral 2) when `released`, else the tiny debug width (2 blocks)."""
    if released and family in REGISTRY_RELEASED:  # the real config.json, as released
        from models.family import RELEASED_DIR, released_config

        if not (RELEASED_DIR / REGISTRY_RELEASED[family]).is_file():
            raise SystemExit(f"{family}: its benchmark width needs models/released/{REGISTRY_RELEASED[family]} (the "
                             "real config.json of that checkpoint, with its source in SOURCES.md); --cpu-smoke runs "
                             "without it")
        cfg = released_config(REGISTRY_RELEASED[family])
    else:
        cfg = base_config(family, **RELEASED[family]) if released else base_config(family)
    set_blocks(cfg, blocks if blocks is not None else (BLOCKS[family] if released else SMOKE_BLOCKS))
    return fit_positions(cfg, seq)


def hf_config(family: str, cfg: dict) -> dict | None:
    """config.json of transformers' native model for the hf run (chatglm -> `glm` via models/chatglm.py's
    HfFormat), None where transformers has no native class (baichuan)."""
    if family not in HF_MODEL_TYPE:
        return None
    if family == "chatglm":
        import models

        out = models.get_family("chatglm").hf_formats["glm"].config(cfg)
        out["use_cache"] = False
        return out
    return dict(cfg)


def pipeline_flops_per_token(cfg: dict, seq: int) -> float:
    """train_ds.py's count: 6·(active parameters without the input embedding) + 12·L·h·s."""
    import models

    return models.resolve(cfg).flops_per_token(seq)


def pipeline_dims(gpus: int, blocks: int) -> list[int]:
    """[gpus, 1] while every stage gets a layer (blocks + embedding + head); else the deepest pipeline that
    divides the GPUs, the rest data-parallel (mixtral's 4 layers on 8 GPUs: [4, 2])."""
    layers = blocks + 2
    if gpus <= layers:
        return [gpus, 1]
    stages = max(p for p in range(1, layers + 1) if gpus % p == 0)
    return [stages, gpus // stages]


# ----------------------------------------------------------------------------------------------
# Variants and the plan


@dataclass(frozen=True)
class RunSpec:
    family: str
    trainer: str  # pipeline | hf
    variant: str  # "default" or canonical "k=v,k2=v2"
    overrides: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        return self.family, self.trainer, self.variant

    @property
    def name(self) -> str:
        slug = self.variant.replace("=", "-").replace(",", "+").replace("/", "_")
        return f"{self.family}-{self.trainer}-{slug}"


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """'default' | 'hf' | 'k=v[,k2=v2...]' -> (canonical name, overrides); keys sorted, so the same switches
    always give the same name."""
    text = text.strip()
    if text in ("default", "hf"):
        return text, ()
    items = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise SystemExit(f"--variants: expected default, hf or KEY=VALUE[,KEY=VALUE...], got {text!r}")
        if key in items:
            raise SystemExit(f"--variants: {key} set twice in {text!r}")
        items[key] = value
    if not items:
        raise SystemExit(f"--variants: empty variant {text!r}")
    check_keys(items)
    pairs_ = tuple(f"{k}={items[k]}" for k in sorted(items))
    return ",".join(pairs_), pairs_


def check_keys(items: dict) -> None:
    """Refuse a key neither trainer knows before any GPU time is spent (DeepSpeed sections pass through)."""
    try:
        from utils.config import DS_KEYS, OUR_KEYS
    except ImportError:
        return
    for key in items:
        if key not in OUR_KEYS and key.split(".")[0] not in DS_KEYS:
            raise SystemExit(f"--variants: unknown trainer key {key!r}")


def applies(family: str, trainer: str, overrides: tuple[str, ...]) -> bool:
    if trainer == "hf":
        return family in HF_MODEL_TYPE
    keys = [o.split("=", 1)[0] for o in overrides]
    return all(family in FAMILY_ONLY_KEYS.get(k, (family,)) for k in keys)


def plan_runs(families: list[str], variants: list[str], order: str = "defaults-first") -> list[RunSpec]:
    """The runs, most important first: every default, every hf, then each variant (`defaults-first`), or all
    runs of one family together in that order (`family`)."""
    parsed, seen = [], set()
    for text in variants:
        name, overrides = parse_variant(text)
        if name not in seen:
            seen.add(name)
            parsed.append((name, overrides))
    rank = {"default": 0, "hf": 1}
    parsed.sort(key=lambda p: rank.get(p[0], 2))  # stable: the user's order among the A/B variants
    specs = [[RunSpec(f, "hf", "default") if name == "hf" else RunSpec(f, "pipeline", name, overrides)
              for f in families] for name, overrides in parsed]
    specs = [[s for s in group if applies(s.family, s.trainer, s.overrides)] for group in specs]
    if order == "family":
        return [s for f in families for group in specs for s in group if s.family == f]
    return [s for group in specs for s in group]


# ----------------------------------------------------------------------------------------------
# Plans: what one GPU session should measure, in order, resumable


@dataclass(frozen=True)
class PlanStep:
    """Runs of one sequence length: `families` x `variants`, into the plan's --out (plus `out_suffix`)."""
    what: str
    families: tuple[str, ...]
    variants: tuple[str, ...]
    seq: int = 2048
    out_suffix: str = ""


PLANS = {
    "new": (
        PlanStep("dense families at their released width", ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"),
                 ("default", "hf")),
        PlanStep("a windowed, soft-capped family above its window", ("gemma2",), ("default", "hf"), 8192,
                 "-seq8192"),
    ),
    # issue 27: FP8 against the bf16 default on three dense widths, at 2048 and 8192 tokens (one GPU call each)
    "fp8": (
        PlanStep("FP8 recipes against bf16, dense widths", ("llama3", "qwen3", "mistral"), ("default", *FP8_VARIANTS)),
        PlanStep("FP8 recipes against bf16 at long context", ("llama3", "qwen3", "mistral"),
                 ("default", *FP8_VARIANTS), 8192, "-seq8192"),
    ),
}
CALL_SECONDS = 540  # what one 10-minute device call leaves for runs after the start and the matmul measurement
GUESS_RUN_SECONDS = 90.0  # a run's wall time before any was measured (compile + 5 steps)


def step_out(out: str, step: PlanStep) -> str:
    return out.removesuffix(".json") + step.out_suffix + ".json"


def plan_left(name: str, out: str, mbs: int = 2) -> list[tuple[PlanStep, list[RunSpec], float]]:
    """Per step of plan `name`: the runs its --out file does not yet hold with status ok, and a guess of their
    seconds (the median wall time of the runs measured so far, else `GUESS_RUN_SECONDS`)."""
    left = []
    for step in PLANS[name]:
        families = [f for f in step.families if f in FAMILIES]
        if not families:
            continue
        path = step_out(out, step)
        runs = []
        if os.path.isfile(path):
            with open(path) as f:
                runs = json.load(f).get("runs", [])
        done = {run_key(r) for r in runs if r.get("status") == "ok" and r.get("seq") == step.seq
                and r.get("mbs") == mbs}
        times = sorted(r["elapsed_s"] for r in runs if r.get("status") == "ok" and r.get("elapsed_s"))
        per_run = times[len(times) // 2] if times else GUESS_RUN_SECONDS
        todo = [spec for spec in plan_runs(families, list(step.variants)) if spec.key not in done]
        left.append((step, todo, per_run * len(todo)))
    return left


def print_plan_left(name: str, out: str) -> int:
    """Prints what plan `name` still has to run and how many device calls that needs; returns the run count."""
    left = plan_left(name, out)
    total = sum(len(todo) for _, todo, _ in left)
    seconds = sum(t for _, _, t in left)
    for step, todo, t in left:
        if todo:
            print(f"[families] plan {name}: {step.what} (seq {step.seq}): {len(todo)} runs left, ~{t / 60:.0f} min: "
                  + ", ".join(f"{p.family} {p.trainer} {p.variant}" for p in todo), flush=True)
    calls = -(-seconds // CALL_SECONDS) if total else 0
    print(f"[families] plan {name}: {total} runs left, ~{seconds / 60:.0f} min, about {calls:.0f} more 10-minute "
          "calls" + (" (nothing left)" if not total else ""), flush=True)
    return total


def run_plan(args: argparse.Namespace, argv: list[str]) -> int:
    """`--plan NAME`: each step of the plan as its own benchmark call (`--skip-done`, the step's seq and --out),
    within one --budget; ends by printing what is left and how many calls it needs."""
    t0 = time.monotonic()
    if not args.out:
        raise SystemExit("--plan needs --out (the committed results JSON of this machine, e.g. "
                         "benchmarks/results/families-1xH100-DATE.json): the plan skips what it already holds")
    rest = strip_plan_args(argv)
    rc = 0
    for step, todo, _ in plan_left(args.plan, args.out):
        if not todo:
            continue
        budget = args.budget - (time.monotonic() - t0) if args.budget else 0
        if args.budget and budget < 60:
            rc = 3
            break
        families = list(dict.fromkeys(spec.family for spec in todo))
        print(f"[families] plan {args.plan}: {step.what} (seq {step.seq})", flush=True)
        seq = max(64, step.seq // 32) if args.cpu_smoke else step.seq  # CPU smoke: tiny rows, same shape of plan
        rc = main([*rest, "--families", *families, "--variants", *step.variants, "--seq", str(seq),
                   "--skip-done", "--out", step_out(args.out, step), *(["--budget", str(budget)] if budget else [])])
        if rc == 3:
            break
    left = print_plan_left(args.plan, args.out)
    return 3 if left else (0 if rc in (0, 3) else rc)


def strip_plan_args(argv: list[str]) -> list[str]:
    """argv without --plan/--out/--budget/--families/--variants/--seq/--skip-done (the plan sets them per step)."""
    valued = {"--plan", "--out", "--budget", "--seq"}
    multi = {"--families", "--variants"}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in valued:
            i += 1 if "=" in arg else 2
        elif name in multi:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        elif arg == "--skip-done":
            i += 1
        else:
            out.append(arg)
            i += 1
    return out


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    mode: str  # gpu | cpu-smoke
    gpus: int
    families: list[str]
    plan: list[RunSpec]
    order: str
    seq: int
    mbs: int
    global_batch: int
    warmup: int
    steps: int  # measured steps; max_steps = warmup + steps
    precision: str  # bf16 | fp32
    released: bool
    timeout_s: float
    budget_s: float
    skip_done: bool
    out: str
    work_dir: str
    matmul: dict
    env: dict = field(default_factory=dict)

    @property
    def max_steps(self) -> int:
        return self.warmup + self.steps

    def blocks(self, family: str) -> int:
        return BLOCKS[family] if self.released else SMOKE_BLOCKS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                   help="default, hf, or KEY=VALUE[,KEY=VALUE...] pipeline switches "
                        f"(default: {' '.join(VARIANTS)}); family-only keys skip other families")
    p.add_argument("--order", choices=["defaults-first", "family"], default="defaults-first",
                   help="defaults-first: every default, every hf, then the variants; family: one family at a time")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the averages")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; CPU smoke 64)")
    p.add_argument("--mbs", type=int, default=None, help="micro-batch per GPU (default 2)")
    p.add_argument("--global-batch", type=int, default=None,
                   help=f"samples per optimizer step (default {PER_GPU_BATCH} x GPUs; CPU smoke 4)")
    p.add_argument("--timeout", type=float, default=240, help="seconds per run before it is killed")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds for this whole call (0: none): no run is started that the longest run so far "
                        "says will not finish, and a run still going at the budget is stopped")
    p.add_argument("--skip-done", action="store_true",
                   help="skip runs the --out file already holds with status ok (same seq and micro-batch)")
    p.add_argument("--matmul-tflops", type=float, default=None,
                   help="dense bf16 matmul rate to use (else the --out file's, else measured)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/families-<host>-<date>.json; "
                                               "an existing file is merged into)")
    p.add_argument("--work-dir", default=None, help="configs, logs, run dirs (default benchmarks/work/families-<host>-<date>)")
    p.add_argument("--report-only", metavar="JSON", default=None, help="rewrite the .md and .png of this JSON; no runs")
    p.add_argument("--plan", choices=sorted(PLANS), default=None,
                   help="run the named plan's steps (new: the dense families added since 2026-12-02 at seq 2048, "
                        "gemma2 at 8192), each with --skip-done into --out (per-step suffix), within --budget; "
                        "prints what is left and how many 10-minute calls it needs")
    p.add_argument("--plan-left", action="store_true", help="with --plan and --out: only print what is left")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the whole orchestration on CPU: tiny configs, fp32, 2 ranks (gloo), seq 64, 1 measured step")
    return p.parse_args(argv)


def visible_gpus() -> int:
    """GPUs this process may use, without creating a CUDA context here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    return 0


def settings_from_args(args: argparse.Namespace) -> Settings:
    host, date = pairs.host_and_date()
    work_dir = args.work_dir or os.path.join(ROOT, "benchmarks", "work", f"families-{host}-{date}")
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false"}
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # compiled blocks reused by later runs (and warm later calls)
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(ROOT, "benchmarks", "work", "torchinductor-cache")
    plan = plan_runs(list(dict.fromkeys(args.families)), args.variants, args.order)
    if args.cpu_smoke:
        gpus, seq, mbs, gb = 2, args.seq or 64, args.mbs or 2, args.global_batch or 4
        mode, released, precision = "cpu-smoke", False, "fp32"
        warmup, steps, timeout = min(args.warmup, 1), min(args.steps, 1), min(args.timeout, 300)
        out = args.out or os.path.join(work_dir, "results", f"families-{host}-{date}-cpu-smoke.json")
        matmul = {"device": "cpu", "n": 256, "dtype": "fp32", "iters": 5}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    else:
        gpus = args.gpus or visible_gpus()
        if gpus < 1:
            raise SystemExit("no GPU visible: pass --gpus N on a GPU host, or --cpu-smoke")
        seq, mbs, gb = args.seq or 2048, args.mbs or 2, args.global_batch or PER_GPU_BATCH * gpus
        mode, released, precision = "gpu", True, "bf16"
        warmup, steps, timeout = args.warmup, args.steps, args.timeout
        out = args.out or os.path.join(ROOT, "benchmarks", "results", f"families-{host}-{date}.json")
        matmul = {"device": "cuda", "n": 8192, "dtype": "bf16"}
    if args.matmul_tflops:
        matmul["given_tflops"] = args.matmul_tflops
    if steps < 1 or warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    s = Settings(mode=mode, gpus=gpus, families=list(dict.fromkeys(args.families)), plan=plan, order=args.order,
                 seq=seq, mbs=mbs, global_batch=gb, warmup=warmup, steps=steps, precision=precision,
                 released=released, timeout_s=timeout, budget_s=args.budget, skip_done=args.skip_done,
                 out=os.path.abspath(out), work_dir=os.path.abspath(work_dir), matmul=matmul, env=env)
    check_batches(s)
    return s


def check_batches(s: Settings) -> None:
    for fam in s.families:
        for trainer, dims in (("pipeline", pipeline_dims(s.gpus, s.blocks(fam))), ("hf", [1, s.gpus])):
            if s.global_batch % (s.mbs * dims[1]):
                raise SystemExit(f"--global-batch {s.global_batch} is not a multiple of micro-batch {s.mbs} x "
                                 f"{dims[1]} data-parallel replicas ({fam} {trainer}, dims {dims})")


def workload_json(s: Settings) -> dict:
    return {"name": "released widths, reduced depth" if s.released else "tiny debug configs (CPU smoke)",
            "blocks": {f: s.blocks(f) for f in s.families}, "released": {f: RELEASED_NAME[f] for f in s.families},
            "seq": s.seq, "mbs": s.mbs, "global_batch": s.global_batch, "gpus": s.gpus, "precision": s.precision,
            "warmup_steps": s.warmup, "measured_steps": s.steps, "max_steps": s.max_steps,
            "optimizer": "torch AdamW (torch_adam: true)", "gradient_clipping": 1.0, "hf_zero_stage": HF_ZERO_STAGE,
            "init": "random (from_scratch: true)", "data": "synthetic_data: true (full-length samples)"}


# ----------------------------------------------------------------------------------------------
# Files of one call: model configs and base YAMLs


def write_inputs(s: Settings) -> dict:
    """Per family and trainer: config.json under work/models/, the base YAML under work/configs/.
    Returns {family: {"pipeline": {...}, "hf": {...} | None, "flops_per_token": ...}}."""
    work = workload.Workload("families", {}, s.global_batch, bf16=s.precision == "bf16", steps=s.max_steps,
                             warmup=s.warmup, lr=1e-5 if s.released else 1e-3)
    out = {}
    for fam in s.families:
        cfg = family_config(fam, released=s.released, blocks=s.blocks(fam), seq=s.seq)
        entry = {"flops_per_token": pipeline_flops_per_token(cfg, s.seq), "blocks": s.blocks(fam)}
        for trainer, model_cfg in (("pipeline", cfg), ("hf", hf_config(fam, cfg))):
            if model_cfg is None:
                entry[trainer] = None
                continue
            model_dir = os.path.join(s.work_dir, "models", f"{fam}-{trainer}")
            os.makedirs(model_dir, exist_ok=True)
            with open(os.path.join(model_dir, "config.json"), "w") as f:
                json.dump(model_cfg, f, indent=2)
            dims = pipeline_dims(s.gpus, s.blocks(fam)) if trainer == "pipeline" else [1, s.gpus]
            ycfg = workload.trainer_config("pipeline" if trainer == "pipeline" else "zero", work, model_dir, s.gpus,
                                           zero_stage=HF_ZERO_STAGE, dims=dims)
            ycfg["max_seq_len"] = s.seq
            ycfg["train_micro_batch_size_per_gpu"] = s.mbs
            yml = os.path.join(s.work_dir, "configs", f"{fam}-{trainer}.yml")
            os.makedirs(os.path.dirname(yml), exist_ok=True)
            with open(yml, "w") as f:
                yaml.safe_dump(ycfg, f, sort_keys=False)
            entry[trainer] = {"model_config": model_cfg, "yaml": ycfg, "yaml_path": yml, "dims": dims,
                              "model_type": model_cfg["model_type"]}
        out[fam] = entry
    return out


# ----------------------------------------------------------------------------------------------
# One run


def build_command(s: Settings, spec: RunSpec, yml: str, save_path: str) -> list[str]:
    return [launch.deepspeed_bin(), "--num_gpus", str(s.gpus), "--master_port", str(launch.free_port()),
            os.path.join(ROOT, TRAINER_SCRIPT[spec.trainer]), "--config", yml, f"--save_path={save_path}",
            f"--max_seq_len={s.seq}", f"--train_micro_batch_size_per_gpu={s.mbs}",
            *(f"--{o}" for o in spec.overrides), *smoke_overrides(s, spec)]


def smoke_overrides(s: Settings, spec: RunSpec) -> list[str]:
    """CPU smoke: FP8 variants run torchao's emulation (no FP8 kernels on a CPU); the variant name stays the same."""
    fp8 = any(o.startswith("fp8.") for o in spec.overrides)
    return ["--fp8.emulate=true"] if s.mode == "cpu-smoke" and fp8 and "fp8.emulate=true" not in spec.overrides else []


def shown_command(s: Settings, cmd: list[str]) -> str:
    """The command as one shell line, with the environment it adds (PYTHONPATH aside)."""
    extra = {k: v for k, v in s.env.items() if k != "PYTHONPATH"}
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()) + (" " if extra else "") + shlex.join(cmd)


def measure(save_path: str, warmup: int, global_batch: int, gpus: int, fpt: float, smi: list[float]) -> dict | None:
    """Averages over the steps after the warm-up, as the trainer reported them; None if none was logged."""
    rows = read_metrics(save_path, missing_ok=True)
    tp = report.throughput(rows, warmup, global_batch)
    if tp is None:
        return None
    measured = [r for r in rows if r["step"] > warmup]
    seconds = sum(r["step_time_s"] for r in measured)
    tflops = sum(r["tflops_per_gpu"] * r["step_time_s"] for r in measured) / seconds  # over time, like tokens/s
    peaks = report.read_rank_peaks(save_path)
    if peaks:
        peak, source = max(peaks), "rank_stats"
    elif smi:
        peak, source = max(smi), "nvidia-smi"
    else:
        peak, source = tp["reporter_peak_gib"], "metrics peak_mem_gib (reporting rank)"
    return {"tokens_per_s": tp["tokens_per_s"], "tflops_per_gpu": tflops, "peak_gib": peak,
            "peak_gib_source": source, "peak_gib_per_gpu": peaks, "samples_per_s": tp["samples_per_s"],
            "step_time_s": tp["step_time_s"], "steps_measured": tp["steps_measured"], "steps_logged": len(rows),
            "trained_tokens_per_s": tp["trained_tokens_per_s"],
            "tflops_per_gpu_pipeline_count": fpt * tp["tokens_per_s"] / gpus / 1e12}


def last_error_line(tail: str) -> str:
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error:" in ln or "out of memory" in ln.lower():
            return ln[-200:]
    return lines[-1][-200:] if lines else ""


def execute(s: Settings, spec: RunSpec, inputs: dict, timeout_s: float) -> dict:
    """Launch one run and turn its files into a record (never raises for the run's own failures)."""
    fam = inputs[spec.family]
    tr = fam[spec.trainer]
    save_path = os.path.join(s.work_dir, "runs", spec.name)
    shutil.rmtree(save_path, ignore_errors=True)
    cmd = build_command(s, spec, tr["yaml_path"], save_path)
    result = launch.run_command(cmd, {**os.environ, **s.env}, os.path.join(s.work_dir, "logs", f"{spec.name}.log"),
                                timeout_s, gpus=s.gpus if s.mode == "gpu" else 0, cwd=ROOT)
    rec = {"family": spec.family, "trainer": spec.trainer, "variant": spec.variant, "seq": s.seq, "mbs": s.mbs,
           "status": result.status, "tokens_per_s": None, "tflops_per_gpu": None, "peak_gib": None,
           "command": shown_command(s, cmd), "overrides": list(spec.overrides), "gpus": s.gpus,
           "dims": tr["dims"], "global_batch": s.global_batch, "blocks": fam["blocks"],
           "model_type": tr["model_type"], "released": RELEASED_NAME[spec.family] if s.released else "tiny",
           "returncode": result.returncode, "elapsed_s": round(result.elapsed_s, 1), "log": result.log_path,
           "smi_peak_gib": result.smi_peak_gib, "date": pairs.host_and_date()[1]}
    got = measure(save_path, s.warmup, s.global_batch, s.gpus, fam["flops_per_token"], result.smi_peak_gib)
    if got is None:
        rec["status"] = "failed" if result.status == "ok" else result.status
    else:
        rec.update(got)
    if rec["status"] != "ok":
        rec["error_tail"] = launch.read_tail(result.log_path, 3000)
        rec["error"] = last_error_line(rec["error_tail"])
    pairs.tidy_run_dir(save_path)
    return rec


# ----------------------------------------------------------------------------------------------
# Records: merge, derived ratios


def run_key(rec: dict) -> tuple[str, str, str]:
    return rec["family"], rec["trainer"], rec["variant"]


def merge_runs(old: list[dict], new: list[dict], key=run_key) -> list[dict]:
    """Old runs kept in place, a new run replacing the old one with the same `key` (family, trainer, variant)."""
    out = list(old)
    index = {key(r): i for i, r in enumerate(out)}
    for rec in new:
        if key(rec) in index:
            out[index[key(rec)]] = rec
        else:
            index[key(rec)] = len(out)
            out.append(rec)
    return out


DERIVED = ("mfu", "vs_hf_tokens", "hf_tokens_per_s", "default_speedup")


def derive(runs: list[dict], matmul_tflops: float | None) -> list[dict]:
    """mfu (TFLOP/s / matmul rate), the default run's ratio to hf tokens/s, each variant's slow-down
    (default tokens/s / variant tokens/s); recomputed from scratch so merged files stay consistent."""
    ok = {run_key(r): r for r in runs if r.get("status") == "ok" and r.get("tokens_per_s")}
    for r in runs:
        for k in DERIVED:
            r.pop(k, None)
        r["mfu"] = (r["tflops_per_gpu"] / matmul_tflops if matmul_tflops and r.get("tflops_per_gpu") is not None
                    else None)
    for r in runs:
        if r["trainer"] != "pipeline" or run_key(r) not in ok:
            continue
        if r["variant"] == "default":
            hf = ok.get((r["family"], "hf", "default"))
            if hf is not None:
                r["hf_tokens_per_s"] = hf["tokens_per_s"]
                r["vs_hf_tokens"] = r["tokens_per_s"] / hf["tokens_per_s"]
        else:
            d = ok.get((r["family"], "pipeline", "default"))
            if d is not None:
                r["default_speedup"] = d["tokens_per_s"] / r["tokens_per_s"]
    return runs


# ----------------------------------------------------------------------------------------------
# Markdown and chart


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def fmt_tflops(v) -> str:
    if v is None:
        return "—"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def fmt_tokens(v) -> str:
    if v is None:
        return "—"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def fmt_pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


def variant_columns(runs: list[dict]) -> list[str]:
    """A/B variant names in the canonical order (VARIANTS first, then others as they appear)."""
    names = [r["variant"] for r in runs if r["trainer"] == "pipeline" and r["variant"] != "default"]
    known = [v for v in VARIANTS[2:] if v in names]
    return known + [v for v in dict.fromkeys(names) if v not in known]


def families_of(result: dict) -> list[str]:
    present = {r["family"] for r in result["runs"]}
    return [f for f in FAMILIES if f in present]


def _cell(rec: dict | None, text) -> str:
    if rec is None:
        return "—"
    if rec["status"] != "ok":
        return rec["status"]
    return text(rec)


def family_table(result: dict) -> str:
    runs = result["runs"]
    by = {run_key(r): r for r in runs}
    cols = variant_columns(runs)
    head = ["family", "default TFLOP/s/GPU (% of matmul)"]
    for v in cols:
        head += [f"`{v}` TFLOP/s/GPU", "default speed-up"]
    head += ["hf tokens/s", "default / hf"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fam in families_of(result):
        d = by.get((fam, "pipeline", "default"))
        blocks = (d or next(r for r in runs if r["family"] == fam)).get("blocks")
        released = (d or next(r for r in runs if r["family"] == fam)).get("released", RELEASED_NAME[fam])
        row = [f"{fam} ({released}, {blocks} blocks)",
               _cell(d, lambda r: f"{fmt_tflops(r['tflops_per_gpu'])} ({fmt_pct(r.get('mfu'))})")]
        for v in cols:
            rec = by.get((fam, "pipeline", v))
            row.append(_cell(rec, lambda r: fmt_tflops(r["tflops_per_gpu"])))
            row.append("—" if rec is None or rec.get("default_speedup") is None else f"{rec['default_speedup']:.2f}×")
        h = by.get((fam, "hf", "default"))
        row.append(_cell(h, lambda r: fmt_tokens(r["tokens_per_s"])) if fam in HF_MODEL_TYPE else "n/a")
        row.append("—" if d is None or d.get("vs_hf_tokens") is None else f"{d['vs_hf_tokens']:.2f}×")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def runs_table(result: dict) -> str:
    lines = ["| family | trainer | variant | status | tokens/s | TFLOP/s/GPU | % of matmul | peak GiB | dims | run s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['family']} | {r['trainer']} | `{r['variant']}` | {r['status']} | "
                     f"{fmt_tokens(r.get('tokens_per_s'))} | {fmt_tflops(r.get('tflops_per_gpu'))} | "
                     f"{fmt_pct(r.get('mfu'))} | {_num(r.get('peak_gib'), '.1f')} | {r.get('dims')} | "
                     f"{_num(r.get('elapsed_s'), '.0f')} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    dev, w = result.get("device") or {}, result["workload"]
    blocks = ", ".join(f"{f} {n}" for f, n in w["blocks"].items())
    lines = [f"# Per-family benchmark {result['host']} {result['date']} ({result['mode']})", "",
             f"{result.get('device_name')} × {result['gpus']}; dense {dev.get('matmul_dtype', 'bf16')} matmul "
             f"{dev.get('matmul_n', 8192)}³: {result.get('matmul_tflops')} TFLOP/s (the % of matmul denominator). "
             f"Workload: {w['name']} ({blocks} blocks), random init, {w['precision']}, seq {w['seq']}, "
             f"micro-batch {w['mbs']}, global batch {w['global_batch']}, torch AdamW, clipping 1.0; "
             f"{w['measured_steps']} measured steps after {w['warmup_steps']} warm-up steps. "
             f"Pipeline: `train_ds.py` with the shipped defaults, dims per run below; hf: `train_ds_zero.py`, "
             f"transformers' own model under ZeRO-{w['hf_zero_stage']} (chatglm as transformers' `glm`).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in (result.get("versions") or {}).items()), "",
             family_table(result), "",
             "TFLOP/s per GPU as the trainer reports it (6·N + 12·L·h·s per token, N without the input embedding; "
             "the pipeline counts mixtral's 2 active experts, train_ds_zero.py all parameters). Speed-up: default "
             "tokens/s over the variant's. default / hf: pipeline tokens/s over transformers + ZeRO tokens/s. "
             "A status (OOM, timeout, failed) stands where a run did not finish; — where not run.", "",
             *(f"Note: {n}" for n in result.get("notes") or ()), *([""] if result.get("notes") else []),
             "## All runs", "", runs_table(result), ""]
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["Failures (last error line; the full tail is in the JSON's `error_tail`):", ""]
        lines += [f"- {r['family']} {r['trainer']} `{r['variant']}`: {r['status']}: {r.get('error') or '?'}"
                  for r in failed]
        lines.append("")
    lines.append("Each run's exact command line is its `command` in the JSON.")
    return "\n".join(lines)


def plot(result: dict, png_path: str) -> None:
    """Grouped bars: TFLOP/s per GPU per family per run, a dashed line at 60 % of the matmul rate. hf bars use
    the pipeline's FLOP count (mixtral: active experts) so that equal heights mean equal tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    by = {run_key(r): r for r in runs}
    fams = families_of(result)
    series = [("pipeline", "default", "pipeline default")]
    series += [("pipeline", v, f"pipeline {v}") for v in variant_columns(runs)]
    if any(r["trainer"] == "hf" for r in runs):
        series.append(("hf", "default", f"hf (transformers, ZeRO-{result['workload'].get('hf_zero_stage', 1)}; "
                                        "pipeline FLOP count)"))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.7 * len(fams) + 3), 4.8))
    width = 0.8 / max(1, len(series))
    top = 0.0
    for i, (trainer, variant, label) in enumerate(series):
        xs, hs = [], []
        for j, fam in enumerate(fams):
            rec = by.get((fam, trainer, variant))
            x = j + (i - (len(series) - 1) / 2) * width
            if rec is None:
                continue
            value = rec.get("tflops_per_gpu_pipeline_count" if trainer == "hf" else "tflops_per_gpu")
            if rec["status"] == "ok" and value is not None:
                xs.append(x)
                hs.append(value)
            else:
                ax.text(x, 0, rec["status"], rotation=90, ha="center", va="bottom", fontsize=7)
        top = max([top] + hs)
        ax.bar(xs, hs, width, label=label)
    m = result.get("matmul_tflops")
    if m:
        ax.axhline(TARGET_MFU * m, ls="--", color="gray", lw=1,
                   label=f"{TARGET_MFU:.0%} of matmul ({TARGET_MFU * m:.3g} TFLOP/s)")
        top = max(top, TARGET_MFU * m)
    ax.set_xticks(range(len(fams)))
    names = {r["family"]: r.get("released", RELEASED_NAME[r["family"]]) for r in runs}
    ax.set_xticklabels([f"{f}\n{names[f]}" for f in fams], fontsize=8)
    ax.set_ylabel("TFLOP/s per GPU")
    ax.set_ylim(0, top * 1.25 if top else 1)
    ax.set_title(f"{result.get('device_name')} × {result['gpus']}, seq {result['workload']['seq']}, "
                 f"micro-batch {result['workload']['mbs']} ({result['mode']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = png_path + ".tmp"
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)


def side_paths(json_path: str) -> tuple[str, str]:
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    return stem + ".md", stem + ".png"


def atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(result: dict, json_path: str) -> None:
    derive(result["runs"], result.get("matmul_tflops"))
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    md_path, png_path = side_paths(json_path)
    atomic_write(json_path, json.dumps(result, indent=2))
    atomic_write(md_path, markdown(result) + "\n")
    plot(result, png_path)


# ----------------------------------------------------------------------------------------------
# The whole benchmark


def load_existing(s: Settings) -> dict | None:
    if not os.path.isfile(s.out):
        return None
    with open(s.out) as f:
        old = json.load(f)
    if old.get("mode") != s.mode or old.get("gpus") != s.gpus:
        raise SystemExit(f"--out {s.out} holds a {old.get('mode')} benchmark on {old.get('gpus')} GPUs; this one is "
                         f"{s.mode} on {s.gpus}: pick another --out")
    return old


def device_facts(s: Settings, old: dict | None) -> dict:
    """The matmul rate: --matmul-tflops, else the merged file's (one denominator for a split benchmark),
    else measured by benchmarks/matmul.py in a child process (this process never holds a CUDA context)."""
    if "given_tflops" in s.matmul:
        dev = {"matmul_tflops": s.matmul["given_tflops"], "source": "--matmul-tflops",
               "matmul_dtype": s.matmul["dtype"], "matmul_n": s.matmul["n"]}
        dev["device_name"] = gpu_name() if s.mode == "gpu" else "cpu"
        return dev
    if old and old.get("matmul_tflops"):
        return {**(old.get("device") or {}), "source": f"reused from {os.path.basename(s.out)}"}
    return pairs.measure_device(_MatmulJob(s.matmul, s.env))


@dataclass
class _MatmulJob:
    """What benchmarks/run.py's measure_device reads of its settings."""
    matmul: dict
    env: dict


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def assemble(s: Settings, device: dict, inputs: dict, runs: list[dict], old: dict | None) -> dict:
    host, date = pairs.host_and_date()
    session = {"host": host, "date": date, "harness_command": shlex.join([sys.executable] + sys.argv),
               "matmul_tflops": device.get("matmul_tflops"), "device_name": device.get("device_name")}
    sessions = list((old or {}).get("sessions", []))
    configs = dict((old or {}).get("configs", {}))
    for fam, e in inputs.items():
        configs[fam] = {"flops_per_token": e["flops_per_token"], "blocks": e["blocks"],
                        **{t: (None if e[t] is None else {k: e[t][k] for k in ("model_type", "dims", "model_config",
                                                                               "yaml")})
                           for t in ("pipeline", "hf")}}
    work = workload_json(s)
    for key in ("blocks", "released"):  # a call for some families keeps what earlier calls recorded of the rest
        work[key] = {**(old or {}).get("workload", {}).get(key, {}), **work[key]}
    return {"kind": "families", "host": host, "date": date, "mode": s.mode, "gpus": s.gpus,
            "device_name": device.get("device_name"), "matmul_tflops": device.get("matmul_tflops"),
            "device": device, "versions": pairs.versions(), "workload": work,
            "settings": {k: v for k, v in asdict(s).items() if k not in ("plan", "env")} | {"env": s.env},
            "sessions": sessions + [session], "configs": configs, "runs": runs}


def progress(i: int, n: int, rec: dict, matmul_tflops: float | None) -> str:
    """`[families] 3/17 bloom pipeline default: ok 48.1k tok/s 470 TFLOP/s (62 %), 41 s`"""
    head = f"[families] {i}/{n} {rec['family']} {rec['trainer']} {rec['variant']}: {rec['status']}"
    if rec.get("tokens_per_s") is not None:
        mfu = f" ({fmt_pct(rec['tflops_per_gpu'] / matmul_tflops)})" if matmul_tflops else ""
        head += f" {fmt_tokens(rec['tokens_per_s'])} tok/s {fmt_tflops(rec['tflops_per_gpu'])} TFLOP/s{mfu}"
    head += f", {rec['elapsed_s']:.0f} s"
    if rec["status"] != "ok" and rec.get("error"):
        head += f" ({rec['error'][:160]})"
    return head


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # launch.run_command then stops the running job's own process group


def report_only(path: str) -> int:
    with open(path) as f:
        result = json.load(f)
    write_outputs(result, path)
    print(markdown(result))
    print(f"[families] rewrote {' and '.join(side_paths(path))}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    t0 = time.monotonic()  # --budget counts from here: setup and the matmul measurement are part of the call
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report_only:
        return report_only(args.report_only)
    if args.plan and args.plan_left:
        if not args.out:
            raise SystemExit("--plan-left needs --out")
        return 3 if print_plan_left(args.plan, args.out) else 0
    if args.plan:
        return run_plan(args, argv)
    s = settings_from_args(args)
    old = load_existing(s)
    os.makedirs(s.work_dir, exist_ok=True)
    inputs = write_inputs(s)
    device = device_facts(s, old)
    print(f"[families] {device.get('device_name')} x {s.gpus}: dense {s.matmul['dtype']} matmul "
          f"{device.get('matmul_tflops')} TFLOP/s ({device.get('source', 'measured')})"
          + (f" ({device['error']})" if "error" in device else ""), flush=True)
    done = {run_key(r): r for r in (old or {}).get("runs", [])
            if r.get("status") == "ok" and r.get("seq") == s.seq and r.get("mbs") == s.mbs}
    todo = [spec for spec in s.plan if not (s.skip_done and spec.key in done)]
    if len(todo) < len(s.plan):
        print(f"[families] --skip-done: {len(s.plan) - len(todo)} runs already ok in {s.out}", flush=True)
    print(f"[families] {len(todo)} runs ({s.order}): " + ", ".join(f"{p.family} {p.trainer} {p.variant}" for p in todo),
          flush=True)
    runs = list((old or {}).get("runs", []))
    result = assemble(s, device, inputs, runs, old)
    write_outputs(result, s.out)
    signal.signal(signal.SIGTERM, _on_sigterm)
    elapsed, ok_here, left_out = {}, 0, []
    try:
        for i, spec in enumerate(todo, 1):
            limit = s.timeout_s
            if s.budget_s:
                used = time.monotonic() - t0
                guess = max(elapsed.get(spec.trainer, []) or sum(elapsed.values(), []) or [0.0])
                if used + guess > s.budget_s or s.budget_s - used < 5:
                    left_out = todo[i - 1:]
                    break
                limit = min(limit, s.budget_s - used)
            print(f"[families] {i}/{len(todo)} {spec.family} {spec.trainer} {spec.variant}: running "
                  f"(limit {limit:.0f} s)", flush=True)
            rec = execute(s, spec, inputs, limit)
            elapsed.setdefault(spec.trainer, []).append(rec["elapsed_s"])
            ok_here += rec["status"] == "ok"
            if limit < s.timeout_s and rec["status"] == "timeout":
                rec["budget_cut"] = True
                left_out = todo[i - 1:]
            if not (rec.get("budget_cut") and spec.key in done):  # a budget cut never replaces a measured run
                result["runs"] = merge_runs(result["runs"], [rec])
                write_outputs(result, s.out)
            print(progress(i, len(todo), rec, result.get("matmul_tflops"))
                  + (" (stopped by --budget)" if rec.get("budget_cut") else ""), flush=True)
            if left_out:
                break
    except KeyboardInterrupt:
        print(f"[families] interrupted; the runs finished so far are in {s.out}", file=sys.stderr, flush=True)
        return 130
    derive(result["runs"], result.get("matmul_tflops"))
    print(markdown(result))
    md_path, png_path = side_paths(s.out)
    print(f"[families] results: {s.out}, {md_path}, {png_path}", file=sys.stderr, flush=True)
    if left_out:
        print(f"[families] --budget {s.budget_s:.0f} s: {len(left_out)} runs not done: "
              + ", ".join(f"{p.family} {p.trainer} {p.variant}" for p in left_out)
              + " (run the same command again with --skip-done)", flush=True)
        return 3
    return 0 if ok_here or not todo else 1


if __name__ == "__main__":
    sys.exit(main())
