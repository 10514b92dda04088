"""The store schema, declared once as code: create_store lays arrays out from it, open_store checks the
attributes against it, `h2t store verify` checks every array against it.

    <root>/<model>/<dataset>/<store_id>.zarr/
        attrs["h2t"]             the ATTRS below
        <split>/features/<tap>   (n, dim)  float16 | float32, or bfloat16 kept as its bit pattern in uint16
                                 (array attrs h2t_encoding=bfloat16), or int8 codes; shard = (shard_rows, dim),
                                 inner chunk = (shard_rows, col_chunk: by default 512 bytes per row),
                                 lz4 (or zstd, or none) + CRC32C each
        <split>/quant/<tap>      int8 taps only: (n_shards, 2 * dim) float16 (float32 in stores whose spec
                                 has no "quant"), per shard the scale of every
                                 column then its minimum lo: value = code * scale + (lo + 128 * scale)
                                 (pipeline/storage/quant.py); zstd + byte shuffle + CRC32C
        <split>/labels           (n,)      int64
        <split>/sample_ids       (n,)      str
        <split>/shards_done      (n_shards,) uint8 ledger, one chunk per shard: 1 = shard fully written
        derived/relevance/<key>/ weight_sq, grad_norm (D,) float32; attrs = parameters + certificate
        derived/views/<key>/     relevance-ordered columns per split (pipeline/storage/views.py)

Every array names its dimensions (Zarr v3 `dimension_names`, layout only: not in the id), so that xarray
opens a split's groups without h2t: `sample` (rows of a split), one axis per tap named after the tap (`<tap>.feature`),
`shard`, and `<tap>.quant` for an int8 tap's scales and offsets (`dimensions`). Stores written before
they had names read the same (`pipeline.open_dataset` names them itself).

A reader trusts only `status == "complete"`; an interrupted writer resumes from the ledger.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..errors import H2TError
from .quant import quantize

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

SCHEMA_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32", "int8")
COMPRESSIONS = ("auto", "lz4", "zstd", "none")
FLOAT_MAX = {"float16": float(np.finfo(np.float16).max), "bfloat16": 3.3895313892515355e38,
             "float32": float(np.finfo(np.float32).max)}
STATUS_CREATING, STATUS_WRITING, STATUS_COMPLETE = "creating", "writing", "complete"
STATUSES = (STATUS_CREATING, STATUS_WRITING, STATUS_COMPLETE)

# attrs["h2t"]: key -> what it holds. Every key is written by create_store and required by open_store.
ATTRS = {
    "schema_version": "SCHEMA_VERSION of the code that wrote the store",
    "store_id": "sha256 of the canonical spec, 16 hex digits",
    "spec": "everything that changes the numbers (the id is its hash)",
    "layers": "layer table: name, role, raw_shape, dim, offset; dtype when widened, reused_from when copied",
    "splits": "{split: rows}",
    "num_classes": "number of classes",
    "class_names": "class names in label order",
    "shard_rows": "rows per shard (one extraction batch)",
    "dtype": "the store dtype asked for",
    "status": "creating | writing | complete",
    "skipped": "samples left out as unreadable: id, split, reason",
    "created_at": "UTC time the store was laid out",
    "created_by": "user@host that laid it out",
}


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def store_id(spec: dict) -> str:
    """Content hash of everything that changes the stored numbers."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ArraySchema:
    """One array of every split: where it lives, its dtype and shape given the store's attributes."""
    path: str  # template over {split} and {layer}
    doc: str

    def key(self, split: str, layer: str | None = None) -> str:
        return self.path.format(split=split, layer=layer)


FEATURES = ArraySchema("{split}/features/{layer}", "pooled activations of one tap, (n, dim)")
SAMPLE, SHARD = "sample", "shard"


def dimensions(kind: str, layer: str | None = None) -> list[str]:
    """The dimension names of an array of the schema: `features`, `quant` (of a tap), `labels`,
    `sample_ids`, `ledger`."""
    return {"features": [SAMPLE, f"{layer}.feature"], "quant": [SHARD, f"{layer}.quant"], "labels": [SAMPLE],
            "sample_ids": [SAMPLE], "ledger": [SHARD]}[kind]
LABELS = ArraySchema("{split}/labels", "integer class of each sample, (n,) int64")
SAMPLE_IDS = ArraySchema("{split}/sample_ids", "stable id of each sample, (n,) str")
QUANT = ArraySchema("{split}/quant/{layer}", "scale and minimum per (shard, column) of an int8 tap, (n_shards, 2 dim)")
LEDGER = ArraySchema("{split}/shards_done", "completion ledger, (n_shards,) uint8, one chunk per shard")
SPLIT_ARRAYS = (LABELS, SAMPLE_IDS, LEDGER)


def storage_dtype(dtype: str) -> str:
    """The zarr dtype a store dtype is written as: zarr has no bfloat16, so its bits go into uint16."""
    return "uint16" if dtype == "bfloat16" else dtype


# Chunks equal to the fill value are written like any other: an all-zero shard (a dead ReLU tap, a black
# batch) is then present on storage, and `h2t store verify` can tell it from a deleted one.
WRITE_EMPTY: ArrayConfigParams = {"write_empty_chunks": True}


# Objects of a tap's arrays are named `c.<shard>.0` beside the array's zarr.json (Zarr v3's default chunk-key
# encoding with the "." separator) rather than `c/<shard>/0`: a shard then costs one file, not a directory and
# a file (creating ~50 directories per shard took about half the writes' time of small shards on ext4).
# Readers follow each array's metadata, so stores of either naming read the same (layout, not numbers).
FLAT_KEYS = {"name": "default", "separator": "."}


