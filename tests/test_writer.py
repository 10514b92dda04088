"""Writer threads and all-zero shards: every shard is written by this code's own encoder (pipeline/storage/
shards.py), all-zero ones included, from any number of threads at once, and writing never touches zarr's
process-wide settings. (Writers used to switch zarr's codec pipeline to keep all-zero shards, which raced
between threads: a black batch's shard was sometimes left unwritten and `h2t store verify` said "missing".)"""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.data.base import Dataset, in_memory_split
from pipeline.extract import extract, plan_store
from pipeline.storage import catalog, quant
from pipeline.storage.schema import FEATURES, QUANT
from pipeline.storage.store import FeatureStore, create_store, open_store
from pipeline.storage.writer import ShardWriter
from tests.conftest import shard_object, tiny_cfg

BATCH = 8  # rows per shard
SIZES = {"train": 40, "val": 16, "test": 24}
BLACK = {("train", 0), ("train", 2), ("train", 4), ("val", 1), ("test", 0)}  # (split, shard) of black images


def mixed_dataset(seed: int) -> Dataset:
    """Random 32 px images, except the shards in BLACK, whose images are black (all pixels 0)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in SIZES.items():
        images = rng.integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)
        for split, shard in BLACK:
            if split == name:
                images[shard * BATCH:(shard + 1) * BATCH] = 0
        splits[name] = in_memory_split(name, images, np.arange(n) % 4, [f"{name}/{i}" for i in range(n)])
    return Dataset(f"blackmix{seed}", 4, splits, {"source": "test", "black": sorted(BLACK), "seed": seed},
                   [str(c) for c in range(4)])


def black_cfg(root: Path, writers: int = 4):
    # mean 0: a black pixel enters the backbone as 0, and a random-init ResNet (conv without bias, fresh
    # BatchNorm, ReLU) keeps it 0 in every tap up to pre_logits
    return tiny_cfg(root, **{"model.mean": [0.0, 0.0, 0.0], "extract.writers": writers,
                             "extract.batch_size": BATCH})


def shard_file(store: FeatureStore, key: str, shard: int) -> Path:
    """Where one shard of the array `key` lies on the local disk."""
    return shard_object(store, key, shard)


def all_zero_shards(store: FeatureStore) -> set[tuple[str, str, int]]:
    out = set()
    for split, n in store.splits().items():
        for layer in store.layers:
            values = store.features(split, layer["name"])[:]
            out |= {(split, layer["name"], s) for s in range(-(-n // BATCH))
                    if not values[s * BATCH:(s + 1) * BATCH].any()}
    return out


def assert_every_shard_on_disk(store: FeatureStore) -> None:
    for split, n in store.splits().items():
        for layer in store.layers:
            for shard in range(-(-n // BATCH)):
                assert store.shard_exists(split, layer["name"], shard), (split, layer["name"], shard)
                assert shard_file(store, FEATURES.key(split, layer["name"]), shard).is_file()
    assert not [p for p in Path(store.path).rglob("*.tmp")]  # no write left half-done beside its name


def test_black_and_other_shards_from_four_writers_are_all_written_every_time(tmp_path):
    for run in range(6):  # the race lost a shard now and then: several fresh stores
        cfg = black_cfg(tmp_path / f"run{run}")
        result = extract(cfg.extract_job(), plan_store(cfg.extract_job(), mixed_dataset(run)))
        store = open_store(result.store.path)
        assert store.complete and result.backbone_images == sum(SIZES.values())
        assert catalog.verify(store) == [], run
        assert_every_shard_on_disk(store)
        zero = all_zero_shards(store)
        # the black shards really are all zero in the ReLU taps (so a dropped all-zero shard can be caught),
        # and only they are
        assert {(split, shard) for split, _tap, shard in zero} == BLACK, run
        relu_taps = [layer["name"] for layer in store.layers if layer["name"] != "logits"]
        assert {(s, t, k) for s, k in BLACK for t in relu_taps} <= zero, run


def test_writing_never_changes_zarrs_process_wide_settings(tmp_path, monkeypatch):
    before = zarr.config.get("codec_pipeline.path")
    seen, switched = [], []
    set_config = zarr.config.set

    def spy_set(*args, **kwargs):  # whatever sets zarr's config while the writers run
        switched.append((args, kwargs))
        return set_config(*args, **kwargs)

    write_shard = ShardWriter.write_shard

    def recording_write_shard(self, array, shard, block):
        seen.append(zarr.config.get("codec_pipeline.path"))
        write_shard(self, array, shard, block)
        seen.append(zarr.config.get("codec_pipeline.path"))

    monkeypatch.setattr(zarr.config, "set", spy_set)
    monkeypatch.setattr(ShardWriter, "write_shard", recording_write_shard)
    cfg = black_cfg(tmp_path, writers=4)
    store = extract(cfg.extract_job(), plan_store(cfg.extract_job(), mixed_dataset(0))).store
    assert store.complete and catalog.verify(open_store(store.path)) == []
    assert zarr.config.get("codec_pipeline.path") == before
    assert seen and set(seen) == {before}  # the same inside every writer thread, during every write
    assert not [call for call in switched if "codec_pipeline" in repr(call)], switched


LAYERS = [{"name": "a", "role": "t", "raw_shape": [24], "dim": 24, "offset": 0},
          {"name": "b", "role": "t", "raw_shape": [40], "dim": 40, "offset": 24}]


@pytest.mark.parametrize("dtype,compression", [("float16", "lz4"), ("float32", "zstd"), ("bfloat16", "none"),
                                               ("int8", "lz4")])
def test_all_zero_and_other_shards_written_from_many_threads_are_all_present(tmp_path, rng, dtype, compression):
    sizes = {"train": 8 * 60 - 3, "test": 8 * 20}  # a short last shard in train
    store = create_store(str(tmp_path / "w.zarr"), {"model": {"name": "m"}, "dataset": {"name": "d"}}, LAYERS,
                         sizes, 2, ["a", "b"], 8, dtype, 16, compression)
    expected = {}
    jobs = []
    for split, n in sizes.items():
        store.group[f"{split}/labels"][:] = np.zeros(n, np.int64)
        values = np.maximum(rng.standard_normal((n, 64)), 0).astype(np.float32)
        for shard, start in enumerate(range(0, n, 8)):
            if shard % 3 != 1:  # two shards in three all zero
                values[start:start + 8] = 0
            blocks = []
            for layer in LAYERS:
                block = values[start:start + 8, layer["offset"]:layer["offset"] + layer["dim"]]
                blocks.append(quant.quantize(block) if dtype == "int8" else store.encode(layer["name"], block))
            jobs.append((split, start, blocks))
        expected[split] = values

    with ThreadPoolExecutor(8) as pool:  # one store object, as extraction's writer threads share it
        list(pool.map(lambda job: store.write_rows(*job), jobs))

    assert catalog.verify(store) == []
    for split, n in sizes.items():
        assert store.shards_done(split).all()
        for layer in LAYERS:
            for shard in range(-(-n // 8)):
                assert store.shard_exists(split, layer["name"], shard), (split, layer["name"], shard)
                assert shard_file(store, FEATURES.key(split, layer["name"]), shard).is_file()
                if dtype == "int8":
                    assert shard_file(store, QUANT.key(split, layer["name"]), shard).is_file()
            values = store.decode(layer["name"], store.features(split, layer["name"])[:])
            want = expected[split][:, layer["offset"]:layer["offset"] + layer["dim"]]
            if dtype == "int8":  # all-zero shards come back exactly zero, the rest within half a step
                np.testing.assert_allclose(values, want, atol=float(want.max()) / 255)
                zero_rows = ~want.any(axis=1)
                assert not values[zero_rows].any()
            else:
                np.testing.assert_array_equal(values, store.decode(layer["name"], store.encode(layer["name"], want)))
    store.mark_complete()

    # an all-zero shard that is deleted is told from one that is written: verify names it
    reopened = open_store(store.path)
    os.remove(shard_file(reopened, FEATURES.key("train", "b"), 3))
    problems = catalog.verify(reopened)
    assert len(problems) == 1 and "train/features/b shard 3" in problems[0] and "missing" in problems[0]
