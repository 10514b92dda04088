"""Named taps: which activations of a backbone are recorded, in a fixed order, and pooled inside the forward.

A tap is a module path (its forward output is recorded) or one of the two head taps `pre_logits` and
`logits`. Each family has an explicit, ordered default list (docs/ARCHITECTURE.md); any other timm model
gets its feature_info modules. Users choose a subset by names or glob patterns.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .errors import H2TError
from .pooling import pool_activation

HEAD_TAPS = ("pre_logits", "logits")


@dataclass(frozen=True)
class Tap:
    name: str  # module path, or one of HEAD_TAPS
    role: str  # what the activation is: stem, expansion, depthwise, block, attention, mlp_hidden, ...
    layout: str = "nchw"  # 4-D outputs: nchw, or nhwc (channels last: Swin, ConvNeXt's MLP)
    prefix_tokens: int = 0  # token maps that start with CLS / register / distillation tokens


def _resnet_taps(model) -> list[Tap]:
    taps = [Tap("act1", "stem")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for idx, block in enumerate(getattr(model, stage)):
            path = f"{stage}.{idx}"
            taps.append(Tap(f"{path}.act1", "conv1"))
            if hasattr(block, "conv3"):  # bottleneck: the three conv outputs after norm + activation
                taps.append(Tap(f"{path}.act2", "conv2"))
            taps.append(Tap(path, "block"))
    return taps


_EFFICIENTNET_BLOCK_TAPS = {
    "InvertedResidual": (("bn1", "expansion"), ("bn2", "depthwise")),
    "CondConvResidual": (("bn1", "expansion"), ("bn2", "depthwise")),
    "DepthwiseSeparableConv": (("bn1", "depthwise"),),
    "EdgeResidual": (("bn1", "expansion"),),
}


def _efficientnet_taps(model) -> list[Tap]:
    taps = [Tap("bn1", "stem")]
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            path = f"blocks.{s}.{b}"
            for sub, role in _EFFICIENTNET_BLOCK_TAPS.get(type(block).__name__, ()):
                taps.append(Tap(f"{path}.{sub}", role))
            taps.append(Tap(path, "block"))
    if isinstance(getattr(model, "bn2", None), torch.nn.Module) and not isinstance(model.bn2, torch.nn.Identity):
        taps.append(Tap("bn2", "head_conv"))
    return taps


def _vit_taps(model) -> list[Tap]:
    p = int(getattr(model, "num_prefix_tokens", 0))
    taps = [Tap("patch_embed", "patch_embedding"), Tap("pos_drop", "position_embedded", prefix_tokens=p)]
    for i, _ in enumerate(model.blocks):
        path = f"blocks.{i}"
        taps += [Tap(f"{path}.norm1", "pre_attention_norm", prefix_tokens=p),
                 Tap(f"{path}.attn", "attention", prefix_tokens=p),
                 Tap(f"{path}.mlp.act", "mlp_hidden", prefix_tokens=p), Tap(f"{path}.mlp", "mlp_output", prefix_tokens=p)]
    taps.append(Tap("norm", "final_sequence", prefix_tokens=p))
    return taps


def _stage_blocks(model):
    """(path, block) for every block of models laid out as stages[i].blocks[j]."""
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage.blocks):
            yield f"stages.{s}.blocks.{b}", block


def _resnetv2_taps(model) -> list[Tap]:
    """Pre-activation ResNet, as the reference: the input of every conv after norm + ReLU."""
    taps = [Tap("stem", "stem")]
    for path, block in _stage_blocks(model):
        taps += [Tap(f"{path}.{sub}", f"conv{sub[-1]}_input") for sub in ("norm1", "norm2", "norm3")
                 if isinstance(getattr(block, sub, None), torch.nn.Module)]
    taps.append(Tap("norm", "final_map"))
    return taps


def _convnext_taps(model) -> list[Tap]:
    taps = [Tap("stem", "stem")]
    for path, block in _stage_blocks(model):
        hidden_layout = "nchw" if getattr(block, "use_conv_mlp", False) else "nhwc"
        taps += [Tap(f"{path}.conv_dw", "depthwise"), Tap(f"{path}.mlp.act", "mlp_hidden", hidden_layout),
                 Tap(path, "block")]
    return taps


def _regnet_taps(model) -> list[Tap]:
    taps = [Tap("stem", "stem")]
    for stage_name in ("s1", "s2", "s3", "s4"):
        for block_name, block in getattr(model, stage_name).named_children():
            path = f"{stage_name}.{block_name}"
            taps += [Tap(f"{path}.conv1", "conv1"), Tap(f"{path}.conv2", "conv2"), Tap(path, "block")]
    return taps


def _swin_taps(model) -> list[Tap]:
    taps = [Tap("patch_embed", "patch_embedding", "nhwc")]
    for s, layer in enumerate(model.layers):
        for b, _ in enumerate(layer.blocks):
            path = f"layers.{s}.blocks.{b}"
            taps += [Tap(f"{path}.norm1", "pre_attention_norm", "nhwc"), Tap(f"{path}.mlp.act", "mlp_hidden", "nhwc"),
                     Tap(path, "block", "nhwc")]
    taps.append(Tap("norm", "final_map", "nhwc"))
    return taps


def _feature_info_taps(model) -> list[Tap]:
    info = getattr(model, "feature_info", None) or []
    taps = [Tap(item["module"], "feature") for item in info if item.get("module")]
    if not taps:
        raise H2TError(f"{type(model).__name__} has no tap list and no feature_info: "
                       f"name modules with taps.include=[...] (module paths)")
    return taps


def default_taps(model: torch.nn.Module) -> list[Tap]:
    """The family's explicit, ordered tap list, ending with pre-logits and logits."""
    families = ((ResNet, _resnet_taps), (ResNetV2, _resnetv2_taps), ((EfficientNet, MobileNetV3), _efficientnet_taps),
                (ConvNeXt, _convnext_taps), (RegNet, _regnet_taps), (VisionTransformer, _vit_taps),
                (SwinTransformer, _swin_taps))
    body = next((rule(model) for cls, rule in families if isinstance(model, cls)), None)
    if body is None:
        body = _feature_info_taps(model)
    return body + [Tap("pre_logits", "pre_logits"), Tap("logits", "logits")]


