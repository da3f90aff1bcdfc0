"""Which attention kernel trains a config on a device, decided before anything is allocated (torch-free, so
`moechat plan` can use it). The expert path is chosen by the model itself per call
(`modeling_moechat.expert_path_for`), since an exported model must decide without moechat installed.

Packed rows (several documents per row, position ids restarting) need a block-diagonal causal mask. sdpa
takes it as a dense [B, 1, T, T] boolean mask, turns it into a float mask each layer keeps for backward, and
computes every tile; FlexAttention (compiled, with a block mask built from the position ids by
transformers' masking utilities) and flash-attn's varlen kernel skip the tiles between documents.
"""

from __future__ import annotations

import importlib.util

from moechat.errors import ConfigError

ATTENTION_CHOICES = ("auto", "sdpa", "flex_attention", "flash_attention_2")


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(requested: str, device_type: str, flash_installed: bool, precision: str = "bf16") -> str:
    """The backend `train.attn_implementation` trains through on `device_type`, or a one-line ConfigError
    for a value that cannot run there. `auto`: flash_attention_2 when flash-attn is installed, else
    flex_attention, on CUDA; sdpa elsewhere (FlexAttention has no CPU backward in torch 2.13, and sdpa with
    the boolean mask is the fastest that trains on a CPU). flash-attn computes in 16 bits only: `auto` in
    fp32 on CUDA takes flex_attention. `precision` is the resolved one."""
    if requested not in ATTENTION_CHOICES:
        raise ConfigError(f"params.yaml: train.attn_implementation={requested!r} is not one of "
                          f"{' | '.join(ATTENTION_CHOICES)}")
    cuda = device_type == "cuda"
    if requested == "auto":
        if not cuda:
            return "sdpa"
        return "flash_attention_2" if flash_installed and precision != "fp32" else "flex_attention"
    if requested == "flex_attention" and not cuda:
        raise ConfigError(f"params.yaml: train.attn_implementation=flex_attention cannot train on {device_type}: "
                          f"torch's FlexAttention has no backward there; use auto or sdpa")
    if requested == "flash_attention_2" and not cuda:
        raise ConfigError(f"params.yaml: train.attn_implementation=flash_attention_2 needs a CUDA GPU (this run "
                          f"is on {device_type}); use auto or sdpa")
    if requested == "flash_attention_2" and not flash_installed:
        raise ConfigError("params.yaml: train.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                          "`pip install flash-attn --no-build-isolation`, or use auto (flex_attention)")
    if requested == "flash_attention_2" and precision == "fp32":
        raise ConfigError("params.yaml: train.attn_implementation=flash_attention_2 computes in bf16/fp16 only, and "
                          "train.precision is fp32; use train.precision: bf16, or auto / flex_attention")
    return requested
