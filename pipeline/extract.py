"""Extraction: run the frozen backbone over every split once, pool each tap on the device, fill the store."""
from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from tqdm.auto import tqdm

from .backbone import build_model, check_model_name, create, create_kwargs, weights_fingerprint
from .config import Decode, ExtractConfig, ExtractJob, OnIncomplete, WritersIn
from .data import Dataset, build_dataset
from .devices import resolve_device
from .errors import H2TError
from .pooling import validate_target_size
from .preprocess import build_preprocess
from .stages import DeviceStage, Loader, ShardQueue, Writer
from .storage import location, runs
from .storage.catalog import human_bytes
from .storage.claims import Claims
from .storage.reuse import Reuse, find_reuse, reused_layer
from .storage.schema import SCHEMA_VERSION, STATUS_CREATING, inner_columns, storage_dtype
from .storage.store import FeatureStore, WideningElsewhere, create_store, open_store, store_path
from .storage.union import StoreUnion
from .storage.writer import WriterTimes
from .taps import TappedForward, select_taps
from .write_processes import ProcessWriter


@dataclass
class Plan:
    """Everything known before the backbone runs: the store's identity, location and layer table."""
    spec: dict
    path: str
    layers: list[dict]
    dataset: Dataset
    taps: list
    preprocess: object


def plan_store(job: ExtractJob, dataset: Dataset | None = None) -> Plan:
    """Resolve the store of an extraction without loading weights or running a forward on data."""
    model_cfg = job.model
    check_model_name(model_cfg.name)
    target_size = validate_target_size(job.pooling.target_size)
    inner_columns(job.store.col_chunk, str(job.store.dtype))  # a bad store.col_chunk is named before any work
    dataset = dataset or build_dataset(job.data)
    preprocess = build_preprocess(model_cfg)
    with torch.device("meta"):  # structure only: tap names and shapes, no weights, no compute
        skeleton = create(model_cfg.name, create_kwargs(model_cfg, preprocess.input_size))
    skeleton.eval()
    taps = select_taps(skeleton, list(job.taps.include), list(job.taps.exclude))
    runner = TappedForward(skeleton, taps, target_size, str(job.pooling.rule), str(job.pooling.cls_token))
    try:
        layers = runner.layer_table(preprocess.input_size)
    except RuntimeError as exc:
        raise H2TError(f"{model_cfg.name} cannot run at input size {preprocess.input_size}: "
                       f"{str(exc).splitlines()[0]}") from None
    finally:
        runner.close()
    compute = str(model_cfg.precision)
    spec: dict = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": model_cfg.name, "weights": weights_fingerprint(model_cfg),
                  "kwargs": create_kwargs(model_cfg, preprocess.input_size),
                  "timm": timm.__version__, "torch": torch.__version__},
        "preprocess": preprocess.as_dict(),
        "taps": [t.name for t in taps],
        "pooling": {"rule": str(job.pooling.rule), "target_size": target_size,
                    "cls_token": str(job.pooling.cls_token)},
        "dtype": str(job.store.dtype),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(),
                    "splits": {name: len(split) for name, split in dataset.splits.items()}},
    }
    if job.store.dtype == "int8":  # float16 scales and minima (float32 before: other numbers, another id)
        spec["quant"] = {"params": "float16"}
    if compute != "float32":  # other compute dtypes give other numbers (float32 stores keep their ids)
        spec["model"]["precision"] = compute
    return Plan(spec, store_path(job.store.root, spec), layers, dataset, taps, preprocess)


def decodes_on_device(settings: ExtractConfig, dataset: Dataset) -> bool:
    """Whether image files decode on the extraction device (`extract.decode`; auto: when it is CUDA)."""
    if settings.decode == Decode.cpu or not any(split.read_bytes is not None for split in dataset.splits.values()):
        return False
    return settings.decode == Decode.device or resolve_device(settings.device).type == "cuda"


