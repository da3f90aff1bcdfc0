"""`--device auto|cpu|cuda[:N]` resolved once, for chat, evaluate and quantize."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from moechat.errors import MoechatError

if TYPE_CHECKING:
    import torch


class DeviceError(MoechatError, ValueError):
    """A --device that names no usable device here."""


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str) -> "torch.device":
    """`auto` = the GPU when one is visible, else the CPU; checked with torch alone, before the slow imports."""
    if not DEVICE.fullmatch(name):
        raise DeviceError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) visible; use cuda:0")
    return device