def matches(name: str, pattern: str) -> bool:
    """Glob over dotted paths: `*` and `?` stay within one component, `**` spans components."""
    regex = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", "[^.]*").replace(r"\?", "[^.]")
    return re.fullmatch(regex.replace("\0", ".*"), name) is not None


def select_taps(model: torch.nn.Module, include=("**",), exclude=()) -> list[Tap]:
    """Default taps filtered by glob patterns; a pattern that names a module outside the list adds it."""
    defaults = default_taps(model)
    modules = dict(model.named_modules())
    chosen: list[Tap] = []
    for pattern in include:
        pattern = str(pattern)
        hits = [t for t in defaults if matches(t.name, pattern)]
        if not hits:  # module paths or patterns outside the family's list: user taps
            hits = [Tap(name, "user") for name in modules if name and matches(name, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, [t.name for t in defaults] + list(modules), n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise H2TError(f"tap {pattern!r} matches no tap or module of {type(model).__name__}{hint}")
        chosen += [t for t in hits if t not in chosen]
    for pattern in exclude:
        chosen = [t for t in chosen if not matches(t.name, str(pattern))]
    if not chosen:
        raise H2TError("taps.include / taps.exclude leave no tap selected")
    order = {t.name: i for i, t in enumerate(defaults)}
    module_order = {name: i for i, name in enumerate(modules)}
    # Keep the network's order: default taps by their list position, user modules by definition order.
    return sorted(chosen, key=lambda t: (order.get(t.name, len(order)), module_order.get(t.name, 0)))


class _AllTapsSeen(Exception):
    """Raised by a hook once every tap has its activation: the rest of the forward is not needed."""


class TappedForward:
    """Runs the backbone once and returns every tap's activation pooled on the device, in tap order.

    Without head taps the forward stops as soon as every tap has fired, so taps that all sit early in
    the network cost only the layers up to them."""

    def __init__(self, model: torch.nn.Module, taps: list[Tap], target_size: int, pooling_rule: str = "head2toe",
                 cls_mode: str = "pooled"):
        self.model: Any = model  # a timm model: forward_features / forward_head
        self.taps, self.target_size, self.rule = taps, target_size, pooling_rule
        self.cls_mode = cls_mode
        self.module_taps = [t for t in taps if t.name not in HEAD_TAPS]
        self.want_head = {t.name for t in taps if t.name in HEAD_TAPS}
        self._out: dict[str, torch.Tensor] = {}
        self._running = False
        self._shapes: dict[str, tuple[int, ...]] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[t.name].register_forward_hook(self._hook(t)) for t in self.module_taps]

    def _hook(self, tap: Tap):
        def record(_module, _inputs, output):
            if not self._running:  # another runner's forward on the same model
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            shape = tuple(output.shape[1:])
            self._shapes[tap.name] = (shape[2], shape[0], shape[1]) if len(shape) == 3 and tap.layout == "nhwc" else shape
            self._out[tap.name] = pool_activation(output, self.target_size, self.rule, tap.layout, tap.prefix_tokens,
                                                  self.cls_mode)
            if not self.want_head and len(self._out) == len(self.module_taps):
                raise _AllTapsSeen
        return record

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._out.clear()
        self._running = True
        try:
            self._forward(x)
        except _AllTapsSeen:
            pass
        finally:
            self._running = False
        missing = [t.name for t in self.taps if t.name not in self._out]
        if missing:
            raise H2TError(f"tap {missing[0]!r} produced no activation in forward_features of "
                           f"{type(self.model).__name__}")
        return [self._out[t.name] for t in self.taps]

    def _forward(self, x: torch.Tensor) -> None:
        features = self.model.forward_features(x)
        if self.want_head:
            pre_logits = self.model.forward_head(features, pre_logits=True)
            self._out["pre_logits"] = pre_logits.flatten(1)
            self._shapes["pre_logits"] = tuple(pre_logits.shape[1:])
            if "logits" in self.want_head:
                logits = self.model.forward_head(features)
                self._out["logits"], self._shapes["logits"] = logits.flatten(1), tuple(logits.shape[1:])

    def layer_table(self, input_size: int) -> list[dict]:
        """Raw shape and pooled width of each tap, from one forward of a meta tensor (no compute)."""
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            self(torch.zeros(1, 3, input_size, input_size, device=device))
        table, offset = [], 0
        for t in self.taps:
            dim = int(self._out[t.name].shape[1])
            table.append({"name": t.name, "role": t.role, "raw_shape": list(self._shapes[t.name]), "dim": dim,
                          "offset": offset})
            offset += dim
        return table

    def close(self) -> None:
        for h in self._handles:
            h.remove()
