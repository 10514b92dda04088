"""Selection: global top-k over all layers' relevance, as a per-layer column plan."""
from __future__ import annotations

import numpy as np

from .errors import H2TError


def ranking(relevance: np.ndarray, tiebreak: np.ndarray | None = None, entry: np.ndarray | None = None) -> np.ndarray:
    """Every feature, most relevant first: by relevance, then (among equal relevance, i.e. the exact zeros
    of the group lasso) by `entry` when given (the largest λ of a path below at which the row is non-zero),
    then by `tiebreak` (the gradient norm: how close each zero row is to entering), then by column order.
    Every kept fraction is a prefix of it."""
    D = len(relevance)
    keys = [np.arange(D), np.zeros(D) if tiebreak is None else -np.asarray(tiebreak)]
    if entry is not None:
        keys.append(-np.asarray(entry))
    return np.lexsort((*keys, -np.asarray(relevance)))


def kept(D: int, fraction: float) -> int:
    """k = int(D * fraction), at least 1."""
    if not 0.0 < float(fraction) <= 1.0:
        raise H2TError(f"select.fraction must be in (0, 1], got {fraction}")
    return max(1, int(D * float(fraction)))


def column_plan(chosen: np.ndarray, layers: list[dict]) -> dict[str, np.ndarray]:
    """Global column indices -> {layer: sorted columns within the layer}, layers in store order."""
    plan = {}
    for layer in layers:
        lo, hi = layer["offset"], layer["offset"] + layer["dim"]
        cols = np.sort(chosen[(chosen >= lo) & (chosen < hi)]) - lo
        if len(cols):
            plan[layer["name"]] = cols
    return plan


def top_fraction(relevance: np.ndarray, layers: list[dict], fraction: float,
                 tiebreak: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """k = int(D * fraction) most relevant features (see `ranking`) -> {layer: sorted columns}."""
    k = kept(len(relevance), fraction)
    return column_plan(ranking(relevance, tiebreak)[:k], layers)


def linear_plan(layers: list[dict], name: str) -> dict[str, np.ndarray]:
    """The linear probe's columns: every column of tap `name` (`linear.layer`), of each backbone's layers
    when `layers` is a union's (named `<backbone>/<tap>`, pipeline/storage/union.py)."""
    members = list(dict.fromkeys(layer["member"] for layer in layers if "member" in layer))
    return whole_layers(layers, [f"{member}/{name}" for member in members] or [name])


def whole_layers(layers: list[dict], names: list[str]) -> dict[str, np.ndarray]:
    """Every column of the named layers (the linear-probe baseline uses pre_logits)."""
    by_name = {layer["name"]: layer for layer in layers}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise H2TError(f"layer {missing[0]!r} is not in the store (taps: {', '.join(by_name)})")
    return {n: np.arange(by_name[n]["dim"]) for n in names}
