"""Data from the user's disk: image folders, a CSV manifest, numpy .npz arrays. Never downloads.

Every image is converted the way the models expect: 8-bit RGB (grayscale replicated, alpha dropped, palette
expanded, 16-bit scaled down, EXIF orientation applied). A file that cannot be read stops the run with a line
naming it, or with `data.on_error=skip` is left out and recorded (store attributes, results.json).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..decode import decode_file, to_rgb_array  # noqa: F401 - to_rgb_array: imported from here by other sources
from ..errors import H2TError
from .base import SPLITS, Dataset, Pool, assemble, register, to_rgb_uint8

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_image(path: Path) -> np.ndarray:
    """Any PIL-readable image file as uint8 (H, W, 3), JPEGs through the fastest decoder with PIL's pixels
    (pipeline/decode.py); a broken or missing file is an error naming it."""
    return decode_file(path)


def _file_pool(root: Path, paths: list[Path], labels: list[int]) -> Pool:
    return Pool([str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths],
                np.asarray(labels, dtype=np.int64), lambda i: load_image(paths[i]), path_of=paths.__getitem__)


def _file_stats(root: Path, pools: dict[str, Pool]) -> list:
    """Size and mtime of every file: a changed or replaced file changes the dataset id."""
    out: list[tuple[str, int | None, int | None]] = []
    for pool in pools.values():
        for rel in pool.ids:
            try:
                st = (root / rel).stat()
                out.append((rel, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((rel, None, None))  # missing: reported when read
    return out


def _directory(root, key: str) -> Path:
    if not root:
        raise H2TError(f"data.{key} is required (a path on this machine)")
    return Path(os.path.expanduser(str(root)))


# --- image folders ---------------------------------------------------------------------------------------

def _list_class_dirs(split_dir: Path) -> dict[str, list[Path]]:
    try:
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
        files = {}
        for d in class_dirs:
            images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not images:
                raise H2TError(f"class directory {d} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files[d.name] = images
    except PermissionError as exc:
        raise H2TError(f"cannot read directory {exc.filename}: permission denied") from None
    except OSError as exc:
        raise H2TError(f"cannot read directory {exc.filename or split_dir}: {exc.strerror}") from None
    if not files:
        raise H2TError(f"{split_dir} has no class subdirectories (expected {split_dir}/<class>/<image>)")
    return files


@register("folder")
def folder(root: str | None = None, val_fraction: float = 0.2, seed: int = 0, name: str | None = None,
           sizes: dict | None = None, on_error: str = "error") -> Dataset:
    """ROOT/train/<class>/*, ROOT/test/<class>/*, optional ROOT/val/<class>/* (else carved from train)."""
    base = _directory(root, "root")
    for required in ("train", "test"):
        if not (base / required).is_dir():
            raise H2TError(f"data.root={base}: missing directory {base / required} "
                           f"(expected {base}/train/<class>/*, {base}/test/<class>/*)")
    train = _list_class_dirs(base / "train")
    classes = sorted(train)
    index = {c: i for i, c in enumerate(classes)}
    pools = {}
    for split in SPLITS:
        if split != "train" and not (base / split).is_dir():
            continue
        files = train if split == "train" else _list_class_dirs(base / split)
        unknown = sorted(set(files) - set(index))
        if unknown:
            raise H2TError(f"{base / split}: class {unknown[0]!r} does not exist in {base / 'train'}")
        pairs = [(p, index[c]) for c in sorted(files) for p in files[c]]
        pools[split] = _file_pool(base, [p for p, _ in pairs], [y for _, y in pairs])
    source = {"source": "folder", "root": str(base.resolve()), "files": _file_stats(base, pools)}
    return assemble(name or base.name, pools, len(classes), classes, source, sizes, seed, val_fraction, on_error)


# --- CSV manifest ----------------------------------------------------------------------------------------

@register("csv")
def csv_manifest(path: str | None = None, num_classes: int | None = None, val_fraction: float = 0.2,
                 test_fraction: float = 0.2, seed: int = 0, name: str | None = None, sizes: dict | None = None,
                 on_error: str = "error") -> Dataset:
    """A CSV of `path,label[,split]` rows (header optional); paths relative to the CSV's directory."""
    manifest = _directory(path, "path")
    if not manifest.is_file():
        raise H2TError(f"data.path={manifest}: no such CSV file")
    rows = []
    with open(manifest, newline="") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if line_no == 1 and row[0].strip().lower() == "path":
                continue  # header
            if len(row) not in (2, 3):
                raise H2TError(f"{manifest} line {line_no}: expected path,label[,split], got {len(row)} fields")
            label_text = row[1].strip()
            try:
                label = int(label_text)
            except ValueError:
                raise H2TError(f"{manifest} line {line_no}: label {label_text!r} is not an integer") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise H2TError(f"{manifest} line {line_no}: label {label} is outside 0..{(num_classes or 1) - 1}"
                               if num_classes else f"{manifest} line {line_no}: label {label} is negative")
            split = row[2].strip() if len(row) == 3 else None
            if split is not None and split not in SPLITS:
                raise H2TError(f"{manifest} line {line_no}: split {split!r} is not one of {', '.join(SPLITS)}")
            rows.append((manifest.parent / row[0].strip(), label, split))
    if not rows:
        raise H2TError(f"{manifest} lists no images")
    k = num_classes or max(label for _, label, _ in rows) + 1
    have_splits = {s for _, _, s in rows}
    if have_splits == {None}:  # no split column: a deterministic test split first
        if not 0.0 < float(test_fraction) < 1.0:
            raise H2TError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        order = np.random.default_rng([seed, 3]).permutation(len(rows))
        n_test = max(1, int(round(len(rows) * float(test_fraction))))
        test = set(order[:n_test].tolist())
        rows = [(p, y, "test" if i in test else "train") for i, (p, y, _) in enumerate(rows)]
    elif None in have_splits:
        raise H2TError(f"{manifest}: some rows have a split column and some do not")
    base = manifest.parent
    pools = {s: _file_pool(base, [p for p, _, r in rows if r == s], [y for _, y, r in rows if r == s])
             for s in SPLITS if any(r == s for _, _, r in rows)}
    source = {"source": "csv", "path": str(manifest.resolve()), "num_classes": k, "test_fraction": test_fraction,
              "files": _file_stats(base, pools)}
    return assemble(name or manifest.stem, pools, k, [str(c) for c in range(k)], source, sizes, seed,
                    val_fraction, on_error)


# --- numpy arrays ----------------------------------------------------------------------------------------

def _images_nhwc(images: np.ndarray, what: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise H2TError(f"{what}: images must be uint8, got {images.dtype}")
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    try:
        return to_rgb_uint8(images)
    except H2TError as exc:
        raise H2TError(f"{what}: {exc}") from None


@register("npz")
def npz(path: str | None = None, num_classes: int | None = None, val_fraction: float = 0.2, seed: int = 0,
        name: str | None = None, sizes: dict | None = None, on_error: str = "error") -> Dataset:
    """x_<split> / y_<split> arrays (train and test required, val optional), uint8 NHWC or NCHW."""
    file = _directory(path, "path")
    if not file.is_file():
        raise H2TError(f"data.path={file}: no such .npz file")
    try:
        arrays = np.load(file, allow_pickle=False)
        names = set(arrays.files)
    except (OSError, ValueError) as exc:
        raise H2TError(f"cannot read {file}: {exc}") from None
    pools = {}
    for split in SPLITS:
        xk, yk = f"x_{split}", f"y_{split}"
        if xk not in names and split == "val":
            continue
        if xk not in names or yk not in names:
            raise H2TError(f"{file}: needs arrays {xk} and {yk} (has {', '.join(sorted(names))})")
        images = _images_nhwc(arrays[xk], f"{file}:{xk}")
        labels = arrays[yk]
        if not np.issubdtype(labels.dtype, np.integer):
            raise H2TError(f"{file}:{yk}: labels must be integers, got {labels.dtype}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise H2TError(f"{file}:{yk}: expected {len(images)} labels, got shape {labels.shape}")
        pools[split] = Pool([f"{split}/{i}" for i in range(len(labels))], labels.astype(np.int64),
                            lambda i, im=images: im[i], images)  # type: ignore[misc]
    k = num_classes or int(max(p.labels.max() for p in pools.values())) + 1
    for split, pool in pools.items():
        bad = np.flatnonzero((pool.labels < 0) | (pool.labels >= k))
        if len(bad):
            raise H2TError(f"{file}:y_{split}[{bad[0]}] = {pool.labels[bad[0]]} is outside 0..{k - 1}")
    source = {"source": "npz", "path": str(file.resolve()), "num_classes": k}
    return assemble(name or file.stem, pools, k, [str(c) for c in range(k)], source, sizes, seed, val_fraction,
                    on_error)
