"""The relevance cache: scores computed from a complete store, kept in it under derived/relevance/<key>.

    derived/relevance/<key>/<name>   (D,) float32 per array (weight_sq, grad_norm, ...)
    attrs                            parameters and certificate, written last: present = committed

Scores are written once per key, under a claim; a read-only store (an http root) keeps nothing and the
scores are recomputed next time.
"""
from __future__ import annotations

import numpy as np

from .claims import Claims
from .handle import StoreHandle, group_at, read_all

ROOT = "derived/relevance"


class RelevanceCache:
    def __init__(self, handle: StoreHandle):
        self.handle = handle

    def save(self, key: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        """Write ROOT/<key>/{name} arrays, then attrs (parameters, certificate): committed. Jobs of a parallel
        sweep may race to compute the same scores: only the one holding the claim writes them, and only
        when nobody committed them meanwhile; the others keep their own copy in memory."""
        if self.handle.read_only:
            return
        claims = Claims(self.handle.group.store, ttl_s=3600)
        unit = f"relevance/{key}"
        if not claims.try_claim(unit):
            return  # another job is writing these scores now: written once, by it
        try:
            if self.load(key) is None:  # nobody committed them meanwhile
                self._write(key, arrays, attrs)
        finally:
            claims.release(unit)

    def _write(self, key: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
        group = self.handle.group.require_group(f"{ROOT}/{key}")
        for name, values in arrays.items():
            arr = group.create_array(name, shape=values.shape, dtype="float32", chunks=values.shape, overwrite=True,
                                     dimension_names=["feature"])
            arr[:] = values.astype(np.float32)
        group.attrs.update(attrs)

    def load(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """The committed scores of `key` and their attrs; None when absent or interrupted."""
        try:
            group = group_at(self.handle.group, f"{ROOT}/{key}")
        except KeyError:
            return None
        if "params" not in group.attrs:  # an interrupted write: recompute
            return None
        return {name: read_all(arr) for name, arr in group.arrays()}, dict(group.attrs)
