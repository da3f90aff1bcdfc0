"""The memory planner: peak GPU memory of a training config, estimated before anything is allocated.

Torch-free (the `moechat plan` command, moechat.cli.plan, imports it without torch); training runs the same
estimate as its pre-flight check.

The estimate adds up what a training step keeps alive at its peak, in bytes (a = 2 under bf16/fp16 autocast,
4 in fp32), term by term as the code keeps it; tests/train/test_plan.py holds the sum within 10% of the live
storages of a measured step (moechat.train.memtrack) in all four precision x checkpointing modes:
  weights      4 B/param (fp32 master weights; autocast computes in bf16/fp16)
  grads        4 B/param (fp32, like the weights)
  optimizer    adamw: 8 B/param (two fp32 moments); adamw_8bit: 2 B/param (two uint8 moments) plus one
               fp32 absmax per 256-value block and moment (bitsandbytes blockwise quantisation), except
               wte, wpe and lm_head, which keep 32-bit state (8 B/param; train.keep_embeddings_in_32bit)
               unless ZeRO-2 flattens them into its partitions
  casts        autocast's a-byte copies of the blocks' matmul weights, kept for backward, and the MoE
               layers' per-forward stacks of their experts' weights (a copy in fp32 too) (`cast_bytes`)
  activations  per token, the tensors autograd saves for backward (`activation_bytes_per_token`), plus the
               attention mask where the backend keeps one (`mask_bytes`: sdpa's float [B, 1, T, T] per layer)
  logits       none held: the chunked loss keeps a compute-dtype copy of lm_head's weight and an fp32
               gradient accumulator for it: vocab x d x (a + 4) B (a = 0 in fp32: the weight itself)
  backward     the larger of the loss phase and one block's backward (`backward_bytes`); they never coexist
DeepSpeed ZeRO-2 (`state_bytes`): a 16-bit module, two reduce buckets, and fp32 master weights, gradient
partition and optimizer state divided over the W GPUs (zero2_offload keeps those three in host memory).

On CPU (`device_type="cpu"`, `--device cpu`) the same sum is host memory held by the step's tensors. On CUDA,
headroom: the sum is what PyTorch's allocator hands out. A card also holds the CUDA context and kernels
outside the allocator, and the caching allocator's blocks are never packed perfectly, so a plan fits when
allocated x (1 + FRAGMENTATION) + CUDA_CONTEXT_GB <= the budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from moechat.errors import MoechatError
from moechat.config.params import DataConfig, TrainConfig
from moechat.model.size import ParamCount, count_params
from moechat.train.schedule import build_schedule

if TYPE_CHECKING:
    from moechat.model.configuration_moechat import MoeChatConfig

GIB = 1024**3
CHAT_TOKENS = 3  # <|im_start|>, <|im_end|>, <|pad|> added to the base tokenizer
BNB_BLOCK = 256  # bitsandbytes 8-bit optimizer block size (one fp32 absmax per block and moment)
# Reserves beyond what the allocator reports. Not measured here (no GPU): the CUDA context with cuBLAS and
# kernels takes a few hundred MiB on current drivers, and the caching allocator's block rounding and
# split blocks typically cost 5-10% of allocated memory; we reserve the high ends.
CUDA_CONTEXT_GB = 0.75
FRAGMENTATION = 0.10
LOSS_CHUNK_TOKENS = 1024  # modeling_moechat.LOSS_CHUNK_TOKENS (tests/train/test_plan.py holds them equal)




@dataclass(frozen=True)
class MemoryPlan:
    micro_batch_size: int
    seq_len: int
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    params: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    casts_gb: float
    activations_gb: float
    logits_gb: float
    backward_gb: float
    allocated_gb: float  # the sum of the terms above: what torch.cuda.max_memory_allocated would show
    headroom_gb: float  # CUDA context + fragmentation reserve
    total_gb: float  # allocated + headroom: what must fit the card
    budget_gb: float
    attention: str = "sdpa"  # the attention backend counted (planned_attention)
    device_type: str = "cuda"  # cpu: host memory, no CUDA context or GPU budget

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.budget_gb




def compute_bytes(precision: str) -> int:
    """Bytes per activation element: 4 in fp32, 2 under bf16/fp16 autocast (`auto` assumes a GPU: 2)."""
    return 4 if precision == "fp32" else 2


def planned_attention(requested: str, device_type: str) -> str:
    """The attention backend a config trains through (moechat.train.backends.resolve_attention without the
    installed-package check): `auto` is a kernel that skips masked tiles on CUDA (flex_attention, or
    flash_attention_2 where installed: neither holds a [T, T] mask) and sdpa elsewhere."""
    if requested != "auto":
        return requested
    return "flex_attention" if device_type == "cuda" else "sdpa"


def mask_bytes(attention: str, batch: int, seq: int, a: int, n_layer: int, checkpointing: bool
               ) -> tuple[float, float]:
    """(kept through the step, extra while one checkpointed block is recomputed) for packed rows' mask.

    sdpa receives transformers' boolean document mask [B, 1, T, T] and turns it into an additive float mask
    in the compute dtype that every layer keeps for backward. With checkpointing no layer keeps one, but the
    boolean mask is an input of every checkpointed block (kept for the recomputation), and the recomputed
    block builds its float mask again. flex_attention's block mask is [B, 1, T/128, T/128] block indices and
    flash_attention_2 takes sequence lengths: no [T, T] term."""
    if attention not in ("sdpa", "eager"):
        return 0.0, 0.0
    square = batch * seq * seq
    if checkpointing:
        return float(square), float(square * a)
    return float(n_layer * square * a), 0.0


def linear_params(model: MoeChatConfig) -> tuple[int, int, int]:
    """Parameters of the blocks' matmuls: (attention and dense MLP linears, the experts' c_fc, the experts'
    c_proj), weights and biases. The routers run in fp32 (no cast) and are left out."""
    d, f, e = model.n_embd, model.n_inner, model.num_experts
    n_moe = len(model.moe_layer_indices())
    plain = model.n_layer * (4 * d * d + 4 * d) + (model.n_layer - n_moe) * (2 * d * f + f + d)
    return plain, n_moe * e * (d * f + f), n_moe * e * (f * d + d)


def cast_bytes(model: MoeChatConfig, precision: str, checkpointing: bool, sixteen_bit_module: bool
               ) -> tuple[float, float]:
    """(kept through the step, extra while one checkpointed MoE block is recomputed) of weight copies.

    Under autocast the matmul weights are cast once per forward and the casts kept for backward (a bytes per
    parameter; a DeepSpeed 16-bit module needs none). The MoE layer stacks its experts' weights each forward
    (in fp32 a copy too) and the grouped matmul keeps the stacks; with checkpointing only the c_proj stacks
    stay (the GELU recomputation of modeling_moechat.gelu_then holds them) and a recomputed block stacks its
    c_fc weights again."""
    a = compute_bytes(precision)
    plain, fc, proj = linear_params(model)
    autocast = 0 if a == 4 or sixteen_bit_module else a
    n_moe = max(len(model.moe_layer_indices()), 1)
    if checkpointing:
        return float(autocast * plain + a * proj), float(a * fc / n_moe)
    return float(autocast * plain + a * (fc + proj)), 0.0


def activation_bytes_per_token(model: MoeChatConfig, precision: str, checkpointing: bool) -> float:
    """Saved-for-backward bytes per token of the whole stack, as the code saves them.

    a = compute bytes; under autocast the matmul inputs are saved as a-byte casts, in fp32 the saved
    LayerNorm output is the matmul input itself. Per block: the fp32 residual at ln_1 and ln_2 (4d each).
    Attention: ln_1 output (cast), q, the qkv buffer (k and v are views), the SDPA output, its fp32
    logsumexp (4 per head) and the output projection's input: 7*a*d + 4*h. Dense MLP: ln_2 output (cast)
    and c_fc output (backward recomputes the GELU from it: modeling_moechat.gelu_then): a*d + a*f. MoE MLP:
    the router's fp32 input and two [E] fp32 rows of router probabilities/logits (three [E] fp32 rows), the
    top-k ids (int64) and weights, and per assignment (k per token) two int64 indices (the gather and the
    inverse permutation), its expert one-hot row (the bias matmul's), the expert input (cast), c_fc output,
    its routing weight (fp32, and cast for the combining matmul) and the expert output (in the compute
    dtype): 4d + 12E + 12k + k * (16 + a*E + a*d + a*f + 4 + a + a*d).
    Around the stack: token ids, position ids (int64), ln_f's fp32 input and the loss's fp32 hidden rows.
    The attention mask, per batch rather than per token, is `mask_bytes`.
    """
    per_layer = block_bytes_per_token(model, precision)
    around = 8 + 8 + 4 * model.n_embd + 4 * model.n_embd
    if checkpointing:  # each block's fp32 input, and one block's activations while it is recomputed
        return around + model.n_layer * 4 * model.n_embd + max(per_layer)
    return float(around + sum(per_layer))


def block_bytes_per_token(model: MoeChatConfig, precision: str) -> list[float]:
    """Saved-for-backward bytes per token of each block (see `activation_bytes_per_token`)."""
    a = compute_bytes(precision)
    d, f, k, e, h = model.n_embd, model.n_inner, model.num_experts_per_tok, model.num_experts, model.n_head
    resid = 4 * d  # fp32 residual stream at each LayerNorm input
    attn = resid + 7 * a * d + 4 * h
    ln_out = a * d if a != 4 else 4 * d
    dense_mlp = resid + ln_out + a * f
    moe_mlp = resid + 4 * d + 12 * e + 12 * k + k * (16 + a * e + a * d + a * f + 4 + a + a * d)
    return [float(attn + (moe_mlp if model.is_moe_layer(i) else dense_mlp)) for i in range(model.n_layer)]


def backward_bytes(model: MoeChatConfig, precision: str, checkpointing: bool, tokens: int, vocab_size: int,
                   recompute_extra: float = 0.0) -> float:
    """What a step holds beyond the kept activations at its peak: the larger of the loss phase and one
    block's backward, which never coexist (the loss backward ends before the first block's starts).

    Loss phase (forward and backward alike): one chunk of LOSS_CHUNK_TOKENS rows of logits in fp32 beside
    their fp32 softmax (or log-softmax), 8 bytes a logit (the compute-dtype copies come and go in between, and
    each chunk is freed before the next), and the fp32 gradient of the hidden rows (4d per token).
    Block phase: the MLP's gradient buffers (the gradients of the GELU output and input side by side and of
    its input, k x (2*a*f + a*d) per token in an MoE block) and the residual stream's fp32 gradient; with
    checkpointing also the recomputed block's activations and `recompute_extra` (its mask and weight stacks).
    """
    a = compute_bytes(precision)
    d, f = model.n_embd, model.n_inner
    grad_hidden = tokens * 4 * d
    loss = min(tokens, LOSS_CHUNK_TOKENS) * vocab_size * 8 + grad_hidden
    k = model.num_experts_per_tok if model.moe_layer_indices() else 1
    block = tokens * k * (2 * a * f + a * d) + grad_hidden
    if checkpointing:
        block += tokens * max(block_bytes_per_token(model, precision)) + recompute_extra
    return float(max(loss, block))


# ZeRO-2 as moechat configures it (train.deepspeed_config): two reduce buckets (overlap_comm) of this many
# elements in the module's dtype (deepspeed/runtime/zero/stage_1_and_2.py, setup_buckets, DeepSpeed 0.19.8).
ZERO_REDUCE_BUCKET = 5e8


def state_bytes(pc: ParamCount, train: TrainConfig, world_size: int) -> dict[str, float]:
    """Weights, gradients and optimizer state on the GPU. Plain / DDP: fp32 weights and gradients, the
    optimizer's state. DeepSpeed ZeRO-2 in 16 bits: a 16-bit module, two reduce buckets, and the fp32 master
    weights, gradient partition and optimizer state divided over the W GPUs (offload: those three in host
    memory). A JSON config is counted as moechat's zero2."""
    p = pc.total
    if train.optimizer == "adamw_8bit":
        wide = 0 if train.deepspeed else pc.embedding + pc.lm_head  # 32-bit state: wte, wpe, lm_head
        opt = 8 * wide + 2 * (p - wide) + 2 * 4 * (p - wide) / BNB_BLOCK
    else:
        opt = 8.0 * p
    if not train.deepspeed:
        return {"weights_gb": 4.0 * p, "grads_gb": 4.0 * p, "optimizer_gb": opt}
    a = compute_bytes(train.precision)
    offload = train.deepspeed == "zero2_offload"
    master = 0 if a == 4 else 4 * p  # fp32 master weights beside a 16-bit module
    buckets = 2 * ZERO_REDUCE_BUCKET * a
    return {"weights_gb": float(a * p), "grads_gb": buckets + (0 if offload else 4 * p / world_size),
            "optimizer_gb": 0.0 if offload else (master + opt) / world_size}


