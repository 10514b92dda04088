"""One probe (pipeline/probe.py): which rows it fits and validates on, settings refused before any work,
and the order of the group lasso's exact zeros."""
import warnings

import numpy as np
import pytest
import torch

from pipeline.config import SelectConfig, TieRule
from pipeline.devices import native_bfloat16
from pipeline.errors import H2TError
from pipeline.head import evaluate, read_columns, train_linear_head
from pipeline.probe import check_settings, fit_rows, probe_store, rankings, tap_batches
from pipeline.rows import Rows
from pipeline.score.relevance import score_path
from tests.conftest import make_store, schema_cfg, score_cfg

WIDTHS = [30, 20, 14]


@pytest.fixture
def store(tmp_path, rng):
    X = {s: np.abs(rng.standard_normal((n, sum(WIDTHS)))).astype(np.float32)
         for s, n in (("train", 96), ("val", 32), ("test", 40))}
    y = {s: (x[:, 3] + x[:, 35] > x[:, 52] + x[:, 10]).astype(np.int64) for s, x in X.items()}
    return make_store(tmp_path / "p.zarr", X, y, 2, spec={"widths": WIDTHS, "pooling": {"target_size": 32}})


def cfg(**over):
    """The head2toe probe job of these tests (`over`: dotted keys of the config)."""
    return schema_cfg(**{"select.fraction": 0.2, "head.steps": 60, "head.lr": 0.05, "score.lam": 2e-3,
                         "linear.layer": "layer2", **over}).probe_job()


def test_the_rows_a_probe_fits_and_validates_on(store):
    fit, validate = fit_rows(store, cfg().fit_on)
    assert fit.counts(store) == {"train": 96} and validate.counts(store) == {"val": 32}
    fit, validate = fit_rows(store, cfg(**{"probe.fit_on": ["train", "val"]}).fit_on)
    assert fit.counts(store) == {"train": 96, "val": 32} and validate is None
    result = probe_store(store, cfg(**{"probe.fit_on": ["train", "val"]}))
    assert result["fit_on"]["rows"] == {"train": 96, "val": 32} and result["val_accuracy"] is None
    assert result["test_accuracy"] is not None
    with pytest.raises(H2TError, match="probe.fit_on must name splits of the store other than test"):
        fit_rows(store, cfg(**{"probe.fit_on": ["train", "dev"]}).fit_on)


def test_taps_are_batched_by_width_within_the_count_and_the_budget():
    layers = [{"name": f"t{i}", "dim": dim} for i, dim in enumerate([50, 10, 40, 10, 30, 500])]
    names = lambda batches: [[layer["name"] for layer in batch] for batch in batches]  # noqa: E731
    assert names(tap_batches(layers, 10, 1e9, 2)) == [["t1", "t3"], ["t4", "t2"], ["t0", "t5"]]
    # padded to the widest, 4 bytes x 10 rows: 3 taps of <= 30 columns 3,600 <= 4,000, a fourth of 40 6,400;
    # 2 of <= 50 4,000; the 500-wide tap alone
    assert names(tap_batches(layers, 10, 4000)) == [["t1", "t3", "t4"], ["t2", "t0"], ["t5"]]
    assert names(tap_batches(layers, 10, 1e9)) == [["t1", "t3", "t4", "t2", "t0", "t5"]]


@pytest.mark.parametrize("workers,per_batch", [(1, 8), (2, 2)])
def test_per_layer_heads_trained_in_batches_are_each_tap_trained_alone(store, monkeypatch, workers, per_batch):
    """One stacked batch of three taps, or two batches (two taps padded to 20 columns, one alone) in two workers."""
    import pipeline.probe as probe_module
    monkeypatch.setattr(probe_module, "TAPS_PER_BATCH", per_batch)
    job = cfg(**{"method": "per_layer", "head.workers": workers})
    result = probe_store(store, job)
    assert [entry["layer"] for entry in result["per_layer"]] == ["layer0", "layer1", "layer2"]  # network order
    for entry, width in zip(result["per_layer"], WIDTHS):
        plan = {entry["layer"]: np.arange(width)}
        head = train_linear_head(read_columns(store, "train", plan), store.labels("train"), 2, 0.05, 60, 128)
        assert entry["dim"] == width
        assert (entry["val_accuracy"], entry["test_accuracy"]) == (evaluate(head, store, "val", plan),
                                                                   evaluate(head, store, "test", plan))


