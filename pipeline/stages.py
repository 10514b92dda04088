"""Extraction as bounded stages, so that the device never waits on decoding or storage:

    claim   `ShardQueue`: the next shard nobody has written, leased to this process
    load    `Loader`: the next batches decoded ahead by `extract.workers` (image files in forked
            processes, in-memory pixels in threads), same-sized images pinned for an asynchronous copy
    device  `DeviceStage`: preprocessing, the tapped forward and pooling on the device, every tap cast to
            its store dtype (bfloat16 included) into one flat buffer per dtype, one `aminmax` per buffer
            for NaN / inf / overflow (one small copy back)
    encode  `DeviceStage.to_host`: one device-to-host copy per buffer; each tap's rows a contiguous view
    write   `Writer`: `extract.writers` threads (1 beside a CPU forward, 2 beside a CUDA one) write whole
            shards (numcodecs compresses and checksums outside the GIL), mark the ledger, release the
            claim; at most `writers + 1` batches are in flight, so memory stays flat whatever the size
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .decode import decode_file, decode_jpegs, device_decodable
from .errors import H2TError
from .runtime import exit_with_parent
from .storage.quant import LEVELS, QuantizedBlock
from .storage.store import StaleShard
from .storage.writer import WriterTimes

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}


@dataclass(frozen=True)
class Shard:
    """One unit of work: rows [start, stop) of a split, written as one shard of every computed tap."""
    split: str
    start: int
    stop: int
    index: int


class ShardQueue:
    """Hands out the shards nobody has written, each claimed by this process first (pipeline/storage/claims.py).

    Candidates come from one read of the ledger, refreshed only when they run out; after a claim the
    ledger entry is read again, since a shard may have been finished while we looked."""

    def __init__(self, store, dataset, claims, shard_rows: int):
        self.store, self.dataset, self.claims, self.shard_rows = store, dataset, claims, shard_rows
        self._candidates: deque[Shard] = deque()

    def _unwritten(self) -> list[Shard]:
        out = []
        for name, split in self.dataset.splits.items():
            done = self.store.shards_done(name)
            for index, start in enumerate(range(0, len(split), self.shard_rows)):
                if not done[index]:
                    out.append(Shard(name, start, min(start + self.shard_rows, len(split)), index))
        return out

    def remaining_rows(self) -> int:
        return sum(s.stop - s.start for s in self._unwritten())

    def claim_next(self) -> Shard | None:
        """None also while another writer widens a tap: it waits for the shards in flight to drain."""
        if self.store.widening():
            return None
        for refresh in (False, True):
            if refresh:
                self._candidates = deque(self._unwritten())
            while self._candidates:
                shard = self._candidates.popleft()
                unit = f"{shard.split}/{shard.index}"
                if not self.claims.try_claim(unit):
                    continue
                if self.store.ledger_entry(shard.split, shard.index):  # finished meanwhile by another writer
                    self.claims.release(unit)
                    continue
                return shard
        return None

    def give_back(self, shards: list[Shard]) -> None:
        """Release the claims of shards this process will not write now; they are the next candidates."""
        for shard in shards:
            self.claims.release(f"{shard.split}/{shard.index}")
        self._candidates.extendleft(reversed(shards))

    def all_done(self) -> bool:
        return all(self.store.shards_done(name).all() for name in self.dataset.splits)


def _join(parts: list):
    """Decoded ranges as one (B, H, W, 3) array when every image has one size (one copy to the device),
    else a list of images."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    images = [image for part in parts for image in (list(part) if isinstance(part, np.ndarray) else part)]
    if images and all(image.shape == images[0].shape for image in images):
        return np.stack(images)
    return images


_PROCESS_DATASET = None  # set in each forked decode process by its initializer; never in the parent


def _hold_dataset(dataset, parent: int) -> None:
    """A decode process's start: the dataset it decodes from, and an end when the extraction's process
    (`parent`) is gone."""
    global _PROCESS_DATASET
    _PROCESS_DATASET = dataset
    exit_with_parent(parent)


def _decode_range(split: str, start: int, stop: int):
    assert _PROCESS_DATASET is not None, "called outside a decode process"
    return _join([_PROCESS_DATASET.splits[split].load(start, stop)])


