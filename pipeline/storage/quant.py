"""int8 stores: one byte per feature, with an affine scale and offset per (shard, column).

Extraction quantises each shard's rows of a column to 256 levels between their minimum and maximum
(on the device, pipeline/stages.py): code = round((x - lo) / scale) - 128 with scale = (hi - lo) / 255, and
stores `scale` and `offset = lo + 128 * scale` beside the codes (schema QUANT: one row per shard, the
scales of every column then the offsets). Every read gives code * scale + offset in float32: an exact 0
where a column's minimum is 0 (ReLU outputs), a constant column exactly (its scale is 0), and at most
scale / 2 from the value everywhere else.
`DequantizedArray` makes an int8 tap read like any other feature array, so scoring, column reads, views and
verify need no other path.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

LEVELS = 255


class QuantizedBlock(NamedTuple):
    """One shard of an int8 tap as extraction writes it."""
    codes: np.ndarray  # (rows, dim) int8
    params: np.ndarray  # (2 * dim,) float32: scales, then offsets


def quantize(x: np.ndarray) -> QuantizedBlock:
    """The reference quantiser (float32 rows -> codes and params); the device stage computes the same."""
    x = np.asarray(x, np.float32)
    lo, hi = x.min(axis=0), x.max(axis=0)
    scale = ((hi - lo) / np.float32(LEVELS)).astype(np.float32)  # 0 for a constant column: decodes to lo exactly
    offset = lo + np.float32(128) * scale
    codes = np.clip(np.rint((x - lo) / np.where(scale > 0, scale, np.float32(1))), 0, LEVELS) - 128
    return QuantizedBlock(codes.astype(np.int8), np.concatenate([scale, offset]).astype(np.float32))


def dequantize_into(out: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """out[:] = codes * scale + offset (scale, offset broadcast over rows), in float32."""
    np.multiply(codes, scale, out=out)
    out += offset
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
        return self._dequantize(out, rows, cols, self.codes[rows, cols])

    def _dequantize(self, out: np.ndarray, rows: slice, cols, codes: np.ndarray) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("int8 feature arrays are read by contiguous row ranges")
        if stop <= start:
            return out
        first, last = start // self.shard_rows, (stop - 1) // self.shard_rows
        params = self.params[first:last + 1]
        col_index = np.arange(self.dim)[cols] if not isinstance(cols, np.ndarray) else cols
        scales, offsets = params[:, :self.dim][:, col_index], params[:, self.dim:][:, col_index]
        for i, shard in enumerate(range(first, last + 1)):
            a = max(start, shard * self.shard_rows) - start
            b = min(stop, (shard + 1) * self.shard_rows) - start
            dequantize_into(out[a:b], codes[a:b], scales[i], offsets[i])
        return out

    def __len__(self) -> int:
        return self.shape[0]
