"""Preprocessing: uint8 RGB images -> the normalised tensor the backbone expects, on the device.

Defaults come from the model's timm pretrained config (input size, interpolation, crop, mean/std); each is
overridable; timm's `resolve_data_config` resolves them (`model.use_test_size` takes the model's
test_input_size). Three resize modes: `center_crop` (timm's eval transform: shorter side to
floor(S / crop_pct), then a centred S x S crop), `border` (timm's crop_mode border: the longer side to
floor(S / crop_pct), then centred crop or pad to S x S, padding with the mean colour) and `squash` (the
Head2Toe reference: resize to S x S, aspect ratio not kept, nothing cropped). The whole transform is part
of the store id.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config

from .backbone import check_model_name
from .config import Interpolation, ModelConfig
from .errors import H2TError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "center_crop"
    crop_pct: float = 0.875

    def as_dict(self) -> dict:
        out = {"input_size": self.input_size, "interpolation": self.interpolation, "mean": list(self.mean),
               "std": list(self.std), "resize": self.resize}
        if self.resize in ("center_crop", "border"):
            out["crop_pct"] = self.crop_pct
        return out

    def __call__(self, images, device: torch.device) -> torch.Tensor:
        """uint8 (B, H, W, 3) array or tensor (pinned: copied without blocking), or a list of (H, W, 3)
        arrays or of (3, H, W) tensors (decoded on the device) of any sizes -> (B, 3, S, S) float on the device."""
        if isinstance(images, torch.Tensor):
            batch = self._resize(images.to(device, non_blocking=True).permute(0, 3, 1, 2))
        elif isinstance(images, list):
            # every image as (H, W, 3), laid out as the arrays' path lays them out (a channels-last view):
            # the resize kernel, and so the rounding, is the same whichever decoder made the pixels
            hwc = [im.to(device).permute(1, 2, 0).contiguous() if isinstance(im, torch.Tensor)
                   else torch.from_numpy(im).to(device) for im in images]
            if hwc and all(im.shape == hwc[0].shape for im in hwc):
                batch = self._resize(torch.stack(hwc).permute(0, 3, 1, 2))  # one size: one resize call
            else:
                batch = torch.cat([self._resize(im[None].permute(0, 3, 1, 2)) for im in hwc])
        else:
            batch = self._resize(torch.from_numpy(images).to(device).permute(0, 3, 1, 2))
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (batch - mean) / std

    def _interpolate(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode=self.interpolation, antialias=True, align_corners=False)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        S = self.input_size
        if self.resize == "squash":
            return self._interpolate(x, (S, S)).clamp_(0.0, 1.0)
        height, width = x.shape[-2:]
        if self.resize == "border":
            return self._border(x, S)
        short = math.floor(S / self.crop_pct)
        scale = short / min(height, width)
        new = (max(S, round(height * scale)), max(S, round(width * scale)))
        x = self._interpolate(x, new)
        top, left = (new[0] - S) // 2, (new[1] - S) // 2
        return x[..., top:top + S, left:left + S].clamp_(0.0, 1.0)


    def _border(self, x: torch.Tensor, S: int) -> torch.Tensor:
        """timm's ResizeKeepRatio(longest side) + CenterCropOrPad, padding with the mean colour."""
        height, width = x.shape[-2:]
        scale = math.floor(S / self.crop_pct) / max(height, width)
        x = self._interpolate(x, (max(1, round(height * scale)), max(1, round(width * scale)))).clamp_(0.0, 1.0)
        fill = torch.tensor([round(255 * m) / 255 for m in self.mean], dtype=x.dtype, device=x.device)
        out = fill.view(1, 3, 1, 1).expand(x.shape[0], 3, S, S).clone()
        h, w = x.shape[-2:]
        src_top, src_left = max(0, round((h - S) / 2)), max(0, round((w - S) / 2))
        dst_top, dst_left = max(0, (S - h) // 2), max(0, (S - w) // 2)
        rows, cols = min(S, h), min(S, w)
        out[..., dst_top:dst_top + rows, dst_left:dst_left + cols] = x[..., src_top:src_top + rows,
                                                                       src_left:src_left + cols]
        return out


def build_preprocess(cfg: ModelConfig) -> Preprocess:
    """The model's pretrained config, with input_size / interpolation / resize / crop_pct / mean / std overridden."""
    check_model_name(cfg.name)
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
    # timm's own resolution of the model's data config (test_input_size when model.use_test_size)
    defaults = resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict(),
                                   use_test_size=bool(cfg.use_test_size)) if pretrained_cfg else {}
    input_size = cfg.input_size or defaults.get("input_size", (3, 224, 224))[-1]
    interpolation = str(cfg.interpolation or defaults.get("interpolation", "bilinear"))
    mean = tuple(float(v) for v in (cfg.mean or defaults.get("mean", IMAGENET_MEAN)))
    std = tuple(float(v) for v in (cfg.std or defaults.get("std", IMAGENET_STD)))
    default_resize = {"squash": "squash", "border": "border"}.get(str(defaults.get("crop_mode")), "center_crop")
    resize = str(cfg.resize or default_resize)
    crop_pct = cfg.crop_pct or defaults.get("crop_pct", 0.875)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 8:
        raise H2TError(f"model.input_size must be an integer >= 8, got {input_size!r}")
    if interpolation not in {choice.value for choice in Interpolation}:  # timm's pretrained config may name another
        raise H2TError(f"model.interpolation: {cfg.name}'s pretrained config asks for {interpolation!r}; "
                       f"set one of {', '.join(Interpolation)}")
    if not 0.0 < float(crop_pct) <= 1.0:
        raise H2TError(f"model.crop_pct must be in (0, 1], got {crop_pct}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise H2TError(f"model.mean and model.std need 3 values (std > 0), got {mean} / {std}")
    return Preprocess(int(input_size), interpolation, mean, std, resize, float(crop_pct))
