"""Applying a probed or tuned head to new images: the backbone up to the last selected tap, the store's
pooling and storage cast, the selected columns, per-layer normalisation, the linear head.

A head file (`<method>.head.pt` beside results.json) holds everything needed: the model config the store
was extracted with (and the store's spec to check it against), the selected taps and columns, the weights,
the class names. Features are cast to the store's dtype before use, so an image gets the numbers it would
have had in the store and a test folder's accuracy equals the reported test accuracy.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import cast

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .backbone import build_model, weights_fingerprint
from .config import ModelConfig
from .data.files import IMAGE_EXTENSIONS, load_image
from .devices import resolve_device
from .errors import H2TError
from .head import load_head, normalise_layers, plain_json
from .preprocess import build_preprocess
from .score.matrix import cast_into
from .stages import DeviceStage
from .storage.schema import from_bfloat16_bits
from .taps import TappedForward, select_taps


def head_file(path: str | Path, method: str = "head2toe") -> Path:
    """A head file, or the output folder of a probe, run or tune (its `<method>.head.pt`)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    found = path / f"{method}.head.pt"
    if not found.is_file():
        heads = sorted(p.name for p in path.glob("*.head.pt"))
        raise H2TError(f"{path} holds no {found.name}" + (f" (it has {', '.join(heads)}: use --method)" if heads else
                       " (probe, run and tune write <method>.head.pt in their output folder)"))
    return found


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given; folders searched recursively; a .txt file lists one path per line."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise H2TError(f"{p} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            out += found
        elif p.suffix.lower() == ".txt" and p.is_file():
            out += [Path(line.strip()).expanduser() for line in p.read_text().splitlines() if line.strip()]
        elif p.is_file():
            out.append(p)
        else:
            raise H2TError(f"{p}: no such file or folder")
    missing = [p for p in out if not p.is_file()]
    if missing:
        raise H2TError(f"{missing[0]}: no such image")
    return out


def model_settings(saved: dict) -> ModelConfig:
    """The model settings a head file holds, checked against the schema (older files may lack newer keys)."""
    return cast(ModelConfig, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved)))


class BackbonePart:
    """One backbone of a head file: the model up to its last selected tap, pooling and storage cast; gives
    the selected columns of its taps, raw (as the store holds them)."""

    def __init__(self, part: dict, device: torch.device):
        spec = part["spec"]
        model_cfg = model_settings(part["model_cfg"])
        if weights_fingerprint(model_cfg) != spec["model"]["weights"]:
            raise H2TError(f"the weights of {model_cfg.name} here differ from those store {part['store_id']} "
                           f"was extracted with: predictions would not match the head")
        self.preprocess = build_preprocess(model_cfg)
        if plain_json(self.preprocess.as_dict()) != spec["preprocess"]:
            raise H2TError(f"preprocessing of {model_cfg.name} here differs from store {part['store_id']}'s")
        self.layers = part["layers"]
        model = build_model(model_cfg).to(device)
        names = [layer["name"] for layer in self.layers]
        taps = select_taps(model, names)  # network order, as in the store
        self.order = [names.index(t.name) for t in taps]
        pooling = spec["pooling"]
        self.runner = TappedForward(model, taps, pooling["target_size"], pooling["rule"], pooling["cls_token"])
        ordered = [self.layers[i] for i in self.order]
        # int8 stores quantise per shard of rows: a single image has no shard, its values stay float32
        self.stage = DeviceStage(self.runner, self.preprocess, device, ordered,
                                 {layer["name"]: "float32" if layer["dtype"] == "int8" else layer["dtype"]
                                  for layer in ordered},
                                 precision=spec["model"].get("precision", "float32"))

    def columns(self, images) -> list[np.ndarray]:
        """Each of its taps' selected columns (float32), in the head file's order."""
        by_layer = dict(zip(self.order, self.stage.to_host(self.stage(images))))
        parts = []
        for i, layer in enumerate(self.layers):
            values = by_layer[i]
            if layer["dtype"] == "bfloat16":
                values = from_bfloat16_bits(values)
            cols = layer["columns"].numpy()
            parts.append(cast_into(np.empty((len(values), len(cols)), np.float32), values[:, cols]))
        return parts

    def close(self) -> None:
        self.runner.close()


class Predictor:
    """The backbone(s) (each up to its last selected tap), pooling, storage cast, columns and head of one
    head file. A head over a union of stores runs each backbone that has selected columns."""

    def __init__(self, artefact: dict, device: str = "auto"):
        self.artefact = artefact
        self.device = resolve_device(device)
        members = artefact.get("backbones") or [artefact]
        self.parts = []
        try:
            for member in members:
                if member["layers"]:  # a backbone none of whose features were selected is not run
                    self.parts.append(BackbonePart(member, self.device))
        except BaseException:
            self.close()
            raise
        self.head = torch.nn.Linear(artefact["weight"].shape[1], artefact["weight"].shape[0])
        with torch.no_grad():
            self.head.weight.copy_(artefact["weight"])
            self.head.bias.copy_(artefact["bias"])

    def features(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """(n, selected columns) as the head was trained on: store-cast, then per-layer L2-normalised."""
        parts = [columns for part in self.parts for columns in part.columns(images)]
        plan = {layer["name"]: layer["columns"].numpy() for layer in self.artefact["layers"]}
        return normalise_layers(np.concatenate(parts, axis=1), plan)

    def probabilities(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self.head(torch.from_numpy(self.features(images))), dim=1).numpy()

    def close(self) -> None:
        for part in self.parts:
            part.close()


def predict_files(head_path: str, inputs: list[str], out: str | Path, batch_size: int = 64,
                  device: str = "auto", progress: bool = True, method: str = "head2toe") -> tuple[Path, int, float | None]:
    """Predictions for every image -> CSV (path, class, class_index, probability). Returns (CSV path, images,
    accuracy against the images' parent folder names when every one of them names a class, else None)."""
    artefact = load_head(head_file(head_path, method))
    paths = image_paths(inputs)
    names = artefact["class_names"]
    predictor = Predictor(artefact, device)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    correct, labelled = 0, all(p.parent.name in names for p in paths)
    try:
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "class_index", "probability"])
            for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=not progress):
                chunk = paths[start:start + batch_size]
                images = [load_image(p) for p in chunk]
                same = len({im.shape for im in images}) == 1
                probs = predictor.probabilities(np.stack(images) if same else images)  # a list: sizes differ
                for p, row in zip(chunk, probs):
                    k = int(row.argmax())
                    writer.writerow([str(p), names[k], k, f"{row[k]:.6f}"])
                    correct += labelled and names[k] == p.parent.name
    finally:
        predictor.close()
    return out, len(paths), (correct / len(paths) if labelled else None)