def planned_bytes(plan: Plan, skip=()) -> dict[str, dict[str, int]]:
    """Uncompressed bytes of every (split, tap) array, taps in `skip` left out: an upper bound of what
    extraction writes."""
    itemsize = np.dtype(storage_dtype(plan.spec["dtype"])).itemsize
    return {split: {layer["name"]: n * layer["dim"] * itemsize for layer in plan.layers if layer["name"] not in skip}
            for split, n in plan.spec["dataset"]["splits"].items()}


def planned_reuse(job: ExtractJob, plan: Plan) -> Reuse:
    """The layers a new store would copy from complete siblings (none when the store already exists)."""
    options = location.storage_options(job.store)
    if open_store(plan.path, plan.spec, options) is not None:
        return Reuse()
    return find_reuse(plan.spec, plan.path, plan.layers, options)


def store_status(job: ExtractJob, plan: Plan) -> str:
    """What a run would do for this store: nothing (complete), join its writers, or extract (and copy what
    sibling stores hold)."""
    options = location.storage_options(job.store)
    store = open_store(plan.path, plan.spec, options)
    if store is not None and store.complete:
        return "complete"
    images = sum(plan.spec["dataset"]["splits"].values())
    if store is not None:
        done = sum(int(store.shards_done(s).sum()) for s in store.splits())
        total = sum(len(store.shards_done(s)) for s in store.splits())
        return f"incomplete ({done} of {total} shards written): the rest to extract"
    reuse = find_reuse(plan.spec, plan.path, plan.layers, options)
    copied = f"; {len(reuse.sources)} of {len(plan.layers)} taps copied from complete stores" if reuse.sources else ""
    if reuse.covers(plan.layers):
        return "to grow: every tap copied from complete stores, no forward"
    return f"to extract: {images} images through the backbone{copied}"


def format_plan(plan: Plan, per_tap: bool = False, reuse: Reuse | None = None) -> str:
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
    need = sum(sum(t.values()) for t in planned_bytes(plan, skip=(reuse or Reuse()).sources).values())
    probe = Path(root).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need * 1.05 > free:
        raise H2TError(f"not enough space for the store at {root}: needs up to {human_bytes(need)} "
                       f"(uncompressed), {human_bytes(free)} free on {probe}")


@dataclass
class ExtractResult:
    store: FeatureStore | StoreUnion
    backbone_images: int
    seconds: float
    stage_seconds: float = 0.0  # the images' own time: from the first shard claimed to the last one written
    writes: WriterTimes | None = None  # where this process's shard writes spent their time


def wait_for_store(job: ExtractJob, plan: Plan, clock=time.monotonic, sleep=time.sleep) -> None:
    """What a probe does when the store exists but is still being written (`probe.on_incomplete`):
    `extract` joins the writers (the default), `wait` polls until it is complete (at most `probe.wait_s`),
    `error` stops with a message. Readers only ever read complete stores."""
    if job.on_incomplete == OnIncomplete.extract:
        return
    options = location.storage_options(job.store)
    deadline = clock() + float(job.wait_s)
    while True:
        store = open_store(plan.path, plan.spec, options)
        if store is None or store.complete:
            return  # nothing yet (this job extracts it) or ready
        done = sum(int(store.shards_done(s).sum()) for s in store.splits())
        total = sum(len(store.shards_done(s)) for s in store.splits())
        if job.on_incomplete == OnIncomplete.error or clock() > deadline:
            raise H2TError(f"store {store.id} at {plan.path} is being written ({done} of {total} shards): "
                           f"rerun later, or use probe.on_incomplete=wait|extract")
        sleep(float(job.extract.poll_s))


