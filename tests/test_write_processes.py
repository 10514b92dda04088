"""Shard writes in worker processes (pipeline/write_processes.py): the same store as writer threads make."""
import errno
import os

import numpy as np
import pytest

import pipeline.extract
from pipeline import write_processes
from pipeline.errors import H2TError
from pipeline.extract import extract
from pipeline.stages import Shard
from pipeline.storage.claims import Claims
from pipeline.storage.quant import QuantizedBlock
from pipeline.storage.store import create_store
from pipeline.write_processes import ProcessWriter, pack, place, unpack
from tests.conftest import tiny_cfg


def test_blocks_come_back_from_one_segment_as_they_went_in(rng):
    blocks = [rng.standard_normal((5, 7)).astype(np.float16),
              rng.integers(0, 2**16, (5, 3), dtype=np.uint16),  # bfloat16 bit patterns
              QuantizedBlock(rng.integers(-128, 128, (5, 9), dtype=np.int8), rng.random(18).astype(np.float16)),
              np.zeros((5, 0), np.float32)]
    layout, nbytes = place(blocks)
    assert all(offset % np.dtype(dtype).alignment == 0 for placed in layout for offset, _, dtype in placed)
    buffer = bytearray(nbytes)
    pack(blocks, layout, buffer)
    back = unpack(layout, buffer)
    assert isinstance(back[2], QuantizedBlock)
    for sent, got in zip(blocks, back):
        for a, b in zip(sent if isinstance(sent, QuantizedBlock) else [sent],
                        got if isinstance(got, QuantizedBlock) else [got]):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_blocks_cut_from_one_buffer_are_copied_as_one_run(rng, monkeypatch):
    host = rng.standard_normal(5 * 12).astype(np.float16)  # a batch cast into one buffer: taps of 7, 0 and 5 columns
    blocks = [host[:35].reshape(5, 7), host[35:35].reshape(5, 0), host[35:].reshape(5, 5),
              rng.standard_normal((5, 2)).astype(np.float16)[:, :1]]  # not contiguous: copied on its own
    copies = []
    real = write_processes.ctypes.memmove
    monkeypatch.setattr(write_processes.ctypes, "memmove", lambda dst, src, n: copies.append(n) or real(dst, src, n))
    layout, nbytes = place(blocks)
    buffer = bytearray(nbytes)
    pack(blocks, layout, buffer)
    assert copies == [host.nbytes, 10]
    assert all(np.array_equal(a, b) for a, b in zip(blocks, unpack(layout, buffer)))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_store_written_by_processes_equals_one_written_by_threads(tmp_path, dtype, monkeypatch):
    made = []

    class Spy(ProcessWriter):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pipeline.extract, "ProcessWriter", Spy)
    stores = {}
    for kind in ("threads", "processes"):
        result = extract(tiny_cfg(tmp_path / kind, **{"extract.writers": 2, "extract.writers_in": kind,
                                                      "store.dtype": dtype}).extract_job())
        assert result.store.complete and result.writes is not None
        stores[kind] = result
    assert len(made) == 1 and made[0].times.shards > 0  # the processes' run wrote through worker processes
    threads, processes = stores["threads"].store, stores["processes"].store
    assert processes.id == threads.id
    assert stores["processes"].writes.shards == stores["threads"].writes.shards > 0
    for split in threads.splits():
        assert processes.shards_done(split).all()
        for layer in threads.layers:
            assert np.array_equal(processes.features(split, layer["name"])[:], threads.features(split, layer["name"])[:])


def small_store(tmp_path, rows=80):
    layers = [{"name": "t0", "role": "t", "raw_shape": [4], "dim": 4, "offset": 0}]
    return create_store(str(tmp_path / "s.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}}, layers,
                        {"train": rows}, 2, ["a", "b"], 8, "float16", 4, "lz4")


def shm_exists(name: str) -> bool:
    return os.path.exists(os.path.join(write_processes.SHM_ROOT, name.lstrip("/")))


def test_process_writers_count_stale_shards_surface_errors_and_leave_no_segment(tmp_path):
    store = small_store(tmp_path)
    writer = ProcessWriter(store, Claims(store.group.store, 300), writers=2)
    try:
        for i in range(5):
            writer.submit(Shard("train", 8 * i, 8 * i + 8, i), [np.full((8, 4), i, np.float16)], {"t0": "float16"})
        # cast for a dtype the tap no longer has (as after another writer's widening): not marked done
        writer.submit(Shard("train", 40, 48, 5), [np.full((8, 4), 5, np.float32)], {"t0": "float32"})
        writer.drain()
        assert writer.stale == 1 and writer.times.shards == 6 and writer.times.cpu_s > 0
        writer.submit(Shard("nope", 0, 8, 0), [np.ones((8, 4), np.float16)])  # no such split in the store
        with pytest.raises(Exception, match="nope"):
            writer.drain()
        segments = [segment.name for segment in writer._segments]
    finally:
        writer.close()
    assert segments and not any(shm_exists(name) for name in segments)
    done = store.shards_done("train")
    assert done[:5].all() and not done[5:].any()
    assert np.array_equal(store.features("train", "t0")[:40, 0], np.repeat(np.arange(5), 8).astype(np.float16))


def test_a_larger_batch_replaces_a_segment_and_closing_mid_flight_finishes_the_writes(tmp_path):
    store = small_store(tmp_path, rows=80)
    writer = ProcessWriter(store, Claims(store.group.store, 300), writers=1)
    try:
        writer.submit(Shard("train", 0, 4, 0), [np.full((4, 4), 7, np.float16)])  # a short last shard's size
        writer.drain()
        small = writer._segments[0].name
        for i in range(1, 4):  # full shards: the small segment is replaced, and workers let go of it
            writer.submit(Shard("train", 8 * i, 8 * i + 8, i), [np.full((8, 4), i, np.float16)])
        assert writer._retired == [small] and not shm_exists(small)
    finally:
        writer.close(raise_errors=False)  # with writes in flight: they finish, then the workers exit
    assert not writer._segments and not writer._inflight
    done = store.shards_done("train")
    assert done[:4].all()
    assert np.array_equal(store.features("train", "t0")[8:32, 0], np.repeat(np.arange(1, 4), 8).astype(np.float16))


def test_a_batch_beyond_free_shared_memory_is_refused_with_one_line(tmp_path, monkeypatch):
    """A segment is created sparse: writing past a full /dev/shm would kill the process (SIGBUS), so its
    memory is reserved first, and a refusal (ENOSPC) becomes the error."""
    store = small_store(tmp_path, rows=16)
    made = []
    real = write_processes.SharedMemory

    def tracked(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write_processes, "SharedMemory", tracked)
    monkeypatch.setattr(os, "posix_fallocate", full)
    writer = ProcessWriter(store, Claims(store.group.store, 300), writers=1)
    try:
        with pytest.raises(H2TError, match=r"needs 1 MiB of shared memory, /dev/shm has [\d,]+ MiB free.*extract.writers"):
            writer.submit(Shard("train", 0, 8, 0), [np.ones((8, 2**16), np.float16)])
    finally:
        writer.close()
    assert made and not any(shm_exists(segment.name) for segment in made)
    assert not store.shards_done("train").any()
