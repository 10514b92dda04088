"""The store catalog: list, describe, verify, remove and clean up stores under a local or s3:// root."""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import H2TError
from . import location, views, zarr_compat
from .handle import array_at, group_at, read_all
from .quant import DequantizedArray, QuantizedBlock, dequantize
from .schema import check_arrays, check_attrs
from .store import STATUS_COMPLETE, FeatureStore, open_store


def options() -> dict:
    """Remote credentials for catalog commands: the AWS_* environment variables."""
    return location.storage_options(None)


def _children(store, prefix: str) -> list[str]:
    try:
        return [name.rstrip("/") for name in zarr_compat.collect(store.list_dir(prefix))]
    except Exception as exc:  # noqa: BLE001 - remote listing failures
        raise H2TError(location.describe_failure(str(prefix), exc)) from None


def find_stores(root: str) -> list[str]:
    """Every `<root>/<model>/<dataset>/<id>.zarr` under a local or s3:// root."""
    if location.read_only_scheme(root):
        raise H2TError(f"cannot list {root} (http has no listing): give the store's path instead")
    if location.is_remote(root):
        store = location.zarr_store(root, options(), read_only=True)
        found = []
        for model in _children(store, ""):
            for dataset in _children(store, model):
                for name in _children(store, f"{model}/{dataset}"):
                    if name.endswith(".zarr") and zarr_compat.run(store.exists(f"{model}/{dataset}/{name}/zarr.json")):
                        found.append(location.join(root, model, dataset, name))
        return sorted(found)
    base = location.local_path(root)
    if not base.is_dir():
        raise H2TError(f"store root {base} is not a directory")
    return sorted(str(p) for p in base.glob("*/*/*.zarr") if (p / "zarr.json").is_file())


def _stem(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")


def resolve(ref: str, root: str) -> str:
    """A store by path or URL, or by id (or a unique id prefix) under root; one line for anything else."""
    not_a_store = (f"{ref} is not a store (no zarr.json there); for the stores under a root: "
                   f"h2t store ls {ref}")
    if location.is_remote(ref):
        return ref  # checked when opened
    local = location.local_path(ref)
    if (local / "zarr.json").is_file():
        return ref
    if local.is_dir():
        raise H2TError(not_a_store)
    if "/" in ref or ref.endswith(".zarr"):
        raise H2TError(f"{ref}: no such store")
    if not location.is_remote(root) and not location.local_path(root).is_dir():
        raise H2TError(f"no store {ref!r}: the store root {root} does not exist (give --root or a path)")
    hits = [p for p in find_stores(root) if _stem(p).startswith(ref)]
    if not hits:
        raise H2TError(f"no store {ref!r} under {root} (give a path or an id from `h2t store ls`)")
    if len(hits) > 1:
        raise H2TError(f"store id prefix {ref!r} is ambiguous: {', '.join(_stem(p) for p in hits)}")
    return hits[0]


def open_resolved(path: str) -> FeatureStore:
    """The store at a resolved path; a root or an empty prefix is named as such."""
    store = open_store(path, options=options())
    if store is None:
        raise H2TError(f"{path} is not a store (no zarr.json there); for the stores under a root: "
                       f"h2t store ls {path}")
    return store


def _size_on_storage(store: FeatureStore) -> int:
    if not location.is_remote(store.path):
        return sum(f.stat().st_size for f in location.local_path(store.path).rglob("*") if f.is_file())
    return int(zarr_compat.run(store.group.store.getsize_prefix("")))


def _last_modified(path: Path) -> float:
    return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)


def summary(store: FeatureStore) -> dict:
    info, spec = store.info, store.info.spec
    return {
        "id": info.id, "path": str(store.path), "model": spec["model"]["name"], "dataset": spec["dataset"]["name"],
        "splits": dict(info.splits), "taps": len(info.layers), "features": info.n_features,
        "target_size": spec.get("pooling", {}).get("target_size"), "dtype": spec.get("dtype"),
        "size_bytes": _size_on_storage(store), "status": info.status,
        "created_at": info.created_at, "created_by": info.created_by,
    }


def list_summaries(root: str) -> list[dict]:
    return summaries(find_stores(root))


def summaries(paths: list[str]) -> list[dict]:
    """A summary of each listed store; a store removed since it was listed (another `h2t store rm` or `gc`)
    is left out."""
    out = []
    for path in paths:
        try:
            store = open_store(path, options=options())
            if store is not None:
                out.append(summary(store))
        except H2TError as exc:
            out.append({"id": _stem(path), "path": path, "status": f"unreadable: {exc}"})
    return out


