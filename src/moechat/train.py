"""The training loop: `train -> train_step -> validate`, one loop for every engine.

accelerate is the one seam for the engine: device placement, autocast (bf16/fp16 with a GradScaler),
gradient accumulation, DDP (NCCL, or gloo on CPU) and DeepSpeed ZeRO-2 all come from `Accelerator`, so
the loop below reads the same on one CPU and on many GPUs. The data order is ours (a seeded permutation
per epoch and a cursor into it), so a resumed run sees exactly the rows an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import resource
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, set_seed
from accelerate.utils.operations import ConvertOutputsToFp32
from tqdm.auto import tqdm

from moechat import checkpoint as ckpt
from moechat import curves, plan
from moechat.io import atomic_dir
from moechat.labels import target_mask
from moechat.model_folder import load_model
from moechat.config import ConfigError, MoechatError, TrainConfig
from moechat.configuration_moechat import MoeChatConfig
from moechat.router_tally import RouterTally
from moechat.schedule import Schedule, build_schedule, lr_multiplier, steps_per_epoch
from moechat.val_loss import count_batches, val_sums

COLUMNS = ("input_ids", "labels", "position_ids")
# Dense 16-bit tensor-core peaks (no sparsity: half the datasheets' "with sparsity" figures) from NVIDIA's
# datasheets. A key matches whole model tokens of the CUDA device name ("L4" never matches "NVIDIA L40";
# spaces, '-' and '_' between tokens are interchangeable), first match wins, so variants come before their
# family. A10G (AWS) has no NVIDIA datasheet figure and is left out: MFU against an unknown device is null
# rather than a guess.
PEAK_FLOPS_16BIT = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
    ("GH200", 989e12), ("A100", 312e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("V100 PCIe", 112e12), ("V100", 125e12), ("T4", 65e12),
)


class NonFiniteLossError(MoechatError, RuntimeError):
    """The loss went NaN/inf; the message names the step and the checkpoint that survives."""


class TrainOOMError(MoechatError, RuntimeError):
    """CUDA ran out of memory; the message says what to lower, with the planner's estimate."""


class TrainingInterrupted(MoechatError):
    """Ctrl-C during training; the message says from which step `dvc repro` resumes."""

    exit_code = 130  # the shell's code for SIGINT


def interrupted(checkpoint_dir: Path, fp: str, step: int, total_steps: int) -> TrainingInterrupted:
    """The one line for a Ctrl-C after `step` finished steps (what the bar shows): what survives and what the
    next `dvc repro` does."""
    last = ckpt.latest_checkpoint(checkpoint_dir, fp)
    if last is None:
        return TrainingInterrupted(f"interrupted after step {step}/{total_steps} before the first checkpoint; "
                                   f"`dvc repro` starts this experiment again from step 0")
    saved = int(ckpt.STEP_DIR.match(last.name).group(1))
    return TrainingInterrupted(f"interrupted after step {step}/{total_steps}; `dvc repro` resumes from step {saved} "
                               f"(checkpoint {last})")


# ----------------------------------------------------------------------------------------------------
# Engine setup


def resolve_precision(requested: str, cuda: bool, bf16_supported: bool) -> str:
    """`auto` -> bf16 on GPUs that have it, fp16 (loss-scaled) on older GPUs, fp32 on CPU."""
    if requested != "auto":
        if requested in ("bf16", "fp16") and not cuda:
            raise ConfigError(f"train.precision={requested} needs a CUDA GPU (CPU 16-bit matmuls are ~100x "
                              f"slower here); use precision: fp32 or auto on CPU")
        return requested
    if not cuda:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


# Under offload accelerate swaps the optimizer we pass for a new DeepSpeedCPUAdam built from its param groups
# unless this is False. Ours already is DeepSpeed's CPU Adam (build_optimizer), and the swap would leave the LR
# scheduler on the discarded optimizer: after a resume replaces the param groups, the LR stops following it.
KEEP_OUR_CPU_ADAM = {"zero_force_ds_cpu_optimizer": False}


