"""Solvers: minimise datafit + penalty over a feature matrix, reporting a convergence certificate.

`FISTA` makes one pass over the matrix per iteration. `WorkingSet` (the default) makes one pass per outer
iteration: it solves the problem restricted to the features that are, or may become, non-zero, in memory,
and uses the full gradient only to check optimality and grow that set (the skglm strategy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .contracts import Datafit, Matrix, Penalty
from .matrix import DenseMatrix


@dataclass
class Solution:
    W: np.ndarray
    b: np.ndarray
    objective: float
    kkt_violation: float  # max distance to optimality over rows and the bias (0 at the optimum)
    iterations: int
    passes: int  # full passes over the feature matrix
    converged: bool
    grad_norms: np.ndarray | None = None  # ||grad_i|| at the solution: how close a zero row is to entering
    history: list[float] = field(default_factory=list)


def _prior_bias(datafit: Datafit) -> np.ndarray:
    """The optimal intercept when W = 0: log class frequencies."""
    prior = np.bincount(datafit.labels, minlength=datafit.num_classes) / datafit.n
    return np.log(np.maximum(prior, 1e-12)).astype(np.float32)


class FISTA:
    """Accelerated proximal gradient with adaptive restart; each iteration is one pass over the matrix.

    Steps 1/L_W for W (power iteration) and 1/L_b for the bias (0.5 when columns are centred, else both
    share the bound of [X 1]); stops when the KKT violation, checked every `check_every` iterations, is at
    most `tol * lam`.
    """

    def __init__(self, max_iter: int = 1000, tol: float = 1e-2, check_every: int = 10, progress: bool = False):
        self.max_iter, self.tol, self.check_every, self.progress = int(max_iter), float(tol), int(check_every), progress

    def solve(self, matrix: Matrix, datafit: Datafit, penalty: Penalty, W0: np.ndarray | None = None,
              b0: np.ndarray | None = None) -> Solution:
        K = datafit.num_classes
        W = np.zeros((matrix.D, K), np.float32) if W0 is None else W0.astype(np.float32)
        b = _prior_bias(datafit) if b0 is None else b0.astype(np.float32)
        L_W = datafit.lipschitz(matrix)
        if matrix.centered:
            step_W, step_b = 1.0 / L_W, 1.0 / 0.5
        else:
            step_W = step_b = 1.0 / (L_W + 0.5 * 1.05)
        Yw, Yb, t = W.copy(), b.copy(), 1.0
        history, kkt, objective, converged, it = [], math.inf, math.inf, False, 0
        gW_at = np.zeros_like(W)
        bar = tqdm(total=self.max_iter, desc="score (FISTA)", unit="it", disable=not self.progress, leave=False)
        for it in range(1, self.max_iter + 1):
            _, gW, gb = datafit.value_grad(matrix, Yw, Yb)
            W_new = penalty.prox(Yw - step_W * gW, step_W)
            b_new = Yb - step_b * gb
            if np.vdot(Yw - W_new, W_new - W) + np.vdot(Yb - b_new, b_new - b) > 0:
                t = 1.0  # momentum points uphill: restart
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            beta = (t - 1.0) / t_new
            Yw, Yb = W_new + beta * (W_new - W), b_new + beta * (b_new - b)
            W, b, t = W_new, b_new, t_new
            bar.update(1)
            if it % self.check_every == 0 or it == self.max_iter:
                loss, gW_at, gb_at = datafit.value_grad(matrix, W, b)
                objective = loss + penalty.value(W)
                kkt = max(penalty.kkt_violation(W, gW_at), float(np.abs(gb_at).max()))
                history.append(objective)
                bar.set_postfix(objective=f"{objective:.5g}", kkt=f"{kkt / penalty.lam:.2g}lam")
                if kkt <= self.tol * penalty.lam:
                    converged = True
                    break
        bar.close()
        return Solution(W, b, objective, kkt, it, matrix.passes, converged, np.linalg.norm(gW_at, axis=1), history)


class WorkingSet:
    """Outer loop over working sets, each solved in memory by FISTA; one full pass per outer iteration.

    The set holds the non-zero rows plus the rows that violate optimality most (at least `start_size`,
    at least twice the non-zero count). Stops when the full problem's KKT violation is at most `tol * lam`.
    """

    def __init__(self, max_iter: int = 50, tol: float = 1e-2, inner_max_iter: int = 3000, start_size: int = 256,
                 progress: bool = False):
        self.max_iter, self.tol, self.progress = int(max_iter), float(tol), progress
        self.inner_max_iter, self.start_size = int(inner_max_iter), int(start_size)

    def solve(self, matrix: Matrix, datafit: Datafit, penalty: Penalty, W0: np.ndarray | None = None,
              b0: np.ndarray | None = None) -> Solution:
        """W0 / b0: a warm start (the solution at a larger λ on a path), else zero and the class prior."""
        K, lam = datafit.num_classes, penalty.lam
        W = np.zeros((matrix.D, K), np.float32) if W0 is None else W0.astype(np.float32, copy=True)
        b = _prior_bias(datafit) if b0 is None else b0.astype(np.float32, copy=True)
        loss, gW, gb = datafit.value_grad(matrix, W, b)
        history, converged, inner_iterations, kkt = [], False, 0, math.inf
        objective = loss
        bar = tqdm(total=self.max_iter, desc="score (working set)", unit="pass", disable=not self.progress, leave=False)
        for _outer in range(self.max_iter):
            violations = penalty.violations(W, gW)
            kkt = max(float(violations.max()), float(np.abs(gb).max()))
            objective = loss + penalty.value(W)
            history.append(objective)
            bar.set_postfix(objective=f"{objective:.5g}", kkt=f"{kkt / lam:.2g}lam")
            if kkt <= self.tol * lam:
                converged = True
                break
            active = np.flatnonzero(np.abs(W).sum(axis=1) > 0)
            size = max(self.start_size, 2 * len(active))
            zero_violators = np.flatnonzero((violations > 0) & (np.abs(W).sum(axis=1) == 0))
            worst = zero_violators[np.argsort(-violations[zero_violators], kind="stable")]
            ws = np.union1d(active, worst[:max(0, size - len(active))])
            sub = DenseMatrix(matrix.columns(ws), centered=matrix.centered)
            inner = FISTA(max_iter=self.inner_max_iter, tol=0.3 * self.tol, check_every=20)
            solution = inner.solve(sub, datafit, penalty, W0=W[ws], b0=b)
            inner_iterations += solution.iterations
            W = np.zeros_like(W)
            W[ws] = solution.W
            b = solution.b
            loss, gW, gb = datafit.value_grad(matrix, W, b)
            bar.update(1)
        else:
            violations = penalty.violations(W, gW)
            kkt = max(float(violations.max()), float(np.abs(gb).max()))
            objective = loss + penalty.value(W)
        bar.close()
        return Solution(W, b, objective, kkt, inner_iterations, matrix.passes, converged,
                        np.linalg.norm(gW, axis=1), history)


SOLVERS = {"working_set": WorkingSet, "fista": FISTA}
