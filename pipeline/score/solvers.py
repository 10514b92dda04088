"""Solvers: minimise datafit + penalty over a FeatureMatrix, reporting a convergence certificate."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm


@dataclass
class Solution:
    W: np.ndarray
    b: np.ndarray
    objective: float
    kkt_violation: float  # max distance to optimality over rows (0 at the optimum)
    iterations: int
    passes: int  # full passes over the feature matrix
    converged: bool
    history: list[float] = field(default_factory=list)


class FISTA:
    """Accelerated proximal gradient with adaptive restart; each iteration is one pass over the matrix.

    Step 1/L with L from power iteration; stops when the KKT violation, checked every `check_every`
    iterations, is at most `tol * lam`.
    """

    def __init__(self, max_iter: int = 300, tol: float = 1e-2, check_every: int = 10, progress: bool = False):
        self.max_iter, self.tol, self.check_every, self.progress = int(max_iter), float(tol), int(check_every), progress

    def solve(self, matrix, datafit, penalty, W0: np.ndarray | None = None) -> Solution:
        K = datafit.num_classes
        W = np.zeros((matrix.D, K), np.float32) if W0 is None else W0.astype(np.float32)
        b = np.zeros(K, np.float32)
        step = 1.0 / datafit.lipschitz(matrix)
        Yw, Yb, t = W.copy(), b.copy(), 1.0
        history, kkt, objective, converged, it = [], math.inf, math.inf, False, 0
        bar = tqdm(total=self.max_iter, desc="score (FISTA)", unit="it", disable=not self.progress, leave=False)
        for it in range(1, self.max_iter + 1):
            _, gW, gb = datafit.value_grad(matrix, Yw, Yb)
            W_new = penalty.prox(Yw - step * gW, step)
            b_new = Yb - step * gb
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
        return Solution(W, b, objective, kkt, it, matrix.passes, converged, history)


SOLVERS = {"fista": FISTA}