def deepspeed_config(cfg: TrainConfig, precision: str) -> Optional[dict[str, Any]]:
    """The DeepSpeed config for `train.deepspeed`, or None without DeepSpeed.

    zero2: ZeRO stage 2 (optimizer state and grads sharded over GPUs) with our optimizer as the client
    optimizer; bnb's 8-bit AdamW is not on DeepSpeed's tested list, hence `zero_allow_untested_optimizer`.
    zero2_offload: stage 2 with the optimizer state and step on the CPU, which needs DeepSpeed's CPU Adam
    (a fused fp32 AdamW): 8-bit AdamW cannot run there, so this choice replaces train.optimizer.
    A path: that JSON file, with batch/clip/precision keys checked against params.
    """
    if cfg.deepspeed is None:
        return None
    base = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed in ("zero2", "zero2_offload"):
        zero: dict[str, Any] = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_scatter": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
        if cfg.deepspeed == "zero2_offload":
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            base.update(KEEP_OUR_CPU_ADAM)
        else:
            base["zero_allow_untested_optimizer"] = True
        return {**base, "zero_optimization": zero}
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed={cfg.deepspeed!r} is not null, zero2, zero2_offload or an existing "
                          f"JSON file; fix the path or pick one of those")
    try:
        given = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed={cfg.deepspeed}: not valid JSON ({err})") from err
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        if key in given and given[key] not in ("auto", base[key]):
            raise ConfigError(f"{path}: {key}={given[key]} disagrees with params.yaml ({base[key]}); set it to "
                              f"\"auto\" or to the params value")
    merged = {**given, **{k: base[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                               "gradient_clipping")}}
    merged.setdefault("bf16", base["bf16"])
    merged.setdefault("fp16", base["fp16"])
    merged.setdefault("zero_allow_untested_optimizer", True)
    return {**KEEP_OUR_CPU_ADAM, **merged} if offloads_optimizer(merged) else merged


def offloads_optimizer(ds_config: Optional[dict[str, Any]]) -> bool:
    zero = (ds_config or {}).get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") == "cpu"


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by deepspeed, torchrun and accelerate launch


def single_process_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The process-group variables that a single process without a launcher (plain `dvc repro`) lacks, or {}
    when a launcher set them (its values win).

    Without them `deepspeed.init_distributed` falls back to MPI discovery and fails on a missing mpi4py.
    MASTER_ADDR/MASTER_PORT the user chose are kept; otherwise localhost and a free port."""
    if any(key in environ for key in LAUNCHER_ENV):
        return {}
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if "MASTER_ADDR" not in environ:
        env["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in environ:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(probe.getsockname()[1])
    return env


def build_accelerator(cfg: TrainConfig, precision: str, ds_config: Optional[dict[str, Any]]) -> Accelerator:
    """The Accelerator for `precision` and, with `ds_config`, DeepSpeed (launched or as a single process).

    Side effect under DeepSpeed without a launcher: fills in the single-process group environment."""
    plugin = None
    if ds_config is not None:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"train.deepspeed={cfg.deepspeed} needs DeepSpeed, which is not installed here; "
                              f"run `pip install -e \".[deepspeed]\"` or set train.deepspeed: null")
        os.environ.update(single_process_env(os.environ))
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]
    # cpu=True on a machine without CUDA makes accelerate pick gloo DDP under torchrun/accelerate launch;
    # DeepSpeed initialises its own process group (and refuses cpu=True).
    cpu = not torch.cuda.is_available() and plugin is None
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.grad_accum, deepspeed_plugin=plugin,
                       step_scheduler_with_optimizer=False, cpu=cpu)


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each transformer block in place (`Module.compile`: parameter names, checkpoints and
    gradient checkpointing are unchanged). A block compiles to one graph (tests/test_train_compile.py); the
    embeddings, the chunked loss and the loop between blocks stay eager."""
    for block in model.transformer.h:
        block.compile(backend=backend)


