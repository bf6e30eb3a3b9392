"""Qwen3-MoE (30B-A3B, 235B-A22B; `model_type: "qwen3_moe"`) as DeepSpeed pipeline layers, and the pieces Qwen2-MoE
(`models/qwen2_moe.py`) shares: Enter, QwenMoeBlock x L, Exit.

Attention is the llama block's with Qwen3's flags (per-head q/k RMSNorm before RoPE, explicit `head_dim`); the
feed-forward is `models.moe`'s `SparseMoe` (softmax top-k router, `norm_topk_prob` renormalising, experts
`gate_proj`/`up_proj`/`down_proj` under `mlp`) on the layers transformers makes sparse (`decoder_sparse_step`,
`mlp_only_layers`), a dense SwiGLU MLP of `intermediate_size` on the others. The load-balancing loss is
transformers' (`router_aux_loss_coef` · E · Σ f·P over the sparse layers' (layer, token) rows, padding excluded),
trained whatever `output_router_logits` says, as for mixtral. Reference: transformers' `Qwen3MoeForCausalLM`.

Checkpoints: the hub's per-expert names `mlp.experts.{e}.gate_proj.weight` (what `pp_to_hg` writes) and
transformers 5's fused `mlp.experts.gate_up_proj` [E, 2F, H] (gate rows first) / `mlp.experts.down_proj` [E, H, F]
are both read; `pp_to_hg --format transformers5` writes the fused one (`models.moe_layout`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from deepspeed.pipe import LayerSpec

from .common import ModelError, ModelOptions, Rotary, cfg_get, check_attention_backend, read_rope_config
from .family import Family, WeightRule, even_parts, pipeline_specs
from .llama import (ATTENTION_RULES, EMBED_RULES, HEAD_RULES, LlamaArgs, LlamaAttention, mean_keys,
                    dense_debug_config, read_decoder_fields, read_layer_types, read_windows,
                    with_defaults)
from .moe import (MoeBlock, MoeConfig, MoeEnter, MoeExit, SparseLayers, SparseMoe, SwigluMlp, check_moe_config,
                  expert_load_metrics, moe_loss_fn, tied_moe_head_weight, tied_moe_lm_head)
from .moe_layout import FUSED_FORMAT, fused_experts_to_hub

QWEN3_30B_LAYERS = 48
DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "intermediate_size": 6144, "num_experts": 128,
            "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
            "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "attention_bias": False,
            "use_sliding_window": False, "sliding_window": 4096}


@dataclass(frozen=True)
class QwenMoeArgs(LlamaArgs, SparseLayers):
    """`LlamaArgs` (the attention's flags) plus the MoE: `moe` (`models.moe.MoeConfig`), `sparse` (per layer,
    whether its MLP is the sparse one), `router_aux_loss_coef`."""
    moe: MoeConfig | None = None
    sparse: tuple[bool, ...] = ()
    router_aux_loss_coef: float = 0.001



def sparse_layers(cfg: dict, num_layers: int, experts: int) -> tuple[bool, ...]:
    """transformers' rule: layer i is sparse unless it is in `mlp_only_layers`, iff experts > 0 and
    (i + 1) % decoder_sparse_step == 0."""
    step = cfg_get(cfg, "decoder_sparse_step", int, 1)
    if step < 1:
        raise ModelError(f"config.json: 'decoder_sparse_step' must be >= 1, got {step}")
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ModelError(f"config.json: 'mlp_only_layers' must be a list of layer indices, got {only!r}")
    sparse = tuple(i not in only and experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
    if not any(sparse):
        raise ModelError("config.json: no layer is sparse (num_experts, decoder_sparse_step, mlp_only_layers): "
                         "this is a dense model; use its dense model_type")
    return sparse


def read_moe_fields(cfg: dict, family: str, layer_types: list[str], qk_norm: str | None, qkv_bias: bool | None,
                    shared_size: int = 0, shared_gate: bool = False) -> QwenMoeArgs:
    """The args every Qwen MoE family reads the same way (config.json already `with_defaults`)."""
    fields = read_decoder_fields(cfg, family, 1e-6)
    experts = cfg_get(cfg, "num_experts", int)
    moe = check_moe_config(MoeConfig(
        num_experts=experts, top_k=cfg_get(cfg, "num_experts_per_tok", int), hidden_size=fields["hidden_size"],
        expert_size=cfg_get(cfg, "moe_intermediate_size", int), init_std=fields["initializer_range"],
        norm_topk_prob=cfg_get(cfg, "norm_topk_prob", bool), expert_names=("gate_proj", "down_proj", "up_proj"),
        shared_size=shared_size, shared_gate=shared_gate))
    return QwenMoeArgs(
        **fields, rope=read_rope_config(cfg, fields["head_dim"]), attention_bias=cfg_get(cfg, "attention_bias", bool),
        qkv_bias=qkv_bias, qk_norm=qk_norm, layer_windows=read_windows(cfg, layer_types), moe=moe,
        sparse=sparse_layers(cfg, fields["num_layers"], experts),
        router_aux_loss_coef=float(cfg_get(cfg, "router_aux_loss_coef", (int, float))))


def read_config(cfg: dict) -> QwenMoeArgs:
    """config.json -> QwenMoeArgs. Windows as transformers' Qwen3-MoE: `sliding_window` on every layer when
    `use_sliding_window` (else none). transformers 5 saves `num_experts` as `num_local_experts`."""
    if "num_local_experts" in cfg and "num_experts" not in cfg:
        cfg = {**cfg, "num_experts": cfg["num_local_experts"]}
    cfg = with_defaults(cfg, DEFAULTS)
    layers = cfg_get(cfg, "num_hidden_layers", int)
    on = cfg_get(cfg, "use_sliding_window", bool) and cfg.get("sliding_window") is not None
    types = read_layer_types(cfg, layers, ["sliding_attention" if on else "full_attention"] * layers)
    return read_moe_fields(cfg, "qwen3_moe", types if on else ["full_attention"] * layers, "head", None)


class QwenMoeBlock(MoeBlock):
    """Block layer (`models.moe.MoeBlock`): `LlamaAttention` with the family's flags, then `mlp`: a `SparseMoe`
    on sparse layers, `SwigluMlp(intermediate_size)` on dense ones."""
    moe_name = "mlp"

    def __init__(self, args: QwenMoeArgs, opts: ModelOptions, layer_idx: int):
        super().__init__()
        index = args.moe_index(layer_idx)
        ffn = (SparseMoe(args, opts.dtype, opts.moe_grouped_gemm) if index is not None else
               SwigluMlp(args.hidden_size, args.intermediate_size, args.initializer_range, opts.dtype))
        self.init_modules(args.hidden_size, args.rms_norm_eps,
                          LlamaAttention(args, opts.use_flash_attn, opts.dtype, layer_idx),
                          Rotary(args.rope_of(layer_idx)), ffn, opts, layer_idx, index)


def moe_specs(args, opts: ModelOptions, block_cls: type) -> list:
    """Spec list of a `models.moe` family: MoeEnter, block_cls x L, MoeExit (+ a trailing tied head)."""
    check_attention_backend(opts)
    head_vocab = None if args.tie_word_embeddings else args.vocab_size
    return pipeline_specs((MoeEnter, args.vocab_size, args.hidden_size, args.pad_token_id, args.initializer_range,
                           args.num_moe_layers, args.num_experts, args.top_k, opts.dtype, args.moe.seq_aux_alpha > 0),
                          [LayerSpec(block_cls, args, opts, i) for i in range(args.num_layers)],
                          LayerSpec(MoeExit, args.hidden_size, head_vocab, args.rms_norm_eps,
                                    args.initializer_range, opts.dtype, opts.fused_head_loss),
                          args.tie_word_embeddings, tied_moe_head_weight if opts.fused_head_loss else tied_moe_lm_head)


def build_layers(args: QwenMoeArgs, opts: ModelOptions) -> list:
    return moe_specs(args, opts, QwenMoeBlock)


def ffn_params(args, layer: int) -> float:
    """Weights one token multiplies in a layer's feed-forward: router + top-k experts + shared expert(s) (+ its
    gate) on sparse layers, the dense MLP elsewhere."""
    h, moe = args.hidden_size, args.moe
    if not args.sparse[layer]:
        return 3.0 * h * args.intermediate_size
    shared = 3.0 * h * moe.shared_size + (h if moe.shared_gate else 0)
    return h * moe.num_experts + moe.top_k * 3.0 * h * moe.expert_size + shared


def layer_flops(args: QwenMoeArgs, seq_len: int) -> list[float]:
    """Forward FLOPs of one sequence per logical layer: [Enter, Block x L, Exit] (len L+2); a block counts its
    attention as llama and the feed-forward weights a token actually runs (`ffn_params`: the idle experts cost
    nothing)."""
    h, hd = args.hidden_size, args.head_dim
    q_dim, kv_dim = args.num_heads * hd, args.num_kv_heads * hd
    attn = h * q_dim * 2 + h * kv_dim * 2
    blocks = [seq_len * (2.0 * (attn + ffn_params(args, i)) + 4.0 * q_dim * mean_keys(seq_len, args.window(i)))
              for i in range(args.num_layers)]
    return [0.0] + blocks + [seq_len * (4.0 * h + 2.0 * h * args.vocab_size)]


def default_parts(num_stages: int, num_layers: int | None = None) -> list[int]:
    """Logical layers per stage; L defaults to Qwen3-30B-A3B's 48."""
    return even_parts((QWEN3_30B_LAYERS if num_layers is None else num_layers) + 2, num_stages)


