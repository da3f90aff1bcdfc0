"""The memory planner against a hand calculation, the real model's parameter count, and its refusal."""

from __future__ import annotations

import json

import pytest
import torch

from moechat import plan
from moechat.config import ModelConfig, TrainConfig
from moechat.modeling import MoeChatConfig, MoeChatForCausalLM

GIB = 1024**3
MODEL = ModelConfig(n_positions=4, n_embd=8, n_layer=2, n_head=2, n_inner=16, num_experts=2, top_k=1, moe_every=2)
VOCAB = 10


def train_cfg(**kw) -> TrainConfig:
    base = dict(seq_len=4, micro_batch_size=2, precision="bf16", optimizer="adamw", gradient_checkpointing=False,
                gpu_memory_gb=16.0)
    return TrainConfig(**{**base, **kw})


def test_parameter_count_by_hand_and_by_the_model():
    # wte 10*8 + wpe 4*8 = 112; attn 8*24+24 + 8*8+8 = 288; mlp 8*16+16 + 16*8+8 = 280; two LayerNorms 32;
    # block 0 dense 600, block 1 MoE 288+32+router 16+2*280 = 896; ln_f 16; lm_head 80  -> 1704
    pc = plan.count_params(MODEL, VOCAB)
    assert (pc.total, pc.embedding, pc.lm_head) == (1704, 112, 80)
    model = MoeChatForCausalLM(MoeChatConfig(vocab_size=VOCAB, n_positions=4, n_embd=8, n_layer=2, n_head=2,
                                             n_inner=16, num_experts=2, num_experts_per_tok=1, moe_every=2))
    assert model.parameter_counts()["total"] == pc.total
    ref = ModelConfig()  # the reference config: 50257 GPT-2 ids + 3 chat tokens
    with torch.device("meta"):
        big = MoeChatForCausalLM(MoeChatConfig(vocab_size=50260, n_positions=1024, n_embd=1024, n_layer=8,
                                               n_head=16, n_inner=4096, num_experts=10, num_experts_per_tok=2,
                                               moe_every=2))
    assert big.parameter_counts()["total"] == plan.count_params(ref, 50260).total == 506_968_064


def test_estimate_matches_a_hand_calculation():
    p = plan.estimate(MODEL, train_cfg(), VOCAB)
    # bytes: weights 4*1704, grads 4*1704, AdamW 8*1704, bf16 casts 2*(1704-112)
    # activations per token: attention 4d+4d+2d+3*2d+2d = 144; dense MLP 4d+4d+2d+2*2*16 = 144;
    # MoE MLP 4d+4d + top1*(2d + 2*2*16 + 2d) + 16 = 176  -> 288 + 320 = 608 B/token, 8 tokens
    # logits 8 tokens * 10 * 2 (bf16); loss 8 tokens * 10 * (4 saved log-softmax + 4 + 4 fp32 grads)
    expected = {"weights_gb": 6816, "grads_gb": 6816, "optimizer_gb": 13632, "casts_gb": 3184,
                "activations_gb": 4864, "logits_gb": 160, "loss_gb": 960}
    for key, value in expected.items():
        assert getattr(p, key) * GIB == pytest.approx(value), key
    assert p.total_gb * GIB == pytest.approx(36432)
    ckpt = plan.estimate(MODEL, train_cfg(gradient_checkpointing=True), VOCAB)
    assert ckpt.activations_gb * GIB == pytest.approx(8 * (2 * 32 + 320))  # block inputs + one MoE block
    bnb = plan.estimate(MODEL, train_cfg(optimizer="adamw_8bit"), VOCAB)
    assert bnb.optimizer_gb * GIB == pytest.approx(2 * 1704 + 8 * 1704 / 256)
    fp32 = plan.estimate(MODEL, train_cfg(precision="fp32"), VOCAB)
    assert fp32.casts_gb == 0 and fp32.logits_gb * GIB == pytest.approx(8 * 10 * 4)
    assert fp32.loss_gb * GIB == pytest.approx(8 * 10 * 12)
    zero = plan.estimate(MODEL, train_cfg(deepspeed="zero2"), VOCAB, world_size=4)
    assert zero.grads_gb * GIB == pytest.approx(6816 / 4) and zero.optimizer_gb * GIB == pytest.approx(13632 / 4)
    off = plan.estimate(MODEL, train_cfg(deepspeed="zero2_offload"), VOCAB)
    assert off.optimizer_gb == 0


def test_refuses_over_budget_and_suggests_the_largest_micro_batch():
    # fixed 30448 B + 2992 B per micro-batch (608*4 activations + 4*10*14 logits and loss): 36000 B fits
    # micro-batch 1 only
    cfg = train_cfg(gpu_memory_gb=36000 / GIB)
    assert plan.largest_micro_batch(MODEL, cfg, VOCAB) == 1
    with pytest.raises(plan.MemoryBudgetError, match=r"set train.micro_batch_size: 1 \(the largest that fits"):
        plan.check(MODEL, cfg, VOCAB)
    assert plan.check(MODEL, train_cfg(gpu_memory_gb=36432 / GIB), VOCAB).fits
    hopeless = train_cfg(gpu_memory_gb=1000 / GIB)
    with pytest.raises(plan.MemoryBudgetError, match="even micro-batch 1 does not fit: set "
                                                     "train.gradient_checkpointing: true, lower train.seq_len"):
        plan.check(MODEL, hopeless, VOCAB)


