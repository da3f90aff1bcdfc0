"""The memory planner against a hand calculation, the real model's parameter count, and its refusal."""

from __future__ import annotations

import json

import pytest
import torch

from dataclasses import replace
from pathlib import Path

from moechat.train import plan
from moechat.config.params import TrainConfig, load_params
from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM
from moechat.train.memtrack import LiveStorages, step_peak_bytes

GIB = 1024**3
MODEL = MoeChatConfig(n_positions=4, n_embd=8, n_layer=2, n_head=2, n_inner=16, num_experts=2, num_experts_per_tok=1,
                      moe_every=2)
REFERENCE = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
VOCAB = 10


def reference_train(**kw) -> TrainConfig:
    return replace(REFERENCE.train, **kw)


def train_cfg(**kw) -> TrainConfig:
    base = dict(seq_len=4, micro_batch_size=2, precision="bf16", optimizer="adamw", gradient_checkpointing=False,
                gpu_memory_gb=16.0)
    return replace(REFERENCE.train, **{**base, **kw})


def test_parameter_count_by_hand_and_by_the_model():
    # wte 10*8 + wpe 4*8 = 112; attn 8*24+24 + 8*8+8 = 288; mlp 8*16+16 + 16*8+8 = 280; two LayerNorms 32;
    # block 0 dense 600, block 1 MoE 288+32+router 16+2*280 = 896; ln_f 16; lm_head 80  -> 1704
    pc = plan.count_params(MODEL, VOCAB)
    assert (pc.total, pc.embedding, pc.lm_head) == (1704, 112, 80)
    model = MoeChatForCausalLM(MoeChatConfig(vocab_size=VOCAB, n_positions=4, n_embd=8, n_layer=2, n_head=2,
                                             n_inner=16, num_experts=2, num_experts_per_tok=1, moe_every=2))
    assert model.parameter_counts()["total"] == pc.total
    ref = REFERENCE.model.architecture  # the reference config: 50257 GPT-2 ids + 3 chat tokens
    with torch.device("meta"):
        big = MoeChatForCausalLM(MoeChatConfig(vocab_size=50260, n_positions=1024, n_embd=1024, n_layer=8,
                                               n_head=16, n_inner=4096, num_experts=10, num_experts_per_tok=2,
                                               moe_every=2))
    assert big.parameter_counts()["total"] == plan.count_params(ref, 50260).total == 506_968_064


@pytest.fixture
def no_headroom(monkeypatch):
    """The byte-exact tests below check the allocator's sum; the headroom has its own test."""
    monkeypatch.setattr(plan, "CUDA_CONTEXT_GB", 0.0)
    monkeypatch.setattr(plan, "FRAGMENTATION", 0.0)


