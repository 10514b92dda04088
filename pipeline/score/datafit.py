"""Datafits: the smooth part of the scoring objective, evaluated block by block."""
from __future__ import annotations

import numpy as np

from .contracts import Matrix


class MultinomialLogistic:
    """Mean softmax cross-entropy of logits X W + b against integer labels."""

    def __init__(self, labels: np.ndarray, num_classes: int):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.n = len(self.labels)

    def block_value_grad(self, X: np.ndarray, rows: slice, W: np.ndarray, b: np.ndarray):
        """Sum of losses over the block and the block's contribution to n * gradient (W and b)."""
        logits = X @ W + b
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        denom = exp.sum(axis=1, keepdims=True)
        y = self.labels[rows]
        idx = np.arange(len(y))
        loss = float(np.sum(np.log(denom[:, 0]) - logits[idx, y]))
        residual = exp / denom
        residual[idx, y] -= 1.0
        return loss, X.T @ residual, residual.sum(axis=0)

    def value_grad(self, matrix: Matrix, W: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """(mean loss, dW, db) in one pass over the matrix.

        A matrix whose `offset` is not None yields blocks B whose rows are X + offset: X W + b = B W + (b - offset W)
        and X^T R = B^T R - offset (1^T R), so the centring costs O(D K) per pass, not a pass per block."""
        offset = matrix.offset
        b_eff = b if offset is None else (b - offset @ W).astype(np.float32)
        loss, gW, gb = matrix.reduce(self.block_value_grad, W, b_eff)
        gW, gb = gW.astype(W.dtype, copy=False), gb.astype(b.dtype, copy=False)
        if offset is not None:
            gW -= np.outer(offset, gb).astype(W.dtype)
        return loss / self.n, gW / self.n, gb / self.n

    def lambda_max(self, matrix: Matrix) -> float:
        """Smallest lam for which W = 0 is optimal (intercept at the log class prior)."""
        prior = np.bincount(self.labels, minlength=self.num_classes) / self.n
        b = np.log(np.maximum(prior, 1e-12)).astype(np.float32)
        _, gW, _ = self.value_grad(matrix, np.zeros((matrix.D, self.num_classes), np.float32), b)
        return float(np.linalg.norm(gW, axis=1).max())

    @staticmethod
    def lipschitz(matrix: Matrix, iterations: int = 30, seed: int = 0) -> float:
        """Lipschitz constant of the gradient in W: 0.5 * largest eigenvalue of X^T X / n (power iteration).

        The bias, whose column of ones is orthogonal to the centred X, has its own constant 0.5.
        """
        rng = np.random.default_rng(seed)
        v = rng.standard_normal(matrix.D).astype(np.float32)
        v /= np.linalg.norm(v)
        eig = 0.0
        offset = matrix.offset
        for _ in range(iterations):
            shift = 0.0 if offset is None else float(offset @ v)
            out, total = matrix.reduce(_gram_step, v, shift)
            if offset is not None:
                out = out - offset * total
            eig = float(np.linalg.norm(out))
            if eig == 0.0:
                break
            v = (out / eig).astype(np.float32)
        return 0.5 * max(eig, 1e-12) / matrix.n * 1.05  # margin: power iteration approaches from below


def _gram_step(X: np.ndarray, _rows, v: np.ndarray, shift: float):
    """One block's share of (X - 1 offset)^T-free power step: X^T u and sum(u), u = X v - shift."""
    u = X @ v - shift
    return X.T @ u, float(u.sum())
