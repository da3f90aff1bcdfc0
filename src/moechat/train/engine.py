"""The engine seam: precision, accelerate's Accelerator (DDP, or DeepSpeed ZeRO-2 with or without optimizer
offload) and per-block torch.compile. Everything engine-specific the loop needs is built here."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from types import MethodType
from typing import Any, Mapping, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.operations import ConvertOutputsToFp32

from moechat.config.params import TrainConfig
from moechat.errors import ConfigError


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
        # DeepSpeed skips a step whose gradients are not finite (its default; stated so a JSON cannot drop it)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
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
    if isinstance(merged["bf16"], dict) and merged["bf16"].get("check_grad_overflow") is False:
        raise ConfigError(f"{path}: bf16.check_grad_overflow=false would let DeepSpeed apply non-finite gradients "
                          f"to the weights; remove it (moechat skips such steps, docs/pipeline.md)")
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
    gradient checkpointing are unchanged). A block compiles to one graph (tests/train/test_train_compile.py); the
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