@pytest.mark.parametrize("key,value,culprit", [
    ("select.fraction", 0.0, "select.fraction"), ("head.lr", -1.0, "head.lr"), ("score.lam", 0.0, "score.lam"),
    ("probe.fit_on", ["test"], "probe.fit_on"), ("store.view_fraction", 2.0, "store.view_fraction"),
    ("score.cluster", "yarn", "score.cluster"),
])
def test_settings_out_of_range_are_refused_before_any_work(key, value, culprit):
    with pytest.raises(H2TError, match=culprit.replace(".", "\\.")):
        check_settings(cfg(**{key: value}))


def test_entry_order_ranks_zero_rows_by_the_largest_lam_at_which_they_enter(store):
    lam = 2e-3
    select = SelectConfig(tie_rule=TieRule.entry, entry_steps=3)
    (order, info), = rankings(store, score_cfg(lam=lam), select, Rows.of(store, "train"), [lam])
    solved = score_path(store, score_cfg(lam=lam), "train", [lam, lam / 2, lam / 4, lam / 8])
    weight = solved[0][0]["weight_sq"]
    entry = np.zeros(len(weight))
    for point, (arrays, _) in sorted(zip([lam / 2, lam / 4, lam / 8], solved[1:])):
        entry[arrays["weight_sq"] > 0] = point
    nonzero = int((weight > 0).sum())
    assert set(order[:nonzero]) == set(np.flatnonzero(weight > 0))  # non-zero rows first
    rest = entry[order[nonzero:]]
    assert (np.diff(rest) <= 0).all() and rest[0] > 0  # then by entry lam, largest first
    assert info["entry_path"] == [lam / 2, lam / 4, lam / 8] and info["ranking_key"].endswith("-entry3")


def test_the_head_trains_where_head_device_says_and_results_say_where(store):
    result = probe_store(store, cfg(**{"head.device": "cpu", "probe.fit_on": ["train"]}))
    assert result["head_device"] == "cpu" and result["test_accuracy"] is not None
    assert result["head_precision"] == "float32"
    bf16 = probe_store(store, cfg(**{"head.device": "cpu", "head.precision": "bfloat16"}))
    assert bf16["head_precision"] == "bfloat16" and bf16["selected_per_layer"] == result["selected_per_layer"]
    if not torch.cuda.is_available():
        with pytest.raises(H2TError, match="head.device=cuda: no CUDA device"):
            check_settings(cfg(**{"head.device": "cuda"}))
    with pytest.raises(H2TError, match="head.device='tpu9' is not a torch device"):
        check_settings(cfg(**{"head.device": "tpu9"}))


def test_bfloat16_heads_warn_where_the_cpu_would_emulate_them(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    for flags, native in (("fpu sse2 avx512f avx512_bf16", True), ("fpu sse2 avx2", False), ("fp asimd bf16", True)):
        info = tmp_path / f"cpuinfo-{native}"
        info.write_text(f"processor\t: 0\n{'Features' if 'asimd' in flags else 'flags'}\t\t: {flags}\n")
        assert native_bfloat16(cpu, info) is native
    assert native_bfloat16(cpu, tmp_path / "missing") is None
    monkeypatch.setattr("pipeline.probe.native_bfloat16", lambda device: False)
    with pytest.warns(UserWarning, match="head.precision=bfloat16: cpu has no bfloat16 dot products"):
        check_settings(cfg(**{"head.device": "cpu", "head.precision": "bfloat16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 never warns
        check_settings(cfg(**{"head.device": "cpu"}))
