"""Data sources: each builds a `Dataset` of named splits that yield uint8 RGB images by row range."""
from .base import DATA_SOURCES, Dataset, Split, build_dataset

__all__ = ["Dataset", "Split", "build_dataset", "DATA_SOURCES"]
