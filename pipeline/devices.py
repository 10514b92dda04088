"""Where a stage runs: the backbone's forward (`extract.device`), the heads (`head.device`), predict's --device."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import H2TError


def resolve_device(name: str, setting: str = "extract.device") -> torch.device:
    """A device setting (`extract.device`, `head.device`, predict's --device): auto is the CUDA device when
    there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise H2TError(f"{setting}={name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise H2TError(f"{setting}={name}: no CUDA device on this machine")
    return device


BFLOAT16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 dot products, AMX tiles, Arm's BF16 extension


def native_bfloat16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether `device` multiplies bfloat16 in hardware: a CUDA device that supports it, or a CPU whose flags list
    bfloat16 dot products (Linux's /proc/cpuinfo); None where that cannot be told. Without them torch emulates
    bfloat16 products, slower than float32's."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return None
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = {word for line in text.splitlines() if line.startswith(("flags", "Features")) for word in line.split()}
    return bool(flags & BFLOAT16_CPU_FLAGS)
