"""Head2Toe pooling: reduce each tapped activation to about `target_size` features.

The paper's rule is applied on the device inside the forward, so full maps never reach the
host. Sizes are computed by `pooled_dim` from shapes alone, so the store layout is known before any image
goes through the backbone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import H2TError

POOLING_RULES = ("head2toe",)
CLS_MODES = ("pooled", "only", "separate")  # prefix (CLS) tokens: pooled with the patch tokens, alone, kept raw


def _conv_kernel(channels: int, height: int, width: int, target_size: int) -> tuple[int, int]:
    """Kernel (= stride) of the average pool per axis; (0, 0) means global average.

    The reference derives one kernel from H for square maps; a non-square map gets H // n and W // n.
    """
    if channels >= target_size:
        return 0, 0
    n = math.isqrt(target_size // channels)
    if n == 0 or height // n == 0 or width // n == 0:
        return 0, 0
    return height // n, width // n


def _token_kernel(tokens: int, channels: int, target_size: int) -> int:
    """Kernel (= stride) of the 1-D average pool over tokens; 0 means mean over all tokens."""
    if channels >= target_size:
        return 0
    groups = target_size / channels
    # When there are fewer tokens than the budget allows, the reference's kernel would be 0: keep all tokens.
    return max(int(tokens / groups), 1)


def pooled_dim(shape: tuple[int, ...], target_size: int) -> int:
    """Number of features a per-example activation of `shape` pools to (batch axis excluded)."""
    if len(shape) == 1:
        return shape[0]
    if len(shape) == 2:  # tokens (N, C)
        tokens, channels = shape
        k = _token_kernel(tokens, channels, target_size)
        return channels if k == 0 else channels * (tokens // k)
    if len(shape) == 3:  # conv map (C, H, W)
        channels, height, width = shape
        kh, kw = _conv_kernel(channels, height, width, target_size)
        if kh == 0:
            return channels
        return channels * (height // kh) * (width // kw)
    raise H2TError(f"cannot pool an activation of shape {tuple(shape)}: expected (C,), (N, C) or (C, H, W)")


def column_recipe(shape: tuple[int, ...], target_size: int, rule: str, cls_mode: str) -> list:
    """What a tap's columns are computed from besides the activation itself: two stores of one backbone and
    dataset whose layers share name, raw shape and recipe hold the same numbers (pipeline/reuse.py)."""
    if len(shape) == 1:
        return ["vector"]
    if len(shape) == 2:
        # the kernel depends on how many prefix tokens there are, which the shape does not say: keep T
        return ["tokens", rule, target_size if shape[1] < target_size else 0, cls_mode]
    channels, height, width = shape
    return ["conv", rule, *_conv_kernel(channels, height, width, target_size)]


def pool(x: torch.Tensor, target_size: int, rule: str = "head2toe") -> torch.Tensor:
    """Pool a batch of activations (B, C) / (B, N, C) / (B, C, H, W) to (B, pooled_dim)."""
    if rule not in POOLING_RULES:
        raise H2TError(f"unknown pooling.rule={rule!r}; known: {', '.join(POOLING_RULES)}")
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        _, tokens, channels = x.shape
        k = _token_kernel(tokens, channels, target_size)
        if k == 0:
            return x.mean(dim=1)
        pooled = F.avg_pool1d(x.transpose(1, 2), kernel_size=k, stride=k)  # (B, C, N // k)
        return pooled.flatten(1)
    if x.ndim == 4:
        _, channels, height, width = x.shape
        kh, kw = _conv_kernel(channels, height, width, target_size)
        if kh == 0:
            return x.mean(dim=(2, 3))
        if kh == kw == 1:  # nothing to average: one copy in (C, H, W) order, whatever x's memory layout (the
            # forward may change its output in place later); 15-40x cheaper on a CPU than avg_pool2d's pass
            return x.clone(memory_format=torch.contiguous_format).flatten(1)
        return F.avg_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw)).flatten(1)
    raise H2TError(f"cannot pool an activation of shape {tuple(x.shape)}")


def validate_target_size(target_size) -> int:
    if isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < 1:
        raise H2TError(f"pooling.target_size must be a positive integer, got {target_size!r}")
    return target_size


def pool_activation(x: torch.Tensor, target_size: int, rule: str = "head2toe", layout: str = "nchw",
                    prefix_tokens: int = 0, cls_mode: str = "pooled") -> torch.Tensor:
    """Pool one tap's batch, given its layout: channels-last maps are made channels-first; token maps with
    prefix tokens follow `cls_mode` (`pooled`: CLS averaged with the patches, `only`: the CLS vector,
    `separate`: the raw CLS vector followed by the pooled patch tokens)."""
    if cls_mode not in CLS_MODES:
        raise H2TError(f"pooling.cls_token must be one of {', '.join(CLS_MODES)}, got {cls_mode!r}")
    if x.ndim == 4 and layout == "nhwc":
        x = x.permute(0, 3, 1, 2)
    if x.ndim == 3 and prefix_tokens and cls_mode != "pooled":
        if cls_mode == "only":
            return x[:, 0]
        return torch.cat([x[:, 0], pool(x[:, prefix_tokens:], target_size, rule)], dim=1)
    return pool(x, target_size, rule)
