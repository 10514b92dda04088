"""int8 stores (store.dtype=int8; pipeline/storage/quant.py): codes and a scale and offset per (shard,
column), quantised on the device exactly as the numpy reference does, read back as float32 within half a
step everywhere, exact zeros kept; views keep the codes, verify checks the params, probes run on them, and
they take fewer bytes than float16."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import H2TError
from pipeline.extract import extract, plan_store
from pipeline.head import read_columns
from pipeline.probe import probe_store
from pipeline.select import column_plan, ranking
from pipeline.stages import DeviceStage, quantize_into
from pipeline.storage import catalog, quant, views
from pipeline.storage.schema import QUANT
from pipeline.storage.store import open_store
from tests.conftest import schema_cfg, shard_object, tiny_cfg

EPS = np.finfo(np.float32).eps
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def relu_like(rng, rows: int = 50, dim: int = 40) -> np.ndarray:
    """ReLU outputs (exact zeros), a dead column, a constant column, negative values, a wide range."""
    x = np.maximum(rng.standard_normal((rows, dim)), 0).astype(np.float32)
    x[:, 3] = 2.5  # constant
    x[:, 5] = 0.0  # dead unit
    x[:, 7] = rng.standard_normal(rows).astype(np.float32) - 3.0  # negative values (not a ReLU tap)
    x[:, 9] *= 1e4
    x[:, 11] *= 1e-4
    return x


def decode(block: quant.QuantizedBlock) -> np.ndarray:
    return quant.dequantize(block)


def half_step(params: np.ndarray, dim: int) -> np.ndarray:
    """The largest error a decoded value may have: half a step, plus float32 rounding of the decode."""
    params = params.astype(np.float32)
    scale, lo = params[..., :dim], params[..., dim:]
    return scale / 2 + 4 * EPS * (np.abs(quant.offsets(scale, lo)) + 128 * scale)


# --- the quantiser ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_device_quantiser_gives_the_reference_codes_and_params_bit_for_bit(rng, device):
    x = relu_like(rng)
    ref = quant.quantize(x)
    codes = torch.empty(x.shape, dtype=torch.int8, device=device)
    params = torch.empty(2 * x.shape[1], dtype=torch.float16, device=device)
    quantize_into(torch.from_numpy(x).to(device), codes, params)
    np.testing.assert_array_equal(codes.cpu().numpy(), ref.codes)
    assert params.cpu().numpy().tobytes() == ref.params.tobytes()
    assert ref.codes.dtype == np.int8 and ref.params.dtype == np.float16


def test_reference_codes_span_int8_and_decode_within_half_a_step(rng):
    x = relu_like(rng)
    dim = x.shape[1]
    block = quant.quantize(x)
    lo, hi = x.min(axis=0), x.max(axis=0)
    varying = hi > lo
    # the column's minimum is code -128 and its maximum 127: all 256 levels are used, unless the scale is
    # below float16's normal range (column 11's ~1e-6: a subnormal step of 6e-8 rounds it up by a few %)
    normal = block.params[:dim] >= np.finfo(np.float16).smallest_normal
    assert (block.codes.min(axis=0) == -128).all()
    assert (block.codes.max(axis=0)[varying & normal] == 127).all() and (block.codes.max(axis=0)[~varying] == -128).all()
    assert not normal[11] and block.codes.max(axis=0)[11] >= 127 - 16
    values = decode(block)
    assert (np.abs(values - x) <= half_step(block.params, dim)).all()
    # float16 parameters rounded outward: lo the largest float16 <= the minimum, scale the smallest float16
    # >= (max - lo) / 255, so that every value is within the 256 levels
    lo16, scale16 = block.params[dim:], block.params[:dim]
    assert (lo16.astype(np.float32) <= lo).all() and (np.nextafter(lo16, np.float16(np.inf)).astype(np.float32) > lo).all()
    need = (hi - lo16.astype(np.float32)) / np.float32(255)
    assert (scale16.astype(np.float32) >= need).all()
    assert (np.nextafter(scale16, np.float16(0)).astype(np.float32) < need)[varying].all()
    zero_min = lo == 0  # ReLU columns: every exact zero comes back exactly zero
    assert zero_min[0] and zero_min[5]
    assert not values[:, zero_min][x[:, zero_min] == 0].any()
    np.testing.assert_array_equal(values[:, 3], x[:, 3])  # constant columns decode exactly
    np.testing.assert_array_equal(values[:, 5], x[:, 5])


@pytest.mark.parametrize("value", [0.0, 2.5, 0.3, 1e-3, -7.1, 3e4])
def test_a_constant_column_decodes_exactly_when_a_float16_holds_it_and_within_a_step_of_a_few_ulps(value):
    x = np.full((16, 2), value, np.float32)
    x[:, 1] = np.linspace(0, 1, 16, dtype=np.float32)
    block = quant.quantize(x)
    values = decode(block)
    if np.float32(np.float16(value)) == np.float32(value):
        np.testing.assert_array_equal(values[:, 0], x[:, 0])
    else:  # far closer than a float16 store would keep it
        assert (np.abs(values[:, 0] - x[:, 0]) <= half_step(block.params, 2)[0]).all()
        assert (np.abs(values[:, 0] - x[:, 0]) < abs(np.float32(np.float16(value)) - np.float32(value))).all()


def test_values_beyond_float16_fit_int8_while_its_float16_minima_do(rng):
    """An int8 tap takes values a float16 store refuses (its scale carries the range), but not a minimum
    below float16's: that one is named, or widened to float32 with store.on_overflow=widen."""
    big = np.maximum(rng.standard_normal((8, 6)), 0).astype(np.float32) * np.float32(1e5)  # up to ~3e5, minima 0
    low = rng.standard_normal((8, 6)).astype(np.float32) - np.float32(1e5)  # minima below -65504
    layers = [{"name": "big", "dim": 6}, {"name": "low", "dim": 6}]
    stage = DeviceStage(lambda x: x, lambda images, device: images, torch.device("cpu"), layers,
                        {"big": "int8", "low": "int8"})
    with pytest.raises(H2TError, match="tap low: .*beyond int8's float16 scales"):
        stage([torch.from_numpy(big), torch.from_numpy(low)])
    widened = []
    stage = DeviceStage(lambda x: x, lambda images, device: images, torch.device("cpu"), layers,
                        {"big": "int8", "low": "int8"}, on_overflow="widen")
    stage.widen = widened.append
    blocks = stage.to_host(stage([torch.from_numpy(big), torch.from_numpy(low)]))
    assert widened == ["low"] and blocks[1].dtype == np.float32
    assert (np.abs(decode(blocks[0]) - big) <= half_step(blocks[0].params, 6)).all()


