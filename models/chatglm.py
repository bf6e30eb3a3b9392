"""ChatGLM2/3-6B (`model_type: "chatglm"`, remote code on the hub) as DeepSpeed pipeline layers.

The math is transformers' `GlmForCausalLM`: RMSNorm pre-norm blocks; one `query_key_value` projection
(with bias) whose output is contiguous `[q: nh·hd | k: g·hd | v: g·hd]` with g KV groups; RoPE on the
first half of each head by interleaved pairs, base 10000·rope_ratio; SwiGLU with gate and up stacked in
`dense_h_to_4h`; untied `output_layer`. config.json is read as plain JSON (no remote code).

The checkpoint's `transformer.rotary_pos_emb.inv_freq` is a persistent buffer: the Enter layer keeps it
(unused by the math, which recomputes the angles in fp32) so conversion round trips are bit-exact.
`pp_to_hg --format glm` writes a checkpoint of transformers' native `glm` type instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec

from .common import (EmbeddingEnter, ModelError, ModelOptions, NormHeadExit, PairRotary, RMSNorm, RopeConfig,
                     apply_rope_pairs, causal_attention, cfg_get, check_attention_backend, load_renamed_weights,
                     make_linear, PreNormBlock)
from .family import Family, HfFormat, WeightRule, even_parts, pipeline_specs
from .hf_files import hf_weight_files, iter_hf_tensors, read_hf_config

CHATGLM3_6B_LAYERS = 28
CHATGLM_ROPE_BASE = 10000.0


@dataclass(frozen=True)
class ChatGLMArgs:
    """The subset of a chatglm config.json that determines the weights and the math."""
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_groups: int
    head_dim: int
    layernorm_eps: float
    qkv_bias: bool
    rope_ratio: float = 1.0
    initializer_range: float = 0.02

    @property
    def rope(self) -> RopeConfig:
        """Rotary over the first half of each head: θ_i = (10000·rope_ratio)^(−2i/(hd/2))."""
        return RopeConfig(head_dim=self.head_dim // 2, theta=CHATGLM_ROPE_BASE * self.rope_ratio)

    @property
    def qkv_sizes(self) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_groups * self.head_dim, self.num_kv_groups * self.head_dim]


# (key, value that this implementation requires, why) — anything else is refused, not silently mis-computed
_REQUIRED = (
    ("rmsnorm", True, "LayerNorm variants (ChatGLM-6B v1) are not supported"),
    ("post_layer_norm", True, "a final norm is expected"),
    ("add_bias_linear", False, "biases on dense/MLP projections are not supported"),
    ("apply_residual_connection_post_layernorm", False, "post-layernorm residuals are not supported"),
    ("fp32_residual_connection", False, "fp32 residuals are not supported"),
    ("tie_word_embeddings", False, "ChatGLM's output_layer is untied"),
)


def read_config(cfg: dict) -> ChatGLMArgs:
    """config.json dict -> ChatGLMArgs (released keys: num_layers, padded_vocab_size, kv_channels,
    multi_query_attention/multi_query_group_num, ffn_hidden_size, layernorm_epsilon, add_qkv_bias, rope_ratio)."""
    for key, required, why in _REQUIRED:
        value = cfg_get(cfg, key, bool, required)
        if value != required:
            raise ModelError(f"config.json: chatglm with {key}={str(value).lower()}: {why} "
                             f"(supported: {str(required).lower()})")
    hidden = cfg_get(cfg, "hidden_size", int)
    heads = cfg_get(cfg, "num_attention_heads", int)
    groups = cfg_get(cfg, "multi_query_group_num", int, 1) if cfg_get(cfg, "multi_query_attention", bool,
                                                                        False) else heads
    if heads % groups:
        raise ModelError(f"config.json: num_attention_heads ({heads}) must be a multiple of "
                         f"multi_query_group_num ({groups})")
    head_dim = cfg_get(cfg, "kv_channels", int, hidden // heads)
    if head_dim % 4:
        raise ModelError(f"config.json: kv_channels ({head_dim}) must be a multiple of 4 (RoPE rotates pairs "
                         "within the first half of each head)")
    vocab = cfg_get(cfg, "padded_vocab_size", int, None) or cfg_get(cfg, "vocab_size", int)
    layers = cfg_get(cfg, "num_layers", int, None) or cfg_get(cfg, "num_hidden_layers", int)
    return ChatGLMArgs(
        vocab_size=vocab,
        hidden_size=hidden,
        ffn_hidden_size=cfg_get(cfg, "ffn_hidden_size", int),
        num_layers=layers,
        num_heads=heads,
        num_kv_groups=groups,
        head_dim=head_dim,
        layernorm_eps=float(cfg_get(cfg, "layernorm_epsilon", (int, float), 1e-5)),
        qkv_bias=cfg_get(cfg, "add_qkv_bias", bool, False),
        rope_ratio=float(cfg_get(cfg, "rope_ratio", (int, float), 1.0)),
        initializer_range=float(cfg_get(cfg, "initializer_range", (int, float), 0.02)),
    )


class _InvFreqBuffer(nn.Module):
    """Holds the checkpoint's `rotary_pos_emb.inv_freq` `[hd/4]` as a persistent buffer (carried, not used)."""

    def __init__(self, head_dim: int, dtype: torch.dtype):
        super().__init__()
        dim = head_dim // 2
        inv_freq = 1.0 / (CHATGLM_ROPE_BASE ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq.to(dtype), persistent=True)