def ensure_store(job: ExtractJob) -> ExtractResult:
    """The complete store of this job, for a probe: extracted when missing, its writers joined (or
    waited for, `probe.on_incomplete`) when another process is writing it. A job naming several backbones
    gets their stores read as one (storage/union.py), every one planned before any is extracted."""
    plans = plan_members(job)
    results = []
    for member, plan in zip(job.members(), plans):
        wait_for_store(member, plan)
        results.append(extract(member, plan))
    if len(results) == 1:
        return results[0]
    return ExtractResult(StoreUnion([r.store for r in results]), sum(r.backbone_images for r in results),
                         sum(r.seconds for r in results))


def plan_members(job: ExtractJob) -> list[Plan]:
    """The plan of each backbone's store, checked to see one dataset (`check_one_dataset`)."""
    return check_one_dataset([plan_store(member) for member in job.members()])


def check_one_dataset(plans: list[Plan]) -> list[Plan]:
    """Backbones that would see different samples are one line naming both and the first setting that differs."""
    first = plans[0].spec["dataset"]
    for plan in plans[1:]:
        other = plan.spec["dataset"]
        if other != first:
            # a setting the user wrote (sizes, root, ...) before the fingerprint that follows from it
            key = next(k for k in sorted(set(first) | set(other), key=lambda k: (k == "fingerprint", str(k)))
                       if first.get(k) != other.get(k))
            raise H2TError(f"backbones {plans[0].spec['model']['name']} and {plan.spec['model']['name']} would "
                           f"see different samples (dataset {key}: {first.get(key)!r} vs {other.get(key)!r}): "
                           "a union of stores needs one dataset")
    return plans


def extract(job: ExtractJob, plan: Plan | None = None, reuse: Reuse | None = None, forward=None) -> ExtractResult:
    """Make sure the complete store exists; run the backbone only over shards nobody has written.

    Several processes may run this on one store at once: the store is laid out by whoever claims
    `create`, and each shard is computed by whoever claims it (pipeline/claims.py). Layers that complete
    sibling stores hold are copied (`reuse`, found here when not given; pipeline/storage/reuse.py).
    `forward` replaces the tapped backbone (benchmarks/extract_ceiling.py measures the rest of the pipeline).
    """
    start_time = time.perf_counter()
    plan = plan or plan_store(job)
    options = location.storage_options(job.store)
    store = open_store(plan.path, plan.spec, options)
    if store is not None and store.complete:
        return ExtractResult(store, 0, time.perf_counter() - start_time)
    settings = job.extract
    shard_rows = int(settings.batch_size)
    for key in ("batch_size", "workers", "prefetch", "writers"):  # before anything is written
        if getattr(settings, key) is not None and int(getattr(settings, key)) < 1:
            raise H2TError(f"extract.{key} must be >= 1, got {getattr(settings, key)}")
    dataset = plan.dataset
    location.ensure_writable_root(plan.path)
    if store is not None and store.info.status != STATUS_CREATING:
        reuse = Reuse()  # laid out already: its layer table says what is copied
    elif reuse is None:
        reuse = find_reuse(plan.spec, plan.path, plan.layers, options)
    # The backbone is built before anything is written (missing weights leave no store behind), unless
    # every layer is copied from other stores.
    device = resolve_device(settings.device)
    model = None if forward is not None or reuse.covers(plan.layers) else _build(job, device)
    claims = Claims(location.zarr_store(plan.path, options), float(settings.lease_s))
    poll_s = float(settings.poll_s)
    while store is None or store.info.status == STATUS_CREATING:
        if claims.try_claim("create"):
            try:
                store = open_store(plan.path, plan.spec, options)
                if store is None or store.info.status == STATUS_CREATING:
                    if not location.is_remote(plan.path):
                        preflight(plan, job.store.root, reuse)
                    layers = [reused_layer(layer, reuse.sources[layer["name"]]) if layer["name"] in reuse.sources
                              else layer for layer in plan.layers]
                    store = create_store(
                        plan.path, plan.spec, layers, {s: len(split) for s, split in dataset.splits.items()},
                        dataset.num_classes, dataset.class_names, reuse.shard_rows or shard_rows, str(job.store.dtype),
                        job.store.col_chunk, str(job.store.compression), dataset.skipped, options,
                        labels={s: split.labels for s, split in dataset.splits.items()},
                        sample_ids={s: split.ids for s, split in dataset.splits.items()},
                        reused=reuse.sources)
            finally:
                claims.release("create")
        else:  # another process is laying the store out
            time.sleep(poll_s)
            store = open_store(plan.path, plan.spec, options)
    shard_rows = store.info.shard_rows  # resuming keeps the layout the store was created with

    queue = ShardQueue(store, dataset, claims, shard_rows)
    remaining = queue.remaining_rows()
    images_done, stage_seconds, writes = 0, 0.0, None
    if remaining:
        note_run(store, run_record(job, plan.dataset, device))
        writer = open_writer(job.extract, store, queue.claims, device)  # worker processes start while batches load
        runner = forward
        try:
            if runner is None:
                model = model or _build(job, device)
                # only the layers this store computes; the forward stops after the last of them
                computed = {layer["name"] for layer in store.computed_layers}
                pooling = plan.spec["pooling"]
                runner = TappedForward(model, [t for t in plan.taps if t.name in computed], pooling["target_size"],
                                       pooling["rule"], pooling["cls_token"])
            stages_start = time.perf_counter()
            with claims.kept():  # a shard slower than the lease is not taken over and computed again elsewhere
                images_done, writes = _run_stages(job, plan, store, runner, queue, device, remaining, poll_s, writer)
            stage_seconds = time.perf_counter() - stages_start
        finally:
            try:
                writer.close(raise_errors=False)  # closed by then, unless the stages failed to start
            finally:
                claims.release_all()  # an error leaves the unwritten shards free for the next run at once
                if forward is None and runner is not None:
                    runner.close()
    if not store.complete:
        reopened = open_store(plan.path, plan.spec, options)
        assert reopened is not None  # it was laid out above
        store = reopened
        if not store.complete:
            store.mark_complete()
    return ExtractResult(store, images_done, time.perf_counter() - start_time, stage_seconds, writes)