def test_device_stage_casts_int8_taps_with_their_own_params_beside_other_dtypes(rng):
    pooled = [torch.from_numpy(relu_like(rng, 8, d)) for d in (16, 12, 20)]
    layers = [{"name": n, "dim": p.shape[1]} for n, p in zip("abc", pooled)]
    stage = DeviceStage(lambda x: x, lambda images, device: images, torch.device("cpu"), layers,
                        {"a": "int8", "b": "float16", "c": "int8"})
    blocks = stage.to_host(stage(pooled))
    for i in (0, 2):
        ref = quant.quantize(pooled[i].numpy())
        assert isinstance(blocks[i], quant.QuantizedBlock)
        np.testing.assert_array_equal(blocks[i].codes, ref.codes)
        assert blocks[i].params.tobytes() == ref.params.tobytes()
    assert blocks[1].dtype == np.float16
    np.testing.assert_array_equal(blocks[1], pooled[1].numpy().astype(np.float16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_in_an_int8_tap_are_named(rng, bad):
    pooled = [torch.from_numpy(relu_like(rng, 8, 16)), torch.ones(8, 4)]
    pooled[0][3, 2] = bad
    stage = DeviceStage(lambda x: x, lambda images, device: images, torch.device("cpu"),
                        [{"name": "a", "dim": 16}, {"name": "b", "dim": 4}], {"a": "int8", "b": "int8"})
    with pytest.raises(H2TError, match="tap a: activations contain NaN or inf"):
        stage(pooled)


# --- an extracted int8 store -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The tiny config extracted as int8 and as float32 (40 / 8 / 20 rows, shards of 16)."""
    root = tmp_path_factory.mktemp("int8")
    return {dtype: extract(tiny_cfg(root, **{"store.dtype": dtype}).extract_job()).store for dtype in ("int8", "float32")}


@pytest.fixture
def int8_copy(stores, tmp_path):
    """A private copy of the int8 store, to damage or add views to."""
    path = shutil.copytree(stores["int8"].path, tmp_path / "copy.zarr")
    return open_store(str(path))


def test_int8_store_has_its_own_id_and_its_quant_arrays(stores, tmp_path):
    store = stores["int8"]
    float16 = plan_store(tiny_cfg(tmp_path, **{"store.dtype": "float16"}).extract_job())
    float16_id = os.path.basename(float16.path).removesuffix(".zarr")
    assert float16.spec["dtype"] == "float16" and store.meta["spec"]["dtype"] == "int8"
    assert len({store.id, stores["float32"].id, float16_id}) == 3
    assert store.complete and catalog.verify(store) == []
    shard_rows = store.meta["shard_rows"]
    for split, n in store.splits().items():
        n_shards = -(-n // shard_rows)
        for layer in store.layers:
            params = store.group[QUANT.key(split, layer["name"])]
            assert params.shape == (n_shards, 2 * layer["dim"]) and params.dtype == np.float16
            assert store.stored_features(split, layer["name"]).dtype == np.int8
            assert store.features(split, layer["name"]).dtype == np.float32
            assert all(store.shard_exists(split, layer["name"], s) for s in range(n_shards))
            written = params[:]
            assert np.isfinite(written).all() and (written[:, :layer["dim"]] >= 0).all()


def test_int8_values_are_within_half_a_step_of_float32(stores):
    int8, exact = stores["int8"], stores["float32"]
    shard_rows = int8.meta["shard_rows"]
    for split in int8.splits():
        for layer in int8.layers:
            name, dim = layer["name"], layer["dim"]
            values = int8.features(split, name)[:]
            want = exact.features(split, name)[:]
            params = np.repeat(int8.group[QUANT.key(split, name)][:], shard_rows, axis=0)[:len(want)]
            assert values.dtype == np.float32 and values.shape == want.shape
            assert (np.abs(values - want) <= half_step(params, dim)).all(), (split, name)
            # an exact zero stays zero where its shard's column has minimum 0 (ReLU taps: almost everywhere)
            for s in range(0, len(want), shard_rows):
                block, got = want[s:s + shard_rows], values[s:s + shard_rows]
                zero_min = block.min(axis=0) == 0
                assert not got[:, zero_min][block[:, zero_min] == 0].any(), (split, name, s)


def test_int8_reads_by_rows_columns_and_selections_agree_with_the_full_read(stores):
    store = stores["int8"]
    for layer in store.layers:
        name, dim = layer["name"], layer["dim"]
        for split, n in store.splits().items():
            array = store.features(split, name)
            full = array[:]
            cols = np.array([dim - 1, 0, dim // 2, 3])
            for rows in (slice(None), slice(0, n), slice(5, n - 3), slice(16, 32), slice(n - 1, n), slice(2, 2)):
                np.testing.assert_array_equal(array[rows], full[rows])
                np.testing.assert_array_equal(array[rows, 2:9], full[rows, 2:9])
                np.testing.assert_array_equal(array.get_orthogonal_selection((rows, cols)), full[rows][:, cols])
                np.testing.assert_array_equal(array.get_orthogonal_selection((rows, slice(1, dim, 1))),
                                              full[rows, 1:])
            for row in (0, min(17, n - 2), n - 1, -1, -n):
                np.testing.assert_array_equal(array[row], full[row])
                np.testing.assert_array_equal(array[row, 2:9], full[row, 2:9])
                np.testing.assert_array_equal(array.get_orthogonal_selection((row, cols)), full[row, cols])


@pytest.mark.parametrize("budget_mb", [1024, 0.05])  # the matrix in memory, or streamed in row blocks
def test_the_scoring_matrix_of_an_int8_store_is_that_of_its_values(stores, tmp_path, budget_mb):
    from pipeline.score.matrix import FeatureMatrix
    from tests.conftest import make_store

    store = stores["int8"]
    values = {split: np.concatenate([store.features(split, layer["name"])[:] for layer in store.layers], axis=1)
              for split in store.splits()}
    plain = make_store(tmp_path / "values.zarr", values, {s: store.labels(s) for s in values},
                       store.meta["num_classes"], store.meta["shard_rows"], "float32",
                       {"widths": [layer["dim"] for layer in store.layers]})
    budget = int(budget_mb * 2**20)
    quantised, exact = FeatureMatrix(store, "train", budget), FeatureMatrix(plain, "train", budget)
    assert quantised.in_memory == exact.in_memory == (budget_mb > 1)
    got, want = list(quantised.blocks()), list(exact.blocks())
    assert [rows for rows, _ in got] == [rows for rows, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a.tobytes() == b.tobytes()
    idx = np.array([0, 5, 63, 64, 700, store.n_features - 1])
    assert quantised.columns(idx).tobytes() == exact.columns(idx).tobytes()


@pytest.mark.parametrize("budget", [views.SHARD_BYTES, 1])  # one view shard per split, or one per store shard
def test_a_column_view_of_an_int8_store_reads_exactly_the_same_values(int8_copy, rng, budget):
    store = int8_copy
    order = ranking(rng.random(store.n_features))
    view = views.build_view(store, "k0", order, 300, budget_bytes=budget)
    assert view.encoding == "int8"
    for split, n in store.splits().items():
        assert view.group[split].dtype == np.int8 and view.group[split].shape == (n, 300)
        assert view.group[f"{split}_quant"].dtype == np.float16
        assert view.group[f"{split}_quant"].shape == (-(-n // store.meta["shard_rows"]), 600)
    for k in (1, 37, 300):
        plan = column_plan(order[:k], store.layers)
        for split in store.splits():
            for normalise in (True, False):
                direct = read_columns(store, split, plan, normalise=normalise)
                assert np.array_equal(read_columns(store, split, plan, view, normalise=normalise), direct)
                assert np.array_equal(read_columns(store, split, plan, view, slice(3, 19), normalise=normalise),
                                      direct[3:19])
    # the view's values are the store's, column for column (a prefix of the view is the top columns)
    for split in store.splits():
        full = np.concatenate([store.features(split, layer["name"])[:] for layer in store.layers], axis=1)
        assert view.read(split, 300).tobytes() == np.ascontiguousarray(full[:, order[:300]]).tobytes()
        assert view.read(split, 40, slice(5, 30)).tobytes() == np.ascontiguousarray(full[5:30, order[:40]]).tobytes()
    assert catalog.verify(store) == []
    assert views.view_for(store, "k0", order, 200).key == view.key  # found again, not rebuilt


def test_verify_reports_a_deleted_quant_shard(int8_copy):
    store = int8_copy
    name = store.layers[4]["name"]
    chunk = shard_object(store, QUANT.key("train", name), 1)
    assert chunk.is_file() and catalog.verify(store) == []
    os.remove(chunk)
    reopened = open_store(store.path)
    assert not reopened.shard_exists("train", name, 1)
    problems = catalog.verify(reopened)
    assert len(problems) == 1, problems
    assert f"/{name} shard 1 " in problems[0] and problems[0].startswith("train/") and "missing" in problems[0]


def test_verify_names_the_quant_array_of_a_deleted_quant_shard(int8_copy):
    store = int8_copy
    name = store.layers[4]["name"]
    os.remove(shard_object(store, QUANT.key("train", name), 1))
    problems = catalog.verify(open_store(store.path))
    assert len(problems) == 1 and QUANT.key("train", name) in problems[0], problems


def test_verify_reports_a_corrupted_quant_shard(int8_copy):
    store = int8_copy
    name = store.layers[2]["name"]
    chunk = shard_object(store, QUANT.key("test", name), 0)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    problems = catalog.verify(open_store(store.path))
    assert len(problems) == 1 and f"{QUANT.key('test', name)} shard 0" in problems[0], problems
    assert "checksum" in problems[0]


# --- probes and bytes at realistic sizes -----------------------------------------------------------------

SIZED = {"data.sizes": {"train": 256, "val": 64, "test": 128}, "extract.batch_size": 64}


@pytest.fixture(scope="module")
def sized_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sized")
    return {dtype: extract(tiny_cfg(root, **SIZED, **{"store.dtype": dtype}).extract_job()).store for dtype in ("int8", "float16")}


def probe_cfg(method):
    return schema_cfg(**{"select.fraction": 0.1, "head.steps": 200, "head.lr": 0.05, "score.lam": 1e-3,
                         "linear.layer": "pre_logits"}).probe_job(method)


@pytest.mark.parametrize("method", ["head2toe", "linear"])
def test_a_probe_on_an_int8_store_scores_like_float16(sized_stores, method):
    int8 = probe_store(sized_stores["int8"], probe_cfg(method))
    half = probe_store(sized_stores["float16"], probe_cfg(method))
    assert int8["store_id"] == sized_stores["int8"].id and int8["n_features_selected"] == half["n_features_selected"]
    if method == "head2toe":
        assert int8["column_view"] is not None  # the head read the int8 view
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert abs(int8[key] - half[key]) <= 0.05, (key, int8[key], half[key])
    assert int8["test_accuracy"] > 1.5 / 4  # 4 classes: the probe learned something


def feature_bytes(store) -> int:
    """Bytes on disk of every split's feature arrays and, for int8, their scales and offsets."""
    total = 0
    for split in store.splits():
        for folder in ("features", "quant"):
            total += sum(f.stat().st_size for f in (Path(store.path) / split / folder).rglob("*") if f.is_file())
    return total


def test_int8_takes_fewer_bytes_per_value_than_float16(sized_stores):
    per_value = {}
    for dtype, store in sized_stores.items():
        values = sum(store.splits().values()) * store.n_features
        per_value[dtype] = feature_bytes(store) / values
    quant_bytes = sum(f.stat().st_size for split in sized_stores["int8"].splits()
                      for f in (Path(sized_stores["int8"].path) / split / "quant").rglob("*") if f.is_file())
    assert quant_bytes > 0  # the scales and offsets are counted
    assert per_value["int8"] < per_value["float16"], per_value


def test_an_int8_store_with_float32_params_from_before_reads_and_verifies_the_same(int8_copy):
    """Stores written before the parameters became float16 (no spec["quant"], float32 arrays) stay readable."""
    import zarr

    store = int8_copy
    want = {(s, layer["name"]): store.features(s, layer["name"])[:] for s in store.splits() for layer in store.layers}
    group = zarr.open_group(store.path, mode="r+")
    for split in store.splits():
        for layer in store.layers:
            old = group[QUANT.key(split, layer["name"])]
            values = old[:].astype(np.float32)
            new = group.create_array(QUANT.key(split, layer["name"]), shape=old.shape, dtype="float32",
                                     chunks=old.chunks, compressors=old.compressors, fill_value=0, overwrite=True,
                                     dimension_names=old.metadata.dimension_names)
            new[:] = values
    meta = dict(group.attrs["h2t"])
    meta["spec"] = {k: v for k, v in meta["spec"].items() if k != "quant"}
    group.attrs["h2t"] = meta
    before = open_store(store.path)
    assert catalog.verify(before) == []
    for (split, name), values in want.items():
        np.testing.assert_array_equal(before.features(split, name)[:], values)
    meta["spec"]["quant"] = {"params": "float16"}  # verify checks the params' dtype against the spec
    group.attrs["h2t"] = meta
    assert any("quant" in problem and "float16" in problem for problem in catalog.verify(open_store(store.path)))