class ChatGLMEnter(EmbeddingEnter):
    """Enter: `(input_ids, position_ids)` -> `(embedding [B,S,H], position_ids)`; no padding_idx (as ChatGLM).

    Local names: `embed_tokens.weight`, `rotary_pos_emb.inv_freq` (buffer).
    """

    def __init__(self, args: ChatGLMArgs, dtype: torch.dtype = torch.float32):
        super().__init__(args.vocab_size, args.hidden_size, None, args.initializer_range, dtype)
        self.rotary_pos_emb = _InvFreqBuffer(args.head_dim, dtype)


class ChatGLMAttention(nn.Module):
    """Grouped-KV attention with a fused `query_key_value` ([q | k | v] blocks) and pair-interleaved partial RoPE."""

    def __init__(self, args: ChatGLMArgs, use_flash_attn: bool, dtype: torch.dtype):
        super().__init__()
        std = args.initializer_range
        self.num_heads, self.num_kv, self.head_dim = args.num_heads, args.num_kv_groups, args.head_dim
        self.sizes, self.use_flash_attn = args.qkv_sizes, use_flash_attn
        self.query_key_value = make_linear(args.hidden_size, sum(self.sizes), args.qkv_bias, std, dtype)
        self.dense = make_linear(args.num_heads * args.head_dim, args.hidden_size, False, std, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,S,H], cos/sin [B,1,S,hd/4] -> [B,S,H]."""
        b, s, _ = x.shape
        q, k, v = self.query_key_value(x).split(self.sizes, dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = k.view(b, s, self.num_kv, self.head_dim).transpose(1, 2)  # (B, g, S, hd)
        v = v.view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope_pairs(q, cos, sin), apply_rope_pairs(k, cos, sin)
        out = causal_attention(q, k, v, self.use_flash_attn, position_ids)  # (B, S, nh, hd)
        return self.dense(out.reshape(b, s, self.num_heads * self.head_dim))


class ChatGLMMLP(nn.Module):
    """SwiGLU: `dense_4h_to_h(silu(a) * b)` with `a, b = dense_h_to_4h(x).chunk(2)`, [B,S,H] -> [B,S,H]."""

    def __init__(self, args: ChatGLMArgs, dtype: torch.dtype):
        super().__init__()
        std = args.initializer_range
        self.dense_h_to_4h = make_linear(args.hidden_size, 2 * args.ffn_hidden_size, False, std, dtype)
        self.dense_4h_to_h = make_linear(args.ffn_hidden_size, args.hidden_size, False, std, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class ChatGLMBlock(PreNormBlock):
    """Block: `(hidden [B,S,H], position_ids [B,S])` -> `(hidden, position_ids)`; names mirror
    `transformer.encoder.layers.{i}.*`."""

    attn_name = "self_attention"

    def __init__(self, args: ChatGLMArgs, opts: ModelOptions):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.layernorm_eps, dtype=opts.dtype)
        self.self_attention = ChatGLMAttention(args, opts.use_flash_attn, opts.dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.layernorm_eps, dtype=opts.dtype)
        self.mlp = ChatGLMMLP(args, opts.dtype)
        self.rotary = PairRotary(args.rope)
        self.set_options(opts)


def build_layers(args: ChatGLMArgs, opts: ModelOptions) -> list:
    """Enter, ChatGLMBlock x L, Exit (final RMSNorm + output_layer); untied: L+2 specs."""
    check_attention_backend(opts)
    return pipeline_specs((ChatGLMEnter, args, opts.dtype),
                          [LayerSpec(ChatGLMBlock, args, opts) for _ in range(args.num_layers)],
                          LayerSpec(NormHeadExit, args.hidden_size, args.vocab_size, args.layernorm_eps,
                                    args.initializer_range, opts.dtype, opts.fused_head_loss))


def layer_flops(args: ChatGLMArgs, seq_len: int) -> list[float]:
    """Forward FLOPs per logical layer for one sequence: [Enter 0, Block x L, Exit] (see llama.layer_flops)."""
    h, q_dim = args.hidden_size, args.num_heads * args.head_dim
    proj_params = h * sum(args.qkv_sizes) + q_dim * h + 3 * h * args.ffn_hidden_size
    block = seq_len * (2.0 * proj_params + 2.0 * seq_len * q_dim)
    return [0.0] + [block] * args.num_layers + [seq_len * (4.0 * h + 2.0 * h * args.vocab_size)]


def default_parts(num_stages: int, num_layers: int | None = None) -> list[int]:
    """Balanced split of L+2 with the leftover layers on the middle stages, so the end stages stay light:
    the first holds the most in-flight activations under 1F1B, the last also computes the 65024-token head.
    chatglm3-6b (28 blocks) on 8 stages -> [3, 4, 4, 4, 4, 4, 4, 3]."""
    return even_parts((CHATGLM3_6B_LAYERS if num_layers is None else num_layers) + 2, num_stages, ends_first=False)


_LAYER = "transformer.encoder.layers.{}."
CHATGLM_WEIGHT_MAP = (
    WeightRule("transformer.embedding.word_embeddings.weight", "enter", "embed_tokens.weight"),
    WeightRule("transformer.rotary_pos_emb.inv_freq", "enter", "rotary_pos_emb.inv_freq"),
    *(WeightRule(_LAYER + name, "block", name) for name in (
        "input_layernorm.weight", "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
        "self_attention.dense.weight", "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight",
        "mlp.dense_4h_to_h.weight")),
    WeightRule("transformer.encoder.final_layernorm.weight", "exit", "norm.weight"),
    WeightRule("transformer.output_layer.weight", "exit", "lm_head.weight"),
)


# ----------------------------------------------------------------------------------------------
# transformers' native `glm` layout: the verify reference and `pp_to_hg --format glm`

_GLM_RENAMES = (
    (r"transformer\.embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.post_attention_layernorm\.weight",
     r"model.layers.\1.post_attention_layernorm.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight", r"model.layers.\1.mlp.gate_up_proj.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"transformer\.encoder\.final_layernorm\.weight", "model.norm.weight"),
    (r"transformer\.output_layer\.weight", "lm_head.weight"),
)
_QKV_RE = re.compile(r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)")


def to_glm_tensors(args: ChatGLMArgs, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One chatglm tensor -> its glm tensors: `query_key_value` splits into q/k/v_proj (cloned, so
    safetensors sees no shared storage), `rotary_pos_emb.inv_freq` is dropped (glm recomputes it)."""
    if name == "transformer.rotary_pos_emb.inv_freq":
        return {}
    match = _QKV_RE.fullmatch(name)
    if match is not None:
        layer, kind = match.groups()
        parts = tensor.split(args.qkv_sizes, dim=0)
        return {f"model.layers.{layer}.self_attn.{p}_proj.{kind}": t.clone() for p, t in zip("qkv", parts)}
    for pattern, target in _GLM_RENAMES:
        if re.fullmatch(pattern, name):
            return {re.sub(pattern, target, name): tensor}
    raise ModelError(f"no glm name for chatglm tensor '{name}'")


