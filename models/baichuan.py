"""Baichuan2-7B (`model_type: "baichuan"`, remote code on the hub) as DeepSpeed pipeline layers.

A llama with three differences: q|k|v fused in one `W_pack` projection, RoPE applied in fp32, and a
NormHead (every vocabulary row of the LM head scaled to unit L2 norm in each forward, gradients flowing
through the normalisation; the raw weight is what is stored). config.json is read as plain JSON, so
training never imports the checkpoint's remote code. Baichuan2-13B (ALiBi) is refused.
Reference: transformers' `LlamaForCausalLM` with `W_pack` split and the head normalised (`reference_model`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec

from .common import (EmbeddingEnter, ModelError, ModelOptions, NormHeadExit, RMSNorm, RopeConfig, Rotary, apply_rope,
                     causal_attention, causal_lm_loss_fn, cfg_get, check_attention_backend, load_renamed_weights,
                     make_linear, PreNormBlock)
from .family import Family, WeightRule, pipeline_specs
from .hf_files import hf_weight_files, iter_hf_tensors, read_hf_config
from .llama import LlamaArgs, LlamaMLP
from .llama import default_parts as llama_default_parts
from .llama import layer_flops as llama_layer_flops

BAICHUAN2_13B = {"hidden_size": 5120, "num_hidden_layers": 40}
BAICHUAN1_VOCAB = 64000


@dataclass(frozen=True)
class BaichuanArgs(LlamaArgs):
    """LlamaArgs (plain MHA, rope base 10000) plus the released config's `z_loss_weight`."""
    z_loss_weight: float = 0.0


def read_config(cfg: dict) -> BaichuanArgs:
    """config.json dict -> BaichuanArgs. Refuses Baichuan2-13B (ALiBi, no RoPE) and Baichuan-7B v1 (plain
    head): the weights would load but the math would silently be wrong."""
    hidden = cfg_get(cfg, "hidden_size", int)
    layers = cfg_get(cfg, "num_hidden_layers", int)
    if hidden == BAICHUAN2_13B["hidden_size"] or layers == BAICHUAN2_13B["num_hidden_layers"]:
        raise ModelError(f"config.json: this baichuan config (hidden_size {hidden}, num_hidden_layers {layers}) "
                         "describes Baichuan2-13B, which uses ALiBi instead of RoPE; only Baichuan2-7B is supported")
    vocab = cfg_get(cfg, "vocab_size", int)
    if vocab == BAICHUAN1_VOCAB:
        raise ModelError(f"config.json: vocab_size {vocab} is Baichuan-7B v1, whose LM head is not a NormHead; "
                         "only Baichuan2-7B is supported")
    heads = cfg_get(cfg, "num_attention_heads", int)
    if hidden % heads:
        raise ModelError(f"config.json: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    act = cfg_get(cfg, "hidden_act", str, "silu")
    if act != "silu":
        raise ModelError(f"config.json: hidden_act '{act}' is not supported for baichuan (supported: silu)")
    if cfg_get(cfg, "tie_word_embeddings", bool, False):
        raise ModelError("config.json: tie_word_embeddings true is not supported for baichuan (NormHead is untied)")
    pad = cfg_get(cfg, "pad_token_id", int, None)
    head_dim = hidden // heads
    return BaichuanArgs(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=cfg_get(cfg, "intermediate_size", int),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg_get(cfg, "rms_norm_eps", (int, float), 1e-6)),
        rope=RopeConfig(head_dim=head_dim, theta=10000.0),
        pad_token_id=pad if pad is not None and 0 <= pad < vocab else None,
        initializer_range=float(cfg_get(cfg, "initializer_range", (int, float), 0.02)),
        z_loss_weight=float(cfg_get(cfg, "z_loss_weight", (int, float), 0.0)),
    )


