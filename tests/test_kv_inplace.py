"""The KV buffers are allocated once, written in place at the right positions, never copied whole."""

from __future__ import annotations

import numpy as np

from river.runtime.generate import GenerationConfig, Generator
from river.runtime.kv_cache import SharedKVCache
from river.runtime.ort_backend import OrtBackend


class RecordingCache(SharedKVCache):
    """Records every host-side write and each step's snapshot, to prove which positions changed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes: list[tuple[int, int, int]] = []  # (layer, start, length)

    def write(self, layer, key, value, at):
        self.writes.append((layer, at, key.shape[2]))
        super().write(layer, key, value, at)


def test_buffers_written_in_place_at_new_positions_only(tiny, tiny_onnx):
    backend = OrtBackend(tiny_onnx, threads=1)
    caches: list[RecordingCache] = []

    def new_cache(capacity, batch=1):
        c = backend.contract
        caches.append(RecordingCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim))
        return caches[-1]

    backend.new_cache = new_cache
    snapshots, pointers = [], []
    orig_decode = backend.decode

    def decode(tokens, cache):
        before = [b.copy() for b in cache.buffers()]
        pos = cache.length
        out = orig_decode(tokens, cache)
        after = cache.buffers()
        for b0, b1 in zip(before, after):
            changed = np.nonzero(np.any(b0 != b1, axis=(0, 1, 3)))[0]
            # only the new token's position may change; earlier and later slots stay untouched
            assert set(changed.tolist()) <= {pos}, (pos, changed)
            assert np.any(b1[:, :, pos] != 0)
        snapshots.append(pos)
        pointers.append([b.ctypes.data for b in after])
        # ONNX Runtime's bound input and output are the cache's own memory
        bound = backend.bound_pointers()
        assert sorted(bound.values()) == sorted(b.ctypes.data for b in after)
        return out

    backend.decode = decode
    gen = Generator(backend, tiny.tokenizer, eos_token_ids=())
    result = gen.generate("in place", GenerationConfig(max_new_tokens=12))
    cache = caches[0]
    assert len(caches) == 1, "the cache was allocated more than once"
    prompt_len = len(result.prompt_ids)
    assert cache.capacity == prompt_len + 12
    # prefill and decode steps both run in place: nothing is written from the host side at all
    assert backend.multi_token_steps and backend.prefill_session is None
    assert cache.writes == []
    assert snapshots == list(range(prompt_len, prompt_len + 11))
    assert all(p == pointers[0] for p in pointers), "a buffer was reallocated"
    assert cache.length == prompt_len + 11


def test_cache_truncate_and_overflow():
    import pytest

    from river.errors import CacheOverflow

    cache = SharedKVCache(2, 1, 2, 8, 4)
    cache.length = 6
    cache.truncate(4)
    assert cache.length == 4
    with pytest.raises(ValueError):
        cache.truncate(5)
    with pytest.raises(CacheOverflow, match="do not fit"):
        cache.require_room(5)
