"""Memory planner (tools/memory.py): exact parameter counts, measured activations, DeepSpeed's optimizer
layouts, the CLI. CPU only, no DeepSpeed launch."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import run_cli
from tools import memory as M
from models.tiny import tiny_llama_config

LLAMA_13B = {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
             "num_attention_heads": 40, "vocab_size": 32000, "rms_norm_eps": 1e-6}


def tiny_cfg(**overrides) -> dict:
    return json.loads(tiny_llama_config(**overrides).to_json_string())


def setup(**changes) -> M.Setup:
    base = M.Setup(precision="bf16", optimizer="AdamW", state_bytes=8, zero_stage=0, offload=False,
                   grad_acc_fp32=False, pipe=3, data=1, micro_batch=1, micro_batches=8, seq=64, grad_ckpt=False,
                   fused_head_loss=False, parts=[3, 2, 3])
    return replace(base, **changes)


def test_parameters_per_stage_equal_transformers_model():
    from transformers import LlamaForCausalLM

    for tied in (False, True):
        cfg = tiny_cfg(num_hidden_layers=6, tie_word_embeddings=tied)
        hf = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=6, tie_word_embeddings=tied))
        n = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
        layers = hf.model.layers
        head = [] if tied else [hf.lm_head]
        expected = [n(hf.model.embed_tokens, *layers[:2]), n(*layers[2:4]), n(*layers[4:], hf.model.norm, *head)]
        stages = M.resident_params(cfg, [3, 2, 3])
        assert [own for own, _ in stages] == expected
        assert sum(M.layer_params(cfg)) == sum(p.numel() for p in hf.parameters())
        embedding = hf.model.embed_tokens.weight.numel()
        # DeepSpeed builds the tied embedding again on the last stage: it costs memory there.
        assert [res - own for own, res in stages] == [0, 0, embedding if tied else 0]


def test_flash_like_attention_matches_sdpa_and_saves_no_seq_squared():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = M.flash_like_sdpa(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    # Per-token bytes of a block do not grow with the sequence: no [S, S] tensor is kept, even for bloom,
    # whose ALiBi bias sends SDPA to the math kernel on CPU (which would save the [S, S] probabilities).
    bloom = {"model_type": "bloom", "vocab_size": 256, "hidden_size": 48, "n_layer": 2, "n_head": 6}
    per_seq = {}
    for seq in (32, 128):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(M, "MEASURE_SEQ", seq)
            per_seq[seq] = M.measure_at_width(bloom, torch.float32)["block"]
            mp.setattr(M, "flash_like_sdpa", M._REAL_SDPA)
            per_seq[seq, "math"] = M.measure_at_width(bloom, torch.float32)["block"]
    assert per_seq[128] == pytest.approx(per_seq[32], rel=1e-6)
    assert per_seq[128, "math"] > 1.5 * per_seq[32, "math"]


def test_measured_bytes_extrapolate_linearly():
    wide = {**LLAMA_13B, "hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16,
            "num_hidden_layers": 2}
    assert M.width_divisors(wide) == [16, 8]  # fitted from hidden 128 and 256
    fitted = M.measure_bytes_per_token(wide, "bf16")
    direct = M.measure_at_width(M.scaled_config(wide, 1), torch.bfloat16)  # the real width, measured
    assert fitted == pytest.approx(direct, rel=1e-6)
    per_h = M.measure_bytes_per_token(LLAMA_13B, "bf16")["block"] / 5120
    print(f"llama bf16: {per_h:.2f} bytes per token per hidden unit per block")
    assert 40 < per_h < 55  # 3 norms-worth of fp32/bf16 copies, q k v out, 4 SwiGLU intermediates


def test_activations_linear_in_tokens_checkpointing_and_in_flight():
    cfg = tiny_cfg(num_hidden_layers=6)

    def activ(**kw):
        return [st.activations for st in M.plan_memory(cfg, setup(**kw)).stages]

    base = activ()
    assert activ(micro_batch=2) == pytest.approx([2 * a for a in base])
    assert activ(seq=128) == pytest.approx([2 * a for a in base])
    assert all(c < a for c, a in zip(activ(grad_ckpt=True), base))
    plan = M.plan_memory(cfg, setup())
    assert [st.in_flight for st in plan.stages] == [3, 2, 1]
    assert [st.blocks for st in plan.stages] == [2, 2, 2]
    assert base[0] > base[1]  # same blocks, one more micro-batch in flight
    assert [st.in_flight for st in M.plan_memory(cfg, setup(micro_batches=1)).stages] == [1, 1, 1]
    # The full logits (bf16 + fp32 copy + fp32 grad) only on the last stage; the fused loss keeps only
    # d loss / d logits in bf16.
    fp32_logits_and_grad = 64 * cfg["vocab_size"] * (4 + 4)
    assert base[2] - activ(fused_head_loss=True)[2] == pytest.approx(fp32_logits_and_grad)


def test_optimizer_layouts_follow_deepspeed():
    cfg = tiny_cfg(num_hidden_layers=6)
    params = [res for _, res in M.resident_params(cfg, [3, 2, 3])]

    def stage0(**kw):
        return M.plan_memory(cfg, setup(**kw)).stages[0]

    adamw, lion = stage0(), stage0(optimizer="Lion", state_bytes=4)
    assert lion.optim < adamw.optim and adamw.optim - lion.optim == 4 * params[0]
    # BF16_Optimizer: bf16 weights + grads + bf16 accumulation buffer; fp32 master + moments over dp.
    assert (adamw.weights, adamw.grads, adamw.optim, adamw.step) == (2 * params[0], 4 * params[0],
                                                                     12 * params[0], 4 * params[0])
    zero1, zero1_dp2 = stage0(zero_stage=1), stage0(zero_stage=1, data=2)
    assert zero1_dp2.optim == zero1.optim / 2 and zero1_dp2.weights == zero1.weights
    fp16, fp16_dp2 = stage0(precision="fp16"), stage0(precision="fp16", data=2)
    assert fp16_dp2.optim == fp16.optim  # FP16_Optimizer does not shard without ZeRO
    offload = stage0(zero_stage=1, offload=True)
    assert offload.optim == 0 and offload.step == 0 and offload.host > adamw.optim
    assert offload.total < zero1.total
    assert stage0(grad_acc_fp32=True).grads == 6 * params[0]


def test_min_gpus_llama_13b_against_the_original_readme():
    s = setup(precision="fp16", pipe=1, parts="auto", micro_batches=64, seq=2048, grad_ckpt=True)
    plan = M.min_gpus(LLAMA_13B, s, gpu_gib=32)
    print(f"llama-13b fp16 AdamW ckpt seq 2048 on 32 GiB: {plan.gpus} GPUs (original README: 14)")
    assert 10 <= plan.gpus <= 21
    assert plan.fits and not M.plan_memory(LLAMA_13B, replace(s, pipe=plan.gpus - 1), 32).fits


def test_gpus_to_dims():
    assert M.gpus_to_dims(8, 2) == (4, 2)
    assert M.gpus_to_dims(6, 4) == (6, 1)


@pytest.fixture
def plan_config(tmp_path):
    model = tmp_path / "model"
    tiny_llama_config(num_hidden_layers=6).save_pretrained(model)
    cfg = {"model_path": str(model), "from_scratch": True, "save_path": str(tmp_path / "out"),
           "synthetic_data": True, "max_seq_len": 256,
           "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}, "parts": "auto"},
           "train_batch_size": 8, "train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "bf16": {"enabled": True}}
    path = tmp_path / "plan.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_prints_the_table(plan_config):
    res = run_cli("-m", "tools.memory", "--config", str(plan_config), "--max_seq_len=128",
                  "--train_micro_batch_size_per_gpu=2", "--gpu-gib", "24")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = lines[0].split()
    assert header[:9] == ["stage", "layers", "params", "weights", "grads", "optim", "activ", "step", "total"]
    assert "fits 24 GiB" in lines[0]
    assert [line.split()[0] for line in lines[1:3]] == ["0", "1"] and lines[3].startswith("all stages:")
    assert "micro-batch 2 x seq 128" in res.stdout and "bf16" in res.stdout
    earlier = run_cli("-m", "utils.memory", "--config", str(plan_config), "--max_seq_len=128",
                      "--train_micro_batch_size_per_gpu=2", "--gpu-gib", "24")  # the planner's earlier name
    assert earlier.returncode == 0 and earlier.stdout == res.stdout, earlier.stderr


def test_cli_json_gpus_and_min_gpus(plan_config, capsys):
    assert M.main(["--config", str(plan_config), "--gpus", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 4 and len(out["stages"]) == len(out["total_gib"]) == 4
    assert out["fits"] and sum(st["params"] for st in out["stages"]) == sum(M.layer_params(
        json.loads((plan_config.parent / "model" / "config.json").read_text())))
    assert M.main(["--config", str(plan_config), "--min-gpus", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["min_gpus"] == 1
    assert M.main(["--config", str(plan_config), "--zero_optimization.stage=2"]) == 2
    assert "ZeRO 0 and 1" in capsys.readouterr().err


LORA_ALL_LINEAR = {"r": 4, "alpha": 8.0, "dropout": 0.0, "modules_to_save": [], "quantize": None,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def test_lora_plan_counts_adapters_exactly_and_frozen_weights_only():
    """A tiny llama (hidden 64, GQA kv 32, intermediate 128, vocab 512, 6 blocks, parts [3, 2, 3]), LoRA r=4 on
    all seven linears: the trained parameters are r·(in + out) per linear, hand-computed; frozen parameters
    cost their bf16 weights only, adapters the BF16_Optimizer's full bytes; the plan is smaller than full
    fine-tuning. `modules_to_save: [lm_head]` trains the head in full on the last stage."""
    cfg = tiny_cfg(num_hidden_layers=6)
    h, inter, kv, vocab, r = 64, 128, 32, 512, 4
    per_block = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inter) + (inter + h))  # q, k+v, o, gate+up, down
    assert per_block == 4096
    base = [res for _, res in M.resident_params(cfg, [3, 2, 3])]
    trained = [2 * per_block, 2 * per_block, 2 * per_block]
    lora = setup(lora=LORA_ALL_LINEAR)
    assert [t for _, t in M.resident_params(cfg, [3, 2, 3], lora.lora, trained=True)] == trained
    assert [res for _, res in M.resident_params(cfg, [3, 2, 3], lora.lora)] == [b + t for b, t in zip(base, trained)]
    assert sum(M.layer_params(cfg, lora.lora, trained=True)) == 6 * per_block

    full_plan, lora_plan = M.plan_memory(cfg, setup()), M.plan_memory(cfg, lora)
    for st, b, t in zip(lora_plan.stages, base, trained):
        assert st.trained_params == t and st.resident_params == b + t
        # BF16_Optimizer, D = 1, AdamW: weights 2 for all; grads 2 + 2, master + moments 12, step 4 for adapters
        assert (st.weights, st.grads, st.optim, st.step, st.host) == (2 * (b + t), 4 * t, 12 * t, 4 * t, 0)
        assert st.total == st.weights + st.grads + st.optim + max(st.activations, st.step)
    for lo, full in zip(lora_plan.stages, full_plan.stages):
        assert lo.total < full.total and lo.grads < full.grads and lo.optim < full.optim
        assert full.trained_params == full.resident_params
        assert lo.activations == pytest.approx(full.activations, rel=0.5)  # adapters in place, same order
    assert "LoRA r=4 alpha=8 on q_proj" in M.format_plan(lora_plan)

    head = setup(lora={**LORA_ALL_LINEAR, "modules_to_save": ["lm_head"]})
    last = M.plan_memory(cfg, head).stages[2]
    assert last.trained_params == 2 * per_block + vocab * h and last.optim == 12 * last.trained_params
    zero1 = M.plan_memory(cfg, setup(lora=LORA_ALL_LINEAR, zero_stage=1, offload=True, data=2)).stages[1]
    assert zero1.optim == 0 and zero1.host == pytest.approx(trained[1] * (4 + 4 + 8 + 2 + 2) / 2)


def test_lora_plan_mixtral_experts_and_config_section(tmp_path):
    """Stacked experts: E·r·(in + out) per adapted expert weight. The config's `lora:` section reaches the
    plan (the planner reads config.json only: no weights needed)."""
    from models.mixtral import debug_config

    cfg = debug_config(num_hidden_layers=2)  # hidden 64, intermediate 96, 4 experts, heads 4 (kv 2 -> 32)
    lora = {**LORA_ALL_LINEAR, "target_modules": ["q_proj", "w1", "w2", "w3"]}
    per_block = 4 * (64 + 64) + 4 * 3 * 4 * (64 + 96)
    assert M.layer_params(cfg, lora, trained=True) == [0, per_block, per_block, 0]

    model = tmp_path / "model"
    tiny_llama_config(num_hidden_layers=6).save_pretrained(model)
    ycfg = {"model_path": str(model), "save_path": str(tmp_path / "out"), "synthetic_data": True, "max_seq_len": 64,
            "model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [3, 1]}, "parts": [3, 2, 3]},
            "train_batch_size": 8, "train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "bf16": {"enabled": True},
            "lora": {"r": 4, "alpha": 8, "target_modules": LORA_ALL_LINEAR["target_modules"]}}
    path = tmp_path / "plan.yml"
    path.write_text(yaml.safe_dump(ycfg))
    s = M.setup_from_config(M.load_config(str(path)))
    assert s.lora == {**LORA_ALL_LINEAR, "alpha": 8.0}
    del ycfg["lora"]
    path.write_text(yaml.safe_dump(ycfg))
    assert M.setup_from_config(M.load_config(str(path))).lora is None
    assert [st.trained_params for st in M.plan_memory(M.json.loads((model / "config.json").read_text()),
                                                      s).stages] == [8192, 8192, 8192]
