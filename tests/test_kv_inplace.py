"""The KV buffers are allocated once, written in place at the right positions, never copied whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


# --- proof from outside: ONNX Runtime's own profile of the decode steps --------------------------------

def _profile(prefix, monkeypatch, run) -> list[dict]:
    """Kernel events of ONNX Runtime's profile (enable_profiling) while ``run(session_factory)`` runs."""
    import json

    import onnxruntime as ort

    import river.runtime.ort_backend as ort_backend

    plain = ort_backend.session_options

    def profiled(*args, **kwargs):
        so = plain(*args, **kwargs)
        so.enable_profiling, so.profile_file_prefix = True, str(prefix)
        return so

    monkeypatch.setattr(ort_backend, "session_options", profiled)
    session = run(lambda p: ort.InferenceSession(str(p), profiled(1), providers=["CPUExecutionProvider"]))
    events = json.loads(Path(session.end_profiling()).read_text())
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def _shared_kv_steps(tiny_onnx, capacity, steps=24, lowering="ort"):  # steps < the smallest capacity
    def run(_factory):
        backend = OrtBackend(tiny_onnx, threads=1, lowering=lowering)
        cache = backend.new_cache(capacity)
        for token in [1] + [5] * steps:  # every step one token: prefill is a step like the others
            backend.decode(np.array([[token]]), cache)
            cache.length += 1
        return backend.decode_session
    return run


def _concat_steps(tiny, tiny_onnx, past, steps=40):
    """The control: the exported graph's Concat(past, new) over a past of ``past`` positions."""
    c = tiny.config

    def run(factory):
        session = factory(tiny_onnx)
        feeds = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, past + 1), np.int64),
                 "position_ids": np.array([[past]])}
        for layer in range(c.num_layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{layer}.{kind}"] = np.zeros((1, c.num_kv_heads, past, c.head_dim), np.float32)
        for _ in range(steps):
            session.run(None, feeds)
        return session
    return run


def _peak_bytes(events) -> int:
    return max(int(e["args"]["mem_in_use_peak"]) for e in events)


@pytest.mark.parametrize("lowering, writer", [("ort", "GroupQueryAttention"), ("portable", "TensorScatter")])
def test_no_cache_copy_in_onnx_runtime_profile(tiny, tiny_onnx, tmp_path, monkeypatch, lowering, writer):
    """ONNX Runtime's profile, not our pointers: as the cache capacity grows 16x, the memory ONNX Runtime
    allocates per decode step grows by far less than one copy of the cache; the exported Concat form, run
    the same way, grows by more than a copy, so the measure would catch one. Both lowerings: the fused
    one (attention writes the buffers) and the portable one (TensorScatter does)."""
    c = tiny.config
    small, large = 32, 512  # 16x more, within the tiny model's context of 512 (the fused rotary tables cover 2x)
    cache_bytes = 2 * c.num_layers * c.num_kv_heads * large * c.head_dim * 4  # every layer's K and V at 16x

    shared = [_profile(tmp_path / f"s{cap}", monkeypatch, _shared_kv_steps(tiny_onnx, cap, lowering=lowering))
              for cap in (small, large)]
    control = [_profile(tmp_path / f"c{past}", monkeypatch, _concat_steps(tiny, tiny_onnx, past))
               for past in (small, large)]

    ops = {e["args"]["op_name"] for e in shared[1]}
    assert writer in ops and not ops & {"MemcpyToHost", "MemcpyFromHost", "Expand", "Tile"}, ops
    shared_growth = _peak_bytes(shared[1]) - _peak_bytes(shared[0])
    control_growth = _peak_bytes(control[1]) - _peak_bytes(control[0])
    assert control_growth > cache_bytes, (control_growth, cache_bytes)  # the measure sees a copy
    assert shared_growth < cache_bytes / 2, (shared_growth, cache_bytes)  # ... and there is none
    # Kernel times are not asserted: a timed check failed once in CI (Concat only 2.2x slower at 16x the
    # past, on 2 busy cores); the allocation measure above is deterministic and sees the copy.
