"""Whole-shard writes (pipeline/storage/shards.py): the bytes are the ones zarr's own writer makes, and
zarr-python (both codec pipelines) and tensorstore read them back bit-equal."""
import os

import numpy as np
import pytest
import zarr

from pipeline.errors import H2TError
from pipeline.storage import CODEC_PIPELINES, shards
from pipeline.storage.schema import feature_codecs, storage_dtype

LAYOUTS = [("float16", "lz4"), ("float16", "zstd"), ("float32", "none"), ("bfloat16", "lz4"), ("int8", "lz4")]


def _array(root, dtype: str, compression: str, n: int = 100, dim: int = 300, rows: int = 32, inner: int = 64):
    zdtype = np.dtype(storage_dtype(dtype))
    return zarr.create_array(store=str(root), shape=(n, dim), dtype=zdtype, chunks=(rows, inner),
                             shards=(rows, -(-dim // inner) * inner), fill_value=0,
                             compressors=feature_codecs(compression, zdtype.itemsize), zarr_format=3)


def _values(rng, shape, dtype):
    if np.dtype(dtype).kind == "f":
        return np.maximum(rng.standard_normal(shape), 0).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype,compression", LAYOUTS)
def test_a_shard_is_byte_for_byte_what_zarrs_own_writer_makes(tmp_path, rng, dtype, compression):
    ours, theirs = _array(tmp_path / "ours", dtype, compression), _array(tmp_path / "theirs", dtype, compression)
    data = _values(rng, ours.shape, ours.dtype)
    data[32:64] = 0  # an all-zero shard: written, not dropped
    encoder = shards.encoder_for(ours)
    assert encoder is not None
    for shard, r0 in enumerate(range(0, len(data), 32)):
        key, parts = encoder.encode(shard, data[r0:r0 + 32])
        shards.write_local(str(tmp_path / "ours"), key, parts)
    with zarr.config.set({"codec_pipeline.path": CODEC_PIPELINES["zarr"]}):
        theirs.with_config({"write_empty_chunks": True})[:] = data
    names = sorted(os.listdir(tmp_path / "ours" / "c"))
    assert names == sorted(os.listdir(tmp_path / "theirs" / "c")) == ["0", "1", "2", "3"]
    for shard in names:
        assert (tmp_path / "ours" / "c" / shard / "0").read_bytes() == (tmp_path / "theirs" / "c" / shard / "0").read_bytes()
    assert not [name for name in os.listdir(tmp_path / "ours" / "c" / "0") if name.endswith(".tmp")]


@pytest.mark.parametrize("pipeline", sorted(CODEC_PIPELINES))
def test_zarr_reads_the_shards_back_with_either_codec_pipeline(tmp_path, rng, pipeline):
    array = _array(tmp_path / "a", "float16", "lz4", n=70)
    data = _values(rng, array.shape, array.dtype)
    encoder = shards.encoder_for(array)
    for shard, r0 in enumerate(range(0, 70, 32)):
        shards.write_local(str(tmp_path / "a"), *encoder.encode(shard, data[r0:r0 + 32]))
    with zarr.config.set({"codec_pipeline.path": CODEC_PIPELINES[pipeline]}):
        back = zarr.open_array(str(tmp_path / "a"), mode="r")
        np.testing.assert_array_equal(back[:], data)
        np.testing.assert_array_equal(back[5:40, 70:200], data[5:40, 70:200])


def test_tensorstore_reads_the_shards_bit_equal(tmp_path, rng):
    ts = pytest.importorskip("tensorstore")
    array = _array(tmp_path / "a", "float16", "lz4")
    data = _values(rng, array.shape, array.dtype)
    encoder = shards.encoder_for(array)
    for shard, r0 in enumerate(range(0, 100, 32)):
        shards.write_local(str(tmp_path / "a"), *encoder.encode(shard, data[r0:r0 + 32]))
    opened = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}}).result()
    np.testing.assert_array_equal(opened.read().result(), data)


def test_arrays_of_other_layouts_are_left_to_zarr(tmp_path):
    two_shards = zarr.create_array(store=str(tmp_path / "b"), shape=(10, 300), dtype="float16", chunks=(10, 50),
                                   shards=(10, 150), zarr_format=3)
    assert shards.encoder_for(two_shards) is None  # more than one shard across the columns
    three_d = zarr.create_array(store=str(tmp_path / "c"), shape=(2, 2, 2), dtype="float32", chunks=(1, 2, 2),
                                zarr_format=3)
    assert shards.encoder_for(three_d) is None


# --- direct reads of whole shards ---------------------------------------------------------------------

READ_LAYOUTS = LAYOUTS + [("int8", "zstd")]


@pytest.mark.parametrize("dtype,compression", READ_LAYOUTS)
def test_direct_reads_give_what_zarr_reads(tmp_path, rng, dtype, compression):
    array = _array(tmp_path / "a", dtype, compression)  # 100 rows in shards of 32; 300 columns, inner chunks of 64
    data = _values(rng, array.shape, array.dtype)
    array[:] = data  # zarr's own writer
    reader = shards.reader_for(zarr.open_array(str(tmp_path / "a"), mode="r"))
    assert reader is not None
    for start, stop in [(0, 100), (0, 32), (32, 96), (96, 100), (10, 50), (64, 65)]:
        got = reader.read(start, stop)
        assert got.dtype == array.dtype and got.shape == (stop - start, 300)
        np.testing.assert_array_equal(got, data[start:stop])


