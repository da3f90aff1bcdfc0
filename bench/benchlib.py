"""What every benchmark records beside its figures: the device that produced them, named."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def device_name(device: str | torch.device = "cpu") -> str:
    """The GPU's marketing name, or the CPU model with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