def drop_fp32_output_copy(model: torch.nn.Module) -> None:
    """Keep accelerate's autocast around `forward` but drop its `convert_outputs_to_fp32` wrapper, which
    copies every floating output to fp32: in eval mode that is a second, fp32 copy of the [B, T, V]
    logits. Our losses are fp32 already. No-op without mixed precision (nothing was wrapped)."""
    forward = getattr(model.forward, "__func__", model.forward)
    wrapped = getattr(forward, "__wrapped__", None)
    if isinstance(wrapped, ConvertOutputsToFp32):
        model.forward = MethodType(wrapped.model_forward, model) if hasattr(model.forward, "__func__") \
            else wrapped.model_forward


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matmul weights only; none on biases, LayerNorms and embeddings (GPT-2/nanoGPT
    practice: decaying them shrinks scales and lookup rows without regularising anything)."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids or name.endswith("bias") or p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, offload: bool) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, **kw)
        keep_embeddings_in_32bit(model, bnb.optim.GlobalOptimManager.get_instance())
        return optimizer
    return torch.optim.AdamW(groups, **kw)


EMBEDDING_LIKE = ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")


def keep_embeddings_in_32bit(model: torch.nn.Module, manager: Any) -> None:
    """32-bit Adam state for wte, wpe and lm_head under 8-bit AdamW, as bitsandbytes recommends for
    embeddings (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", Sec. 2.3: the
    embedding layer is where 8-bit state destabilised training; their StableEmbedding keeps its state in 32 bits).
    bitsandbytes keys overrides by parameter identity in its process-wide GlobalOptimManager and reads them
    when it creates each state, at the optimizer's first step."""
    named = dict(model.named_parameters(remove_duplicate=False))
    for name in EMBEDDING_LIKE:
        if name in named:  # a tied lm_head is wte, already listed
            manager.override_config(named[name], "optim_bits", 32)


# ----------------------------------------------------------------------------------------------------
# Data


def load_blocks(data_dir: Path, split: str, seq_len: int) -> dict[str, torch.Tensor]:
    """The packed blocks of `split` as int64 tensors [rows, seq_len] (held in memory: OASST is small)."""
    from moechat.data.chat import PreparedDataError, load_packed

    path = Path(data_dir) / split
    ds = load_packed(data_dir, split)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise PreparedDataError(f"{path}: missing columns {missing} (has {ds.column_names}); rerun the prepare stage")
    blocks = {c: t.long() for c, t in ds.with_format("torch", columns=list(COLUMNS))[:].items()}
    if blocks["input_ids"].ndim != 2 or blocks["input_ids"].shape[1] != seq_len:
        raise PreparedDataError(f"{path}: blocks have shape {tuple(blocks['input_ids'].shape)}, expected [rows, "
                                f"train.seq_len={seq_len}]; rerun `dvc repro prepare` after changing train.seq_len")
    largest = int(blocks["position_ids"].max()) if blocks["position_ids"].numel() else 0
    if largest >= seq_len:  # checked here, on the host, so the training step never waits for the device
        raise PreparedDataError(f"{path}: position ids reach {largest}, past train.seq_len={seq_len}; rerun "
                                f"`dvc repro prepare`")
    return blocks


class BatchStream:
    """Seeded, resumable order over the train blocks: epoch e visits rows in `randperm(seed + e)` order,
    one global batch (micro_batch x grad_accum x world) per optimizer step; a tail shorter than a global
    batch is skipped (every step sees the same number of rows). At least one global batch of rows is
    `build_schedule`'s check, which runs first."""

    def __init__(self, n_rows: int, global_batch: int, seed: int):
        assert n_rows >= global_batch, "build_schedule refuses fewer rows than one global batch"
        self.n_rows, self.global_batch, self.seed = n_rows, global_batch, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.n_rows, self.global_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return self._perm

    def next_rows(self, cursor: ckpt.Cursor) -> tuple[torch.Tensor, ckpt.Cursor]:
        """Row ids of the next global batch and the cursor after it."""
        epoch, pos = cursor.epoch, cursor.position
        if pos + self.global_batch > self.n_rows:
            epoch, pos = epoch + 1, 0
        rows = self.permutation(epoch)[pos:pos + self.global_batch]
        return rows, ckpt.Cursor(epoch, pos + self.global_batch)