INNER_CHUNK_BYTES_PER_ROW = 512  # col_chunk's default: 256 columns of a 2-byte type, 512 of int8, 128 of float32


def inner_columns(col_chunk: int | None, dtype: str) -> int:
    """Columns per inner chunk: `col_chunk`, or by default as many as make 512 bytes per row (32 KiB for a
    64-row shard) in the store's dtype. Each inner chunk is one codec call and one index entry: int8 codes at
    256 columns paid zstd's per-call cost on half the bytes; at 512 zstd decodes ~1.4x faster per byte and
    stores the same bytes (benchmarks/README.md, compact.py)."""
    if col_chunk is None:
        return INNER_CHUNK_BYTES_PER_ROW // np.dtype(storage_dtype(dtype)).itemsize
    if isinstance(col_chunk, bool) or not isinstance(col_chunk, int) or col_chunk < 1:
        raise H2TError(f"store.col_chunk must be a positive integer or null, got {col_chunk!r}")
    return col_chunk


def quant_codecs() -> list:
    """Scales and minima of int8 taps: small (4 bytes per column and shard), written once, read per block;
    zstd over byte-shuffled float16 (many minima are 0)."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2), Crc32cCodec()]


def resolve_compression(compression: str, dtype: str) -> str:
    """`auto`: zstd for int8 codes (lz4 finds nothing to take from 256 evenly used levels: 0.97-0.99 of their
    bytes, zstd's entropy coding 0.84-0.90), lz4 for float types."""
    if compression != "auto":
        return compression
    return "zstd" if dtype == "int8" else "lz4"


def feature_codecs(compression: str, itemsize: int = 2) -> list:
    """Every inner chunk carries a CRC32C (and zarr's shard index has its own): a flipped byte fails the
    read. `lz4` (default; Blosc level 1, a core Zarr v3 codec): on pooled activations 0.81-0.90x the bytes
    at ~1,400-1,700 MiB/s encode and ~3.5-4.5 GiB/s decode per core, against `zstd` level 1's 0.64-0.66x at
    ~350 / ~880 MiB/s (for stores shipped over a network). benchmarks/codecs.py measures them."""
    if compression == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle", typesize=itemsize), Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    return [Crc32cCodec()]


def quant_params_dtype(spec: dict) -> str:
    """The dtype of an int8 store's scales and minima: float16 since spec["quant"] says so (float32 before)."""
    return spec.get("quant", {}).get("params", "float32")


def expected_arrays(meta: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array the attributes promise: key -> (shape, zarr dtype)."""
    dtype = meta.get("dtype") or meta["spec"]["dtype"]
    params_dtype = quant_params_dtype(meta["spec"])
    shard_rows = meta["shard_rows"]
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for split, n in meta["splits"].items():
        for layer in meta["layers"]:
            layer_dtype = layer.get("dtype") or dtype
            out[FEATURES.key(split, layer["name"])] = ((n, layer["dim"]), storage_dtype(layer_dtype))
            if layer_dtype == "int8":
                out[QUANT.key(split, layer["name"])] = ((-(-n // shard_rows), 2 * layer["dim"]), params_dtype)
        out[LABELS.key(split)] = ((n,), "int64")
        out[SAMPLE_IDS.key(split)] = ((n,), "str")
        out[LEDGER.key(split)] = ((-(-n // shard_rows),), "uint8")
    return out


def check_attrs(meta: dict) -> list[str]:
    """Problems with the attributes themselves: missing keys, an unknown status or dtype."""
    problems = [f"attrs['h2t'] lacks {key!r} ({doc})" for key, doc in ATTRS.items() if key not in meta]
    if meta.get("status") not in STATUSES:
        problems.append(f"attrs['h2t']['status'] is {meta.get('status')!r}, not one of {', '.join(STATUSES)}")
    if meta.get("dtype", "float16") not in DTYPES:
        problems.append(f"attrs['h2t']['dtype'] is {meta.get('dtype')!r}, not one of {', '.join(DTYPES)}")
    return problems


def check_arrays(group, meta: dict) -> list[str]:
    """Problems with the arrays: missing, or of another shape or dtype than the attributes promise."""
    problems = []
    for key, (shape, dtype) in expected_arrays(meta).items():
        try:
            arr = group[key]
        except KeyError:
            problems.append(f"{key}: missing array")
            continue
        if tuple(arr.shape) != shape:
            problems.append(f"{key}: shape {tuple(arr.shape)}, schema says {shape}")
        elif dtype != "str" and np.dtype(arr.dtype) != np.dtype(dtype):
            problems.append(f"{key}: dtype {arr.dtype}, schema says {dtype}")
    return problems


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (as torch rounds); finite inputs only."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32, exactly."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def encode_values(block: np.ndarray, dtype: str):
    """A float32 block as a tap of store dtype `dtype` stores it (int8: a quant.QuantizedBlock)."""
    if dtype == "int8":
        return quantize(block)
    return to_bfloat16_bits(block) if dtype == "bfloat16" else block.astype(dtype, copy=False)


def decode_values(block: np.ndarray, dtype: str) -> np.ndarray:
    """Values read from a tap of store dtype `dtype` as numbers: bfloat16 bits become float32, others are
    returned as stored (an int8 tap's values are read through quant.DequantizedArray)."""
    return from_bfloat16_bits(block) if dtype == "bfloat16" else block