def estimate(model: MoeChatConfig, train: TrainConfig, vocab_size: int, micro_batch_size: Optional[int] = None,
             world_size: int = 1, device_type: str = "cuda") -> MemoryPlan:
    """Peak memory of one training process on `device_type` (see the module docstring for each term)."""
    mb = micro_batch_size or train.micro_batch_size
    precision = train.precision
    a = compute_bytes(precision)
    pc = count_params(model, vocab_size)
    tokens = mb * train.seq_len
    ckpt = train.gradient_checkpointing
    attention = planned_attention(train.attn_implementation, device_type)
    mask_kept, mask_extra = mask_bytes(attention, mb, train.seq_len, a, model.n_layer, ckpt)
    casts, cast_extra = cast_bytes(model, precision, ckpt, sixteen_bit_module=bool(train.deepspeed) and a == 2)
    per_token = activation_bytes_per_token(model, precision, ckpt)
    if ckpt:  # the recomputed block's activations belong to the block phase of `backward_bytes`
        per_token -= max(block_bytes_per_token(model, precision))
    acts = tokens * per_token + mask_kept
    head = vocab_size * model.n_embd * ((0 if a == 4 else a) + 4)
    backward = backward_bytes(model, precision, ckpt, tokens, vocab_size, mask_extra + cast_extra)
    parts = dict(**state_bytes(pc, train, world_size), casts_gb=casts, activations_gb=acts, logits_gb=head,
                 backward_gb=backward)
    gb = {k: v / GIB for k, v in parts.items()}
    allocated = sum(gb.values())
    headroom = FRAGMENTATION * allocated + CUDA_CONTEXT_GB if device_type == "cuda" else 0.0
    return MemoryPlan(micro_batch_size=mb, seq_len=train.seq_len, precision=precision, optimizer=train.optimizer,
                      gradient_checkpointing=ckpt, params=pc.total, allocated_gb=allocated, headroom_gb=headroom,
                      total_gb=allocated + headroom, budget_gb=train.gpu_memory_gb, attention=attention,
                      device_type=device_type, **gb)


