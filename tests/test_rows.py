"""Row selections (pipeline/rows.py): folds and train + val read the same numbers as a store that holds
exactly those rows, for scoring (in memory and streamed), column reads and relevance."""
import numpy as np
import pytest

from pipeline.errors import H2TError
from pipeline.head import read_columns
from pipeline.rows import Rows, kfold, merged
from pipeline.score import FeatureMatrix, score_store
from pipeline.score.relevance import relevance_key, score_params
from pipeline.select import column_plan
from tests.conftest import make_store, score_cfg

WIDTHS = [24, 40, 8]


@pytest.fixture
def data(rng):
    n = {"train": 70, "val": 26, "test": 30}
    X = {s: np.abs(rng.standard_normal((m, sum(WIDTHS)))).astype(np.float32) for s, m in n.items()}
    y = {s: (x[:, 3] + x[:, 30] > x[:, 50] + x[:, 60]).astype(np.int64) + 2 * (x[:, 1] > 1) for s, x in X.items()}
    return X, y


@pytest.fixture
def store(tmp_path, data):
    X, y = data
    return make_store(tmp_path / "s.zarr", X, y, 4, shard_rows=8, spec={"widths": WIDTHS})


def store_of(tmp_path, data, rows_by_split, name):
    """A store whose train split holds exactly the selected rows, in the selection's order."""
    X, y = data
    Xs = np.concatenate([X[s][idx] for s, idx in rows_by_split])
    ys = np.concatenate([y[s][idx] for s, idx in rows_by_split])
    return make_store(tmp_path / name, {"train": Xs, "test": X["test"]}, {"train": ys, "test": y["test"]}, 4,
                      shard_rows=8, spec={"widths": WIDTHS})


def test_segments_cover_exactly_the_selected_rows_in_order(store, rng):
    idx_train = np.sort(rng.choice(70, 33, replace=False))
    rows = Rows((("train", idx_train), ("val", None)), "mix")
    expected = np.concatenate([store.labels("train")[idx_train], store.labels("val")])
    assert rows.size(store) == 33 + 26
    assert np.array_equal(rows.labels(store), expected)
    for block_rows, align in ((8, 8), (5, 1), (64, 8)):
        for part in (slice(None), slice(3, 40), slice(30, 36)):
            got = []
            for seg in rows.segments(store, block_rows, align, part):
                assert seg.src.stop - seg.src.start <= block_rows
                if align > 1:
                    assert seg.src.start % align == 0
                values = store.labels(seg.split)[seg.src]
                got.append(values if seg.take is None else values[seg.take])
                assert len(got[-1]) == seg.dst.stop - seg.dst.start
            assert np.array_equal(np.concatenate(got), expected[part]), (block_rows, align, part)


def test_merged_rows_read_once_give_each_selection_its_rows(store, rng):
    plan = column_plan(np.sort(rng.choice(sum(WIDTHS), 17, replace=False)), store.layers)
    partial = Rows((("val", np.array([1, 4, 5, 20])), ("train", np.sort(rng.choice(70, 9, replace=False)))), "some")
    cases = [kfold(store, ["train", "val"], 5, 0)[2], (Rows.of(store, "train"), Rows.of(store, "val")),
             (partial, Rows.of(store, "val"))]
    for selections in cases:
        union, positions = merged(store, *selections)
        together = read_columns(store, union, plan)
        assert union.size(store) == len(np.unique(np.concatenate(positions)))
        for selection, at in zip(selections, positions):
            assert np.array_equal(together[at], read_columns(store, selection, plan))
            assert np.array_equal(union.labels(store)[at], selection.labels(store))
    fit, val = cases[0]
    assert merged(store, fit, val)[0].parts == (("train", None), ("val", None))  # a fold's rows: the whole pool


