"""Where a stage runs: the backbone's forward (`extract.device`), the heads (`head.device`), predict's --device."""
from __future__ import annotations

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
