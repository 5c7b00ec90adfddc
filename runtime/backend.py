"""The interface every step backend implements (ONNX Runtime now; TensorRT and torch reference next)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from river.export.contract import StepContract
from river.runtime.kv_cache import SharedKVCache


class StepBackend(ABC):
    contract: StepContract

    def new_cache(self, capacity: int, batch: int = 1) -> SharedKVCache:
        c = self.contract
        return SharedKVCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim)

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        """Run the prompt [B,S] over an empty cache; write positions [0,S); return logits [B,S,V]."""

    @abstractmethod
    def decode(self, token_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        """Run one new token per row [B,1] at position ``cache.length``; write only that position;
        return logits [B,1,V]. The caller advances ``cache.length``."""