def _block_rule(name: str) -> WeightRule:
    return WeightRule(f"model.layers.{{}}.{name}", "block", name)


# The hub layout, one table for every Qwen MoE family (a rule whose tensor a model lacks is never used).
QWEN_MOE_WEIGHT_MAP = EMBED_RULES + ATTENTION_RULES + (
    _block_rule("self_attn.q_norm.weight"),
    _block_rule("self_attn.k_norm.weight"),
    _block_rule("mlp.gate.weight"),
    _block_rule("mlp.experts.{}.gate_proj.weight"),
    _block_rule("mlp.experts.{}.up_proj.weight"),
    _block_rule("mlp.experts.{}.down_proj.weight"),
    _block_rule("mlp.shared_expert.gate_proj.weight"),
    _block_rule("mlp.shared_expert.up_proj.weight"),
    _block_rule("mlp.shared_expert.down_proj.weight"),
    _block_rule("mlp.shared_expert_gate.weight"),
    _block_rule("mlp.gate_proj.weight"),
    _block_rule("mlp.up_proj.weight"),
    _block_rule("mlp.down_proj.weight"),
) + HEAD_RULES


def debug_config(**overrides) -> dict:
    """Tiny qwen3_moe: 8 experts top-2 renormalised, head_dim 24 != hidden/heads, layer 1 dense (`mlp_only_layers`),
    windows of 8 (shorter than the tests' rows)."""
    return dense_debug_config("qwen3_moe", "Qwen3MoeForCausalLM", **{
        "head_dim": 24, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "norm_topk_prob": True, "router_aux_loss_coef": 0.02, "decoder_sparse_step": 1, "mlp_only_layers": [1],
        "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4, "rope_theta": 1e6,
        "output_router_logits": False, **overrides})


def qwen_moe_family(model_type: str, read, debug, released: dict[str, str]) -> Family:
    return Family(model_type=model_type, read_config=read, build_layers=build_layers,
                  weight_map=QWEN_MOE_WEIGHT_MAP, layer_flops=layer_flops, default_parts=default_parts,
                  loss_fn=moe_loss_fn, step_metrics=expert_load_metrics, tied_hf_names=("lm_head.weight",),
                  from_hf_tensor=fused_experts_to_hub, hf_formats={"transformers5": FUSED_FORMAT},
                  width_keys=("hidden_size", "intermediate_size", "moe_intermediate_size", "head_dim",
                              "shared_expert_intermediate_size"),
                  debug_config=debug, released_configs=released)


FAMILY = qwen_moe_family("qwen3_moe", read_config, debug_config, {"qwen3-30b-a3b": "qwen3-30b-a3b.json",
                                                                  "qwen3-235b-a22b": "qwen3-235b-a22b.json"})
