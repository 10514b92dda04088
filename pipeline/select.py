"""Selection: global top-k over all layers' relevance, as a per-layer column plan."""
from __future__ import annotations

import numpy as np

from .errors import H2TError


def top_fraction(relevance: np.ndarray, layers: list[dict], fraction: float,
                 tiebreak: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """k = int(D * fraction) most relevant features -> {layer: sorted columns}.

    Rows with equal relevance (above all the exact zeros of the group lasso) are ranked by `tiebreak`
    (the gradient norm: how close each zero row is to entering), then by column order.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise H2TError(f"select.fraction must be in (0, 1], got {fraction}")
    D = len(relevance)
    k = max(1, int(D * float(fraction)))
    secondary = np.zeros(D) if tiebreak is None else -np.asarray(tiebreak)
    order = np.lexsort((np.arange(D), secondary, -np.asarray(relevance)))[:k]
    plan = {}
    for layer in layers:
        lo, hi = layer["offset"], layer["offset"] + layer["dim"]
        cols = np.sort(order[(order >= lo) & (order < hi)]) - lo
        if len(cols):
            plan[layer["name"]] = cols
    return plan


def whole_layers(layers: list[dict], names: list[str]) -> dict[str, np.ndarray]:
    """Every column of the named layers (the linear-probe baseline uses pre_logits)."""
    by_name = {layer["name"]: layer for layer in layers}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise H2TError(f"layer {missing[0]!r} is not in the store (taps: {', '.join(by_name)})")
    return {n: np.arange(by_name[n]["dim"]) for n in names}
