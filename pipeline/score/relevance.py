"""Relevance of every feature of every layer: row norms of the group-lasso weights, cached in the store."""
from __future__ import annotations

import hashlib
import time

import numpy as np

from ..errors import H2TError
from ..storage.schema import canonical_json
from .datafit import MultinomialLogistic
from .matrix import FeatureMatrix
from .penalty import GroupL2Rows
from .solvers import SOLVERS


def score_params(cfg, fit_split: str) -> dict:
    """Every setting that changes the scores (the kept fraction does not)."""
    lam = float(cfg.lam)
    if not lam > 0:
        raise H2TError(f"score.lam must be > 0, got {cfg.lam}")
    if cfg.solver not in SOLVERS:
        raise H2TError(f"unknown score.solver={cfg.solver!r}; known: {', '.join(SOLVERS)}")
    return {"objective": "multinomial_group_lasso", "normalisation": "per_layer_l2", "lam": lam,
            "solver": cfg.solver, "max_iter": int(cfg.max_iter), "tol": float(cfg.tol), "fit_split": fit_split}


def relevance_key(params: dict) -> str:
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:16]


def score_store(store, cfg, fit_split: str = "train", progress: bool = False):
    """Relevance of the store's features, computed once per parameter set and saved in the store.

    Returns ({"weight_sq": (D,), "grad_norm": (D,)}, info): weight_sq is Head2Toe's s_i = sum_k W_ik^2;
    grad_norm ranks the rows the penalty set exactly to zero. info holds the solver's certificate and
    whether the scores came from the store.
    """
    params = score_params(cfg, fit_split)
    key = relevance_key(params)
    cached = store.load_relevance(key)
    if cached is not None:
        arrays, attrs = cached
        return arrays, {"cached": True, "key": key, **attrs.get("solution", {})}
    start = time.perf_counter()
    matrix = FeatureMatrix(store, fit_split, int(float(cfg.memory_budget_mb) * 2**20))
    datafit = MultinomialLogistic(store.labels(fit_split), store.meta["num_classes"])
    solver = SOLVERS[cfg.solver](max_iter=params["max_iter"], tol=params["tol"], progress=progress)
    solution = solver.solve(matrix, datafit, GroupL2Rows(params["lam"]))
    arrays = {"weight_sq": np.einsum("ij,ij->i", solution.W, solution.W), "grad_norm": solution.grad_norms}
    info = {"objective": solution.objective, "kkt_violation": solution.kkt_violation,
            "iterations": solution.iterations, "passes": solution.passes, "converged": solution.converged,
            "in_memory": matrix.in_memory, "seconds": time.perf_counter() - start,
            "nonzero_rows": int((arrays["weight_sq"] > 0).sum())}
    store.save_relevance(key, arrays, {"params": params, "solution": info})
    return arrays, {"cached": False, "key": key, **info}