def test_cli_reports_the_reference_config(capsys, tmp_path):
    assert plan.main(["--params", "params.yaml", "--tokenizer", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 506_968_064 and out["fits"] and out["micro_batch_size"] == 4
    assert out["largest_micro_batch"] >= 4
    assert plan.main(["--params", "params.yaml", "--tokenizer", str(tmp_path), "--micro-batch", "64"]) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT in 16 GiB" in text and f"largest micro-batch that fits: {out['largest_micro_batch']}" in text


def test_loss_term_is_what_lm_loss_saves_for_backward():
    """The model's own loss keeps one fp32 log-softmax of targets x vocab for backward (4 B each, the planner's
    first 4 of LOSS_BYTES_PER_LOGIT); neither the bf16 logits' copy nor their fp32 upcast is saved."""
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    saved: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        MoeChatForCausalLM.lm_loss(logits[:, :-1], labels[:, 1:])  # the shifted pairs, as forward passes them
    # besides scalars (the target count): exactly one fp32 tensor of (B*(T-1)) x V
    floating = [(dtype, n) for dtype, n in saved.values() if dtype.is_floating_point and n > 8]
    assert floating == [(torch.float32, B * (T - 1) * V * 4)]
    assert plan.LOSS_BYTES_PER_LOGIT == 12


def test_reference_config_loss_term():
    # cross_entropy's fp32 log-softmax at micro-batch 4 x 1024 x 50260: ~0.77 GiB of the 2.30 GiB loss term
    p = plan.estimate(ModelConfig(), TrainConfig(precision="bf16"), 50260)
    assert 4 * 1024 * 50260 * 4 / GIB == pytest.approx(0.767, abs=1e-3)
    assert p.loss_gb == pytest.approx(3 * 4 * 1024 * 50260 * 4 / GIB)
    assert p.logits_gb == pytest.approx(4 * 1024 * 50260 * 2 / GIB)


def test_preflight_refuses_on_a_simulated_16_gib_gpu():
    ref, big = ModelConfig(), TrainConfig(precision="bf16", micro_batch_size=32)
    sixteen = 16 * GIB
    with pytest.raises(plan.MemoryBudgetError, match=r"> train.gpu_memory_gb=16 .*set train.micro_batch_size: 13"):
        plan.preflight(ref, big, 50260, 1, "cuda", sixteen)
    assert plan.preflight(ref, TrainConfig(precision="bf16"), 50260, 1, "cuda", sixteen).fits
    # params promise 80 GiB, the device has 16: the device's memory is the budget
    with pytest.raises(plan.MemoryBudgetError, match=r"this GPU's 16.00 GiB \(less than train.gpu_memory_gb=80\)"):
        plan.preflight(ref, TrainConfig(precision="bf16", micro_batch_size=32, gpu_memory_gb=80), 50260, 1, "cuda",
                       sixteen)
    with pytest.raises(plan.MemoryBudgetError, match=r"> train.gpu_memory_gb=16 "):  # a bigger GPU: params rule
        plan.preflight(ref, big, 50260, 1, "cuda", 80 * GIB)
    assert plan.preflight(ref, big, 50260, 1, "cpu", None) is None  # no GPU budget on CPU


# ----------------------------------------------------------------------------------------------------
# Run size


def test_flops_per_token_from_the_config_equals_the_models_own_count():
    cfg = ModelConfig(n_positions=16, n_embd=8, n_layer=4, n_head=2, n_inner=16, num_experts=4, top_k=2, moe_every=2)
    model = MoeChatForCausalLM(MoeChatConfig(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=4, n_head=2,
                                             n_inner=16, num_experts=4, num_experts_per_tok=2, moe_every=2))
    assert plan.flops_per_token(cfg, VOCAB, 16) == model.flops_per_token(16)


def test_run_size_is_measured_from_prepare_json_when_it_matches(tmp_path):
    from moechat.config import load_params

    params = load_params("params.yaml")
    metrics = tmp_path / "prepare.json"
    metrics.write_text(json.dumps({"seq_len": 1024, "thread_policy": params.data.thread_policy,
                                   "train": {"tokens": 3_000_000, "blocks": 3200}}))
    data = plan.data_size(params.data, 1024, metrics)
    assert data == plan.DataSize(3_000_000, 3200, str(metrics))
    run = plan.run_size(params.model, params.train, 50260, data, mfu=0.5, peak_flops=1e14)
    assert (run.steps_per_epoch, run.total_steps, run.warmup_steps) == (100, 200, 10)
    assert run.tokens_per_run == 200 * 32 * 1024
    assert run.seconds == pytest.approx(run.tokens_per_run * run.flops_per_token / 5e13)
    other_policy = {"best": "all", "all": "best"}[params.data.thread_policy]
    metrics.write_text(json.dumps({"seq_len": 1024, "thread_policy": other_policy, "train": {"tokens": 1, "blocks": 1}}))
    assert plan.data_size(params.data, 1024, metrics).source.startswith("estimate")  # stale file: not used


def test_cli_prints_tokens_steps_warmup_and_time_beside_the_memory(capsys, tmp_path):
    assert plan.main(["--params", "params.yaml", "--tokenizer", str(tmp_path),
                      "--prepare-metrics", str(tmp_path / "absent.json")]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "fits in 16 GiB" in text
    assert "7.14M train tokens per epoch in 7,264 blocks [estimate (English OASST1, thread_policy all" in text
    assert "optimizer steps 454 (227 per epoch), warmup 22" in text
    assert "min at 30% MFU (assumed) of 44.1 TFLOP/s per GPU" in text
    assert plan.main(["--params", "params.yaml", "--tokenizer", str(tmp_path), "--json",
                      "--prepare-metrics", str(tmp_path / "absent.json")]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run["total_steps"] == 454 and run["warmup_steps"] == 22
