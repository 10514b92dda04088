"""h2t: a feature store for transfer learning with cached activations (Head2Toe)."""
from .storage.dataset import open_dataset

__all__ = ["open_dataset"]
__version__ = "0.1.0"
