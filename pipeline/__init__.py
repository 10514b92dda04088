"""h2t: a feature store for transfer learning with cached activations (Head2Toe)."""

__version__ = "0.1.0"