class BaichuanAttention(nn.Module):
    """MHA with `W_pack` = [q; k; v] rows (`[3H, H]`, head-major blocks) and RoPE computed in fp32."""

    def __init__(self, args: BaichuanArgs, use_flash_attn: bool, dtype: torch.dtype):
        super().__init__()
        h, std = args.hidden_size, args.initializer_range
        self.num_heads, self.head_dim, self.use_flash_attn = args.num_heads, args.head_dim, use_flash_attn
        self.W_pack = make_linear(h, 3 * h, False, std, dtype)
        self.o_proj = make_linear(h, h, False, std, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,S,H], cos/sin [B,1,S,hd] fp32 -> [B,S,H]."""
        b, s, _ = x.shape
        qkv = self.W_pack(x).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, nh, S, hd) each
        q = apply_rope(q.float(), cos, sin).to(v.dtype)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
        out = causal_attention(q, k, v, self.use_flash_attn, position_ids)  # (B, S, nh, hd)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class BaichuanBlock(PreNormBlock):
    """Block: `(hidden [B,S,H], position_ids [B,S])` -> `(hidden, position_ids)`; names mirror HF."""

    rope_in_fp32 = True

    def __init__(self, args: BaichuanArgs, opts: ModelOptions):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=opts.dtype)
        self.self_attn = BaichuanAttention(args, opts.use_flash_attn, opts.dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype=opts.dtype)
        self.mlp = LlamaMLP(args, opts.dtype)
        self.rotary = Rotary(args.rope)
        self.set_options(opts)


def normalized_rows(weight: torch.Tensor) -> torch.Tensor:
    """`weight / ||row||₂` ([V, H] -> [V, H]), the norm accumulated in fp32 without an fp32 copy of weight."""
    norm = torch.linalg.vector_norm(weight, dim=-1, keepdim=True, dtype=torch.float32)
    return weight * norm.clamp_min(1e-12).reciprocal().to(weight.dtype)


class NormHeadLMExit(NormHeadExit):
    """Exit: final RMSNorm, then logits = hidden @ normalized_rows(lm_head.weight)ᵀ, `[B,S,V]`."""

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hidden, weight = self.norm(inputs[0]), normalized_rows(self.lm_head.weight)
        return (hidden, weight) if self.fused else F.linear(hidden, weight)


def build_layers(args: BaichuanArgs, opts: ModelOptions) -> list:
    """Enter, BaichuanBlock x L, Exit (NormHead); always untied: L+2 specs."""
    check_attention_backend(opts)
    return pipeline_specs((EmbeddingEnter, args.vocab_size, args.hidden_size, args.pad_token_id,
                           args.initializer_range, opts.dtype),
                          [LayerSpec(BaichuanBlock, args, opts) for _ in range(args.num_layers)],
                          LayerSpec(NormHeadLMExit, args.hidden_size, args.vocab_size, args.rms_norm_eps,
                                    args.initializer_range, opts.dtype, opts.fused_head_loss))


def loss_fn(args: BaichuanArgs, opts: ModelOptions):
    """CE + z-loss; the training option `aux_max_z_loss.weight` wins over config.json's `z_loss_weight`."""
    if opts.aux_max_z_loss_weight or not args.z_loss_weight:
        return causal_lm_loss_fn(args, opts)
    return causal_lm_loss_fn(args, replace(opts, aux_max_z_loss_weight=args.z_loss_weight))


BAICHUAN_WEIGHT_MAP = (
    WeightRule("model.embed_tokens.weight", "enter", "embed_tokens.weight"),
    WeightRule("model.layers.{}.input_layernorm.weight", "block", "input_layernorm.weight"),
    WeightRule("model.layers.{}.self_attn.W_pack.weight", "block", "self_attn.W_pack.weight"),
    WeightRule("model.layers.{}.self_attn.o_proj.weight", "block", "self_attn.o_proj.weight"),
    WeightRule("model.layers.{}.self_attn.rotary_emb.inv_freq", None),
    WeightRule("model.layers.{}.post_attention_layernorm.weight", "block", "post_attention_layernorm.weight"),
    WeightRule("model.layers.{}.mlp.gate_proj.weight", "block", "mlp.gate_proj.weight"),
    WeightRule("model.layers.{}.mlp.up_proj.weight", "block", "mlp.up_proj.weight"),
    WeightRule("model.layers.{}.mlp.down_proj.weight", "block", "mlp.down_proj.weight"),
    WeightRule("model.norm.weight", "exit", "norm.weight"),
    WeightRule("lm_head.weight", "exit", "lm_head.weight"),
)


class _RowNormalize(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return F.normalize(weight, dim=-1)


def llama_config_dict(cfg: dict) -> dict:
    """A LlamaConfig dict with Baichuan2-7B's math (MHA, rope base 10000, untied)."""
    args = read_config(cfg)
    return dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                num_key_value_heads=args.num_heads, rms_norm_eps=args.rms_norm_eps,
                max_position_embeddings=cfg_get(cfg, "max_position_embeddings", int, 4096),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                pad_token_id=args.pad_token_id, bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"))


def split_w_pack(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF baichuan name -> llama names; `W_pack` [3H, H] splits into q/k/v_proj (cloned, contiguous)."""
    if name.endswith("self_attn.W_pack.weight"):
        prefix = name[: -len("W_pack.weight")]
        q, k, v = tensor.chunk(3, dim=0)
        return {f"{prefix}q_proj.weight": q.clone(), f"{prefix}k_proj.weight": k.clone(),
                f"{prefix}v_proj.weight": v.clone()}
    if name.endswith("rotary_emb.inv_freq"):
        return {}
    return {name: tensor}


def reference_model(hf_dir: str | Path) -> nn.Module:
    """`LlamaForCausalLM` (fp32) with the checkpoint's weights, W_pack split and a parametrized NormHead:
    `lm_head.weight` is computed from the raw stored rows in each forward, so logits and gradients
    (on `lm_head.parametrizations.weight.original`) match Baichuan2's."""
    from torch.nn.utils import parametrize
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**llama_config_dict(read_hf_config(hf_dir)))).float()
    pairs = ((new, t) for name, tensor in iter_hf_tensors(hf_weight_files(Path(hf_dir)))
             for new, t in split_w_pack(name, tensor).items())
    load_renamed_weights(model, pairs)
    parametrize.register_parametrization(model.lm_head, "weight", _RowNormalize())
    return model


FAMILY = Family(
    model_type="baichuan",
    read_config=read_config,
    build_layers=build_layers,
    weight_map=BAICHUAN_WEIGHT_MAP,
    layer_flops=llama_layer_flops,
    default_parts=llama_default_parts,
    loss_fn=loss_fn,
    reference_model=reference_model,
)
