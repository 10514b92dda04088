"""Group-lasso scoring: true group sparsity, agreement with an independent solver, out-of-core streaming."""
import os
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.errors import H2TError
from pipeline.rows import Rows
from pipeline.score import (
    SOLVERS,
    Datafit,
    FeatureMatrix,
    GroupL2Rows,
    Matrix,
    MultinomialLogistic,
    Penalty,
    ScoreRuntime,
    open_matrix,
    score_path,
    score_store,
)
from pipeline.score.contracts import BlockMatrix
from pipeline.score.matrix import DenseMatrix, l2_normalise_rows
from pipeline.storage import shards
from tests.conftest import make_store, score_cfg


def informative_problem(rng, n=240, widths=(20, 30, 10), num_classes=3, informative=6):
    """Labels depend on a few features only; the rest are noise."""
    D = sum(widths)
    X = np.abs(rng.standard_normal((n, D))).astype(np.float32)
    cols = rng.choice(D, informative, replace=False)
    W = rng.standard_normal((informative, num_classes)) * 4
    y = np.argmax(X[:, cols] @ W + rng.standard_normal((n, num_classes)) * 0.3, axis=1)
    return X, y.astype(np.int64), cols


def normalised(X, widths):
    parts, o = [], 0
    for w in widths:
        parts.append(l2_normalise_rows(X[:, o:o + w]))
        o += w
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("solver,max_iter", [("working_set", 50), ("fista", 3000)])
def test_large_lambda_zeroes_most_rows_exactly(tmp_path, rng, solver, max_iter):
    widths = (20, 30, 10)
    X, y, _ = informative_problem(rng, widths=widths)
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:10]}, {"train": y, "test": y[:10]}, 3,
                       spec={"widths": list(widths)})
    lam_max = MultinomialLogistic(y, 3).lambda_max(FeatureMatrix(store, "train", 2**28))
    scores, info = score_store(store, score_cfg(lam=0.5 * lam_max, solver=solver, max_iter=max_iter), "train")
    relevance = scores["weight_sq"]
    assert info["converged"]
    assert (relevance == 0).mean() >= 0.8, "group lasso must zero whole rows"
    assert info["nonzero_rows"] >= 1
    # The prox of the row-group penalty: rows with norm <= step * lam become exactly zero, the others shrink
    # along their own direction by step * lam (block soft-thresholding), computed here independently.
    W = rng.standard_normal((200, 3)).astype(np.float32)
    norms = np.linalg.norm(W, axis=1)
    threshold = float(np.median(norms))
    out = GroupL2Rows(threshold / 0.5).prox(W, 0.5)
    small = norms <= threshold
    assert small.any() and (~small).any()
    assert (out[small] == 0).all()
    expected = W[~small] * (1 - threshold / norms[~small])[:, None]
    np.testing.assert_allclose(out[~small], expected, rtol=1e-5, atol=1e-6)


def test_lambda_above_lambda_max_gives_all_zero(tmp_path, rng):
    X, y, _ = informative_problem(rng)
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:10]}, {"train": y, "test": y[:10]}, 3)
    Xn = l2_normalise_rows(X)  # lam_max computed independently of the solver's code
    prior = np.bincount(y, minlength=3) / len(y)
    residual = np.tile(prior, (len(y), 1))
    residual[np.arange(len(y)), y] -= 1
    lam_max = np.linalg.norm(Xn.T @ residual / len(y), axis=1).max()
    scores, _ = score_store(store, score_cfg(lam=float(lam_max) * 1.01), "train")
    assert (scores["weight_sq"] == 0).all()
    scores, _ = score_store(store, score_cfg(lam=float(lam_max) * 0.9), "train")
    assert (scores["weight_sq"] > 0).any()


@pytest.mark.parametrize("solver,max_iter", [("working_set", 50), ("fista", 5000)])
def test_agrees_with_independent_convex_solver(tmp_path, rng, solver, max_iter):
    cp = pytest.importorskip("cvxpy")
    widths = (20, 30, 10)
    X, y, _ = informative_problem(rng, widths=widths)
    lam, K = 3e-3, 3
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:10]}, {"train": y, "test": y[:10]}, K,
                       spec={"widths": list(widths)})
    scores, info = score_store(store, score_cfg(lam=lam, solver=solver, max_iter=max_iter, tol=1e-3), "train")
    relevance = scores["weight_sq"]

    Xn = normalised(X, widths).astype(np.float64)
    n, D = Xn.shape
    W, b = cp.Variable((D, K)), cp.Variable(K)
    logits = Xn @ W + np.ones((n, 1)) @ b[None, :]
    Y = np.eye(K)[y]
    loss = (cp.sum(cp.log_sum_exp(logits, axis=1)) - cp.sum(cp.multiply(Y, logits))) / n
    problem = cp.Problem(cp.Minimize(loss + lam * cp.sum(cp.norm(W, 2, axis=1))))
    problem.solve()
    reference = np.sum(W.value ** 2, axis=1)

    assert abs(info["objective"] - problem.value) / problem.value <= 1e-3
    k = max(1, int(0.1 * D))
    ours, theirs = set(np.argsort(-relevance)[:k]), set(np.argsort(-reference)[:k])
    assert len(ours & theirs) / k >= 0.9


