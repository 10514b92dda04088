"""Relevance of every feature of every layer: row norms of the group-lasso weights, cached in the store."""
from __future__ import annotations

import hashlib
import time

import numpy as np

from ..config import ScoreConfig
from ..errors import H2TError
from ..rows import Rows
from ..storage.schema import canonical_json
from ..storage.union import StoreUnion
from .cluster import ClusterMatrix, ScoreRuntime, check_spec
from .contracts import Matrix
from .datafit import MultinomialLogistic
from .matrix import FeatureMatrix
from .penalty import GroupL2Rows
from .solvers import SOLVERS


def score_params(settings: ScoreConfig, fit: dict, lam: float | None = None) -> dict:
    """Every setting that changes the scores (the kept fraction does not); `fit` names the rows."""
    lam = float(settings.lam if lam is None else lam)
    if not lam > 0:
        raise H2TError(f"score.lam must be > 0, got {lam}")
    if settings.solver not in SOLVERS:
        raise H2TError(f"unknown score.solver={settings.solver!r}; known: {', '.join(SOLVERS)}")
    check_spec(settings.cluster)
    return {"objective": "multinomial_group_lasso", "normalisation": "per_layer_l2", "lam": lam,
            "solver": str(settings.solver), "max_iter": int(settings.max_iter), "tol": float(settings.tol), **fit}


def fit_rows_id(store, rows: Rows) -> dict:
    """A whole split is named as before (existing cached scores stay valid); any other rows by their digest."""
    return {"fit_split": rows.whole_split} if rows.whole_split else {"fit_rows": rows.digest(store)}


def relevance_key(params: dict) -> str:
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:16]


def score_store(store, settings: ScoreConfig, rows: Rows | str = "train", progress: bool = False, *,
                runtime: ScoreRuntime | None = None) -> tuple[dict, dict]:
    """Relevance of the store's features at `score.lam`, fitted on `rows`; see `score_path`."""
    return score_path(store, settings, rows, [float(settings.lam)], progress, runtime=runtime)[0]


def score_path(store, settings: ScoreConfig, rows: Rows | str, lams, progress: bool = False, *,
               runtime: ScoreRuntime | None = None) -> list[tuple[dict, dict]]:
    """Relevance at each λ of `lams` (in that order), each computed once per parameter set and saved in
    the store.

    Uncached λ are solved from the largest down, each warm-started from the previous solution, on one
    matrix (its row norms and, when it fits the budget, its values are read once for the whole path).
    Returns [({"weight_sq": (D,), "grad_norm": (D,)}, info)]: weight_sq is Head2Toe's s_i = sum_k W_ik^2;
    grad_norm ranks the rows the penalty set exactly to zero. info holds the solver's certificate, the
    cache key and whether the scores came from the store.

    `runtime`: where the Dask client of `score.cluster` comes from; its owner closes it. None: one made for
    this call and closed before it returns. The matrix is closed however the solve ends.
    """
    rows = Rows.of(store, rows) if isinstance(rows, str) else rows
    fit = fit_rows_id(store, rows)
    params = {float(lam): score_params(settings, fit, lam) for lam in lams}
    results: dict[float, tuple[dict, dict]] = {}
    for lam, p in params.items():
        key = store.cache_key(relevance_key(p))
        cached = store.load_relevance(key)
        if cached is not None:
            arrays, attrs = cached
            results[lam] = (arrays, {"cached": True, "key": key, **attrs.get("solution", {})})
    todo = sorted((lam for lam in params if lam not in results), reverse=True)
    own_runtime = runtime is None
    if runtime is None:
        runtime = ScoreRuntime()
    matrix: Matrix | None = None
    try:
        datafit = None
        W = b = None
        passes_before = 0  # the first λ is charged the matrix's own opening pass
        for lam in todo:
            start = time.perf_counter()
            if matrix is None:
                matrix = open_matrix(store, rows, settings, runtime)
                datafit = MultinomialLogistic(rows.labels(store), store.info.num_classes)
            solver = SOLVERS[settings.solver](max_iter=params[lam]["max_iter"], tol=params[lam]["tol"],
                                              progress=progress)
            solution = solver.solve(matrix, datafit, GroupL2Rows(lam), W0=W, b0=b)
            W, b = solution.W, solution.b
            arrays = {"weight_sq": np.einsum("ij,ij->i", W, W), "grad_norm": solution.grad_norms}
            info = {"objective": solution.objective, "kkt_violation": solution.kkt_violation,
                    "iterations": solution.iterations, "passes": matrix.passes - passes_before,
                    "converged": solution.converged, "in_memory": matrix.in_memory,
                    "seconds": time.perf_counter() - start, "nonzero_rows": int((arrays["weight_sq"] > 0).sum()),
                    "warm_start": lam != todo[0]}
            passes_before = matrix.passes
            key = store.cache_key(relevance_key(params[lam]))
            store.save_relevance(key, arrays, {"params": params[lam], "solution": info})
            results[lam] = (arrays, {"cached": False, "key": key, **info})
    finally:
        try:
            if matrix is not None:
                matrix.close()
        finally:
            if own_runtime:
                runtime.close()
    return [results[float(lam)] for lam in lams]


CLUSTER_UNION = ("score.cluster reads one store per worker; several backbones are scored in this process "
                 "(leave score.cluster unset)")


def open_matrix(store, rows: Rows | str, settings: ScoreConfig, runtime: ScoreRuntime) -> Matrix:
    """The feature matrix of `rows`: in this process (threads), or on the Dask cluster `score.cluster`, whose
    client `runtime` holds. Close it after use: `with open_matrix(...) as matrix:`."""
    budget = int(float(settings.memory_budget_mb) * 2**20)
    if settings.cluster and isinstance(store, StoreUnion):
        raise H2TError(CLUSTER_UNION)
    client = runtime.client(settings.cluster)
    if client is None:
        return FeatureMatrix(store, rows, budget)
    return ClusterMatrix(store, rows, client, budget)