def micro_batches(blocks: dict[str, torch.Tensor], rows: torch.Tensor, micro_batch: int, rank: int,
                  world: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of a global batch: micro-batch i of rank r holds rows[(i*world + r)*mb:...],
    so one process with grad_accum=a*w and w processes with grad_accum=a see the same row groups."""
    n_micro = rows.numel() // (micro_batch * world)
    out = []
    for i in range(n_micro):
        start = (i * world + rank) * micro_batch
        idx = rows[start:start + micro_batch]
        out.append({c: blocks[c][idx] for c in COLUMNS})
    return out


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss after the model's shift."""
    return int(target_mask(labels).sum())


# ----------------------------------------------------------------------------------------------------
# Step, validation


@dataclass
class StepStats:
    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: Optional[float]
    tokens: int  # all positions processed, every process
    targets: int  # positions with a loss, every process
    router: list[dict[str, Any]]  # per MoE layer: layer, expert_share (list), dropped_share

    def losses(self) -> dict[str, float]:
        return {"loss": self.loss, "lm_loss": self.lm_loss, "aux_loss": self.aux_loss, "z_loss": self.z_loss}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator,
               batches: list[dict[str, torch.Tensor]], n_targets_global: int, grad_clip: float,
               step: int) -> StepStats:
    """One optimizer step over this rank's micro-batches (forward, backward, clip, step).

    The LM loss is the mean over every target token of the global batch: each micro-batch's token sum is
    divided by N_global / (micro-batches x processes), which the accumulation (/ micro-batches) and DDP's
    gradient average (/ processes) turn back into sum / N_global."""
    world, accum = accelerator.num_processes, len(batches)
    device = accelerator.device
    norm = torch.tensor(max(n_targets_global, 1) / (accum * world), device=device, dtype=torch.float32)
    sums = torch.zeros(4, device=device)  # loss, lm, aux, z summed over micro-batches
    router = RouterTally.for_model(accelerator.unwrap_model(model).config, device)  # summed on the device
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with accelerator.accumulate(model):
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        num_items_in_batch=norm, output_router_stats=True, use_cache=False)
            accelerator.backward(out.loss)
        sums += torch.stack([out.loss.detach().float(), out.lm_loss.detach().float(),
                             out.aux_loss.detach().float(), out.z_loss.detach().float()])
        router.add(out)
        del out, batch  # nothing of this micro-batch stays alive during the next one's forward
    means = accelerator.reduce(sums / accum, reduction="mean")
    if not torch.isfinite(means).all():
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"step {step}: non-finite loss (loss={means[0].item()}, lm={means[1].item()}, "
                                 f"aux={means[2].item()}, z={means[3].item()})")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    shares = router.reduced(lambda t: accelerator.reduce(t, reduction="sum")).step_shares()
    tokens = sum(b["input_ids"].numel() for b in batches) * world
    loss, lm, aux, z = means.tolist()
    gn = None if grad_norm is None else float(grad_norm)
    return StepStats(loss, lm, aux, z, gn, tokens, n_targets_global, shares)


def validate(model: torch.nn.Module, accelerator: Accelerator, val: dict[str, torch.Tensor], micro_batch: int,
             max_batches: int) -> dict[str, float]:
    """Token-weighted LM loss over the first `max_batches` val micro-batches (fixed rows, shared over
    processes) plus the mean router losses. The loss is chunked (`val_sums` without accuracy): a validation
    pass never holds the [B, T, V] logits."""
    rank, world = accelerator.process_index, accelerator.num_processes
    n_batches = count_batches(val["input_ids"].shape[0], micro_batch, max_batches)
    batches = ({c: val[c][b * micro_batch:(b + 1) * micro_batch] for c in COLUMNS}
               for b in range(rank, n_batches, world))
    model.eval()
    sums = val_sums(model, batches, accelerator.device).reduced(lambda t: accelerator.reduce(t, reduction="sum"))
    model.train()
    s = sums.values()
    return {"lm_loss": s["nll"] / max(s["targets"], 1), "aux_loss": s["aux_loss"] / max(s["batches"], 1),
            "z_loss": s["z_loss"] / max(s["batches"], 1)}


# ----------------------------------------------------------------------------------------------------
# Accounting (throughput, memory, what to lower on OOM), resume agreement, the final model


