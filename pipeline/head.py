"""The head: a linear classifier trained on selected columns read from the store, per-layer re-normalised."""
from __future__ import annotations

import math

import numpy as np
import torch

from .score.matrix import cast_into, normalise_rows_in_place


def read_columns(store, split: str, plan: dict[str, np.ndarray], view=None, rows: slice = slice(None),
                 block_rows: int = 512) -> np.ndarray:
    """Only the planned columns of each layer (of `rows`), each layer's subset L2-normalised per example,
    concatenated in plan order (layers in store order, columns ascending), as float32.

    With a column view (pipeline/storage/views.py) whose prefix holds exactly the planned columns, the
    values come from that prefix: a contiguous read of about the selected bytes. The numbers are the
    same either way. Memory: the float32 result and one block of raw values."""
    n = store.splits()[split]
    start, stop, _ = rows.indices(n)
    sizes = [len(cols) for cols in plan.values()]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out = np.empty((stop - start, int(bounds[-1])), np.float32)
    order = _view_order(store, plan, view) if view is not None else None
    if order is not None:  # whole inner chunks of the view: none is decoded twice
        block_rows = view.group[split].chunks[0]
    for r0 in range(start, stop, block_rows):
        block = slice(r0, min(r0 + block_rows, stop))
        target = out[r0 - start:block.stop - start]
        if order is not None:
            raw = view.read(split, len(order), block)
            for (a, b) in zip(bounds[:-1], bounds[1:]):
                cast_into(target[:, a:b], raw[:, order[a:b]])
        else:
            for (layer, cols), a, b in zip(plan.items(), bounds[:-1], bounds[1:]):
                if cols[-1] - cols[0] + 1 == len(cols):  # a whole range (the linear probe's layer): a slice
                    values = store.features(split, layer)[block, int(cols[0]):int(cols[-1]) + 1]
                else:
                    values = store.features(split, layer).get_orthogonal_selection((block, cols))
                cast_into(target[:, a:b], store.decode(layer, values))
        for a, b in zip(bounds[:-1], bounds[1:]):
            normalise_rows_in_place(target[:, a:b])
    return out


def _view_order(store, plan: dict[str, np.ndarray], view) -> np.ndarray | None:
    """Positions in the view's prefix of the plan's columns, in plan order; None when the prefix holds
    other columns (the features are then read directly)."""
    offsets = {layer["name"]: layer["offset"] for layer in store.layers}
    wanted = np.concatenate([offsets[layer] + cols for layer, cols in plan.items()])
    k = len(wanted)
    if k > view.width:
        return None
    prefix = view.columns[:k]
    order = np.argsort(prefix, kind="stable")
    return order if np.array_equal(prefix[order], wanted) else None


def evaluate(head, store, split: str, plan: dict[str, np.ndarray], view=None, block_rows: int = 4096) -> float:
    """Accuracy on a split read in row blocks: memory holds one block of the selected columns."""
    labels = store.labels(split)
    correct = 0
    for r0 in range(0, len(labels), block_rows):
        rows = slice(r0, min(r0 + block_rows, len(labels)))
        correct += int((predict(head, read_columns(store, split, plan, view, rows)) == labels[rows]).sum())
    return correct / len(labels)


def train_linear_head(X: np.ndarray, y: np.ndarray, num_classes: int, lr: float, steps: int,
                      batch_size: int, seed: int = 0) -> torch.nn.Linear:
    """Unregularised softmax regression: Adam (0.9, 0.999, eps 1e-7), cosine decay to 0, fixed batch order."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(X.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-7)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    Xt, yt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    order = torch.randperm(len(yt), generator=generator)
    batch_size = min(batch_size, len(yt))
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):  # next epoch: same fixed order
            position = 0
        idx = order[position:position + batch_size]
        position += batch_size
        loss = torch.nn.functional.cross_entropy(head(Xt[idx]), yt[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return head


def predict(head: torch.nn.Linear, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).argmax(1).numpy()


def accuracy(head: torch.nn.Linear, X: np.ndarray, y: np.ndarray) -> float:
    return float((predict(head, X) == np.asarray(y)).mean())
