"""The head: a linear classifier trained on selected columns read from the store, per-layer re-normalised."""
from __future__ import annotations

import math

import numpy as np
import torch

from .score.matrix import l2_normalise_rows


def read_columns(store, split: str, plan: dict[str, np.ndarray]) -> np.ndarray:
    """Only the planned columns of each layer, each layer's subset L2-normalised per example, concatenated."""
    parts = []
    for layer, cols in plan.items():
        block = store.features(split, layer).get_orthogonal_selection((slice(None), cols))
        parts.append(l2_normalise_rows(store.decode(layer, block)))
    return np.concatenate(parts, axis=1)


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


def accuracy(head: torch.nn.Linear, X: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = head(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).argmax(1).numpy()
    return float((pred == np.asarray(y)).mean())
