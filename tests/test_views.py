"""Column views (pipeline/storage/views.py): a prefix of the view is exactly the selected columns, the
probe's numbers do not depend on it, and it is a cache that can be corrupted, dropped or missing."""
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf.errors import ValidationError

from pipeline.errors import H2TError
from pipeline.head import read_columns
from pipeline.probe import probe_store
from pipeline.select import column_plan, ranking
from pipeline.storage import catalog, views
from pipeline.storage.store import open_store
from tests.conftest import make_store, schema_cfg

WIDTHS = [40, 24, 64, 8]


@pytest.fixture
def store(tmp_path, rng):
    n = {"train": 96, "val": 20, "test": 40}
    X = {s: np.abs(rng.standard_normal((m, sum(WIDTHS)))).astype(np.float32) for s, m in n.items()}
    y = {s: (x[:, 3] + x[:, 50] > x[:, 70] + x[:, 100]).astype(np.int64) for s, x in X.items()}
    return make_store(tmp_path / "s.zarr", X, y, 2, dtype="float16", spec={"widths": WIDTHS, "pooling": {"target_size": 64}})


def probe_cfg(**store_over):
    over = {"score.lam": 2e-3, "score.tol": 1e-3, "score.memory_budget_mb": 512, "select.fraction": 0.2,
            "head.lr": 0.05, "head.steps": 60, "head.batch_size": 32, "linear.layer": "layer3",
            "store.column_views": True, "store.view_fraction": 0.5}
    return schema_cfg(**{**over, **{f"store.{k}": v for k, v in store_over.items()}}).probe_job("head2toe")


def test_a_prefix_of_the_view_reads_exactly_the_selected_columns(store, rng):
    D = store.n_features
    order = ranking(rng.random(D))
    view = views.build_view(store, "k0", order, 90)
    for k in (1, 5, 37, 90):
        plan = column_plan(order[:k], store.layers)
        for split in ("train", "test"):
            direct = read_columns(store, split, plan)
            through = read_columns(store, split, plan, view)
            assert np.array_equal(direct, through), (k, split)
            rows = slice(7, 19)
            assert np.array_equal(read_columns(store, split, plan, view, rows), direct[rows])


def test_views_are_found_by_key_and_width_and_never_half_built(store, rng):
    order = ranking(rng.random(store.n_features))
    assert views.find_view(store, "k0", 10) is None
    narrow = views.build_view(store, "k0", order, 20)
    assert views.find_view(store, "k0", 10).key == narrow.key
    assert views.find_view(store, "k0", 21) is None and views.find_view(store, "other", 10) is None
    wide = views.view_for(store, "k0", order, 30, min_fraction=0.5)
    assert wide.width == max(30, int(np.ceil(0.5 * store.n_features))) and wide.key != narrow.key
    assert views.find_view(store, "k0", 25).key == wide.key
    store.group[f"{views.ROOT}/{wide.key}"].attrs["complete"] = False  # as if its build was interrupted
    assert views.find_view(store, "k0", 25) is None


def test_probe_gives_the_same_results_with_and_without_views(store):
    with_view = probe_store(store, probe_cfg())
    assert with_view["column_view"] is not None and with_view["column_view"]["width"] >= 27
    again = probe_store(store, probe_cfg())  # the view is reused, not rebuilt
    assert again["column_view"] == with_view["column_view"] and len(views.list_views(store)) == 1
    without = probe_store(store, probe_cfg(column_views=False))
    assert without["column_view"] is None
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "selected_per_layer", "n_features_selected"):
        assert with_view[key] == without[key], key


def test_bfloat16_and_widened_stores_read_the_same_through_views(tmp_path, rng):
    X = {"train": rng.standard_normal((48, 30)).astype(np.float32), "test": rng.standard_normal((16, 30)).astype(np.float32)}
    y = {s: (x[:, 0] > 0).astype(np.int64) for s, x in X.items()}
    bf = make_store(tmp_path / "bf.zarr", X, y, 2, dtype="bfloat16", spec={"widths": [10, 20]})
    mixed = make_store(tmp_path / "mixed.zarr", X, y, 2, dtype="float16", spec={"widths": [10, 20]}, complete=False)
    mixed.widen_layer("layer1")
    mixed.mark_complete()
    for s in (bf, open_store(mixed.path)):
        order = ranking(rng.random(30))
        view = views.build_view(s, "k", order, 12)
        plan = column_plan(order[:12], s.layers)
        assert np.array_equal(read_columns(s, "test", plan, view), read_columns(s, "test", plan))


def test_verify_checks_views_and_rm_derived_drops_them(store, rng, tmp_path):
    order = ranking(rng.random(store.n_features))
    view = views.build_view(store, "k0", order, 64)
    assert catalog.verify(store) == []
    chunk = os.path.join(store.path, views.ROOT, view.key, "train", "c", "0", "0")
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 3] ^= 0x40
    open(chunk, "wb").write(data)
    problems = catalog.verify(open_store(store.path))
    assert len(problems) == 1 and view.key in problems[0]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "store", "rm", "--derived", store.path],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reopened = open_store(store.path)
    assert views.list_views(reopened) == [] and catalog.verify(reopened) == [] and reopened.complete


def test_a_bad_view_fraction_is_named_before_any_scoring(store):
    for bad in (0, 1.5):
        with pytest.raises(H2TError, match="store.view_fraction must be in"):
            probe_store(store, probe_cfg(view_fraction=bad))
    with pytest.raises(ValidationError, match="view_fraction"):  # not a number: the schema refuses it
        probe_cfg(view_fraction="many")
    assert "derived" not in open_store(store.path).group  # nothing was scored, no view was built
