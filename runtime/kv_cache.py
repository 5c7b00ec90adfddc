"""Shared KV buffers: one preallocated cache per layer and kind for the whole sequence.

The buffers are allocated once, in the layout the step graph reads ([B,Hkv,C,D]); a step writes only
its new positions, and rolling back (for speculative verification) only moves ``length``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from river.errors import CacheOverflow
from river.runtime.backend import KVCache


def _physical_memory() -> float:
    """This machine's RAM in bytes (inf where the OS does not say): no cache may ask for more."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return math.inf


class SharedKVCache(KVCache):
    """Host buffers (numpy) that ONNX Runtime binds by pointer."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype=np.float32, slack: int = 0):
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        if slack < 0:
            raise ValueError("cache slack must be >= 0")
        shape = (batch, num_kv_heads, capacity + slack, head_dim)
        need = 2 * num_layers * int(np.prod(shape)) * np.dtype(dtype).itemsize
        if need > _physical_memory():
            raise CacheOverflow(f"a cache of {capacity} positions needs {need / 2**30:.1f} GiB of KV buffers, more than "
                                f"this machine's {_physical_memory() / 2**30:.1f} GiB: lower --max-length")
        try:
            self.keys = [np.zeros(shape, dtype) for _ in range(num_layers)]
            self.values = [np.zeros(shape, dtype) for _ in range(num_layers)]
        except MemoryError:
            raise CacheOverflow(f"no memory for a cache of {capacity} positions ({need / 2**30:.1f} GiB of KV "
                                "buffers): lower --max-length") from None
        self.capacity = capacity
        self.slack = slack  # positions past the capacity: where rows that sit out a step write (KVCache.slack)
        self.batch = batch
        self.length = 0  # number of valid positions (the same for every row)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def buffers(self) -> list[np.ndarray]:
        """All buffers in the contract's order: key_0, value_0, key_1, ..."""
        return [b for pair in zip(self.keys, self.values) for b in pair]

    def write(self, layer: int, key: np.ndarray, value: np.ndarray, at: int) -> None:
        """Write new K/V [B,Hkv,S,D] at positions [at, at+S) of one layer, in place."""
        s = key.shape[2]
        if at + s > self.physical:
            raise CacheOverflow(f"writing positions {at}..{at + s - 1} past the cache capacity {self.capacity}")
        self.keys[layer][:, :, at:at + s] = key
        self.values[layer][:, :, at:at + s] = value

    def row_view(self, i: int) -> "SharedKVCache":
        """Row i alone, on the same buffers (no copy): for what a backend must run one row at a time."""
        view = object.__new__(SharedKVCache)
        view.keys, view.values = [k[i:i + 1] for k in self.keys], [v[i:i + 1] for v in self.values]
        view.capacity, view.slack, view.batch, view.length = self.capacity, self.slack, 1, self.length
        view.history = None if self.history is None else self.history.rows(i, i + 1)
        return view

    def valid_kv(self, layer: int, kind: str) -> np.ndarray:
        return np.array((self.keys if kind == "key" else self.values)[layer][:, :, :self.length])
