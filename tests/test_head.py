"""The head (pipeline/head.py): only the planned columns are read, each layer's subset is normalised per
example, a subset of a wider raw read equals a direct read, training is deterministic and learns."""

import threading

import numpy as np
import pytest
import torch

from benchmarks.tune_cost import heads_alone
from pipeline.head import (
    MIN_PRODUCT_COLUMNS,
    accuracy,
    column_subset,
    epoch_batches,
    evaluate,
    head_workers,
    normalise_layers,
    normalise_layers_on,
    plan_positions,
    predict,
    read_columns,
    stack_heads,
    stack_padded,
    stacked_accuracies,
    train_linear_head,
    train_linear_heads,
    train_stacked_heads,
    training_pool,
)
from pipeline.rows import Rows
from pipeline.select import column_plan
from tests.conftest import make_store

WIDTHS = [16, 24, 8]


@pytest.fixture
def store(tmp_path, rng):
    X = {s: np.abs(rng.standard_normal((n, sum(WIDTHS)))).astype(np.float32) for s, n in (("train", 80), ("test", 40))}
    y = {s: (x[:, 2] > x[:, 20]).astype(np.int64) for s, x in X.items()}
    return make_store(tmp_path / "h.zarr", X, y, 2, spec={"widths": WIDTHS}), X, y


def test_read_columns_normalises_each_layers_subset_per_example(store):
    s, X, _ = store
    plan = column_plan(np.array([1, 5, 17, 30, 41, 45]), s.layers)
    out = read_columns(s, "train", plan)
    expected = []
    for layer, cols in plan.items():
        offset = next(l["offset"] for l in s.layers if l["name"] == layer)
        part = X["train"][:, offset + cols]
        expected.append(part / np.linalg.norm(part, axis=1, keepdims=True))
    np.testing.assert_allclose(out, np.concatenate(expected, axis=1), rtol=1e-6)
    rows = Rows((("train", np.array([3, 9, 70])),), "three")
    np.testing.assert_array_equal(read_columns(s, rows, plan), out[[3, 9, 70]])


def test_a_subset_of_a_wider_raw_read_is_the_direct_read(store):
    s, _, _ = store
    wide = column_plan(np.arange(0, 48, 2), s.layers)
    narrow = column_plan(np.array([0, 6, 20, 44]), s.layers)
    raw = read_columns(s, "test", wide, normalise=False)
    subset = normalise_layers(raw[:, plan_positions(wide, narrow)], narrow)
    np.testing.assert_array_equal(subset, read_columns(s, "test", narrow))
    # as tune takes a fold's rows and a lam's columns from one read: bit-equal to reading them directly
    at = np.array([1, 4, 5, 11])
    subset = normalise_layers(raw[np.ix_(at, plan_positions(wide, narrow))], narrow)
    np.testing.assert_array_equal(subset, read_columns(s, Rows((("test", at),), "four"), narrow))


class _Recording:
    """A feature array that notes which reads it serves (and serves them from the real array)."""

    def __init__(self, array):
        self.array, self.chunks, self.reads = array, array.chunks, []

    def __getitem__(self, key):
        self.reads.append("range")
        return self.array[key]

    def get_orthogonal_selection(self, selection):
        self.reads.append("orthogonal")
        return self.array.get_orthogonal_selection(selection)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_column_subset_is_the_columns_of_the_rows_by_either_read(tmp_path, rng, dtype):
    """Each run of columns in adjacent inner chunks is one slice taken in memory, columns far apart one slice per
    run, columns out of order zarr's orthogonal read: the same values each way, int8 stores dequantised alike."""
    X = {"train": np.abs(rng.standard_normal((40, 2048))).astype(np.float32)}
    store = make_store(tmp_path / "c.zarr", X, {"train": np.zeros(40, np.int64)}, 2, dtype=dtype)
    full = store.features("train", "layer0")[0:40, 0:2048]
    assert store.features("train", "layer0").chunks[1] == 64  # 32 inner chunks across the layer
    for cols, read in ((np.arange(100, 300), "range"), (np.arange(3, 2048, 5), "range"),
                       (np.array([3, 70, 2040]), "range range"), (np.array([70, 3, 40]), "orthogonal"),
                       (np.array([], np.int64), "range")):
        array = _Recording(store.features("train", "layer0"))
        np.testing.assert_array_equal(column_subset(array, slice(5, 37), cols), full[5:37][:, cols])
        assert array.reads == read.split()  # [3, 70] in chunks 0 and 1, then 2040 in chunk 31


