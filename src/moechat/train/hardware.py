"""What the device can do and did: datasheet peak FLOP/s for MFU, GPU memory for the pre-flight check,
and the run's peak memory."""

from __future__ import annotations

import re
import resource
from typing import Optional

import torch

from moechat.train import plan


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
        return name, None, f"no datasheet peak known for {name!r}; add it to moechat.train.hardware.PEAK_FLOPS_16BIT"
    key, peak = found
    return name, peak, f"dense 16-bit peak of {key} from NVIDIA's datasheet"


def device_memory(device: torch.device) -> tuple[str, Optional[int]]:
    """(device type, total bytes of GPU memory or None off CUDA) for the pre-flight memory check."""
    if device.type != "cuda":
        return device.type, None
    return "cuda", torch.cuda.get_device_properties(device).total_memory


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / plan.GIB, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / plan.GIB, "host max RSS (CPU run)"