@pytest.mark.parametrize("budget_mb", [64, 0.02])  # in memory, and streamed in blocks of whole shards
def test_a_fold_scores_like_a_store_holding_only_its_rows(tmp_path, store, data, budget_mb):
    (fit, _val), *_ = kfold(store, ["train", "val"], 3, seed=1)
    alone = store_of(tmp_path, data, list(fit.parts), "fold.zarr")
    budget = int(budget_mb * 2**20)
    a, b = FeatureMatrix(store, fit, budget), FeatureMatrix(alone, "train", budget)
    assert a.in_memory == b.in_memory == (budget_mb == 64)
    assert a.n == b.n == fit.size(store)
    blocks_a = np.concatenate([blk.copy() for _, blk in a.blocks()])  # streamed buffers are reused
    blocks_b = np.concatenate([blk.copy() for _, blk in b.blocks()])
    np.testing.assert_array_equal(blocks_a, blocks_b)
    cols = np.array([0, 5, 23, 24, 50, 70])
    np.testing.assert_allclose(a.columns(cols), b.columns(cols), rtol=1e-5, atol=1e-7)  # means summed by other blocks
    plan = column_plan(np.array([1, 7, 30, 31, 65]), store.layers)
    np.testing.assert_array_equal(read_columns(store, fit, plan), read_columns(alone, "train", plan))


def test_train_plus_val_scores_like_one_split_and_is_cached_under_its_own_key(tmp_path, store, data):
    both = Rows.of(store, ["train", "val"])
    alone = store_of(tmp_path, data, [("train", slice(None)), ("val", slice(None))], "both.zarr")
    cfg = score_cfg(lam=3e-3)
    mine, info = score_store(store, cfg, both)
    theirs, _ = score_store(alone, cfg, "train")
    np.testing.assert_allclose(mine["weight_sq"], theirs["weight_sq"], rtol=1e-3, atol=1e-7)
    train_only, info_train = score_store(store, cfg, "train")
    assert info["key"] != info_train["key"]
    # a whole split keeps the key scores had before row selections existed: cached scores stay valid
    legacy = {"objective": "multinomial_group_lasso", "normalisation": "per_layer_l2", "lam": 3e-3,
              "solver": "working_set", "max_iter": 50, "tol": 1e-3, "fit_split": "train"}
    assert info_train["key"] == relevance_key(legacy) == relevance_key(score_params(cfg, {"fit_split": "train"}))
    again, info_again = score_store(store, cfg, both)
    assert info_again["cached"] and np.array_equal(again["weight_sq"], mine["weight_sq"])


def test_folds_are_disjoint_stratified_deterministic_and_cover_the_pool(store):
    folds = kfold(store, ["train", "val"], 4, seed=0)
    assert len(folds) == 4
    seen = []
    labels = Rows.of(store, ["train", "val"]).labels(store)
    for fit, val in folds:
        fit_ids = {(s, int(i)) for s, idx in fit.parts for i in idx}
        val_ids = {(s, int(i)) for s, idx in val.parts for i in idx}
        assert not fit_ids & val_ids and len(fit_ids | val_ids) == 96
        seen += sorted(val_ids)
        counts = np.bincount(val.labels(store), minlength=4)
        assert np.all(np.abs(counts - np.bincount(labels, minlength=4) / 4) <= 1)  # stratified
    assert len(seen) == len(set(seen)) == 96
    again = kfold(store, ["train", "val"], 4, seed=0)
    assert all(a[1].digest(store) == b[1].digest(store) for a, b in zip(folds, again))
    other = kfold(store, ["train", "val"], 4, seed=1)
    assert any(a[1].digest(store) != b[1].digest(store) for a, b in zip(folds, other))


def test_bad_selections_name_the_culprit(store):
    with pytest.raises(H2TError, match="split 'dev' is not in store"):
        Rows.of(store, ["train", "dev"])
    with pytest.raises(H2TError, match="tune.folds must be 0 .* or in 2..96, got 1"):
        kfold(store, ["train", "val"], 1)