def test_streaming_equals_in_memory_and_stays_within_budget(tmp_path, rng):
    n, widths = 2048, (256, 256, 512)
    X = np.abs(rng.standard_normal((n, sum(widths)))).astype(np.float32)
    y = (X[:, 3] > X[:, 700]).astype(np.int64)
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:16]}, {"train": y, "test": y[:16]}, 2,
                       shard_rows=64, spec={"widths": list(widths)})
    matrix_bytes = n * sum(widths) * 4  # 8 MiB
    budget = 1 * 2**20
    streamed = FeatureMatrix(store, "train", budget)
    assert not streamed.in_memory and streamed.block_rows < n
    in_memory = FeatureMatrix(store, "train", 64 * 2**20)
    assert in_memory.in_memory
    datafit = MultinomialLogistic(y, 2)
    W = rng.standard_normal((sum(widths), 2)).astype(np.float32) * 0.01
    b = np.zeros(2, np.float32)

    tracemalloc.start()
    loss_s, gW_s, gb_s = datafit.value_grad(streamed, W, b)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    loss_m, gW_m, gb_m = datafit.value_grad(in_memory, W, b)
    np.testing.assert_allclose(loss_s, loss_m, rtol=1e-5)
    np.testing.assert_allclose(gW_s, gW_m, rtol=1e-4, atol=1e-7)
    assert peak < matrix_bytes / 2, f"streaming pass peaked at {peak} bytes for a {matrix_bytes}-byte matrix"
    cols = np.array([0, 5, 300, 700, 1023])
    np.testing.assert_allclose(streamed.columns(cols), in_memory.columns(cols), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.mean, in_memory.mean, rtol=1e-5, atol=1e-7)
    # FISTA's step comes from the same matrix seen through power iteration (streamed: scaled, offset blocks)
    np.testing.assert_allclose(MultinomialLogistic.lipschitz(streamed), MultinomialLogistic.lipschitz(in_memory),
                               rtol=1e-4)


def test_scores_are_cached_in_the_store_by_parameters(tmp_path, rng):
    X, y, _ = informative_problem(rng)
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:10]}, {"train": y, "test": y[:10]}, 3)
    first, info1 = score_store(store, score_cfg(lam=5e-3), "train")
    again, info2 = score_store(store, score_cfg(lam=5e-3), "train")
    other, info3 = score_store(store, score_cfg(lam=1e-2), "train")
    assert not info1["cached"] and info2["cached"] and not info3["cached"]
    np.testing.assert_array_equal(first["weight_sq"], again["weight_sq"])
    np.testing.assert_array_equal(first["grad_norm"], again["grad_norm"])
    assert info1["key"] != info3["key"]


@pytest.mark.parametrize("bad", [{"lam": 0}, {"lam": -1}, {"solver": "sgd"}])
def test_bad_scoring_settings_are_named(tmp_path, rng, bad):
    X, y, _ = informative_problem(rng, n=32)
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:10]}, {"train": y, "test": y[:10]}, 3)
    with pytest.raises(H2TError, match=f"score.{next(iter(bad))}"):
        score_store(store, score_cfg(**bad), "train")


def test_every_part_has_its_whole_contract(tmp_path, rng):
    X, y, _ = informative_problem(rng, n=32)
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:10]}, {"train": y, "test": y[:10]}, 3)
    with ScoreRuntime() as runtime, open_matrix(store, "train", score_cfg(), runtime) as matrix:
        dense = DenseMatrix(X, centered=False)
        for m in (matrix, dense):
            assert isinstance(m, BlockMatrix) and isinstance(m, Matrix)
        assert matrix.in_memory and dense.in_memory and dense.offset is None
    assert isinstance(MultinomialLogistic(y, 3), Datafit) and isinstance(GroupL2Rows(0.1), Penalty)


class _Failing:
    """A solver that fails on its first pass over the matrix."""

    def __init__(self, **_settings):
        pass

    def solve(self, matrix, datafit, penalty, W0=None, b0=None):
        K = datafit.num_classes
        datafit.value_grad(matrix, np.zeros((matrix.D, K), np.float32), np.zeros(K, np.float32))
        raise RuntimeError("the solve failed")


def test_the_context_manager_closes_the_matrix_even_when_its_block_raises(tmp_path, rng, monkeypatch):
    X, y, _ = informative_problem(rng, n=32)
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:10]}, {"train": y, "test": y[:10]}, 3)
    closed = []
    monkeypatch.setattr(FeatureMatrix, "close", lambda self: closed.append(self))
    with ScoreRuntime() as runtime:
        with open_matrix(store, "train", score_cfg(), runtime) as matrix:
            assert not closed
        assert closed == [matrix]
        with pytest.raises(RuntimeError, match="inside"), open_matrix(store, "train", score_cfg(), runtime) as other:
            raise RuntimeError("inside")
        assert closed == [matrix, other]
    assert runtime.closed


