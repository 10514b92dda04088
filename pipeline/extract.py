"""Extraction: run the frozen backbone over every split once, pool each tap on the device, fill the store."""
from __future__ import annotations

import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import create, build_model, check_model_name, create_kwargs, weights_fingerprint
from .preprocess import build_preprocess
from .data import Dataset, build_dataset
from .storage import location
from .storage.claims import Claims
from .errors import H2TError
from .pooling import validate_target_size
from .storage.reuse import Reuse, find_reuse, reused_layer
from .storage.schema import DTYPES, FLOAT_MAX, SCHEMA_VERSION, STATUS_CREATING, storage_dtype
from .storage.store import FeatureStore, create_store, open_store, store_path
from .taps import TappedForward, select_taps

@dataclass
class Plan:
    """Everything known before the backbone runs: the store's identity, location and layer table."""
    spec: dict
    path: str
    layers: list[dict]
    dataset: Dataset
    taps: list
    preprocess: object


def plan_store(cfg, dataset: Dataset | None = None) -> Plan:
    """Resolve the store for a config without loading weights or running a forward on data."""
    import timm

    check_model_name(cfg.model.name)
    target_size = validate_target_size(cfg.pooling.target_size)
    if cfg.store.dtype not in DTYPES:
        raise H2TError(f"store.dtype must be one of {', '.join(DTYPES)}, got {cfg.store.dtype!r}")
    dataset = dataset or build_dataset(cfg.data)
    preprocess = build_preprocess(cfg.model)
    with torch.device("meta"):  # structure only: tap names and shapes, no weights, no compute
        skeleton = create(cfg.model.name, create_kwargs(cfg.model, preprocess.input_size))
    skeleton.eval()
    taps = select_taps(skeleton, list(cfg.taps.include), list(cfg.taps.exclude))
    runner = TappedForward(skeleton, taps, target_size, cfg.pooling.rule, cfg.pooling.cls_token)
    try:
        layers = runner.layer_table(preprocess.input_size)
    except RuntimeError as exc:
        raise H2TError(f"{cfg.model.name} cannot run at input size {preprocess.input_size}: "
                       f"{str(exc).splitlines()[0]}") from None
    finally:
        runner.close()
    spec = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": cfg.model.name, "weights": weights_fingerprint(cfg.model),
                  "kwargs": create_kwargs(cfg.model, preprocess.input_size),
                  "timm": timm.__version__, "torch": torch.__version__},
        "preprocess": preprocess.as_dict(),
        "taps": [t.name for t in taps],
        "pooling": {"rule": cfg.pooling.rule, "target_size": target_size, "cls_token": cfg.pooling.cls_token},
        "dtype": cfg.store.dtype,
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(),
                    "splits": {name: len(split) for name, split in dataset.splits.items()}},
    }
    return Plan(spec, store_path(cfg.store.root, spec), layers, dataset, taps, preprocess)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise H2TError(f"extract.device={name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise H2TError(f"extract.device={name}: no CUDA device on this machine")
    return device


ON_OVERFLOW = ("error", "widen")


def _check_finite(layer: str, block: np.ndarray, dtype: str, on_overflow: str = "error") -> bool:
    """NaN / inf always stop the run; True when the block does not fit `dtype` and should be widened."""
    if not np.isfinite(block).all():
        raise H2TError(f"tap {layer}: activations contain NaN or inf; not stored")
    if dtype != "float32" and block.size and np.abs(block).max() > FLOAT_MAX[dtype]:
        if on_overflow == "widen":
            return True
        raise H2TError(f"tap {layer}: activations reach {np.abs(block).max():.3g}, beyond {dtype}; "
                       f"use store.dtype=float32 or store.on_overflow=widen")
    return False


def planned_bytes(plan: Plan, skip=()) -> dict[str, dict[str, int]]:
    """Uncompressed bytes of every (split, tap) array, taps in `skip` left out: an upper bound of what
    extraction writes."""
    itemsize = np.dtype(storage_dtype(plan.spec["dtype"])).itemsize
    return {split: {layer["name"]: n * layer["dim"] * itemsize for layer in plan.layers if layer["name"] not in skip}
            for split, n in plan.spec["dataset"]["splits"].items()}


def planned_reuse(cfg, plan: Plan) -> Reuse:
    """The layers a new store would copy from complete siblings (none when the store already exists)."""
    options = location.storage_options(cfg.store)
    if open_store(plan.path, plan.spec, options) is not None:
        return Reuse()
    return find_reuse(plan.spec, plan.path, plan.layers, options)


def format_plan(plan: Plan, per_tap: bool = False, reuse: Reuse | None = None) -> str:
    from .storage.catalog import human_bytes

    reuse = reuse or Reuse()
    sizes = planned_bytes(plan, skip=reuse.sources)
    total = sum(sum(t.values()) for t in sizes.values())
    lines = [f"plan: {plan.path}: {len(plan.layers)} taps, {sum(l['dim'] for l in plan.layers)} features, "
             f"{human_bytes(total)} uncompressed to compute"]
    if reuse.sources:
        lines.append(f"  reused, not computed: {reuse.summary()}")
    for split, taps in sizes.items():
        lines.append(f"  {split:5s} {plan.spec['dataset']['splits'][split]:7d} rows  {human_bytes(sum(taps.values())):>10s}")
        if per_tap:
            lines += [f"      {name:40s} {human_bytes(b):>10s}" for name, b in taps.items()]
    return "\n".join(lines)


def preflight(plan: Plan, root: str, reuse: Reuse | None = None) -> None:
    """Refuse to start when the destination cannot hold the store (uncompressed bound, 5 % margin);
    reused layers are hard links and need no space."""
    import shutil

    need = sum(sum(t.values()) for t in planned_bytes(plan, skip=(reuse or Reuse()).sources).values())
    probe = Path(root).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need * 1.05 > free:
        from .storage.catalog import human_bytes

        raise H2TError(f"not enough space for the store at {root}: needs up to {human_bytes(need)} "
                       f"(uncompressed), {human_bytes(free)} free on {probe}")


@dataclass
class ExtractResult:
    store: FeatureStore
    backbone_images: int
    seconds: float


def extract(cfg, plan: Plan | None = None, reuse: Reuse | None = None) -> ExtractResult:
    """Make sure the complete store exists; run the backbone only over shards nobody has written.

    Several processes may run this on one store at once: the store is laid out by whoever claims
    `create`, and each shard is computed by whoever claims it (pipeline/claims.py). Layers that complete
    sibling stores hold are copied (`reuse`, found here when not given; pipeline/reuse.py).
    """
    start_time = time.perf_counter()
    plan = plan or plan_store(cfg)
    options = location.storage_options(cfg.store)
    store = open_store(plan.path, plan.spec, options)
    if store is not None and store.complete:
        return ExtractResult(store, 0, time.perf_counter() - start_time)
    shard_rows = int(cfg.extract.batch_size)
    if shard_rows < 1:
        raise H2TError(f"extract.batch_size must be >= 1, got {shard_rows}")
    if cfg.store.on_overflow not in ON_OVERFLOW:
        raise H2TError(f"store.on_overflow must be one of {', '.join(ON_OVERFLOW)}, got {cfg.store.on_overflow!r}")
    dataset = plan.dataset
    location.ensure_writable_root(plan.path)
    if store is not None and store.meta["status"] != STATUS_CREATING:
        reuse = Reuse()  # laid out already: its layer table says what is copied
    elif reuse is None:
        reuse = find_reuse(plan.spec, plan.path, plan.layers, options)
    # The backbone is built before anything is written (missing weights leave no store behind), unless
    # every layer is copied from other stores.
    device = _device(cfg.extract.device)
    model = None if reuse.covers(plan.layers) else _build(cfg, device)
    claims = Claims(location.zarr_store(plan.path, options), float(cfg.extract.lease_s))
    poll_s = float(cfg.extract.poll_s)
    while store is None or store.meta["status"] == STATUS_CREATING:
        if claims.try_claim("create"):
            try:
                store = open_store(plan.path, plan.spec, options)
                if store is None or store.meta["status"] == STATUS_CREATING:
                    if not location.is_remote(plan.path):
                        preflight(plan, cfg.store.root, reuse)
                    layers = [reused_layer(layer, reuse.sources[layer["name"]]) if layer["name"] in reuse.sources
                              else layer for layer in plan.layers]
                    store = create_store(
                        plan.path, plan.spec, layers, {s: len(split) for s, split in dataset.splits.items()},
                        dataset.num_classes, dataset.class_names, reuse.shard_rows or shard_rows, cfg.store.dtype,
                        int(cfg.store.col_chunk), cfg.store.compression, dataset.skipped, options,
                        labels={s: split.labels for s, split in dataset.splits.items()},
                        sample_ids={s: split.ids for s, split in dataset.splits.items()},
                        reused=reuse.sources)
            finally:
                claims.release("create")
        else:  # another process is laying the store out
            time.sleep(poll_s)
            store = open_store(plan.path, plan.spec, options)
    shard_rows = store.meta["shard_rows"]  # resuming keeps the layout the store was created with

    remaining = 0
    for name, split in dataset.splits.items():  # one ledger read per split
        done = store.shards_done(name)
        remaining += sum(min(shard_rows, len(split) - start)
                         for shard, start in enumerate(range(0, len(split), shard_rows)) if not done[shard])
    images_done = 0
    if remaining:
        model = model or _build(cfg, device)
        # only the layers this store computes; the forward stops after the last of them
        computed = {layer["name"] for layer in store.computed_layers}
        pooling = plan.spec["pooling"]
        runner = TappedForward(model, [t for t in plan.taps if t.name in computed], pooling["target_size"],
                               pooling["rule"], pooling["cls_token"])
        try:
            images_done = _fill_shards(cfg, plan, store, runner, claims, device, remaining, shard_rows, poll_s)
        finally:
            claims.release_all()  # an error leaves the unwritten shards free for the next run at once
            runner.close()
    if not store.complete:
        store = open_store(plan.path, plan.spec, options)
        if not store.complete:
            store.mark_complete()
    return ExtractResult(store, images_done, time.perf_counter() - start_time)


def _build(cfg, device: torch.device) -> torch.nn.Module:
    model = build_model(cfg.model).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.extract.channels_last else model


def _fill_shards(cfg, plan: Plan, store, runner, claims, device, remaining: int, shard_rows: int,
                 poll_s: float) -> int:
    """Claim, compute and write shards until the store has them all; returns images computed here."""
    dataset, images_done, layers = plan.dataset, 0, store.computed_layers
    with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer, \
            tqdm(total=remaining, unit="img", desc=f"extract {plan.spec['model']['name']}",
                 disable=not cfg.extract.progress) as bar:

        def load(item):
            name, start = item
            split = dataset.splits[name]
            return split.load(start, min(start + shard_rows, len(split)))

        def write(name, start, blocks):
            store.write_rows(name, start, blocks)
            claims.release(f"{name}/{start // shard_rows}")

        candidates: list[tuple[str, int]] = []

        def claim_next():
            """The next unwritten shard nobody holds, now claimed by this process; None if there is none now.

            Candidates come from one read of the ledger, refreshed only when they run out."""
            for refresh in (False, True):
                if refresh:
                    candidates[:] = [(name, start) for name, split in dataset.splits.items()
                                     for shard, (start, done) in enumerate(zip(range(0, len(split), shard_rows),
                                                                               store.shards_done(name)))
                                     if not done]
                while candidates:
                    name, start = candidates.pop(0)
                    shard = start // shard_rows
                    if not claims.try_claim(f"{name}/{shard}"):
                        continue
                    # the ledger entry is written before a claim is released: look again now that we hold it
                    if store.group[f"{name}/shards_done"][shard]:
                        claims.release(f"{name}/{shard}")
                        continue
                    return name, start
            return None

        def all_done() -> bool:
            return all(store.shards_done(name).all() for name in dataset.splits)

        pending_write = None
        item = claim_next()
        next_images = loader.submit(load, item) if item else None
        while True:
            if item is None:  # nothing to claim: finished, or the rest is held by other writers
                if pending_write is not None:
                    pending_write.result()
                    pending_write = None
                if all_done():
                    break
                time.sleep(poll_s)  # wait for them to finish, or for their claims to lapse
                item = claim_next()
                next_images = loader.submit(load, item) if item else None
                continue
            name, start = item
            images = next_images.result()
            item = claim_next()
            if item is not None:
                next_images = loader.submit(load, item)
            x = plan.preprocess(images, device)
            if cfg.extract.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                pooled = runner(x)
            blocks = [p.float().cpu().numpy() for p in pooled]
            if pending_write is not None:
                pending_write.result()  # widening rewrites arrays: no write may be in flight
                pending_write = None
            dtypes = store.layer_dtypes()
            for layer, block in zip(layers, blocks):
                if _check_finite(layer["name"], block, dtypes[layer["name"]], cfg.store.on_overflow):
                    store.widen_layer(layer["name"])
                    dtypes[layer["name"]] = "float32"
            blocks = [store.encode(layer["name"], b, dtypes[layer["name"]]) for layer, b in zip(layers, blocks)]
            pending_write = writer.submit(write, name, start, blocks)
            images_done += len(blocks[0])
            bar.update(len(blocks[0]))
    return images_done