def test_a_left_out_inner_chunk_reads_as_the_fill_value(tmp_path, rng):
    array = _array(tmp_path / "a", "float16", "lz4", n=32)
    data = _values(rng, array.shape, array.dtype) + np.float16(1)
    data[:, 64:128] = 0
    array[:] = data  # zarr's default leaves all-zero inner chunks out of the shard
    index = np.frombuffer((tmp_path / "a" / "c" / "0" / "0").read_bytes()[-4 - 16 * 5:-4], "<u8").reshape(5, 2)
    assert index[1, 0] == shards.EMPTY  # what this test is about
    np.testing.assert_array_equal(shards.reader_for(array).read(0, 32), data)


def test_a_missing_shard_is_left_to_zarr(tmp_path, rng):
    array = _array(tmp_path / "a", "float16", "lz4", n=64)
    array[:] = _values(rng, array.shape, array.dtype)
    os.remove(tmp_path / "a" / "c" / "1" / "0")
    reader = shards.reader_for(array)
    assert reader.read(0, 32) is not None and reader.read(0, 64) is None


@pytest.mark.parametrize("where", ["chunk", "index"])
def test_a_flipped_byte_fails_the_read_naming_the_shard(tmp_path, rng, where):
    array = _array(tmp_path / "a", "int8", "zstd", n=32)
    array[:] = _values(rng, array.shape, array.dtype)
    path = tmp_path / "a" / "c" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[10 if where == "chunk" else -10] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(H2TError, match=f"checksum mismatch in .*{os.path.join('c', '0', '0')}"):
        shards.reader_for(array).read(0, 32)


def test_a_truncated_shard_fails_the_read_naming_it(tmp_path, rng):
    array = _array(tmp_path / "a", "float16", "lz4", n=32)
    array[:] = _values(rng, array.shape, array.dtype)
    path = tmp_path / "a" / "c" / "0" / "0"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(H2TError, match=f"shard .*{os.path.join('c', '0', '0')} is truncated"):
        shards.reader_for(array).read(0, 32)


def test_arrays_not_in_a_local_store_or_of_other_layouts_are_read_through_zarr(tmp_path):
    in_memory = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(10, 300), dtype="float16",
                                  chunks=(10, 50), shards=(10, 300), zarr_format=3)
    assert shards.reader_for(in_memory) is None
    two_shards = zarr.create_array(store=str(tmp_path / "b"), shape=(10, 300), dtype="float16", chunks=(10, 50),
                                   shards=(10, 150), zarr_format=3)
    assert shards.reader_for(two_shards) is None
    unsharded = zarr.create_array(store=str(tmp_path / "c"), shape=(10, 300), dtype="float16", chunks=(10, 300),
                                  zarr_format=3)
    assert shards.reader_for(unsharded) is None


def test_read_rows_reads_shard_files_where_it_can_and_zarr_elsewhere(tmp_path, rng, monkeypatch):
    local = _array(tmp_path / "a", "float16", "lz4", n=70)
    in_memory = zarr.create_array(store=zarr.storage.MemoryStore(), shape=local.shape, dtype=local.dtype,
                                  chunks=local.chunks, shards=local.shards, zarr_format=3)
    data = _values(rng, local.shape, local.dtype)
    local[:], in_memory[:] = data, data
    read = []
    monkeypatch.setattr(shards.ShardReader, "read", lambda self, a, b: read.append((a, b)) or data[a:b].copy())
    np.testing.assert_array_equal(shards.read_rows(local, 32, 70), data[32:70])
    np.testing.assert_array_equal(shards.read_rows(in_memory, 32, 70), data[32:70])
    assert read == [(32, 70)]  # the local array's rows came from its files, the other's through zarr


def test_pieces_are_written_in_order_across_short_writes_and_many_calls(tmp_path, monkeypatch):
    """`write_parts` resumes a short write inside its piece and sends more pieces than one call takes."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in rng.integers(0, 5000, shards.IOV_MAX + 300)]
    parts[3] = b""  # an empty piece
    parts[7] = bytes(range(200))
    real, calls = os.writev, []

    def short_writev(fd, buffers):  # the kernel may write less than asked: at most 7,777 bytes here
        calls.append(len(buffers))
        assert len(buffers) <= shards.IOV_MAX
        budget, taken = 7777, []
        for buf in buffers:
            view = memoryview(buf)[:budget]
            taken.append(view)
            budget -= len(view)
            if not budget:
                break
        return real(fd, taken)

    monkeypatch.setattr(os, "writev", short_writev)
    shards.write_local(str(tmp_path), "a/c.0.0", parts)
    assert (tmp_path / "a" / "c.0.0").read_bytes() == b"".join(bytes(p) for p in parts)
    assert len(calls) > sum(len(p) for p in parts) // 7777
    assert not list((tmp_path / "a").glob("*.tmp"))  # the temp name was renamed into place