def test_training_is_deterministic_and_learns_a_separable_task(store):
    s, _, y = store
    plan = column_plan(np.arange(48), s.layers)
    Xtr = read_columns(s, "train", plan)
    a = train_linear_head(Xtr, y["train"], 2, lr=0.1, steps=200, batch_size=16, seed=3)
    b = train_linear_head(Xtr, y["train"], 2, lr=0.1, steps=200, batch_size=16, seed=3)
    assert np.array_equal(a.weight.detach().numpy(), b.weight.detach().numpy())
    assert accuracy(a, Xtr, y["train"]) >= 0.9
    # scored in row blocks: the same as one prediction over the whole split
    whole = float((predict(a, read_columns(s, "test", plan)) == y["test"]).mean())
    assert evaluate(a, s, "test", plan, block_rows=7) == pytest.approx(whole)


def test_every_row_is_trained_on_every_epoch_in_a_fresh_order(rng):
    """800 rows in batches of 128: an epoch is 6.25 batches. Every row is in the first 896 rows drawn, each
    epoch's order differs, and a row drawn only in the first epoch's last partial batch changes the head
    (a fixed order that restarted before its partial batch never trained on those 32 rows)."""
    import torch


    batches = list(epoch_batches(800, 128, 13, torch.Generator().manual_seed(0)))
    assert all(len(b) == 128 for b in batches)
    drawn = torch.cat(batches)
    first, second = drawn[:800], drawn[800:1600]
    assert sorted(first.tolist()) == list(range(800)) == sorted(second.tolist())  # every row, every epoch
    assert not torch.equal(first, second)  # reshuffled
    X = rng.standard_normal((800, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    late = int(first[790])  # in the first epoch's partial batch (rows 768..799 of its order)
    changed = X.copy()
    changed[late] *= -5.0
    a = train_linear_head(X, y, 2, lr=0.1, steps=7, batch_size=128, seed=0)
    b = train_linear_head(changed, y, 2, lr=0.1, steps=7, batch_size=128, seed=0)
    assert not np.array_equal(a.weight.detach().numpy(), b.weight.detach().numpy())


def _alone_with_torch_adam(X, y, num_classes, lr, steps, batch_size, seed=0):
    """One head trained the textbook way: autograd, torch.optim.Adam and LambdaLR's cosine decay (the
    baseline benchmarks/tune_cost.py measures)."""
    return heads_alone(X, y, num_classes, [(lr, steps)], batch_size, seed)[0]


def test_a_head_of_zero_steps_stays_at_zero_beside_trained_ones(rng):
    X = rng.standard_normal((60, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    untrained, trained = train_linear_heads(X, y, 2, [(0.1, 0), (0.1, 9)], batch_size=16)
    assert not untrained.weight.detach().any() and not untrained.bias.detach().any()
    assert torch.equal(trained.weight, train_linear_head(X, y, 2, 0.1, 9, 16).weight)
    assert train_linear_heads(X, y, 2, [], batch_size=16) == []


def test_heads_trained_together_are_the_heads_trained_alone(rng):
    n, d, k = 150, 40, 3
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > X[:, 2]).astype(np.int64) + (X[:, 3] > 1)
    settings = [(0.05, 30), (0.01, 70), (0.2, 45)]
    together = train_linear_heads(X, y, k, settings, batch_size=32, seed=3)
    for (lr, steps), head in zip(settings, together):
        alone = _alone_with_torch_adam(X, y, k, lr, steps, 32, seed=3)
        np.testing.assert_allclose(head.weight.detach().numpy(), alone.weight.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(head.bias.detach().numpy(), alone.bias.detach().numpy(), rtol=1e-4, atol=1e-5)
        single = train_linear_head(X, y, k, lr, steps, 32, seed=3)
        assert torch.equal(single.weight, head.weight) or np.allclose(single.weight.detach(), head.weight.detach(), atol=1e-6)
    assert not np.allclose(together[0].weight.detach(), together[1].weight.detach())  # each its own lr and steps


def test_heads_filling_the_products_then_padded_as_they_finish_are_the_heads_trained_alone(rng):
    """Three heads of 6 classes fill 18 product columns; once the first finishes the two left (12 columns) are
    padded with zero columns up to MIN_PRODUCT_COLUMNS: every head is still the one trained alone."""
    n, d, k = 120, 25, 6
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    settings = [(0.05, 20), (0.1, 50), (0.02, 35)]
    assert len(settings) * k > MIN_PRODUCT_COLUMNS > 2 * k
    for (lr, steps), head in zip(settings, train_linear_heads(X, y, k, settings, batch_size=32, seed=1)):
        alone = _alone_with_torch_adam(X, y, k, lr, steps, 32, seed=1)
        np.testing.assert_allclose(head.weight.detach().numpy(), alone.weight.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(head.bias.detach().numpy(), alone.bias.detach().numpy(), rtol=1e-4, atol=1e-5)


def _thread_count_seen_by_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_groups_trained_in_a_pool_are_the_groups_trained_one_after_the_other(rng):
    """Several groups at once, each single-threaded: every head as trained in the calling thread, and the torch
    thread count as before afterwards, here and in threads started later."""
    settings = [(0.05, 40), (0.2, 25)]
    groups = []
    for d in (300, 7, 120, 64, 31):
        X = rng.standard_normal((90, d)).astype(np.float32)
        groups.append((X, (X[:, 0] > X[:, 1]).astype(np.int64) + (X[:, 2] > 0.5)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the calling thread trains on two threads, the pool's workers on one each
    try:
        with training_pool(1) as inline:
            expected = [inline.submit(train_linear_heads, X, y, 3, settings, 32).result() for X, y in groups]
        with training_pool(3) as pool:
            futures = [pool.submit(train_linear_heads, X, y, 3, settings, 32) for X, y in groups]
            trained = [f.result() for f in futures]
        assert torch.get_num_threads() == 2 and _thread_count_seen_by_a_new_thread() == 2
    finally:
        torch.set_num_threads(threads)
    for heads, alone in zip(trained, expected):
        for head, reference in zip(heads, alone):
            np.testing.assert_allclose(head.weight.detach(), reference.weight.detach(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(head.bias.detach(), reference.bias.detach(), rtol=1e-5, atol=1e-6)


def test_a_failure_in_a_group_reaches_the_caller_and_the_pool_stops():
    with pytest.raises(ValueError, match="bad group"):
        with training_pool(2) as pool:
            def fail():
                raise ValueError("bad group")
            pool.submit(fail).result()
    with training_pool(1) as inline:  # the calling thread hands the error over the same way
        future = inline.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        future.result()


def test_workers_default_to_one_per_torch_thread_on_a_cpu_and_one_elsewhere():
    assert head_workers(torch.device("cpu")) == torch.get_num_threads()
    assert head_workers(torch.device("cuda")) == 1
    assert head_workers(torch.device("cpu"), 3) == 3


def test_column_sets_stacked_and_padded_give_each_sets_heads(rng):
    """train_stacked_heads pads narrower sets with zero columns: their weights stay exactly 0, so each set's heads
    are the heads it gets alone (same batches, lr and schedule), whatever the other sets' widths."""
    n, k = 90, 3
    y = rng.integers(0, k, n)
    sets = [rng.standard_normal((n, d)).astype(np.float32) for d in (7, 30, 1, 18)]
    settings = [(0.05, 20), (0.2, 35)]
    stacked = train_stacked_heads(sets, y, k, settings, batch_size=32, seed=5)
    assert [[h.weight.shape[1] for h in heads] for heads in stacked] == [[7, 7], [30, 30], [1, 1], [18, 18]]
    for X, heads in zip(sets, stacked):
        for alone, head in zip(train_linear_heads(X, y, k, settings, batch_size=32, seed=5), heads):
            np.testing.assert_allclose(head.weight.detach().numpy(), alone.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(head.bias.detach().numpy(), alone.bias.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert train_stacked_heads([], y, k, settings, batch_size=32) == []


def test_sets_stacked_from_numpy_or_tensors_are_zero_padded_to_the_widest(rng):
    """stack_padded: every set at the front of its slot and zeros after it, whether it comes as numpy rows or as
    a tensor already on the device, in the products' dtype; one float32 numpy set on a CPU is the caller's rows."""
    sets = [rng.standard_normal((6, d)).astype(np.float32) for d in (3, 5, 1)]
    for given in (sets, [torch.from_numpy(X) for X in sets]):
        for dtype in (torch.float32, torch.bfloat16):
            out = stack_padded(given, torch.device("cpu"), dtype)
            assert out.shape == (3, 6, 5) and out.dtype == dtype
            for g, X in enumerate(sets):
                assert torch.equal(out[g, :, :X.shape[1]], torch.from_numpy(X).to(dtype))
                assert not out[g, :, X.shape[1]:].any()
    alone = stack_padded(sets[:1], torch.device("cpu"))
    assert alone.shape == (1, 6, 3) and np.shares_memory(alone.numpy(), sets[0])
    with pytest.raises(ValueError, match="share their rows"):
        stack_padded([sets[0], sets[1][:1]], torch.device("cpu"))


def test_layers_normalised_in_torch_are_the_numpy_normalisation(rng):
    """normalise_layers_on (a round's rows on the device) gives normalise_layers' per-layer unit rows, zero layers
    staying zero, within float32 rounding."""
    plan = {"a": np.arange(4), "b": np.arange(7), "c": np.arange(2)}
    X = rng.standard_normal((9, 13)).astype(np.float32)
    X[3, 4:11] = 0  # one row's layer b is all zeros
    expected = normalise_layers(X.copy(), plan)
    got = normalise_layers_on(torch.from_numpy(X.copy()), plan).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert not got[3, 4:11].any()


def test_stacked_accuracies_are_each_heads_accuracy(rng):
    """stacked_accuracies evaluates every head of every set in one product per set: each head's `accuracy`."""
    n, k = 70, 4
    y = rng.integers(0, k, n)
    sets = [rng.standard_normal((n, d)).astype(np.float32) for d in (6, 11)]
    heads = train_stacked_heads(sets, y, k, [(0.1, 15), (0.3, 25), (0.03, 5)], batch_size=16, seed=1)
    got = stacked_accuracies(heads, [torch.from_numpy(X) for X in sets], y)
    assert got == [[accuracy(h, X, y) for h in per] for per, X in zip(heads, sets)]
    assert len({a for per in got for a in per}) > 1  # the heads differ: the comparison can fail
    assert stacked_accuracies([], [], y) == []
    empty = stacked_accuracies(heads, [torch.from_numpy(X[:0]) for X in sets], y[:0])
    assert all(np.isnan(a) for per in empty for a in per) and len(empty[0]) == 3


def test_heads_are_stacked_on_a_gpu_by_default_and_as_told_elsewhere():
    assert not stack_heads(torch.device("cpu")) and stack_heads(torch.device("cuda"))
    assert stack_heads(torch.device("cpu"), True) and not stack_heads(torch.device("cuda"), False)


def test_bfloat16_products_give_heads_near_the_float32_heads(rng):
    """head.precision=bfloat16 rounds the products' operands, not the method: each head lands within 2 % of the
    float32 one (in norm: Adam's steps on near-zero gradients move single weights more) and predicts the same
    classes on nearly every row; padded columns still leave each set's heads as trained alone."""
    n, d, k = 400, 300, 4
    y = rng.integers(0, k, n)
    X = (rng.standard_normal((n, d)) + 0.3 * np.eye(k)[y] @ rng.standard_normal((k, d))).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    settings = [(0.01, 120), (0.1, 60)]
    exact = train_linear_heads(X, y, k, settings, batch_size=64, seed=2)
    rounded = train_linear_heads(X, y, k, settings, batch_size=64, seed=2, precision="bfloat16")
    for a, b in zip(exact, rounded):
        wa, wb = a.weight.detach().numpy(), b.weight.detach().numpy()
        assert not np.array_equal(wa, wb)  # the setting takes effect
        assert np.linalg.norm(wa - wb) <= 0.02 * np.linalg.norm(wa)
        assert (predict(a, X) == predict(b, X)).mean() >= 0.97
    narrow = X[:, :40]
    stacked = train_stacked_heads([X, narrow], y, k, settings, batch_size=64, seed=2, precision="bfloat16")
    for alone, head in zip(train_linear_heads(narrow, y, k, settings, 64, 2, precision="bfloat16"), stacked[1]):
        np.testing.assert_allclose(head.weight.detach().numpy(), alone.weight.detach().numpy(), rtol=1e-4, atol=1e-5)