def match_peak_flops(device_name: str) -> Optional[tuple[str, float]]:
    """(table key, dense 16-bit peak) for a CUDA device name, matching whole model tokens; None if unknown."""
    for key, peak in PEAK_FLOPS_16BIT:
        tokens = r"[\s_-]+".join(re.escape(t) for t in key.split())
        if re.search(rf"(?<![A-Za-z0-9]){tokens}(?![A-Za-z0-9])", device_name, flags=re.IGNORECASE):
            return key, peak
    return None


def device_peak_flops(device: torch.device, precision: str) -> tuple[str, Optional[float], str]:
    """(device name, peak FLOP/s for this precision or None, why None)."""
    if device.type != "cuda":
        return "cpu", None, "CPU run: no tensor-core peak to compare against; MFU is reported on GPUs"
    name = torch.cuda.get_device_name(device)
    if precision == "fp32":
        return name, None, "fp32 run: the 16-bit tensor-core peak does not apply"
    found = match_peak_flops(name)
    if found is None:
        return name, None, f"no datasheet peak known for {name!r}; add it to moechat.train.PEAK_FLOPS_16BIT"
    key, peak = found
    return name, peak, f"dense 16-bit peak of {key} from NVIDIA's datasheet"


def device_memory(device: torch.device) -> tuple[str, Optional[int]]:
    """(device type, total bytes of GPU memory or None off CUDA) for the pre-flight memory check."""
    if device.type != "cuda":
        return device.type, None
    return "cuda", torch.cuda.get_device_properties(device).total_memory


def oom_error(err: BaseException, where: str, model_cfg: MoeChatConfig, cfg: TrainConfig, vocab_size: int,
              world: int) -> TrainOOMError:
    """A CUDA OOM turned into what to lower, with the planner's estimate (cfg has the resolved precision)."""
    estimate = plan.estimate(model_cfg, cfg, vocab_size, world_size=world)
    return TrainOOMError(
        f"CUDA out of memory {where}: the planner estimated {estimate.total_gb:.2f} GiB for "
        f"micro_batch_size={cfg.micro_batch_size}, seq_len={cfg.seq_len}, gradient_checkpointing="
        f"{cfg.gradient_checkpointing}. Lower train.micro_batch_size (raise grad_accum to keep the batch), "
        f"lower train.seq_len, or set train.gradient_checkpointing: true; "
        f"{plan.advice(model_cfg, cfg, vocab_size, world)}. ({err})")


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / plan.GIB, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / plan.GIB, "host max RSS (CPU run)"


def agree_on_resume(accelerator: Accelerator, resume: Optional[Path], folder: Path) -> None:
    """Every process resumes from the same step. A file damaged for one rank only (its RNG state or optimizer
    shard) makes that rank fall back alone; continuing would mix two checkpoints, so this refuses instead."""
    if accelerator.num_processes == 1:
        return
    step = int(ckpt.STEP_DIR.match(resume.name).group(1)) if resume is not None else -1
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    if len(set(steps)) > 1:
        newest = folder / ckpt.step_dir_name(max(steps))
        raise ckpt.CheckpointError(f"the processes found different newest intact checkpoints (step by rank: "
                                   f"{steps}); {newest} is damaged for some of them: delete it and rerun")