def test_estimate_matches_a_hand_calculation(no_headroom):
    p = plan.estimate(MODEL, train_cfg(), VOCAB)  # attn auto on CUDA: flex_attention, no [T, T] mask
    # bytes: weights 4*1704, grads 4*1704, AdamW 8*1704; bf16 casts 2 * the blocks' linears without routers:
    # attention 2 * (4*64 + 32) + dense MLP 280 = 856, experts' c_fc 2 * 144, c_proj 2 * 136 -> 2 * 1416
    # activations per token: attention 4d + 7*2d + 4*2 heads = 152; dense MLP 4d + 2d + 2*16 = 80 (the
    # GELU output is recomputed); MoE MLP 4d + 4d + 12*2 experts + 12*1 + top1*(16 + 2*2 + 2d + 2*16 + 4 + 2
    # + 2d) = 190; around the stack 8 + 8 + 4d + 4d = 80  -> 80 + 232 + 342 = 654 B/token, 8 tokens
    # lm_head: bf16 cast + fp32 grad accumulator 10*8*(2+4); backward: the larger of the loss phase, one chunk
    # (8 tokens) * 10 * (4+4: fp32 logits and softmax) + the fp32 hidden gradient 8 * 4d = 896, and the MoE
    # block's gradient buffers 8 * top1 * (2*2*16 + 2*8) + 256 = 896
    expected = {"weights_gb": 6816, "grads_gb": 6816, "optimizer_gb": 13632, "casts_gb": 2832,
                "activations_gb": 5232, "logits_gb": 480, "backward_gb": 896}
    for key, value in expected.items():
        assert getattr(p, key) * GIB == pytest.approx(value), key
    assert p.total_gb * GIB == pytest.approx(36704) and p.allocated_gb == pytest.approx(p.total_gb)
    ckpt = plan.estimate(MODEL, train_cfg(gradient_checkpointing=True), VOCAB)
    assert ckpt.activations_gb * GIB == pytest.approx(8 * (80 + 2 * 32))  # around the stack + block inputs
    # the recomputed MoE block (342 B/token) and its c_fc stack (2 * 144) join its gradient buffers; the c_proj
    # stack stays through the step (held by the GELU recomputation), the c_fc stack does not
    assert ckpt.backward_gb * GIB == pytest.approx(896 + 8 * 342 + 2 * 288)
    assert ckpt.casts_gb * GIB == pytest.approx(2 * (856 + 272))
    bnb = plan.estimate(MODEL, train_cfg(optimizer="adamw_8bit"), VOCAB)
    # 32-bit moments for wte + wpe (112) and lm_head (80); uint8 moments and fp32 block absmax for the rest
    assert bnb.optimizer_gb * GIB == pytest.approx(8 * 192 + 2 * (1704 - 192) + 8 * (1704 - 192) / 256)
    fp32 = plan.estimate(MODEL, train_cfg(precision="fp32"), VOCAB)
    # no autocast casts; the experts' weights are still stacked (copied) each forward: 4 * (288 + 272)
    assert fp32.casts_gb * GIB == pytest.approx(4 * 560) and fp32.logits_gb * GIB == pytest.approx(10 * 8 * 4)
    assert fp32.backward_gb * GIB == pytest.approx(8 * (2 * 4 * 16 + 4 * 8) + 256)  # the block's > the loss's
    sdpa = plan.estimate(MODEL, train_cfg(attn_implementation="sdpa"), VOCAB)
    assert (sdpa.activations_gb - p.activations_gb) * GIB == pytest.approx(2 * 2 * 4 * 4 * 2)  # L x B x T x T x 2 B


def test_headroom_reserves_the_cuda_context_and_fragmentation():
    p = plan.estimate(MODEL, train_cfg(), VOCAB)
    assert p.headroom_gb == pytest.approx(plan.CUDA_CONTEXT_GB + plan.FRAGMENTATION * p.allocated_gb)
    assert p.total_gb == pytest.approx(p.allocated_gb + p.headroom_gb)
    assert not plan.estimate(MODEL, train_cfg(gpu_memory_gb=p.allocated_gb * 1.05), VOCAB).fits


def test_refuses_over_budget_and_suggests_the_largest_micro_batch(no_headroom):
    # fixed 30576 B + 3064 B per micro-batch (654*4 activations + the loss phase's 448): 36000 B fits
    # micro-batch 1 only
    cfg = train_cfg(gpu_memory_gb=36000 / GIB)
    assert plan.largest_micro_batch(MODEL, cfg, VOCAB) == 1
    with pytest.raises(plan.MemoryBudgetError, match=r"set train.micro_batch_size: 1 \(the largest that fits"):
        plan.check(MODEL, cfg, VOCAB)
    assert plan.check(MODEL, train_cfg(gpu_memory_gb=37712 / GIB), VOCAB).fits
    hopeless = train_cfg(gpu_memory_gb=1000 / GIB)
    with pytest.raises(plan.MemoryBudgetError, match="even micro-batch 1 does not fit: set "
                                                     "train.gradient_checkpointing: true, lower train.seq_len"):
        plan.check(MODEL, hopeless, VOCAB)


def test_fastest_fitting_prefers_no_checkpointing_then_the_largest_micro_batch(no_headroom):
    ample = plan.fastest_fitting(MODEL, train_cfg(micro_batch_size=2, grad_accum=2, gradient_checkpointing=True),
                                 VOCAB)
    assert (ample.micro_batch_size, ample.grad_accum, ample.gradient_checkpointing) == (4, 1, False)
    # micro-batch 1 fits without checkpointing, micro-batch 2 only with it: no checkpointing wins
    tight = train_cfg(micro_batch_size=2, grad_accum=2, gpu_memory_gb=36000 / GIB)
    assert not plan.estimate(MODEL, tight, VOCAB, 2).fits
    best = plan.fastest_fitting(MODEL, tight, VOCAB)
    assert (best.micro_batch_size, best.grad_accum, best.gradient_checkpointing) == (1, 4, False)
    assert plan.fastest_fitting(MODEL, train_cfg(gpu_memory_gb=1000 / GIB), VOCAB) is None