@dataclass(frozen=True)
class Recommendation:
    """The fastest configuration that fits: same global batch (micro_batch_size x grad_accum)."""

    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    plan: MemoryPlan


def fastest_fitting(model: MoeChatConfig, train: TrainConfig, vocab_size: int, world_size: int = 1
                    ) -> Optional[Recommendation]:
    """Checkpointing off before on (recomputing every block costs about a third more FLOPs), then the
    largest micro-batch that divides the global batch (fewer, larger matmuls and optimizer-free steps);
    None when even micro-batch 1 with checkpointing does not fit."""
    global_batch = train.micro_batch_size * train.grad_accum
    sizes = [mb for mb in range(global_batch, 0, -1) if global_batch % mb == 0]
    for checkpointing in (False, True):
        cfg = replace(train, gradient_checkpointing=checkpointing)
        for mb in sizes:
            p = estimate(model, cfg, vocab_size, mb, world_size)
            if p.fits:
                return Recommendation(mb, global_batch // mb, checkpointing, p)
    return None


def largest_micro_batch(model: MoeChatConfig, train: TrainConfig, vocab_size: int, world_size: int = 1,
                        limit: int = 1024) -> int:
    """Largest micro-batch (<= limit) whose estimate fits train.gpu_memory_gb; 0 when even 1 does not."""
    best = 0
    for mb in range(1, limit + 1):
        if not estimate(model, train, vocab_size, mb, world_size).fits:
            break
        best = mb
    return best


class MemoryBudgetError(MoechatError, RuntimeError):
    """The config does not fit train.gpu_memory_gb; the message says what to lower."""


def advice(model: MoeChatConfig, train: TrainConfig, vocab_size: int, world_size: int = 1) -> str:
    """What to lower, with the largest micro-batch that fits."""
    best = largest_micro_batch(model, train, vocab_size, world_size)
    if best:
        return (f"set train.micro_batch_size: {best} (the largest that fits; raise train.grad_accum to keep "
                f"the global batch)")
    hints = ["lower train.seq_len"]
    if not train.gradient_checkpointing:
        hints.insert(0, "set train.gradient_checkpointing: true")
    if train.optimizer != "adamw_8bit":
        hints.append("use train.optimizer: adamw_8bit")
    return "even micro-batch 1 does not fit: " + ", ".join(hints) + ", or use a smaller model"


def check(model: MoeChatConfig, train: TrainConfig, vocab_size: int, world_size: int = 1,
          budget_name: Optional[str] = None) -> MemoryPlan:
    """Pre-flight: raise MemoryBudgetError before allocating when the estimate exceeds the budget."""
    plan = estimate(model, train, vocab_size, world_size=world_size)
    if not plan.fits:
        raise MemoryBudgetError(
            f"estimated peak GPU memory {plan.total_gb:.2f} GiB > "
            f"{budget_name or f'train.gpu_memory_gb={train.gpu_memory_gb:g}'} "
            f"(micro_batch_size={plan.micro_batch_size}, seq_len={plan.seq_len}, "
            f"gradient_checkpointing={plan.gradient_checkpointing}, optimizer={plan.optimizer}): "
            f"{advice(model, train, vocab_size, world_size)}. Run `moechat plan` for the breakdown.")
    return plan


def preflight(model: MoeChatConfig, train: TrainConfig, vocab_size: int, world_size: int, device_type: str,
              device_total_bytes: Optional[int]) -> Optional[MemoryPlan]:
    """The training stage's check before it allocates: on CUDA, refuse when the estimate exceeds the
    smaller of train.gpu_memory_gb and the device's total memory; elsewhere (CPU) no GPU budget applies
    and it returns None. `train.precision` must already be resolved (not `auto`)."""
    if device_type != "cuda":
        return None
    budget_name = None
    if device_total_bytes is not None and device_total_bytes / GIB < train.gpu_memory_gb:
        device_gb = device_total_bytes / GIB
        budget_name = f"this GPU's {device_gb:.2f} GiB (less than train.gpu_memory_gb={train.gpu_memory_gb:g})"
        train = replace(train, gpu_memory_gb=device_gb)
    return check(model, train, vocab_size, world_size, budget_name)


def vocab_size_for(params_tokenizer_source: str, tokenizer_vocab: int, tokenizer_dir: Optional[Path]) -> int:
    """Model vocabulary: the saved tokenizer's length when it exists, else the params' base vocab plus the
    three chat tokens (the base vocab is 50257 for gpt2 or tokenizer.vocab_size when trained)."""
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists():
        raw = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
        vocab = raw["model"]["vocab"]
        ids = list(vocab.values()) + [t["id"] for t in raw.get("added_tokens", [])]
        return max(ids) + 1
    base = tokenizer_vocab if params_tokenizer_source == "train" else 50257
    return base + CHAT_TOKENS






# ----------------------------------------------------------------------------------------------------
# Run size: tokens, optimizer steps, warmup and projected time (beside the memory estimate)

# RTX 4060 Ti 16 GB: 34 SMs x 2.535 GHz boost x 512 dense bf16 FLOP/clock/SM with fp32 accumulate (Ada
# GeForce runs fp32-accumulate tensor math at half the fp16-accumulate rate; the Ada whitepaper's RTX 4090
# row, 165.2 dense TFLOPS for 128 SMs at 2.52 GHz, gives the per-SM rate).
RTX_4060_TI_BF16_FLOPS = 34 * 2.535e9 * 512
DEFAULT_MFU = 0.30  # an assumption for the projection, not a measurement: metrics/train.json records the real MFU
# English OASST1 train split: ~1.4M tokens per epoch with thread_policy best (what the prepare stage reports on the
# full English OASST1, 1.3-1.5M); `all` has 5.1x the tokens of `best` on the real 100-tree sample
# (metrics/bench_data.json: 175,467 vs 34,407 train tokens). Packed blocks are ~96% full (same file).
OASST1_EN_BEST_TOKENS = 1.4e6
OASST1_ALL_OVER_BEST = 5.1
OASST1_PACKING_EFFICIENCY = 0.96


@dataclass(frozen=True)
class DataSize:
    tokens_per_epoch: int
    blocks: int
    source: str  # "metrics/prepare.json" or "estimate (...)"


@dataclass(frozen=True)
class RunSize:
    data: DataSize
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    tokens_per_run: int  # positions processed (blocks x seq_len), what the FLOPs count
    flops_per_token: float
    seconds: float  # projected wall time at `mfu` of `peak_flops` per GPU
    mfu: float
    peak_flops: float


def data_size(data: DataConfig, seq_len: int, prepare_metrics: Optional[Path]) -> Optional[DataSize]:
    """Train tokens and packed blocks per epoch: measured when metrics/prepare.json matches these params,
    else an estimate for English OASST1, else None (an unknown source cannot be estimated)."""
    if prepare_metrics is not None and Path(prepare_metrics).exists():
        m = json.loads(Path(prepare_metrics).read_text())
        if m.get("seq_len") == seq_len and m.get("thread_policy") == data.thread_policy:
            return DataSize(int(m["train"]["tokens"]), int(m["train"]["blocks"]), str(prepare_metrics))
    if data.source != "OpenAssistant/oasst1" or data.langs != ("en",):
        return None
    tokens = OASST1_EN_BEST_TOKENS * (OASST1_ALL_OVER_BEST if data.thread_policy == "all" else 1.0)
    blocks = math.ceil(tokens / (seq_len * OASST1_PACKING_EFFICIENCY))
    return DataSize(int(tokens), blocks, f"estimate (English OASST1, thread_policy {data.thread_policy}; "
                                         f"run `dvc repro prepare` to measure)")


def flops_per_token(model: MoeChatConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token, as MoeChatForCausalLM.flops_per_token counts them (6 N_active + attention,
    PaLM appendix B), from the config alone."""
    pc = count_params(model, vocab_size)
    d, f = model.n_embd, model.n_inner
    n_moe = len(model.moe_layer_indices())
    idle_experts = n_moe * (model.num_experts - model.num_experts_per_tok) * ((d * f + f) + (f * d + d))
    active_non_embedding = pc.total - pc.embedding - idle_experts
    if model.tie_word_embeddings:
        active_non_embedding += vocab_size * d
    return float(6 * active_non_embedding + 12 * model.n_layer * d * seq_len)


def run_size(model: MoeChatConfig, train: TrainConfig, vocab_size: int, data: DataSize, world_size: int = 1,
             mfu: float = DEFAULT_MFU, peak_flops: float = RTX_4060_TI_BF16_FLOPS) -> RunSize:
    """Optimizer steps and warmup from the real schedule function, and the wall time they take at `mfu`."""
    schedule = build_schedule(train, data.blocks, world_size)
    tokens = schedule.total_steps * train.micro_batch_size * train.grad_accum * world_size * train.seq_len
    fpt = flops_per_token(model, vocab_size, train.seq_len)
    seconds = tokens * fpt / (mfu * peak_flops * world_size)
    return RunSize(data=data, steps_per_epoch=schedule.steps_per_epoch, total_steps=schedule.total_steps,
                   warmup_steps=schedule.warmup_steps, tokens_per_run=tokens, flops_per_token=fpt, seconds=seconds,
                   mfu=mfu, peak_flops=peak_flops)








