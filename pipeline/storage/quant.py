"""int8 stores: one byte per feature, with an affine scale and offset per (shard, column).

Extraction quantises each shard's rows of a column to 256 levels between their minimum and maximum
(on the device, pipeline/stages.py): lo = the minimum rounded down to a float16, scale = (hi - lo) / 255
rounded up to a float16, code = round((x - lo) / scale) - 128, and stores `scale` and `lo` as float16 beside
the codes (schema QUANT: one row per shard, the scales of every column then their minima). float16 halves
what the parameters cost (4 bytes per column and 64-row shard: 0.06 per value, not 0.12), and rounding
outward keeps every value within the 256 levels. Every read gives code * scale + offset in float32, with
offset = lo + 128 * scale computed as the quantiser computes it: an exact 0 where a column's minimum is 0
(ReLU outputs), a constant column exactly when its value is a float16, and at most scale / 2 from the value
everywhere else. Stores written with float32 parameters read the same way.
`DequantizedArray` makes an int8 tap read like any other feature array, so scoring, column reads, views and
verify need no other path.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

LEVELS = 255
KEEP_PARAMS_BYTES = 16 * 2**20


class QuantizedBlock(NamedTuple):
    """One shard of an int8 tap as extraction writes it."""
    codes: np.ndarray  # (rows, dim) int8
    params: np.ndarray  # (2 * dim,) float16: scales, then minima


def float16_toward(x: np.ndarray, direction: float) -> np.ndarray:
    """float32 values rounded to float16 toward -inf (direction < 0) or +inf (direction > 0)."""
    near = x.astype(np.float16)
    off = near.astype(np.float32) > x if direction < 0 else near.astype(np.float32) < x
    with np.errstate(over="ignore"):  # the neighbour of float16's max, computed where it is not used
        return np.where(off, np.nextafter(near, np.float16(direction * np.inf)), near)


def quantize(x: np.ndarray) -> QuantizedBlock:
    """The reference quantiser (float32 rows -> codes and params); the device stage computes the same."""
    x = np.asarray(x, np.float32)
    lo = float16_toward(x.min(axis=0), -1)
    lo32 = lo.astype(np.float32)
    scale = float16_toward((x.max(axis=0) - lo32) / np.float32(LEVELS), 1)  # 0 for a constant float16 column
    scale32 = scale.astype(np.float32)
    codes = np.clip(np.rint((x - lo32) / np.where(scale32 > 0, scale32, np.float32(1))), 0, LEVELS) - 128
    return QuantizedBlock(codes.astype(np.int8), np.concatenate([scale, lo]))


def offsets(scale: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The value of code 0: lo + 128 * scale, in float32 (128 * scale is exact, so one rounding)."""
    return lo + np.float32(128) * scale


def dequantize(block: QuantizedBlock) -> np.ndarray:
    """A shard's values as every read gives them."""
    dim = block.codes.shape[1]
    params = np.asarray(block.params, np.float32)
    scale, lo = params[:dim], params[dim:]
    return dequantize_into(np.empty(block.codes.shape, np.float32), block.codes, scale, offsets(scale, lo))


def dequantize_into(out: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """out[:] = codes * scale + offset (scale, offset broadcast over rows), in float32."""
    np.multiply(codes, scale, out=out)
    out += offset
    return out


class CodesBlock(NamedTuple):
    """Codes of consecutive rows starting at row `start`, with the scales and offsets of each shard they
    touch (first shard first)."""
    codes: np.ndarray
    start: int
    shard_rows: int
    scales: np.ndarray
    offsets: np.ndarray

    def fill(self, out: np.ndarray, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """out[:] = the values of the block's rows [r0, r1)."""
        r1 = len(self.codes) if r1 is None else r1
        first = self.start // self.shard_rows
        a = r0
        while a < r1:
            shard = (self.start + a) // self.shard_rows
            b = min(r1, (shard + 1) * self.shard_rows - self.start)
            dequantize_into(out[a - r0:b - r0], self.codes[a:b], self.scales[shard - first], self.offsets[shard - first])
            a = b
        return out


class DequantizedArray:
    """An int8 tap's codes read as float32 values, for the row and column selections the readers use:
    `array[rows, cols]` (rows a slice or an integer, cols a slice) and `get_orthogonal_selection((rows,
    cols))` (cols also an integer array). Only the params of the shards the rows touch are read."""

    def __init__(self, codes, params, shard_rows: int):
        self.codes, self.params, self.shard_rows = codes, params, int(shard_rows)
        self.shape, self.chunks, self.path = codes.shape, codes.chunks, codes.path
        self.dtype = np.dtype("float32")
        self.dim = codes.shape[1]
        self.ndim = 2
        self._kept: np.ndarray | None = None

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        return self._decode(rows, cols, self.codes[rows, cols] if isinstance(key, tuple) else self.codes[rows])

    def get_orthogonal_selection(self, selection) -> np.ndarray:
        rows, cols = selection
        return self._decode(rows, cols, self.codes.get_orthogonal_selection(selection))

    def _decode(self, rows, cols, codes: np.ndarray) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            return self._decode(slice(int(rows) % self.shape[0], int(rows) % self.shape[0] + 1), cols, codes[None])[0]
        return self._dequantize(np.empty(codes.shape, np.float32), rows, cols, codes)

    def read_into(self, out: np.ndarray, rows: slice, cols=slice(None)) -> np.ndarray:
        """out[:] = the values of rows x cols, dequantised straight into `out` (no float32 copy between)."""
        return self.codes_of(rows, cols).fill(out)

    def codes_of(self, rows: slice, cols=slice(None), codes: np.ndarray | None = None) -> "CodesBlock":
        """The codes of rows x cols and their shards' scales and offsets, one read each, to be dequantised
        a few rows at a time by the reader (while they are in cache)."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("int8 feature arrays are read by contiguous row ranges")
        codes = self.codes[start:stop, cols] if codes is None else codes
        if stop <= start:
            return CodesBlock(codes, start, self.shard_rows, np.empty((0, 0), np.float32), np.empty((0, 0), np.float32))
        first, last = start // self.shard_rows, (stop - 1) // self.shard_rows
        params = self._params(first, last + 1)
        scales, minima = params[:, :self.dim][:, cols], params[:, self.dim:][:, cols]  # views for a slice
        return CodesBlock(codes, start, self.shard_rows, scales, offsets(scales, minima))

    def _params(self, first: int, stop: int) -> np.ndarray:
        """Rows [first, stop) of the scales and minima: all of them read once and kept when they are small
        (a scoring pass reads every layer's block by block: one read per layer instead of one per block)."""
        if self._kept is None and self.params.nbytes <= KEEP_PARAMS_BYTES:
            self._kept = np.asarray(self.params[:], np.float32)
        if self._kept is not None:
            return self._kept[first:stop]
        return np.asarray(self.params[first:stop], np.float32)

    def _dequantize(self, out: np.ndarray, rows: slice, cols, codes: np.ndarray) -> np.ndarray:
        return self.codes_of(rows, cols, codes).fill(out)

    def __len__(self) -> int:
        return self.shape[0]
