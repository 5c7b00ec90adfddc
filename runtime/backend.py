"""The interface every step backend implements (ONNX Runtime now; TensorRT and torch reference next)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from river.export import contract as C
from river.export.contract import StepContract
from river.runtime.kv_cache import SharedKVCache


class StepBackend(ABC):
    contract: StepContract

    def new_cache(self, capacity: int, batch: int = 1) -> SharedKVCache:
        c = self.contract
        return SharedKVCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim)

    # --- shared by the backends' prefills ------------------------------------------------------
    @staticmethod
    def _check_prefill(input_ids: np.ndarray, cache: SharedKVCache) -> None:
        if cache.length:
            raise ValueError("prefill expects an empty cache")
        cache.require_room(input_ids.shape[1])

    def _contract_prefill_feeds(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds of the contract graph for a prompt [B,S] over an empty past."""
        c, (b, s) = self.contract, input_ids.shape
        feeds = {C.INPUT_IDS: input_ids.astype(np.int64), C.ATTENTION_MASK: np.ones((b, s), np.int64),
                 C.POSITION_IDS: np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()}
        empty = np.zeros((b, c.num_kv_heads, 0, c.head_dim), np.float32)
        for layer in range(c.num_layers):
            feeds[C.past_name(layer, "key")] = feeds[C.past_name(layer, "value")] = empty
        return feeds

    def _store_presents(self, outputs: dict[str, np.ndarray], cache: SharedKVCache) -> None:
        """Copy a contract graph's presents [B,Hkv,S,D] into the cache from position 0."""
        for layer in range(self.contract.num_layers):
            cache.write(layer, outputs[C.present_name(layer, "key")], outputs[C.present_name(layer, "value")], at=0)

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        """Run the prompt [B,S] over an empty cache; write positions [0,S); return logits [B,S,V]."""

    @abstractmethod
    def decode(self, token_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        """Run one new token per row [B,1] at position ``cache.length``; write only that position;
        return logits [B,1,V]. The caller advances ``cache.length``."""


class InPlaceSteps:
    """Bookkeeping shared by backends that run steps of a shared-KV graph through IOBinding.

    A subclass provides ``_bind(cache, s) -> dict`` (state with "ids", "positions", "write_at",
    "mask" arrays bound by pointer) and sets ``multi_token_steps``; bindings belong to one cache.
    """

    KEEP_BINDINGS_UP_TO = 16  # bindings for short steps are kept; a long prompt's [B,S,V] logits are not
    multi_token_steps: bool = False
    single_token: bool = False  # a draft session built for [1, 1] steps only
    _bound_cache: SharedKVCache | None = None
    _bindings: dict[int, dict]

    def _step_state(self, token_ids: np.ndarray, cache: SharedKVCache, source) -> dict:
        """Check room and causality, get the binding for S new tokens, and fill its small inputs."""
        s = token_ids.shape[1]
        if self.single_token and token_ids.shape != (1, 1):
            raise ValueError(f"this backend runs one token of one sequence a step, got {token_ids.shape}")
        cache.require_room(s)
        if s > 1 and cache.length and not self.multi_token_steps:
            raise ValueError(f"{source} masks causally by index: its shared-KV form runs one new token "
                             "per step over a non-empty cache (export with river-export for multi-token steps)")
        if self._bound_cache is not cache:
            self._bindings, self._bound_cache = {}, cache
        st = self._bindings.get(s)
        if st is None:
            st = self._bind(cache, s)
            if s <= self.KEEP_BINDINGS_UP_TO:
                self._bindings[s] = st
        pos = cache.length
        st["ids"][:] = token_ids
        st["positions"][:] = np.arange(pos, pos + s)
        st["write_at"][:] = pos
        st["mask"][:, :pos + s] = 1
        st["mask"][:, pos + s:] = 0
        return st

    def decode(self, token_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        if token_ids.shape[1] != 1:
            raise ValueError("decode runs one token per row; use extend for several")
        return self.extend(token_ids, cache)

    def unbind(self) -> None:
        """Forget the bound cache (a finished request's buffers can then be freed)."""
        self._bindings, self._bound_cache = {}, None