def save_final(model: torch.nn.Module, accelerator: Accelerator, init_dir: Path, out_dir: Path) -> None:
    """save_pretrained (safetensors) plus the tokenizer files of the init folder, renamed into place."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    with atomic_dir(out_dir) as tmp:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        for f in Path(init_dir).iterdir():
            if f.is_file() and not (tmp / f.name).exists() and f.suffix != ".safetensors" \
                    and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)


# ----------------------------------------------------------------------------------------------------
# The run: setup -> resume -> loop -> summary


@dataclass
class Run:
    """Everything a training run holds, built once by `setup` (torchtitan's trainer state); `resume`, `save`
    and `train_loop` take it. `cfg.precision` is the resolved one, never `auto`."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP / DeepSpeed engine around raw_model)
    raw_model: torch.nn.Module
    model_cfg: MoeChatConfig  # the loaded model's own config (init may differ from params)
    optimizer: torch.optim.Optimizer  # as prepared by accelerate
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Schedule
    stream: BatchStream
    train_blocks: dict[str, torch.Tensor]
    val_blocks: dict[str, torch.Tensor]
    offload: bool  # DeepSpeed's CPU Adam replaced train.optimizer
    per_rank_optimizer: bool  # ZeRO shards the optimizer state: one file per rank
    checkpoint_dir: Path
    live_dir: Path
    fingerprint: str
    state: ckpt.TrainState
    live: Any = None  # the DVCLive logger, main process only

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer itself, without accelerate's wrapper (whose state_dict a checkpoint holds)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    @property
    def vocab_size(self) -> int:
        return self.raw_model.config.vocab_size

    def oom_error(self, err: BaseException, where: str) -> TrainOOMError:
        return oom_error(err, where, self.model_cfg, self.cfg, self.vocab_size, self.accelerator.num_processes)


def setup(cfg: TrainConfig, seed: int, data_dir: Path, init_dir: Path, checkpoint_dir: Path,
          live_dir: Path) -> Run:
    """Engine, model, data, optimizer and schedule of a run at step 0 (nothing resumed yet)."""
    cuda = torch.cuda.is_available()
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, cuda,
                                                              cuda and torch.cuda.is_bf16_supported()))
    ds_config = deepspeed_config(cfg, cfg.precision)
    offload = offloads_optimizer(ds_config)
    accelerator = build_accelerator(cfg, cfg.precision, ds_config)
    world = accelerator.num_processes
    set_seed(seed)

    model = load_model(init_dir, torch.device("cpu"), torch.float32)  # fp32 master weights; accelerate places them
    model_cfg, vocab = model.config, model.config.vocab_size
    plan.preflight(model_cfg, cfg, vocab, world, *device_memory(accelerator.device))
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        compile_blocks(model)
    train_blocks = load_blocks(data_dir, "train", cfg.seq_len)
    val_blocks = load_blocks(data_dir, "val", cfg.seq_len)
    n_rows = train_blocks["input_ids"].shape[0]
    # before step 0: refuses fewer rows than one global batch, and a warmup that covers the run
    schedule = build_schedule(cfg, n_rows, world)
    stream = BatchStream(n_rows, cfg.micro_batch_size * cfg.grad_accum * world, seed)

    optimizer = build_optimizer(model, cfg, offload)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, schedule))
    try:
        model, optimizer = accelerator.prepare(model, optimizer)
    except torch.OutOfMemoryError as err:
        raise oom_error(err, "while placing the model and optimizer on the GPU", model_cfg, cfg, vocab,
                        world) from err
    drop_fp32_output_copy(model)
    # the resolved precision, not `auto`: a bf16 run and an fp16 (loss-scaled) run are different experiments
    fp = ckpt.fingerprint(dataclasses.asdict(cfg), seed, init_dir, data_dir, world)
    return Run(cfg=cfg, accelerator=accelerator, model=model, raw_model=accelerator.unwrap_model(model),
               model_cfg=model_cfg, optimizer=optimizer, scheduler=scheduler, schedule=schedule, stream=stream,
               train_blocks=train_blocks, val_blocks=val_blocks, offload=offload,
               per_rank_optimizer=ds_config is not None, checkpoint_dir=Path(checkpoint_dir),
               live_dir=Path(live_dir), fingerprint=fp, state=ckpt.TrainState(fingerprint=fp))