class Loader:
    """Decodes batches ahead of the device, each batch split into `workers` ranges decoded in parallel.

    Image files are decoded in `workers` forked processes (PIL holds the GIL for much of a decode, so
    threads stopped scaling at ~1,100 JPEGs/s on 16 cores); in-memory pixels are sliced in threads.
    Same-sized images come back as one uint8 tensor, pinned for a non-blocking copy to a GPU.

    With `device_decode`, image files are only read here (threads) and their JPEGs decoded in one batch on
    `device` (nvJPEG on CUDA; on the CPU it is the same call): a batch is then a list of (3, H, W) uint8
    tensors on the device, files it cannot take decoded on the CPU (`decode_file`) and copied there."""

    def __init__(self, dataset, workers: int, pin: bool, device: torch.device | str = "cpu",
                 device_decode: bool = False):
        if workers < 1:
            raise H2TError(f"extract.workers must be >= 1, got {workers}")
        self.dataset, self.workers, self.pin = dataset, workers, pin
        self.device, self.device_decode = torch.device(device), device_decode
        self._batches = ThreadPoolExecutor(2, thread_name_prefix="h2t-batch")
        self._decoders = ThreadPoolExecutor(workers, thread_name_prefix="h2t-decode")
        self._processes = None
        if workers > 1 and any(_decodes_files(split) and not self._on_device(split)
                               for split in dataset.splits.values()):
            Image.init()  # image plugins imported before forking, so that no child needs the import lock
            # forked: the dataset reaches each process without pickling
            self._processes = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                                  initializer=_hold_dataset, initargs=(dataset, os.getpid()))
            list(self._processes.map(abs, range(workers)))  # fork them all now, while the other threads idle

    def submit(self, shard: Shard) -> Future:
        return self._batches.submit(self._load, shard)

    def _load(self, shard: Shard):
        split = self.dataset.splits[shard.split]
        n = shard.stop - shard.start
        pieces = max(1, min(self.workers, n // 8))  # ranges of at least 8 images
        bounds = [shard.start + n * i // pieces for i in range(pieces + 1)]
        if self._on_device(split):
            return self._decode_on_device(split, list(zip(bounds[:-1], bounds[1:])))
        if self._processes is not None and _decodes_files(split):
            parts = list(self._processes.map(_decode_range, [shard.split] * pieces, bounds[:-1], bounds[1:]))
        else:
            parts = list(self._decoders.map(lambda ab: split.load(*ab), zip(bounds[:-1], bounds[1:])))
        images = _join(parts)
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
            if self.pin:
                images = images.pin_memory()
        return images

    def _on_device(self, split) -> bool:
        return self.device_decode and split.read_bytes is not None

    def _decode_on_device(self, split, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Files read in threads; JPEGs decoded in one batch on the device, the rest (not JPEG, CMYK, rotated,
        ...) on the CPU as PIL decodes them, then copied there."""
        files = [file for part in self._decoders.map(lambda ab: split.read_bytes(*ab), ranges) for file in part]
        jpegs = [i for i, (_, data) in enumerate(files) if device_decodable(data)]
        images = dict(zip(jpegs, decode_jpegs([files[i][1] for i in jpegs], self.device, [files[i][0] for i in jpegs])))
        rest = [i for i in range(len(files)) if i not in images]
        arrays = self._decoders.map(lambda i: decode_file(Path(files[i][0]), files[i][1]), rest)
        images.update((i, torch.tensor(array, device=self.device).permute(2, 0, 1)) for i, array in zip(rest, arrays))
        return [images[i] for i in range(len(files))]

    def close(self) -> None:
        self._batches.shutdown(wait=True, cancel_futures=True)
        self._decoders.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)


def _decodes_files(split) -> bool:
    """Pixels held in memory carry a content digest; splits without one read and decode files."""
    return not split.content_digest


@dataclass
class DeviceBatch:
    rows: int
    flats: dict[str, torch.Tensor]  # store dtype -> every tap of that dtype cast into one flat buffer
    members: dict[str, list[int]]  # store dtype -> the taps (indices) in its buffer, in order
    sizes: list[int]  # elements of each tap
    params: torch.Tensor | None = None  # int8 taps: each one's scales then minima (2 * dim), float16, in order


class DeviceStage:
    """Preprocess + tapped forward + pooling + dtype cast + checks on the device; one copy to the host."""

    def __init__(self, runner, preprocess, device: torch.device, layers: list[dict], dtypes: dict[str, str],
                 channels_last: bool = False, on_overflow: str = "error", precision: str = "float32"):
        # the forward under autocast (pooling and the store cast in float32 after it)
        self.autocast = None if precision == "float32" else TORCH_DTYPES[precision]
        self.runner, self.preprocess, self.device = runner, preprocess, device
        self.layers, self.dtypes = layers, dict(dtypes)
        self.channels_last, self.on_overflow = channels_last, on_overflow
        self.widen: Callable[[str], None] | None = None  # called for a tap to store as float32 from now on

    def __call__(self, images) -> DeviceBatch:
        x = self.preprocess(images, self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast,
                                                    enabled=self.autocast is not None):
            pooled = self.runner(x)
        with torch.inference_mode():
            pooled = [p.float() for p in pooled]
            batch = self._cast(pooled)
            # A value beyond a dtype's range casts to inf, so the extremes of each buffer (NaN propagates)
            # check NaN, inf and overflow at once (aminmax: ~30x cheaper than isfinite on a CPU); the culprit
            # tap is looked for only when something is wrong. int8 taps: their float16 scales and minima are finite
            # exactly when the values fit them.
            checked = [flat for dtype, flat in batch.flats.items() if dtype != "int8"] + [batch.params]
            extremes = torch.stack([torch.stack(torch.aminmax(flat)).float() for flat in checked
                                    if flat is not None and flat.numel()])
            if not bool(torch.isfinite(extremes).all()):
                if self._culprits(pooled):
                    batch = self._cast(pooled)
        return batch

    def _cast(self, pooled: list[torch.Tensor]) -> DeviceBatch:
        members: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layers):
            members.setdefault(self.dtypes[layer["name"]], []).append(i)
        sizes = [p.numel() for p in pooled]
        flats, params = {}, None
        for dtype, taps in members.items():
            flat = torch.empty(sum(sizes[i] for i in taps), dtype=TORCH_DTYPES[dtype], device=self.device)
            quant = None
            if dtype == "int8":
                quant = params = torch.empty(sum(2 * pooled[i].shape[1] for i in taps), dtype=torch.float16,
                                             device=self.device)
            offset = poffset = 0
            for i in taps:
                target = flat[offset:offset + sizes[i]].view(pooled[i].shape)
                if quant is not None:
                    dim = pooled[i].shape[1]
                    quantize_into(pooled[i], target, quant[poffset:poffset + 2 * dim])
                    poffset += 2 * dim
                else:
                    target.copy_(pooled[i])  # cast in place
                offset += sizes[i]
            flats[dtype] = flat
        return DeviceBatch(pooled[0].shape[0], flats, members, sizes, params)

    def _culprits(self, pooled: list[torch.Tensor]) -> bool:
        """Per tap: NaN / inf stop the run; values beyond the tap's dtype stop it, or with
        store.on_overflow=widen the tap is widened to float32. True when a tap was widened."""
        widened = False
        for layer, p in zip(self.layers, pooled):
            name = layer["name"]
            if not bool(torch.isfinite(p).all()):
                raise H2TError(f"tap {name}: activations contain NaN or inf; not stored")
            dtype = self.dtypes[name]
            if dtype != "float32" and not _fits(p, dtype):
                if self.on_overflow != "widen":
                    beyond = "int8's float16 scales" if dtype == "int8" else dtype
                    raise H2TError(f"tap {name}: activations reach {float(p.abs().max()):.3g}, beyond {beyond}; "
                                   f"use store.dtype=float32 or store.on_overflow=widen")
                if self.widen is not None:
                    self.widen(name)
                self.dtypes[name] = "float32"
                widened = True
        return widened

    def to_host(self, batch: DeviceBatch) -> list[np.ndarray]:
        """One copy to the host per dtype buffer (normally one in all); each tap's rows are a contiguous
        view of it; bfloat16 comes back as its bit pattern (uint16)."""
        blocks: list = [None] * len(self.layers)
        params = None if batch.params is None else _to_host(batch.params).numpy()
        for dtype, flat in batch.flats.items():
            if dtype == "bfloat16":
                flat = flat.view(torch.int16)
            array = _to_host(flat).numpy()
            if dtype == "bfloat16":
                array = array.view(np.uint16)
            offset = poffset = 0
            for i in batch.members[dtype]:
                blocks[i] = array[offset:offset + batch.sizes[i]].reshape(batch.rows, -1)
                offset += batch.sizes[i]
                if dtype == "int8":
                    assert params is not None  # int8 taps always come with their scales and offsets
                    dim = blocks[i].shape[1]
                    blocks[i] = QuantizedBlock(blocks[i], params[poffset:poffset + 2 * dim])
                    poffset += 2 * dim
        return blocks


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # torch caches pinned blocks
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def quantize_into(x: torch.Tensor, codes: torch.Tensor, params: torch.Tensor) -> None:
    """x (rows, dim) float32 -> int8 codes and float16 (scales, minima) per column, on x's device: the same
    arithmetic as pipeline/storage/quant.py's reference `quantize`."""
    lo, hi = torch.aminmax(x, dim=0)
    dim = x.shape[1]
    lo16 = _float16_toward(lo, -1)
    lo32 = lo16.float()
    scale16 = _float16_toward((hi - lo32).div_(LEVELS), 1)
    params[:dim].copy_(scale16)
    params[dim:].copy_(lo16)
    scale = scale16.float()
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes.copy_((x - lo32).div_(divisor).round_().clamp_(0, LEVELS).sub_(128))


def _fits(p: torch.Tensor, dtype: str) -> bool:
    """Whether a tap's pooled rows are stored as `dtype` without overflow (int8: its scales and minima)."""
    if dtype == "int8":
        lo, hi = torch.aminmax(p, dim=0)
        lo16 = _float16_toward(lo, -1)
        return bool(torch.isfinite(lo16).all() and torch.isfinite(_float16_toward((hi - lo16.float()) / LEVELS, 1)).all())
    return bool(torch.isfinite(p.to(TORCH_DTYPES[dtype])).all())


def _float16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 values rounded to float16 toward -inf (direction < 0) or +inf (direction > 0)."""
    near = x.half()
    off = near.float() > x if direction < 0 else near.float() < x
    return torch.where(off, torch.nextafter(near, torch.full_like(near, direction * float("inf"))), near)


class Writer:
    """Writes shards in `writers` threads, at most `writers + 1` batches in flight; a write marks the shard
    done in the ledger (last) and releases its claim."""

    def __init__(self, store, claims, writers: int):
        if writers < 1:
            raise H2TError(f"extract.writers must be >= 1, got {writers}")
        self.store, self.claims, self.limit = store, claims, writers + 1
        self._pool = ThreadPoolExecutor(writers, thread_name_prefix="h2t-write")
        self._inflight: deque[Future] = deque()
        self.stale = 0  # shards written across another writer's widening
        self.times = WriterTimes()
        self._lock = threading.Lock()

    def submit(self, shard: Shard, blocks: list[np.ndarray], dtypes: dict | None = None) -> None:
        """`dtypes`: what each block was cast to (a shard cast before another writer widened a tap is stale)."""
        waited = time.perf_counter()
        while len(self._inflight) >= self.limit:
            self._inflight.popleft().result()
        self.times.submit_wait_s += time.perf_counter() - waited
        self._inflight.append(self._pool.submit(self._write, shard, blocks, dtypes))

    def _write(self, shard: Shard, blocks: list[np.ndarray], dtypes: dict | None) -> None:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            self.store.write_rows(shard.split, shard.start, blocks, dtypes)
        except StaleShard:
            self.stale += 1  # not marked done: claimed and computed again, with the new dtypes
        finally:
            self.claims.release(f"{shard.split}/{shard.index}")
            with self._lock:
                self.times.add(time.thread_time() - cpu, time.perf_counter() - wall)

    def drain(self) -> None:
        """Wait for every write in flight (errors surface here)."""
        while self._inflight:
            self._inflight.popleft().result()

    def close(self, raise_errors: bool = True) -> None:
        """Finish the writes in flight; after another error, theirs are not raised over it."""
        try:
            if raise_errors:
                self.drain()
        finally:
            self._pool.shutdown(wait=True)
