"""Data sources: each builds a `Dataset` of named splits that yield uint8 RGB images by row range.

Every source module registers itself here, at package import: `DATA_SOURCES` is complete once
`pipeline.data` is imported, and sources call each other as functions, not through the registry."""
from . import builtin, files, torchvision_sources, vtab  # noqa: E402,F401 - registration
from .base import DATA_SOURCES, Dataset, Split, build_dataset

__all__ = ["Dataset", "Split", "build_dataset", "DATA_SOURCES"]
