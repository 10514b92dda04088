"""The storage layer: the store schema (as code), locations, claims, growing stores, the catalog and derived
views. Everything that touches Zarr lives here; the stages above it see `FeatureStore` and plain arrays.

Importing it changes no process-wide setting: a command calls `configure_io()` at its start (zarr's codec
pipeline and I/O thread pool; io_setup.py).
"""
from __future__ import annotations

from .io_setup import CODEC_PIPELINES, IOSetup, configure_io

__all__ = ["CODEC_PIPELINES", "IOSetup", "configure_io"]
