"""h2t: a feature store for transfer learning with cached activations (Head2Toe).

`pipeline.open_dataset(store or id, split)`: a split as an xarray Dataset (pipeline/storage/dataset.py).
"""
from typing import Any

__all__ = ["open_dataset"]
__version__ = "0.1.0"


def open_dataset(store: Any, split: str, root: str | None = None) -> Any:
    """See pipeline/storage/dataset.py; importing `pipeline` itself stays light (every submodule imports it)."""
    from .storage.dataset import open_dataset as open_split  # noqa: PLC0415 - start-up time of every h2t process

    return open_split(store, split, root)