def test_activation_term_within_ten_percent_of_measured_saved_tensors():
    """Saved-for-backward bytes per token, measured with autograd's saved-tensor hooks on the real model at
    a scaled config (fp32 and bf16 autocast, checkpointing off and on), against the planner's term. With
    checkpointing the hooks see the stored block inputs; the one recomputed block is the off case's."""
    cfg = MoeChatConfig(n_positions=128, n_embd=64, n_layer=4, n_head=4, n_inner=256, num_experts=4,
                        num_experts_per_tok=2, moe_every=2)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MoeChatForCausalLM(MoeChatConfig(vocab_size=128, n_positions=128, n_embd=64, n_layer=4, n_head=4,
                                                 n_inner=256, num_experts=4, num_experts_per_tok=2, moe_every=2,
                                                 pad_token_id=None)).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for precision in ("fp32", "bf16"):
            measured = (saved_bytes(model, 2, 64, precision) - saved_bytes(model, 2, 32, precision)) / 64
            planned = plan.activation_bytes_per_token(cfg, precision, checkpointing)
            if checkpointing:
                one_block = plan.activation_bytes_per_token(replace(cfg, n_layer=2, moe_every=2), precision, False) \
                    - plan.activation_bytes_per_token(replace(cfg, n_layer=1, moe_every=2), precision, False)
                planned -= one_block  # the MoE block (the larger) recomputed during backward
            assert planned == pytest.approx(measured, rel=0.10), (checkpointing, precision, planned, measured)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_planner_within_ten_percent_of_a_measured_step_peak(precision, checkpointing):
    """The whole estimate against the peak of live tensor storages (moechat.train.memtrack: counted by torch, not
    read from the host allocator, so the same on any machine) in the second micro-batch of an accumulation
    step (weights, gradients and AdamW state exist, as on a GPU). A scaled model (vocab / width 64, like the
    reference's 49) on packed rows through sdpa: the per-layer float mask and two loss chunks are in it.
    Without checkpointing the peak falls in the loss, with it in the loss or a recomputed block."""
    vocab, batch, seq = 4096, 3, 384
    cfg = MoeChatConfig(vocab_size=vocab, n_positions=seq, n_embd=64, n_layer=4, n_head=4, n_inner=256,
                        num_experts=4, num_experts_per_tok=2, moe_every=2, pad_token_id=None)
    torch.manual_seed(0)
    model = MoeChatForCausalLM(cfg).train()
    model.set_attn_implementation("sdpa")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    packed = (torch.arange(seq) % (seq // 2)).expand(batch, seq).contiguous()  # two documents a row
    batch_ = {"input_ids": ids, "labels": ids, "position_ids": packed}
    measured = step_peak_bytes(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch_, precision)
    train = train_cfg(seq_len=seq, micro_batch_size=batch, precision=precision, gradient_checkpointing=checkpointing,
                      attn_implementation="sdpa")
    planned = plan.estimate(cfg, train, vocab, device_type="cpu")
    assert planned.allocated_gb * GIB == pytest.approx(measured, rel=0.10), (planned, measured / GIB)


def test_step_peak_is_the_same_every_run():
    """The measurement itself: storages counted by torch give the same bytes run after run."""
    cfg = MoeChatConfig(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64, num_experts=2,
                        num_experts_per_tok=1, moe_every=2, pad_token_id=None)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    peaks = []
    for _ in range(3):
        torch.manual_seed(0)
        model = MoeChatForCausalLM(cfg).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        peaks.append(step_peak_bytes(model, optimizer, {"input_ids": ids, "labels": ids}, "fp32"))
    assert len(set(peaks)) == 1, peaks


def test_live_storages_counts_views_once_and_frees():
    with LiveStorages() as m:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:]
        b = a * 2  # 4000 more
        del b
        c = torch.ones(10)
    assert (m.peak, m.live) == (8000, 4040)
    del view, c


def test_each_attention_backend_is_counted():
    """sdpa keeps a float [B, 1, T, T] mask per layer (the boolean one with checkpointing); the kernels that
    skip masked tiles keep none; `auto` is flex_attention on CUDA and sdpa on CPU."""
    ref = REFERENCE.model.architecture
    base = reference_train(precision="bf16", micro_batch_size=16, gradient_checkpointing=False)
    sdpa = plan.estimate(ref, replace(base, attn_implementation="sdpa"), 50260)
    flex = plan.estimate(ref, replace(base, attn_implementation="flex_attention"), 50260)
    flash = plan.estimate(ref, replace(base, attn_implementation="flash_attention_2"), 50260)
    assert (sdpa.activations_gb - flex.activations_gb) * GIB == 8 * 16 * 1024 * 1024 * 2  # 0.25 GiB
    assert flash.allocated_gb == flex.allocated_gb
    assert plan.estimate(ref, base, 50260).attention == "flex_attention"
    assert plan.estimate(ref, base, 50260, device_type="cpu").attention == "sdpa"
    ckpt = replace(base, gradient_checkpointing=True)
    ckpt_gap = plan.estimate(ref, replace(ckpt, attn_implementation="sdpa"), 50260).activations_gb \
        - plan.estimate(ref, replace(ckpt, attn_implementation="flex_attention"), 50260).activations_gb
    assert ckpt_gap * GIB == 16 * 1024 * 1024  # the boolean mask, an input of every checkpointed block


def test_deepspeed_zero2_terms():
    """ZeRO-2 (bf16): a 16-bit module, two reduce buckets of 5e8 elements, fp32 master weights, gradient
    partition and optimizer state over W GPUs; offload moves those three to the host."""
    p = plan.count_params(MODEL, VOCAB).total
    zero = plan.estimate(MODEL, train_cfg(deepspeed="zero2"), VOCAB, world_size=4)
    assert zero.weights_gb * GIB == 2 * p
    assert zero.grads_gb * GIB == pytest.approx(2 * 5e8 * 2 + 4 * p / 4)
    assert zero.optimizer_gb * GIB == pytest.approx((4 * p + 8 * p) / 4)
    off = plan.estimate(MODEL, train_cfg(deepspeed="zero2_offload"), VOCAB, world_size=4)
    assert off.optimizer_gb == 0 and off.grads_gb * GIB == pytest.approx(2 * 5e8 * 2)
    plain = plan.estimate(MODEL, train_cfg(), VOCAB)
    assert zero.casts_gb < plain.casts_gb  # a 16-bit module needs no autocast copies; the expert stacks stay


def saved_bytes(model: torch.nn.Module, batch: int, seq: int, precision: str) -> int:
    """Bytes of distinct storages autograd saves for backward in one training forward with labels."""
    storages: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    ids = torch.randint(0, 120, (batch, seq), generator=torch.Generator().manual_seed(seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(ids, labels=ids)
    return sum(storages.values())




def test_reference_config_at_micro_batch_8():
    """Micro-batch 8 x 1024, bf16, 8-bit AdamW: allocated <= 8 GiB with checkpointing, <= 10 GiB without
    (the chunked loss holds no logits, backward recomputes the GELUs); the headroom comes on top."""
    ref = REFERENCE.model.architecture
    with_ckpt = plan.estimate(ref, reference_train(precision="bf16", micro_batch_size=8, gradient_checkpointing=True),
                              50260)
    without = plan.estimate(ref, reference_train(precision="bf16", micro_batch_size=8, gradient_checkpointing=False),
                            50260)
    assert with_ckpt.allocated_gb <= 8 and without.allocated_gb <= 10
    assert without.fits and without.total_gb == pytest.approx(without.allocated_gb * 1.1 + plan.CUDA_CONTEXT_GB)


def test_preflight_refuses_on_a_simulated_16_gib_gpu():
    ref = REFERENCE.model.architecture
    big = reference_train(precision="bf16", micro_batch_size=96, gradient_checkpointing=True)
    sixteen = 16 * GIB
    with pytest.raises(plan.MemoryBudgetError, match=r"> train.gpu_memory_gb=16 .*set train.micro_batch_size: 60"):
        plan.preflight(ref, big, 50260, 1, "cuda", sixteen)
    assert plan.preflight(ref, reference_train(precision="bf16"), 50260, 1, "cuda", sixteen).fits
    # params promise 80 GiB, the device has 16: the device's memory is the budget
    with pytest.raises(plan.MemoryBudgetError, match=r"this GPU's 16.00 GiB \(less than train.gpu_memory_gb=80\)"):
        plan.preflight(ref, reference_train(precision="bf16", micro_batch_size=96, gpu_memory_gb=80), 50260, 1, "cuda",
                       sixteen)
    with pytest.raises(plan.MemoryBudgetError, match=r"> train.gpu_memory_gb=16 "):  # a bigger GPU: params rule
        plan.preflight(ref, big, 50260, 1, "cuda", 80 * GIB)
    assert plan.preflight(ref, big, 50260, 1, "cpu", None) is None  # no GPU budget on CPU


# ----------------------------------------------------------------------------------------------------
# Run size


def test_flops_per_token_from_the_config_equals_the_models_own_count():
    cfg = MoeChatConfig(n_positions=16, n_embd=8, n_layer=4, n_head=2, n_inner=16, num_experts=4, num_experts_per_tok=2,
                        moe_every=2)
    model = MoeChatForCausalLM(MoeChatConfig(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=4, n_head=2,
                                             n_inner=16, num_experts=4, num_experts_per_tok=2, moe_every=2))
    assert plan.flops_per_token(cfg, VOCAB, 16) == model.flops_per_token(16)


def test_run_size_is_measured_from_prepare_json_when_it_matches(tmp_path):
    from moechat.config.params import load_params

    params = load_params("params.yaml")
    metrics = tmp_path / "prepare.json"
    metrics.write_text(json.dumps({"seq_len": 1024, "thread_policy": params.data.thread_policy,
                                   "train": {"tokens": 3_000_000, "blocks": 3200}}))
    data = plan.data_size(params.data, 1024, metrics)
    assert data == plan.DataSize(3_000_000, 3200, str(metrics))
    run = plan.run_size(params.model.architecture, params.train, 50260, data, mfu=0.5, peak_flops=1e14)
    assert (run.steps_per_epoch, run.total_steps, run.warmup_steps) == (100, 200, 10)
    assert run.tokens_per_run == 200 * 32 * 1024
    assert run.seconds == pytest.approx(run.tokens_per_run * run.flops_per_token / 5e13)
    other_policy = {"best": "all", "all": "best"}[params.data.thread_policy]
    metrics.write_text(json.dumps({"seq_len": 1024, "thread_policy": other_policy, "train": {"tokens": 1, "blocks": 1}}))
    assert plan.data_size(params.data, 1024, metrics).source.startswith("estimate")  # stale file: not used




def test_optimizer_term_is_the_8bit_state_bytes_after_one_step():
    """The planner's adamw_8bit term against the bytes bitsandbytes actually allocates after a step: uint8
    moments and absmax blocks for the matrices, 32-bit moments for wte, wpe and lm_head (qmaps excluded:
    a few KiB shared by every parameter)."""
    from moechat.train.optim import build_optimizer

    config = MoeChatConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=256,
                           num_experts=4, num_experts_per_tok=2, moe_every=2)
    torch.manual_seed(0)
    model = MoeChatForCausalLM(config)
    optimizer = build_optimizer(model, train_cfg(optimizer="adamw_8bit"), offload=False)
    x = torch.randint(0, 512, (2, 16))
    model(x, labels=x).loss.backward()
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for state in optimizer.state.values() for name, t in state.items()
                   if torch.is_tensor(t) and not name.startswith("qmap") and t.numel() > 1)
    planned = plan.estimate(config, train_cfg(optimizer="adamw_8bit"), 512).optimizer_gb * GIB
    assert planned == pytest.approx(measured, rel=0.10)


def test_loss_chunk_is_the_models():
    """plan.py keeps its own copy (it must not import torch for `moechat plan`); they must agree."""
    from moechat.model.modeling_moechat import LOSS_CHUNK_TOKENS

    assert plan.LOSS_CHUNK_TOKENS == LOSS_CHUNK_TOKENS