def glm_config(cfg: dict) -> dict:
    """chatglm config.json -> a `GlmConfig` config.json (no auto_map: loads without remote code).

    RoPE keys are written top-level (`rope_theta`, `partial_rotary_factor`), which transformers 4.x reads
    and 5.x converts into `rope_parameters`.
    """
    args = read_config(cfg)
    out = {
        "architectures": ["GlmForCausalLM"], "model_type": "glm",
        "vocab_size": args.vocab_size, "hidden_size": args.hidden_size, "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_groups, "head_dim": args.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg_get(cfg, "seq_length", int, 8192), "rms_norm_eps": args.layernorm_eps,
        "rope_theta": CHATGLM_ROPE_BASE * args.rope_ratio, "partial_rotary_factor": 0.5,
        "attention_bias": args.qkv_bias, "attention_dropout": 0.0, "initializer_range": args.initializer_range,
        "tie_word_embeddings": False, "use_cache": True,
        "pad_token_id": cfg.get("pad_token_id"), "eos_token_id": cfg.get("eos_token_id"),
        "bos_token_id": cfg.get("bos_token_id"),
    }
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    if dtype is not None:
        out["torch_dtype"] = dtype
    return out


def reference_model(hf_dir: str | Path) -> nn.Module:
    """transformers' `GlmForCausalLM` (fp32) holding the chatglm checkpoint's weights, renamed and split."""
    from transformers import GlmConfig, GlmForCausalLM

    cfg = read_hf_config(hf_dir)
    args = read_config(cfg)
    skip = ("architectures", "model_type", "torch_dtype")
    config = GlmConfig(**{k: v for k, v in glm_config(cfg).items() if k not in skip})
    model = GlmForCausalLM(config).float()
    pairs = ((new, t) for name, tensor in iter_hf_tensors(hf_weight_files(Path(hf_dir)))
             for new, t in to_glm_tensors(args, name, tensor).items())
    return load_renamed_weights(model, pairs)


FAMILY = Family(
    model_type="chatglm",
    read_config=read_config,
    build_layers=build_layers,
    weight_map=CHATGLM_WEIGHT_MAP,
    layer_flops=layer_flops,
    default_parts=default_parts,
    width_keys=("hidden_size", "ffn_hidden_size", "kv_channels"),
    vocab_keys=("vocab_size", "padded_vocab_size"),
    reference_model=reference_model,
    hf_formats={"glm": HfFormat(config=glm_config, tensors=to_glm_tensors)},
)