def _build(job: ExtractJob, device: torch.device) -> torch.nn.Module:
    model = build_model(job.model).to(device)
    return model.to(memory_format=torch.channels_last) if job.extract.channels_last else model


def decode_workers(workers: int | None, device: torch.device) -> int:
    """`extract.workers`, or by device: one decode thread beside a CPU forward, which already keeps every core
    busy (decode processes fighting its threads halved extraction of JPEG folders on 2 cores:
    benchmarks/README.md, roofline.py), and 4 beside a CUDA forward, which leaves the CPUs to decode."""
    if workers is not None:
        return int(workers)
    return 4 if device.type == "cuda" else 1


def run_numbers(job: ExtractJob, dataset: Dataset, device: torch.device) -> dict:
    """What, besides the spec, makes the numbers a run on `device` writes: the device, who decodes its JPEGs
    (nvJPEG's pixels differ from libjpeg-turbo's) and, for a CUDA float32 forward, torch's TF32 switches as they
    stand (its defaults rule). Needs no device: `device` is only read."""
    cuda = device.type == "cuda"
    float32_on_cuda = cuda and str(job.model.precision) == "float32"
    return {"device": device.type, "decode": "nvjpeg" if cuda and decodes_on_device(job.extract, dataset) else "cpu",
            "tf32_convolutions": bool(float32_on_cuda and torch.backends.cudnn.allow_tf32),
            "tf32_matmuls": bool(float32_on_cuda and torch.backends.cuda.matmul.allow_tf32)}


