"""What the scoring parts expect of each other, as Protocols: a solver minimises a `Datafit` plus a `Penalty`
over a `Matrix`. Every matrix (DenseMatrix, FeatureMatrix, ClusterMatrix) has every member of `Matrix`, so no
caller probes for one (the in-process ones are also `BlockMatrix`es). A matrix is closed after use (`with
open_matrix(...) as matrix:`), which releases what it holds outside this process (a cluster's worker caches)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

_M = TypeVar("_M", bound="Matrix")


@runtime_checkable
class Matrix(Protocol):
    """The (n, D) matrix of normalised features a solver works on, seen only through passes over it.

    `offset`: None, or the column means that the matrix's blocks still hold: the matrix is `block - offset`,
    and the datafit subtracts it algebraically. `centered`: the matrix's columns have zero mean (the bias
    decouples from W). `passes`: full passes over the data made so far. `in_memory`: the values are held in
    this process."""

    n: int
    D: int
    passes: int
    in_memory: bool
    centered: bool
    offset: np.ndarray | None

    def reduce(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One pass: sum over row blocks of fn(block, rows, *args) (a number, an array or a tuple of them)."""
        ...

    def columns(self, idx: np.ndarray) -> np.ndarray:
        """The (n, len(idx)) submatrix, centred when the matrix is."""
        ...

    def close(self) -> None:
        """Release what the matrix holds (a no-op where it holds only memory of this process)."""
        ...

    def __enter__(self: _M) -> _M:
        ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        ...


@runtime_checkable
class BlockMatrix(Matrix, Protocol):
    """A matrix whose row blocks are read in this process (the in-process ones; a cluster's never are)."""

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """(row slice, block) covering all rows once; one pass."""
        ...


@runtime_checkable
class Datafit(Protocol):
    """The smooth part of the objective, evaluated by passes over a matrix."""

    labels: np.ndarray
    num_classes: int
    n: int

    def value_grad(self, matrix: Matrix, W: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """(mean loss, dW, db) in one pass."""
        ...

    def lambda_max(self, matrix: Matrix) -> float:
        ...

    def lipschitz(self, matrix: Matrix, iterations: int = 30, seed: int = 0) -> float:
        ...


@runtime_checkable
class Penalty(Protocol):
    """The non-smooth part of the objective: its value, proximal operator and optimality check."""

    lam: float

    def value(self, W: np.ndarray) -> float:
        ...

    def prox(self, W: np.ndarray, step: float) -> np.ndarray:
        ...

    def violations(self, W: np.ndarray, grad: np.ndarray) -> np.ndarray:
        ...

    def kkt_violation(self, W: np.ndarray, grad: np.ndarray) -> float:
        ...