def verify(store: FeatureStore) -> list[str]:
    """Problems found by reading every shard of every array (checksums) and checking the ledger; [] = sound."""
    problems = check_attrs(store.meta) + check_arrays(store.group, store.meta)
    if problems:
        return problems  # the arrays are not what the attributes say: reading them would mislead
    shard_rows = store.info.shard_rows
    for split, n in store.splits().items():
        done = store.shards_done(split)
        n_shards = -(-n // shard_rows)
        if store.complete and not done.all():
            problems.append(f"{split}: store is marked complete but {int((done == 0).sum())} shards are not")
        for layer in store.layers:
            arr = store.features(split, layer["name"])
            for shard in range(n_shards):
                rows = f"shard {shard} (rows {shard * shard_rows}..{min(n, (shard + 1) * shard_rows) - 1})"
                where = f"{split}/features/{layer['name']} {rows}"
                if not done[shard]:
                    continue  # not written yet: nothing to check
                missing = store.missing_objects(split, layer["name"], shard)
                if missing:
                    problems += [f"{path} {rows}: missing" for path in missing]
                    continue
                try:
                    if isinstance(arr, DequantizedArray):  # each object read on its own: a corrupt one is named
                        where = f"{arr.params.path} {rows}"
                        params = arr.params[shard]
                        where = f"{split}/features/{layer['name']} {rows}"
                        codes = arr.codes[shard * shard_rows:(shard + 1) * shard_rows]
                        block = dequantize(QuantizedBlock(codes, params))
                    else:
                        block = arr[shard * shard_rows:(shard + 1) * shard_rows]
                except Exception as exc:  # noqa: BLE001 - any decode failure is corruption
                    problems.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                    continue
                if not np.isfinite(store.decode(layer["name"], block)).all():
                    problems.append(f"{where}: non-finite values")
        try:
            labels = store.labels(split)
            if len(labels) != n or labels.min() < 0 or labels.max() >= store.info.num_classes:
                problems.append(f"{split}/labels: {len(labels)} labels, range {labels.min()}..{labels.max()}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{split}/labels: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return problems + _verify_views(store)


def _verify_views(store: FeatureStore) -> list[str]:
    """Every complete column view has the shape the store promises and reads back (checksums)."""
    problems = []
    for view in views.list_views(store):
        where = f"{views.ROOT}/{view['key']}"
        if not view.get("complete"):
            continue  # an interrupted build: never read, rebuilt when needed
        try:
            group = group_at(store.group, where)
            columns = read_all(array_at(group, "columns"))
            for split, n in store.splits().items():
                values = array_at(group, split)
                if values.shape != (n, len(columns)):
                    problems.append(f"{where}/{split}: shape {values.shape}, expected {(n, len(columns))}")
                    continue
                values[:]
                if f"{split}_quant" in group:
                    array_at(group, f"{split}_quant")[:]
        except Exception as exc:  # noqa: BLE001 - any decode failure is corruption
            problems.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return problems


def remove_derived(path: str) -> None:
    """Delete the derived artefacts (cached scores, column views): they are recomputed when needed."""
    store = open_store(path, options=options())
    if store is None:
        raise H2TError(f"{path} is not a store")
    if store.read_only:
        raise H2TError(f"store {path} is read-only")
    zarr_compat.run(store.group.store.delete_dir("derived"))


def remove(path: str) -> None:
    if location.is_remote(path):
        location.ensure_writable_root(path)
        store = location.zarr_store(path, options())
        if not zarr_compat.run(store.exists("zarr.json")):
            raise H2TError(f"{path} is not a store")
        zarr_compat.run(store.delete_dir(""))
        return
    local = location.local_path(path)
    if not (local / "zarr.json").is_file():
        raise H2TError(f"{local} is not a store")
    shutil.rmtree(local)
    for parent in (local.parent, local.parent.parent):  # drop empty <dataset>/ and <model>/ directories
        try:
            parent.rmdir()
        except OSError:
            break


def abandoned(root: str, older_than_s: float) -> list[str]:
    """Incomplete local stores nobody has written to for `older_than_s` seconds."""
    if location.is_remote(root):
        raise H2TError("h2t store gc works on local roots (object stores: use their lifecycle rules)")
    now = time.time()
    out = []
    for path in find_stores(root):
        try:
            store = open_store(path)
            if store is None:  # removed since it was listed
                continue
            status = store.info.status
        except H2TError:
            status = "unreadable"
        if status != STATUS_COMPLETE and now - _last_modified(location.local_path(path)) > older_than_s:
            out.append(path)
    return out


def human_bytes(n: float) -> str:
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