def run_record(job: ExtractJob, dataset: Dataset, device: torch.device) -> dict:
    """This process's record for the store's runs (pipeline/storage/runs.py): `run_numbers`, the device's name,
    the writers' kind and torch's version."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return runs.new_record(**run_numbers(job, dataset, device), device_name=name,
                           writers_in=str(job.extract.writers_in), torch=torch.__version__)


def note_run(store: FeatureStore, entry: dict) -> None:
    """Record this run in the store before it writes rows; say so when earlier runs made other numbers."""
    earlier = runs.records(store.group)
    runs.record(store.group, entry)
    differ = runs.differences(earlier + [entry])
    if differ:
        fields = ", ".join(f"{field} {values}" for field, values in differ.items())
        print(f"h2t: note: store {store.id} gets rows from runs that differ in {fields}: their numbers differ slightly "
              f"(h2t store info lists the runs)", file=sys.stderr)


def writer_threads(writers: int | None, device: torch.device) -> int:
    """`extract.writers`, or by device: one beside a CPU forward, 2 beside a CUDA one. On two cores a second
    writer thread never helped (the store path at 0.45-0.73 of one writer's rate in three runs, whole
    extraction equal or up to 8 % slower: benchmarks/README.md); on the H200 host it stopped scaling past two."""
    if writers is not None:
        return int(writers)
    return 2 if device.type == "cuda" else 1


def open_writer(settings: ExtractConfig, store, claims, device: torch.device) -> Writer | ProcessWriter:
    """The shard writers of `extract.writers_in`: threads, or worker processes (pipeline/write_processes.py)."""
    kind = ProcessWriter if settings.writers_in == WritersIn.processes else Writer
    return kind(store, claims, writer_threads(settings.writers, device))


def _run_stages(job: ExtractJob, plan: Plan, store, runner, queue: ShardQueue, device, remaining: int,
                poll_s: float, writer: Writer | ProcessWriter) -> tuple[int, WriterTimes]:
    """Claim, load, compute and write shards until the store has them all (pipeline/stages.py), `writer` closed
    at the end; returns the images computed here and where the writes spent their time."""
    settings = job.extract
    stage = DeviceStage(runner, plan.preprocess, device, store.computed_layers, store.layer_dtypes(),
                        bool(settings.channels_last), str(job.store.on_overflow), str(job.model.precision))
    loader = Loader(plan.dataset, decode_workers(settings.workers, device), pin=device.type == "cuda", device=device,
                    device_decode=decodes_on_device(settings, plan.dataset))

    def widen(name: str) -> None:
        writer.drain()  # widening rewrites the tap's arrays: none of this process's writes may be in flight
        store.widen_layer(name, queue.claims, poll_s, wait=False)  # WideningElsewhere: step back (below)

    stage.widen = widen
    depth = int(settings.prefetch)
    ahead: deque = deque()  # (shard, future images) claimed and loading
    images_done, failed = 0, True
    try:
        with tqdm(total=remaining, unit="img", desc=f"extract {plan.spec['model']['name']}",
                  disable=not settings.progress) as bar:
            while True:
                while len(ahead) < depth:
                    shard = queue.claim_next()
                    if shard is None:
                        break
                    ahead.append((shard, loader.submit(shard)))
                if not ahead:  # nothing to claim: finished, the rest held by other writers, or a widening
                    writer.drain()
                    if queue.all_done():
                        break
                    time.sleep(poll_s)  # wait for them to finish, or for their claims to lapse
                    continue
                shard, images = ahead.popleft()
                stage.dtypes.update(store.layer_dtypes())  # taps other writers widened meanwhile
                try:
                    batch = stage(images.result())
                except WideningElsewhere:
                    # A tap needs widening while another process widens one, waiting for every shard claim to
                    # go: this process gives up its shards (their loads are dropped) and claims them again after.
                    queue.give_back([shard] + [s for s, _ in ahead])
                    ahead.clear()
                    time.sleep(poll_s)
                    continue
                writer.submit(shard, stage.to_host(batch), dict(stage.dtypes))
                images_done += shard.stop - shard.start
                bar.update(shard.stop - shard.start)
        failed = False
    finally:
        loader.close()
        writer.close(raise_errors=not failed)
    return images_done, writer.times