def resume(run: Run) -> Optional[Path]:
    """Load the newest intact checkpoint of the run's experiment into it (weights, optimizer, scheduler,
    GradScaler, counters): the checkpoint's folder, or None for a fresh start. RNG is restored separately,
    by `restore_rng`, as the last thing before the loop."""
    acc, world = run.accelerator, run.accelerator.num_processes
    # the fresh optimizer's parameter groups, which a checkpoint's optimizer state must match (ZeRO's
    # partitioned state is loaded and checked by DeepSpeed itself)
    template = None if run.per_rank_optimizer else run.inner_optimizer.state_dict()
    found = ckpt.resume_point(run.checkpoint_dir, run.fingerprint, run.raw_model, acc.process_index, template,
                              log=acc.print)
    path, loaded = found if found is not None else (None, None)
    agree_on_resume(acc, path, run.checkpoint_dir / run.fingerprint)
    if path is None:
        others = ckpt.other_fingerprints(run.checkpoint_dir, run.fingerprint)
        if others:
            acc.print(f"no checkpoint of experiment {run.fingerprint} in {run.checkpoint_dir}; starting from "
                      f"step 0 (checkpoints of other experiments, kept: {', '.join(others)})")
        return None
    if run.per_rank_optimizer:  # ZeRO takes one state dict per saved rank; ours are saved with the same world
        run.inner_optimizer.load_state_dict([loaded.optimizer_state] * world, load_from_fp32_weights=True)
    else:
        run.inner_optimizer.load_state_dict(loaded.optimizer_state)
    run.scheduler.load_state_dict(loaded.scheduler_state)
    if acc.scaler is not None and loaded.scaler_state is not None:
        acc.scaler.load_state_dict(loaded.scaler_state)
    run.state = loaded.state
    return path


def save(run: Run) -> Path:
    """Checkpoint the run at `run.state.step` (collective: every process calls it), curves included."""
    acc = run.accelerator
    snapshot = (lambda folder: curves.snapshot_live(run.live_dir, folder)) if run.live is not None else None
    return ckpt.save_checkpoint(
        run.checkpoint_dir, run.state, run.raw_model, run.inner_optimizer.state_dict(), run.scheduler.state_dict(),
        run.cfg.keep_checkpoints, rank=acc.process_index, world_size=acc.num_processes,
        barrier=acc.wait_for_everyone, per_rank_optimizer=run.per_rank_optimizer,
        scaler_state=acc.scaler.state_dict() if acc.scaler is not None else None, extra_files=snapshot)


def train(cfg: TrainConfig, seed: int, data_dir: Path, init_dir: Path, checkpoint_dir: Path, out_dir: Path,
          live_dir: Path) -> dict[str, Any]:
    """Train the init model on the packed blocks, resuming from the newest checkpoint of this experiment.

    Side effects: checkpoints under `checkpoint_dir/<fingerprint>/`, DVCLive curves under `live_dir`, the
    final model in `out_dir`. Returns the metrics for metrics/train.json."""
    wall_start = time.perf_counter()
    run = setup(cfg, seed, data_dir, init_dir, checkpoint_dir, live_dir)
    resumed_from = resume(run)
    if run.accelerator.is_main_process:
        run.live = curves.open_live(run.live_dir, resumed_from, run.state.step, run.accelerator.print)
    start_step = run.state.step
    if resumed_from is not None:
        ckpt.restore_rank_rng(resumed_from, run.accelerator.process_index)  # last: the loop continues bit-exact
        run.accelerator.print(f"resuming {run.fingerprint} from {resumed_from} "
                              f"(step {start_step}/{run.schedule.total_steps})")
    try:
        with one_line_errors(run):
            train_loop(run)
    finally:
        if run.live is not None:
            run.live.end()
    # a checkpoint from before val losses were kept in it has none
    val = run.state.last_val or validate(run.model, run.accelerator, run.val_blocks, run.cfg.micro_batch_size,
                                         run.cfg.eval_batches)
    save_final(run.model, run.accelerator, init_dir, out_dir)
    return summary(run, val, start_step, time.perf_counter() - wall_start)


@contextmanager
def one_line_errors(run: Run) -> Iterator[None]:
    """NaN/inf, CUDA OOM and Ctrl-C inside the loop become one-line errors saying what survives and what to do."""
    try:
        yield
    except NonFiniteLossError as err:
        last = ckpt.latest_checkpoint(run.checkpoint_dir, run.fingerprint)
        raise NonFiniteLossError(f"{err}; stopped without saving. Last good checkpoint: {last or 'none'}. "
                                 f"Lower train.lr, or use train.precision: bf16/fp32 if this was fp16") from None
    except torch.OutOfMemoryError as err:
        raise run.oom_error(err, f"at step {run.state.step + 1}") from err
    except KeyboardInterrupt:
        raise interrupted(run.checkpoint_dir, run.fingerprint, run.state.step, run.schedule.total_steps) from None


