"""Whole shards encoded and written in one step (the store path of extraction at the speed of its codec),
and read back the same way (`ShardReader`: the streamed passes of scoring).

A row shard of a feature array (rows x every column) is one object in Zarr v3's sharding format: the
inner chunks, each encoded by the array's own codecs (bytes little-endian, then Blosc / zstd, then
CRC32C), followed by the shard index ((offset, nbytes) per inner chunk, uint64 little-endian, with its own
CRC32C). `ShardEncoder` builds those bytes from the array's metadata with the same C libraries zarr calls
(numcodecs' Blosc and Zstd, google-crc32c): one native call per inner chunk, no event loop, no
process-wide setting; the object is then written with one `put`. Every inner chunk is written, all-zero ones
included, so `h2t store verify` tells a zero shard from a deleted one.

The bytes are plain Zarr v3: zarr-python (either codec pipeline) and tensorstore read them
(tests/test_shards.py compares them with zarr's own writer). An array whose codecs this module does not
know is written through zarr instead (`encoder_for` returns None).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

import google_crc32c
import numpy as np
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation, ZstdCodec
from zarr.storage import LocalStore

from ..errors import H2TError
from .zarr_compat import array_codecs, chunk_key

BLOSC_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


CRC32C = object()  # appended as a separate part: the chunk's bytes are not copied to add 4


def _bytes_codec(codec) -> Callable[[np.ndarray], bytes] | object | None:
    """One bytes-to-bytes codec as a function of the chunk (as an array of its dtype: Blosc takes its
    typesize from it, as zarr's BloscCodec does), or None when unknown."""
    if isinstance(codec, BloscCodec):
        blosc = Blosc(cname=codec.cname.name, clevel=codec.clevel, shuffle=BLOSC_SHUFFLE[codec.shuffle.name],
                      blocksize=codec.blocksize, typesize=codec.typesize)
        return blosc.encode
    if isinstance(codec, ZstdCodec):
        zstd = Zstd(level=codec.level, checksum=codec.checksum)
        return zstd.encode
    if isinstance(codec, Crc32cCodec):
        return CRC32C
    return None


def _pipeline(codecs) -> list | None:
    """The chunk codecs as functions: bytes (little-endian) first, then bytes-to-bytes codecs; a CRC32C
    only as the last one (as feature_codecs lays it out)."""
    if not codecs or not isinstance(codecs[0], BytesCodec) or (codecs[0].endian and codecs[0].endian.value != "little"):
        return None
    steps = [_bytes_codec(codec) for codec in codecs[1:]]
    if any(step is None for step in steps) or CRC32C in steps[:-1]:
        return None
    return steps


def _run(steps: list, chunk: np.ndarray, parts: list) -> int:
    """Append the chunk's encoded bytes to `parts` (one or two pieces); returns their length."""
    data = chunk if chunk.dtype.byteorder in "<|=" or chunk.dtype.itemsize == 1 else chunk.astype(chunk.dtype.newbyteorder("<"))
    checksum = bool(steps) and steps[-1] is CRC32C
    for step in steps[:-1] if checksum else steps:
        data = step(data)
    if isinstance(data, np.ndarray):  # no compression: the chunk's own memory, as bytes
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    parts.append(data)
    if checksum:
        parts.append(np.uint32(google_crc32c.value(data)).tobytes())  # little-endian, as zarr's
        return len(data) + 4
    return len(data)


@dataclass
class ShardEncoder:
    """Encodes row shards of one 2-D array whose shard spans all its columns (or, unsharded, whose chunk
    does): `encode(block)` -> (key, bytes) of the object holding rows [shard * rows, ...)."""
    key_of: Callable[[int], str]
    dtype: np.dtype
    shard_shape: tuple[int, int]
    inner_cols: int  # columns per inner chunk (the shard's width when unsharded)
    steps: list[Callable]  # the inner chunk's codecs
    index_steps: list[Callable] | None  # the shard index's codecs; None: the array is not sharded

    def encode(self, shard: int, block: np.ndarray) -> tuple[str, list]:
        """The object's key and its bytes as a list of pieces (written in order; nothing is joined)."""
        rows, cols = self.shard_shape
        if block.dtype != self.dtype:
            block = block.astype(self.dtype)
        parts: list = []
        if self.index_steps is None:
            if block.ndim == 1:  # a 1-D array (the ledger): one chunk of `rows` values
                chunk = np.zeros(rows, self.dtype)
                chunk[:len(block)] = block
                _run(self.steps, chunk, parts)
            else:
                _run(self.steps, self._chunk(block, 0, cols), parts)
            return self.key_of(shard), parts
        index = np.empty((cols // self.inner_cols, 2), np.uint64)
        offset = 0
        for i, c0 in enumerate(range(0, cols, self.inner_cols)):
            size = _run(self.steps, self._chunk(block, c0, self.inner_cols), parts)
            index[i] = (offset, size)
            offset += size
        _run(self.index_steps, index, parts)
        return self.key_of(shard), parts

    def _chunk(self, block: np.ndarray, c0: int, width: int) -> np.ndarray:
        """Columns [c0, c0 + width) of the block as one contiguous chunk of the full chunk shape: zarr pads
        the last rows and columns with the fill value (0 here)."""
        piece = block[:, c0:c0 + width]
        if piece.shape != (self.shard_shape[0], width):
            padded = np.zeros((self.shard_shape[0], width), self.dtype)
            padded[:piece.shape[0], :piece.shape[1]] = piece
            return padded
        return np.ascontiguousarray(piece)


def encoder_for(array) -> ShardEncoder | None:
    """The encoder of a zarr v3 2-D array with one shard (or chunk) across all its columns, or None when its
    layout or codecs are not the ones this module writes."""
    codecs = array_codecs(array)
    if codecs is None or len(array.shape) not in (1, 2):
        return None
    grid = array.shards or array.chunks  # the shape of one stored object
    if len(array.shape) == 1:  # unsharded 1-D: the ledger
        steps = None if isinstance(codecs[0], ShardingCodec) else _pipeline(codecs)
        if steps is None:
            return None
        return ShardEncoder(lambda shard: chunk_key(array, (shard,)), np.dtype(array.dtype), (grid[0], 1), 1,
                            steps, None)
    grid_rows, grid_cols = grid
    if grid_cols < array.shape[1]:
        return None
    dtype = np.dtype(array.dtype)
    key_of = lambda shard: chunk_key(array, (shard, 0))  # noqa: E731
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        sharding = _row_sharding(array)
        if sharding is None:
            return None
        inner_cols = sharding.chunk_shape[1]
        steps, index_steps = _pipeline(list(sharding.codecs)), _pipeline(list(sharding.index_codecs))
        if steps is None or index_steps is None:
            return None
        return ShardEncoder(key_of, dtype, (grid_rows, grid_cols), inner_cols, steps, index_steps)
    steps = _pipeline(codecs)
    if steps is None:
        return None
    return ShardEncoder(key_of, dtype, (grid_rows, grid_cols), grid_cols, steps, None)


def _row_sharding(array) -> ShardingCodec | None:
    """The sharding codec of a 2-D zarr v3 array laid out as row shards: one shard spans every column, in
    inner chunks of the shard's rows and whole columns, the index at the end; None for any other layout."""
    codecs = array_codecs(array)
    if codecs is None or len(array.shape) != 2 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    rows, cols = array.shards
    inner_rows, inner_cols = sharding.chunk_shape
    if (cols < array.shape[1] or inner_rows != rows or cols % inner_cols
            or sharding.index_location != ShardingCodecIndexLocation.end):
        return None
    return sharding


def write_local(root: str, key: str, parts: list) -> None:
    """One object of a local store, written beside its final name and renamed, so that a reader (or a
    killed writer) never finds a half-written shard under the name."""
    path = os.path.join(root, key)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident():x}.tmp"
    try:
        fh = open(tmp, "wb")
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fh = open(tmp, "wb")
    with fh:
        write_parts(fh, parts)
    os.replace(tmp, path)


_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in getattr(os, "sysconf_names", {}) else -1
IOV_MAX = _IOV_MAX if _IOV_MAX > 0 else 16  # -1: indeterminate; POSIX guarantees 16


def write_parts(fh, parts: list) -> None:
    """Write the pieces in order with as few system calls as `os.writev` allows (up to IOV_MAX pieces each):
    a buffered `writelines` made two per inner chunk (its 4-byte checksum, then its body)."""
    if not hasattr(os, "writev"):
        fh.writelines(parts)
        return
    fh.flush()
    fd = fh.fileno()
    views = [memoryview(part).cast("B") for part in parts]
    first = 0
    while first < len(views):
        batch = views[first:first + IOV_MAX]
        written = os.writev(fd, batch)
        if not written and any(len(view) for view in batch):
            raise OSError(f"no bytes written to {fh.name}")
        for view in batch:  # skip what was written; a partial write resumes inside its piece
            if written < len(view):
                views[first] = view[written:]
                break
            written -= len(view)
            first += 1


def as_bytes(parts: list) -> bytes:
    return b"".join(parts)


def _decode_step(codec) -> Callable[[bytes], bytes] | object | None:
    """One bytes-to-bytes codec's decoder (Blosc's frames describe themselves), or None when unknown."""
    if isinstance(codec, BloscCodec):
        return Blosc().decode
    if isinstance(codec, ZstdCodec):
        return Zstd().decode
    if isinstance(codec, Crc32cCodec):
        return CRC32C
    return None


def _decode_pipeline(codecs) -> tuple[list, bool] | None:
    """The decoders of `_pipeline`'s layouts, outermost last, and whether a CRC32C closes each chunk."""
    if _pipeline(codecs) is None:
        return None
    steps = [_decode_step(codec) for codec in codecs[1:]]
    if any(step is None for step in steps):
        return None
    checksum = bool(steps) and steps[-1] is CRC32C
    return (steps[:-1] if checksum else steps), checksum


class ShardReader:
    """Reads row shards of one local 2-D sharded array straight from their files: the index, then each inner
    chunk decoded with the array's codecs (numcodecs, as `ShardEncoder` encodes them) and its CRC32C
    checked, in the calling thread (no event loop): streamed scoring passes ran 13-42 % faster than through
    zarr's Rust pipeline (benchmarks/shard_reads.py). `read` returns None when a shard's file is absent, so
    the caller reads through zarr and gets zarr's fill value."""

    def __init__(self, array, root: str, steps: list, checksum: bool):
        self.array, self.root, self.steps, self.checksum = array, root, steps, checksum
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.rows, self.cols = array.shards
        self.inner = array.chunks[1]
        self.n_inner = self.cols // self.inner

    def path(self, shard: int) -> str:
        return os.path.join(self.root, self.array.path, chunk_key(self.array, (shard, 0)))

    def read(self, start: int, stop: int) -> np.ndarray | None:
        """Rows [start, stop) of every column."""
        n, width = self.array.shape
        out = np.empty((stop - start, width), self.dtype)
        for shard in range(start // self.rows, -(-stop // self.rows)):
            path = self.path(shard)
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                return None
            lo, hi = max(start, shard * self.rows), min(stop, (shard + 1) * self.rows, n)
            self._decode_shard(path, data, out[lo - start:hi - start], lo - shard * self.rows, width)
        return out

    def _decode_shard(self, path: str, data: bytes, out: np.ndarray, r0: int, width: int) -> None:
        index_bytes = 16 * self.n_inner
        if len(data) < index_bytes + 4:
            raise H2TError(f"shard {path} is truncated ({len(data)} bytes): `h2t store verify` lists damaged shards")
        index_start = len(data) - index_bytes - 4
        self._check(path, data[index_start:-4], data[-4:], "its index")
        index = np.frombuffer(data, "<u8", 2 * self.n_inner, index_start).reshape(self.n_inner, 2)
        view = np.frombuffer(data, np.uint8)  # read-only: chunks are sliced, checksummed and decoded without a copy
        rows = out.shape[0]
        for i, (offset, nbytes) in enumerate(index.tolist()):
            c0 = i * self.inner
            w = min(self.inner, width - c0)
            if offset == EMPTY:  # an inner chunk zarr left out: the fill value
                out[:, c0:c0 + w] = 0
                continue
            body = view[offset:offset + nbytes - 4] if self.checksum else view[offset:offset + nbytes]
            if self.checksum:
                self._check(path, body, data[offset + nbytes - 4:offset + nbytes], f"inner chunk {i}")
            for step in reversed(self.steps):
                body = step(body)
            out[:, c0:c0 + w] = np.frombuffer(body, self.dtype).reshape(self.rows, self.inner)[r0:r0 + rows, :w]

    @staticmethod
    def _check(path: str, body: bytes | np.ndarray, stored: bytes, what: str) -> None:
        if google_crc32c.value(body) != int.from_bytes(stored, "little"):
            raise H2TError(f"checksum mismatch in {what} of shard {path}: the store is damaged "
                           f"(`h2t store verify` lists damaged shards)")


EMPTY = 2**64 - 1  # the shard index's (offset, nbytes) of an absent inner chunk


def reader_for(array) -> ShardReader | None:
    """The direct reader of a zarr v3 2-D array in a local store whose shard spans all its columns (the
    layout `encoder_for` writes), or None: any other array is read through zarr."""
    sharding = _row_sharding(array) if isinstance(getattr(array, "store", None), LocalStore) else None
    if sharding is None:
        return None
    chunk, index = _decode_pipeline(list(sharding.codecs)), _decode_pipeline(list(sharding.index_codecs))
    if chunk is None or index != ([], True):  # the index: little-endian bytes and a CRC32C, as zarr writes it
        return None
    return ShardReader(array, str(array.store.root), *chunk)


def read_rows(array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of every column of a feature array: from its shard files when `reader_for` can
    read them, else through zarr."""
    reader = reader_for(array)
    values = None if reader is None else reader.read(start, stop)
    return array[start:stop] if values is None else values
