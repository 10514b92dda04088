"""Extraction stages (pipeline/stages.py): parallel loading keeps order, the device stage casts and checks
exactly like the store's own encoders, the writer bounds the batches in flight."""
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.data.base import in_memory_split
from pipeline.errors import H2TError
from pipeline.stages import DeviceStage, Loader, Shard, Writer
from pipeline.storage.claims import Claims
from pipeline.storage.schema import to_bfloat16_bits
from pipeline.storage.store import create_store


class Images:
    def __init__(self, split):
        self.splits = {"train": split}


def test_loader_decodes_ranges_in_parallel_and_keeps_their_order(rng):
    images = rng.integers(0, 255, (50, 8, 8, 3), dtype=np.uint8)
    split = in_memory_split("train", images, np.zeros(50, np.int64), [str(i) for i in range(50)])
    files = type(split)("train", split.labels, split.ids, lambda a, b: [images[i] for i in range(a, b)])
    for source in (split, files):
        loader = Loader(Images(source), workers=3, pin=False)
        try:
            batch = loader.submit(Shard("train", 3, 47, 0)).result()
        finally:
            loader.close()
        assert isinstance(batch, torch.Tensor) and np.array_equal(batch.numpy(), images[3:47])


def stage_for(widths, dtypes, on_overflow="error", values=None):
    layers = [{"name": f"t{i}", "dim": w} for i, w in enumerate(widths)]

    def runner(x):
        return [v[: x.shape[0]] for v in values]

    identity = lambda images, device: images.float()  # noqa: E731 - preprocessing is not under test here
    return DeviceStage(runner, identity, torch.device("cpu"), layers, dict(zip([l["name"] for l in layers], dtypes)),
                       on_overflow=on_overflow)


def test_device_stage_casts_each_tap_to_its_store_dtype_in_one_buffer(rng):
    values = [torch.from_numpy(rng.standard_normal((6, w)).astype(np.float32) * 100) for w in (5, 7, 3)]
    stage = stage_for([5, 7, 3], ["float16", "bfloat16", "float16"], values=values)
    batch = stage(torch.zeros(6, 1))
    assert set(batch.flats) == {"float16", "bfloat16"}  # one buffer (and one host copy) per dtype
    blocks = stage.to_host(batch)
    assert np.array_equal(blocks[0], values[0].numpy().astype(np.float16))
    assert np.array_equal(blocks[1], to_bfloat16_bits(values[1].numpy()))
    assert np.array_equal(blocks[2], values[2].numpy().astype(np.float16))
    assert all(b.flags.c_contiguous for b in blocks)


def test_device_stage_names_nan_and_overflowing_taps_or_widens_them():
    ok, big = torch.ones(4, 3), torch.full((4, 2), 1e6)
    with pytest.raises(H2TError, match="tap t1: activations reach 1e\\+06, beyond float16"):
        stage_for([3, 2], ["float16", "float16"], values=[ok, big])(torch.zeros(4, 1))
    nan = ok.clone()
    nan[2, 1] = float("nan")
    with pytest.raises(H2TError, match="tap t0: activations contain NaN"):
        stage_for([3, 2], ["float16", "float16"], values=[nan, ok[:, :2]])(torch.zeros(4, 1))
    widened = []
    stage = stage_for([3, 2], ["float16", "float16"], "widen", values=[ok, big])
    stage.widen = widened.append
    blocks = stage.to_host(stage(torch.zeros(4, 1)))
    assert widened == ["t1"] and blocks[1].dtype == np.float32 and np.array_equal(blocks[1], big.numpy())
    assert blocks[0].dtype == np.float16


def test_writer_keeps_at_most_writers_plus_one_batches_in_flight(tmp_path, rng):
    layers = [{"name": "t0", "role": "t", "raw_shape": [4], "dim": 4, "offset": 0}]
    store = create_store(str(tmp_path / "s.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}}, layers,
                         {"train": 80}, 2, ["a", "b"], 8, "float16", 4, "zstd")
    real, lock, state = store.write_rows, threading.Lock(), {"now": 0, "peak": 0}

    def slow_write(split, start, blocks, dtypes=None):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        real(split, start, blocks, dtypes)
        with lock:
            state["now"] -= 1

    store.write_rows = slow_write

    writer = Writer(store, Claims(store.group.store, 300), writers=2)
    submitted_while_full = []
    for i in range(10):
        writer.submit(Shard("train", 8 * i, 8 * i + 8, i), [np.full((8, 4), i, np.float16)])
        submitted_while_full.append(len(writer._inflight))
    writer.close()
    assert max(submitted_while_full) <= 3 and state["peak"] == 2
    assert store.shards_done("train").all()
    assert np.array_equal(store.features("train", "t0")[:, 0], np.repeat(np.arange(10), 8).astype(np.float16))
    # where the time went: ten writes of >= 50 ms asleep (wall, not CPU), two at a time, so the main thread
    # waited for a free writer for at least the four rounds beyond the first three in flight
    times = writer.times
    assert times.shards == 10 and times.wall_s >= 10 * 0.05
    assert 0 < times.cpu_s < times.wall_s / 2
    assert times.submit_wait_s >= 3 * 0.05