def train_loop(run: Run) -> None:
    """Optimizer steps from `run.state.step` to the schedule's end: log, validate and checkpoint on schedule.
    `run.state` is advanced after every step, so an error names the step it happened in."""
    cfg, acc, live = run.cfg, run.accelerator, run.live
    rank, world, total_steps = acc.process_index, acc.num_processes, run.schedule.total_steps
    bar = tqdm(total=total_steps, initial=run.state.step, disable=None if acc.is_main_process else True,
               desc="train", unit="step")  # None: shown in a terminal, off in a log
    run.model.train()
    try:
        while run.state.step < total_steps:
            state = run.state
            step = state.step + 1
            rows, cursor = run.stream.next_rows(state.cursor)
            batches = micro_batches(run.train_blocks, rows, cfg.micro_batch_size, rank, world)
            n_targets = count_targets(run.train_blocks["labels"][rows])
            t0 = time.perf_counter()
            stats = train_step(run.model, run.optimizer, acc, batches, n_targets, cfg.grad_clip, step)
            lr = run.scheduler.get_last_lr()[0]
            if not acc.optimizer_step_was_skipped:  # fp16: the GradScaler skipped an inf/NaN step
                run.scheduler.step()
            if acc.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            run.state = dataclasses.replace(
                state, step=step, cursor=cursor, tokens_seen=state.tokens_seen + stats.tokens,
                target_tokens_seen=state.target_tokens_seen + stats.targets, train_seconds=state.train_seconds + dt,
                last_losses=stats.losses())
            if live is not None:
                curves.log_train_step(live, step, {**stats.losses(), "lr": lr, "tokens_per_s": stats.tokens / dt,
                                                   "grad_norm": stats.grad_norm}, stats.router)
                curves.log_expert_shares(run.live_dir, step, stats.router)
            if step % cfg.eval_every == 0 or step == total_steps:
                val = validate(run.model, acc, run.val_blocks, cfg.micro_batch_size, cfg.eval_batches)
                run.state = dataclasses.replace(run.state, last_val={**val, "step": step})
                if live is not None:
                    curves.log_val(live, step, val)
            if live is not None:
                live.next_step()
            if step % cfg.save_every == 0 or step == total_steps:
                save(run)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}")
    finally:
        bar.close()


def summary(run: Run, val: dict[str, float], start_step: int, wall_seconds: float) -> dict[str, Any]:
    """The metrics of metrics/train.json: progress, losses, throughput, MFU, memory and the run's facts."""
    state, cfg, acc = run.state, run.cfg, run.accelerator
    world, last = acc.num_processes, state.last_losses
    flops_per_token = run.raw_model.flops_per_token(cfg.seq_len)
    device_name, peak, mfu_note = device_peak_flops(acc.device, cfg.precision)
    mem_gb, mem_kind = peak_memory(acc.device)
    tokens_per_s = state.tokens_seen / state.train_seconds if state.train_seconds else None
    mfu = flops_per_token * tokens_per_s / (peak * world) if peak and tokens_per_s else None
    return {
        "steps": state.step, "total_steps": run.schedule.total_steps, "warmup_steps": run.schedule.warmup_steps,
        "resumed_from_step": start_step or None, "fingerprint": run.fingerprint,
        "loss": last.get("loss"), "lm_loss": last.get("lm_loss"), "aux_loss": last.get("aux_loss"),
        "z_loss": last.get("z_loss"), "val_lm_loss": val["lm_loss"], "tokens_seen": state.tokens_seen,
        "target_tokens_seen": state.target_tokens_seen, "train_seconds": state.train_seconds,
        "wall_seconds": wall_seconds, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token, "mfu": mfu, "device": device_name, "processes": world,
        "peak_flops_per_device": peak, "mfu_note": mfu_note, "peak_memory_gb": mem_gb, "peak_memory_kind": mem_kind,
        "precision": cfg.precision, "optimizer": "deepspeed_cpu_adam" if run.offload else cfg.optimizer,
        "deepspeed": cfg.deepspeed, "parameters": run.raw_model.parameter_counts(),
    }


__all__ = ["train", "train_step", "validate", "NonFiniteLossError", "TrainOOMError", "deepspeed_config",
           "resolve_precision", "param_groups", "lr_multiplier", "BatchStream"]