def test_a_failed_solve_closes_the_matrix_and_its_own_runtime(tmp_path, rng, monkeypatch):
    X, y, _ = informative_problem(rng, n=32)
    store = make_store(tmp_path / "s.zarr", {"train": X, "test": X[:10]}, {"train": y, "test": y[:10]}, 3)
    closed, runtimes = [], []
    monkeypatch.setattr(FeatureMatrix, "close", lambda self: closed.append(self))
    close_runtime = ScoreRuntime.close
    monkeypatch.setattr(ScoreRuntime, "close", lambda self: (runtimes.append(self), close_runtime(self)))
    monkeypatch.setitem(SOLVERS, "working_set", _Failing)
    with pytest.raises(RuntimeError, match="the solve failed"):
        score_path(store, score_cfg(), "train", [1e-2, 5e-3])
    assert len(closed) == 1 and closed[0].passes >= 1  # the matrix the solver was given
    assert len(runtimes) == 1 and runtimes[0].closed  # the runtime score_path made for itself
    mine = ScoreRuntime()
    with pytest.raises(RuntimeError, match="the solve failed"):
        score_path(store, score_cfg(), "train", [1e-2], runtime=mine)
    assert len(closed) == 2 and len(runtimes) == 1 and not mine.closed  # the caller's runtime stays open
    mine.close()


def _tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_casts_in_worker_threads_are_exact_and_leave_no_thread_team_behind():
    """A worker thread's torch cast that ran in parallel would give that thread an OpenMP team of its own for
    as long as it lives, and with more OpenMP threads than cores every parallel region of the main thread
    stops spin-waiting (the heads trained after scoring ran 2-3x slower)."""
    import torch

    from pipeline.score.matrix import cast_into

    rng = np.random.default_rng(0)
    values = rng.standard_normal((300, 700)).astype(np.float16)  # 210,000 elements: torch would go parallel
    wide = np.zeros((300, 900), np.float32)
    flat = np.zeros(values.size, np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a team needs two threads, also on a one-core machine
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: None).result()  # the worker exists before counting
            before = _tasks()
            pool.submit(cast_into, wide[:, 100:800], values).result()  # a strided target
            pool.submit(cast_into, flat, values.reshape(-1)).result()
            after = _tasks()
    finally:
        torch.set_num_threads(threads)
    assert after - before == set()
    np.testing.assert_array_equal(wide[:, 100:800], values.astype(np.float32))
    assert not wide[:, :100].any() and not wide[:, 800:].any()
    np.testing.assert_array_equal(flat, values.astype(np.float32).reshape(-1))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gathered_columns_are_numpys_fancy_indexing_on_any_thread(rng, monkeypatch, dtype):
    """gather_columns_into: torch's gather on the main thread (rows in several pieces), numpy's in a worker; both
    exactly values[:, order] as float32, and a worker keeps no OpenMP team."""
    from pipeline.score import matrix

    values = rng.standard_normal((300, 2000)).astype(dtype)
    order = rng.permutation(2000)
    expected = values[:, order].astype(np.float32)
    out = np.zeros((300, 2000), np.float32)
    monkeypatch.setattr(matrix, "GATHER_BYTES", 100_000)  # several pieces of rows (25 or 12 each)
    matrix.gather_columns_into(out, values, order)
    np.testing.assert_array_equal(out, expected)
    out[:] = 0
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()
        before = _tasks() if os.path.isdir("/proc/self/task") else set()
        pool.submit(matrix.gather_columns_into, out, values, order).result()
        after = _tasks() if os.path.isdir("/proc/self/task") else set()
    np.testing.assert_array_equal(out, expected)
    assert after - before == set()


@pytest.mark.parametrize("budget", [30_000, 2**30])  # streamed in blocks of one shard, or read whole at once
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_the_matrix_read_from_shard_files_is_the_one_zarr_reads(tmp_path, rng, monkeypatch, dtype, fold, budget):
    X = {"train": rng.random((40, 150)).astype(np.float32)}
    y = {"train": rng.integers(0, 3, 40)}
    store = make_store(tmp_path / "s.zarr", X, y, 3, dtype=dtype, spec={"widths": [100, 50]})
    rows = Rows((("train", np.array([0, 3, 4, 17, 18, 33, 39]) if fold else None),), "some")

    def read():
        with FeatureMatrix(store, rows, budget) as matrix:
            return matrix, np.concatenate([block.copy() for _, block in matrix.blocks()])

    direct_matrix, direct = read()
    assert all(reader is not None for reader in direct_matrix.reader.direct["train"])  # the direct path ran
    monkeypatch.setattr(shards, "reader_for", lambda array: None)
    zarr_matrix, through_zarr = read()
    assert all(reader is None for reader in zarr_matrix.reader.direct["train"])
    np.testing.assert_array_equal(direct, through_zarr)
    assert len(direct) == (7 if fold else 40)
