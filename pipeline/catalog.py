"""The store catalog: list, describe, verify, remove and clean up stores under a root (local directories)."""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import H2TError
from .store import STATUS_COMPLETE, FeatureStore, open_store


def find_stores(root: str) -> list[Path]:
    """Every `<root>/<model>/<dataset>/<id>.zarr` under a local root."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise H2TError(f"store root {base} is not a directory")
    return sorted(p for p in base.glob("*/*/*.zarr") if (p / "zarr.json").is_file())


def resolve(ref: str, root: str) -> Path:
    """A store by path, or by id (or a unique id prefix) under root."""
    path = Path(ref).expanduser()
    if (path / "zarr.json").is_file():
        return path
    hits = [p for p in find_stores(root) if p.stem.startswith(ref)]
    if not hits:
        raise H2TError(f"no store {ref!r} under {root} (give a path or an id from `h2t store ls`)")
    if len(hits) > 1:
        raise H2TError(f"store id prefix {ref!r} is ambiguous: {', '.join(p.stem for p in hits)}")
    return hits[0]


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _last_modified(path: Path) -> float:
    return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)


def summary(store: FeatureStore) -> dict:
    meta, spec = store.meta, store.meta["spec"]
    return {
        "id": store.id, "path": str(store.path), "model": spec["model"]["name"], "dataset": spec["dataset"]["name"],
        "splits": store.splits(), "taps": len(store.layers), "features": store.n_features,
        "target_size": spec.get("pooling", {}).get("target_size"), "dtype": spec.get("dtype"),
        "size_bytes": _size_on_disk(Path(store.path)), "status": meta["status"],
        "created_at": meta.get("created_at"), "created_by": meta.get("created_by"),
    }


def list_summaries(root: str) -> list[dict]:
    out = []
    for path in find_stores(root):
        try:
            out.append(summary(open_store(str(path))))
        except H2TError as exc:
            out.append({"id": path.stem, "path": str(path), "status": f"unreadable: {exc}"})
    return out


def verify(store: FeatureStore) -> list[str]:
    """Problems found by reading every shard of every array (checksums) and checking the ledger; [] = sound."""
    problems = []
    shard_rows = store.meta["shard_rows"]
    for split, n in store.splits().items():
        done = store.shards_done(split)
        n_shards = -(-n // shard_rows)
        if store.complete and not done.all():
            problems.append(f"{split}: store is marked complete but {int((done == 0).sum())} shards are not")
        for layer in store.layers:
            arr = store.features(split, layer["name"])
            for shard in range(n_shards):
                where = f"{split}/features/{layer['name']} shard {shard} (rows {shard * shard_rows}.."
                where += f"{min(n, (shard + 1) * shard_rows) - 1})"
                if not done[shard]:
                    continue  # not written yet: nothing to check
                if not store.shard_exists(split, layer["name"], shard):
                    problems.append(f"{where}: missing")
                    continue
                try:
                    block = arr[shard * shard_rows:(shard + 1) * shard_rows]
                except Exception as exc:  # noqa: BLE001 - any decode failure is corruption
                    problems.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                    continue
                if not np.isfinite(block).all():
                    problems.append(f"{where}: non-finite values")
        try:
            labels = store.labels(split)
            if len(labels) != n or labels.min() < 0 or labels.max() >= store.meta["num_classes"]:
                problems.append(f"{split}/labels: {len(labels)} labels, range {labels.min()}..{labels.max()}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{split}/labels: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return problems


def remove(path: Path) -> None:
    if not (path / "zarr.json").is_file():
        raise H2TError(f"{path} is not a store")
    shutil.rmtree(path)
    for parent in (path.parent, path.parent.parent):  # drop empty <dataset>/ and <model>/ directories
        try:
            parent.rmdir()
        except OSError:
            break


def abandoned(root: str, older_than_s: float) -> list[Path]:
    """Incomplete stores nobody has written to for `older_than_s` seconds."""
    now = time.time()
    out = []
    for path in find_stores(root):
        try:
            status = open_store(str(path)).meta["status"]
        except H2TError:
            status = "unreadable"
        if status != STATUS_COMPLETE and now - _last_modified(path) > older_than_s:
            out.append(path)
    return out


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def age(iso: str | None) -> str:
    if not iso:
        return "?"
    created = _dt.datetime.fromisoformat(iso)
    return created.strftime("%Y-%m-%d %H:%M")


def default_root() -> str:
    return os.environ.get("H2T_STORE_ROOT", "stores")
