"""Penalties: the non-smooth part of the objective and its proximal operator."""
from __future__ import annotations

import numpy as np


class GroupL2Rows:
    """lam * sum_i ||W_i,:||_2: one group per input feature (its weights across all classes).

    The prox zeroes whole rows (true group sparsity), unlike a Frobenius penalty that only shrinks them.
    """

    def __init__(self, lam: float):
        self.lam = float(lam)

    def value(self, W: np.ndarray) -> float:
        return self.lam * float(np.linalg.norm(W, axis=1).sum())

    def prox(self, W: np.ndarray, step: float) -> np.ndarray:
        norms = np.linalg.norm(W, axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(norms > 0, np.maximum(0.0, 1.0 - step * self.lam / norms), 0.0)
        return W * scale

    def violations(self, W: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """Per row, the distance of -grad_i to the subdifferential of lam ||W_i|| (0 at the optimum)."""
        norms = np.linalg.norm(W, axis=1)
        grad_norms = np.linalg.norm(grad, axis=1)
        zero = norms == 0
        viol = np.empty_like(norms)
        viol[zero] = np.maximum(0.0, grad_norms[zero] - self.lam)
        nz = ~zero
        viol[nz] = np.linalg.norm(grad[nz] + self.lam * W[nz] / norms[nz, None], axis=1)
        return viol

    def kkt_violation(self, W: np.ndarray, grad: np.ndarray) -> float:
        viol = self.violations(W, grad)
        return float(viol.max()) if viol.size else 0.0
