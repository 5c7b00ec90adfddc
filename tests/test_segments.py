"""Segmented River (compiler/river/segments.py, runtime/segmented_backend.py) and the chained layout
(compiler/river/chained.py) compute what the fused nested River graph computes, in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_river_pass import step_feeds
from tests_helpers import poison_decode

from river.compiler.ort_session import make_session
from river.compiler.river.chained import chained_river_graph
from river.compiler.river.manifest import DISABLED, EXIT_LAYER, FORCED_EXIT, THRESHOLDS, RiverInfo
from river.compiler.river.nested import river_graph
from river.compiler.river.manifest import SEGMENTS_FILE
from river.compiler.river.segments import DATA_FILE, SegmentIndex, write_segments
from river.compiler.river.spec import RiverSpec
from river.errors import RiverError
from river.export import contract as C
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend
from river.runtime.segmented_backend import SegmentedBackend

GATES = (0, 2)
PATTERNS = [([FORCED_EXIT, DISABLED], 1), ([DISABLED, FORCED_EXIT], 3), ([DISABLED, DISABLED], 4)]


@pytest.fixture(scope="module")
def tiny_proto(tiny_onnx):
    return onnx.load(str(tiny_onnx))


@pytest.fixture(scope="module")
def river_int8(tiny_river_segmented):
    """A river-export folder (nested River graph, gates ``GATES``) with its segments beside it."""
    return tiny_river_segmented


def _outputs(session, feeds, thr):
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {**feeds, THRESHOLDS: thr})))


def test_segments_folder(river_int8):
    folder = river_int8.parent / "segments"
    index = SegmentIndex.load(folder)
    assert [s.name for s in index.segments] == ["backbone0", "river0", "backbone1", "river1", "backbone2"]
    assert [(s.first, s.last) for s in index.segments] == [(0, 0), (1, 3), (1, 2), (3, 3), (3, 3)]
    b0, r0, b1 = index.backbone(0), index.river(0), index.backbone(1)
    assert b0.outputs[:3] == ["hidden.0", "gate0.exit", "gate0.similarity"] and b0.hidden_in is None
    assert r0.hidden_in == "hidden.0" and r0.outputs[0] == C.LOGITS
    assert b1.hidden_in == "hidden.0" and "exit_thresholds" in b1.inputs
    assert "write_indices" in b1.shared_kv_inputs and "write_indices" not in b1.inputs
    assert index.thresholds == [DISABLED, DISABLED] and index.twin_format == "ort"
    # one weights file; every external tensor is stored once and every graph passes the full checker
    names = {}
    for seg in index.segments:
        for shared_kv in (False, True):
            model = onnx.load(str(index.path(seg, shared_kv)), load_external_data=False)
            assert not any(n.op_type == "If" for n in model.graph.node)
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    where = {e.key: e.value for e in t.external_data}
                    assert where["location"] == DATA_FILE
                    assert names.setdefault(t.name, where["offset"]) == where["offset"]
            onnx.checker.check_model(str(index.path(seg, shared_kv)), full_check=True)
    offsets = list(names.values())
    assert len(offsets) == len(set(offsets))
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".onnx")) == [SEGMENTS_FILE, DATA_FILE]


@pytest.mark.parametrize("river, head", [("int8", "fp32"), ("int4", "fp32"), ("attn", "fp32"), ("kv", "fp32"),
                                         ("int8", "int8")])
def test_segmented_and_chained_steps_equal_fused(tiny, tiny_proto, tmp_path, river, head):
    """Forced exit at each gate and no exit: logits, every present and exit_layer agree (1e-5)."""
    spec = RiverSpec.from_name(river, GATES, head=head)
    fused = make_session(river_graph(tiny_proto, spec))
    chained_model = chained_river_graph(tiny_proto, spec)
    onnx.checker.check_model(chained_model, full_check=True)
    chained = make_session(chained_model)
    write_segments(tiny_proto, spec, tmp_path / "segments")
    segmented = SegmentedBackend(tmp_path / "segments", threads=1)
    assert segmented.river.head == RiverInfo.from_model(chained_model).head == head
    for seq, past in ((1, 6), (3, 4)):
        feeds = step_feeds(tiny.config, batch=2, seq=seq, past=past, seed=seq)
        for thresholds, expect in PATTERNS:
            thr = np.array(thresholds, np.float32)
            ref = _outputs(fused, feeds, thr)
            assert ref[EXIT_LAYER].tolist() == [expect, expect]
            for got in (_outputs(chained, feeds, thr), segmented.run_step(feeds, thr)):
                assert got.keys() == ref.keys()
                assert np.array_equal(got[EXIT_LAYER], ref[EXIT_LAYER])
                assert max(np.abs(got[n] - ref[n]).max() for n in ref if n != EXIT_LAYER) <= 1e-5
            assert segmented.last_exit_layer == expect


def _thresholds_that_exit_sometimes(tiny, segments) -> np.ndarray:
    """Per gate, a threshold between two observed similarities near the median: some steps exit at
    each gate, and no similarity sits within rounding of a threshold."""
    backend = SegmentedBackend(segments, threads=1)
    sims, decode = [], backend.decode

    def record(tokens, cache):
        out = decode(tokens, cache)
        sims.append([float(s[0]) for s in backend.last_similarities])
        return out

    backend.decode = record
    Generator(backend, tiny.tokenizer).generate("calibrate the river", GenerationConfig(max_new_tokens=24))
    sims = np.sort(np.array(sims), axis=0)
    mid = len(sims) // 2
    return ((sims[mid - 1] + sims[mid]) / 2).astype(np.float32)


def test_greedy_generation_fused_equals_segmented(tiny, river_int8):
    segments = river_int8.parent / "segments"
    thr = _thresholds_that_exit_sometimes(tiny, segments)
    fused = OrtBackend(river_int8, threads=1, thresholds=thr)
    segmented = SegmentedBackend(segments, threads=1, thresholds=thr)
    seen = set()
    for prompt in ("hello river", "the delta of a river", "abc"):
        a = Generator(fused, tiny.tokenizer).generate(prompt, GenerationConfig(max_new_tokens=20))
        b = Generator(segmented, tiny.tokenizer).generate(prompt, GenerationConfig(max_new_tokens=20))
        assert b.token_ids == a.token_ids
        exits = [s.exit_layer for s in b.steps[1:]]
        assert exits == [s.exit_layer for s in a.steps[1:]]
        seen.update(exits)
    assert seen == {1, 3, 4}  # exits at both gates and full-depth steps all happened


def test_segmented_decode_is_in_place_with_no_holes(tiny, river_int8):
    """Invariant 2 for the segmented runtime: after any exit every layer holds finite K/V for every
    position, and the KV inputs/outputs are bound to the cache buffers themselves."""
    backend = SegmentedBackend(river_int8.parent / "segments", threads=1)
    patterns = [[FORCED_EXIT, DISABLED], [DISABLED, FORCED_EXIT], [DISABLED, DISABLED]]
    seen = []

    def bound_to_the_buffers(cache):
        ptrs = backend.bound_pointers()
        for layer in range(tiny.config.num_layers):
            assert ptrs[C.past_name(layer, "key")] == ptrs[C.present_name(layer, "key")] == cache.keys[layer].ctypes.data

    poison_decode(backend, patterns, seen, after=bound_to_the_buffers)
    Generator(backend, tiny.tokenizer).generate("holes?", GenerationConfig(max_new_tokens=7))
    assert seen == [1, 3, 4, 1, 3, 4]


def test_write_segments_refuses_and_leaves_nothing(tiny_proto, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RiverError, match="out of range"):
        write_segments(tiny_proto, RiverSpec.from_name("int8", (3,)), out)
    assert list(tmp_path.iterdir()) == []
    (out / "x").mkdir(parents=True)
    with pytest.raises(RiverError, match="not empty"):
        write_segments(tiny_proto, RiverSpec.from_name("int8", GATES), out)
    with pytest.raises(RiverError, match="segments.json"):
        SegmentIndex.load(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SEGMENTS_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(RiverError, match="format 99"):
        SegmentIndex.load(bad)


def test_segmented_extend_equals_fused(tiny, river_int8):
    """Multi-token steps (verification drafts) in place: same logits, caches and exits as OrtBackend."""
    fused = OrtBackend(river_int8, threads=1)
    segmented = SegmentedBackend(river_int8.parent / "segments", threads=1)
    assert segmented.multi_token_steps == fused.multi_token_steps
    prompt = np.arange(30, 36)[None]
    caches = []
    for backend in (fused, segmented):
        cache = backend.new_cache(16)
        backend.prefill(prompt, cache)
        cache.length = 6
        caches.append(cache)
    for thresholds, expect in PATTERNS:
        outs = []
        for backend, cache in zip((fused, segmented), caches):
            backend.set_thresholds(thresholds)
            step = np.array([[40, 41, 42]]) if backend.multi_token_steps else np.array([[40]])
            outs.append(backend.extend(step, cache).copy())
            assert backend.last_exit_layer == expect
        np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
        n = caches[0].length + outs[0].shape[1]
        for a, b in zip(caches[0].buffers(), caches[1].buffers()):
            np.testing.assert_allclose(b[:, :, :n], a[:, :, :n], atol=1e-5)


@pytest.mark.slow
def test_smollm2_segmented_equals_fused(smol, smol_onnx, smol_segments):
    folder, spec = smol_segments
    gates = spec.gates
    fused = make_session(river_graph(onnx.load(str(smol_onnx)), spec), threads=2)
    segmented = SegmentedBackend(folder, threads=2)
    feeds = step_feeds(smol.config, batch=1, seq=1, past=12, seed=4)
    for k in range(len(gates) + 1):
        thr = np.full(len(gates), DISABLED, np.float32)
        if k < len(gates):
            thr[k] = FORCED_EXIT
        ref = _outputs(fused, feeds, thr)
        got = segmented.run_step(feeds, thr)
        assert int(ref[EXIT_LAYER][0]) == int(got[EXIT_LAYER][0]) == (gates[k] + 1 if k < len(gates) else 30)
        assert max(np.abs(got[n] - ref[n]).max() for n in ref if n != EXIT_LAYER) <= 1e-4


def test_rivers_run_once_over_the_batch_and_rows_equal_alone(tiny, river_int8):
    """Rows 0 and 2 exit at gate 0, row 1 at none: river0 runs once over the whole batch (today's twins
    quantize each row by itself; the staying row writes the slack), and every row's logits and K/V
    equal the same row run alone."""
    from river.runtime.batching.kv_pool import KVPool

    backend = SegmentedBackend(river_int8.parent / "segments", threads=1)
    assert not backend.rivers_per_row
    c, gates = backend.contract, len(GATES)
    rng = np.random.default_rng(2)
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, rows=3, slack=4, gates=gates, capacity=32)
    pool.fit(32, 0)
    exit_at_0 = np.array([FORCED_EXIT] + [DISABLED] * (gates - 1), np.float32)
    for i, n in enumerate((5, 8, 6)):
        backend.prefill(rng.integers(1, tiny.config.vocab_size, (1, n)).astype(np.int64), pool.rows(i, i + 1))
        pool.lengths[i] = n
        pool.thresholds[i] = exit_at_0 if i != 1 else DISABLED
    tokens = rng.integers(1, tiny.config.vocab_size, (3, 1)).astype(np.int64)
    alone = []
    for i in range(3):  # a fresh cache with the row's own past and thresholds
        solo = backend.new_cache(32)
        for a, b in zip(solo.buffers(), pool.rows(i, i + 1).buffers()):
            a[:] = b[:, :, :32]
        solo.length = int(pool.lengths[i])
        backend.set_thresholds(pool.thresholds[i])
        alone.append((np.array(backend.extend(tokens[i:i + 1], solo))[0], [b[0, :, :solo.length + 1].copy()
                                                                           for b in solo.buffers()]))
        assert backend.last_exit_layer == (GATES[0] + 1 if i != 1 else c.num_layers)
    states = []
    original = backend._step_state
    backend._step_state = lambda ids, cache: states.append(cache) or original(ids, cache)
    both = np.array(backend.extend(tokens, pool.rows(0, 3)))
    assert len(states) == 1, "a river ran row by row"
    assert list(backend.last_exit_layers) == [GATES[0] + 1, c.num_layers, GATES[0] + 1]
    for i, (logits, kv) in enumerate(alone):
        np.testing.assert_allclose(both[i], logits, atol=1e-5)
        for a, b in zip(pool.rows(i, i + 1).buffers(), kv):
            np.testing.assert_allclose(a[0, :, :b.shape[1]], b, atol=1e-5)


def test_lowered_segments_equal_the_portable_ones(tiny, river_int8):
    """The segments' ONNX Runtime lowering (fused attention over the shared buffers, the default) gives
    the portable segments' logits, exits and K/V, with rows of one batch leaving at different gates
    (a row a segment is not for writes the slack through its mask, not a write index)."""
    from river.runtime.batching.kv_pool import KVPool

    folder = river_int8.parent / "segments"
    lowered, portable = SegmentedBackend(folder, threads=1), SegmentedBackend(folder, threads=1, lowering="portable")
    assert (lowered.lowering, portable.lowering) == ("ort_fused", "portable")
    assert any(n.op_type == "GroupQueryAttention"
               for n in onnx.load(str(lowered._lowered["backbone1"]), load_external_data=False).graph.node)
    c = lowered.contract
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, tiny.config.vocab_size, (1, n)).astype(np.int64) for n in (5, 8, 6)]
    tokens = rng.integers(1, tiny.config.vocab_size, (3, 1)).astype(np.int64)
    results = []
    for backend in (lowered, portable):
        pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, rows=3, slack=4, gates=len(GATES), capacity=32)
        pool.fit(32, 0)
        for i, p in enumerate(prompts):
            backend.prefill(p, pool.rows(i, i + 1))
            pool.lengths[i] = p.shape[1]
            pool.thresholds[i] = PATTERNS[i][0]
        logits = np.array(backend.extend(tokens, pool.rows(0, 3)))
        results.append((logits, list(backend.last_exit_layers), pool))
    (a, exits_a, pool_a), (b, exits_b, pool_b) = results
    assert exits_a == exits_b == [expect for _, expect in PATTERNS]
    np.testing.assert_allclose(a, b, atol=1e-4)
    for i in range(3):
        n = int(pool_a.lengths[i]) + 1
        for x, y in zip(pool_a.rows(i, i + 1).buffers(), pool_b.rows(i, i + 1).buffers()):
            np.testing.assert_allclose(x[:, :, :n], y[:, :, :n], atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
def test_segment_sessions_spin_only_on_a_shared_pool(river_int8, monkeypatch, shared):
    """Segments alternate step by step: with a thread pool per session, an idle pool that spins takes
    the cores the next segment needs (SmolLM2: 10.5 tok/s against 32-34 without spinning)."""
    import river.runtime.segmented_backend as segmented

    monkeypatch.setattr(segmented, "shared_thread_pool", lambda: shared)
    backend = SegmentedBackend(river_int8.parent / "segments", threads=1)
    try:
        spinning = backend._options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ONNX Runtime's default, spinning
        spinning = "1"
    assert spinning == ("1" if shared else "0")
