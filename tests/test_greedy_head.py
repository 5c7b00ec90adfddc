"""The greedy head (compiler/lowering/greedy_head.py): off, the lowered graph's logits are the fp32
head's; on, every value is either the exact logit or below the exact maximum, so the argmax is the
fp32 head's; greedy generation is unchanged; sampling runs the exact head."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from river.compiler.graph_io import load_onnx, load_onnx_header
from river.compiler.lowering import greedy_head
from river.compiler.quantize import dequantize_nbits, ort_block_quant
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend

EXACT_TOL = 1e-4  # the rescored logits are fp32 dot products summed in another order than the MatMul


def _steps(backend, vocab, greedy, seed=0, steps=((5, 0), (1, 0), (3, 1), (1, 0), (1, 0))):
    """Logits of a fixed run of steps (random tokens, a rollback) at full depth, greedy head on or off."""
    rng = np.random.default_rng(seed)
    cache = backend.new_cache(24)
    out = []
    with backend.greedy_logits(greedy), backend.full_depth():
        for s, back in steps:
            cache.truncate(cache.length - back)
            out.append(np.array(backend.extend(rng.integers(1, vocab, (1, s)).astype(np.int64), cache)))
            cache.length += s
    backend.release(cache)
    return out


def assert_greedy_contract(greedy: np.ndarray, exact: np.ndarray) -> int:
    """Each value exact or below the row's exact maximum; the argmax the same. Returns the count of
    rescored (exact) values."""
    g, e = greedy.reshape(-1, greedy.shape[-1]), exact.reshape(-1, exact.shape[-1])
    rescored = np.abs(g - e) <= EXACT_TOL * np.maximum(1.0, np.abs(e))
    top = e.max(axis=-1, keepdims=True)
    assert (rescored | (g < top - EXACT_TOL)).all(), "an approximate logit reaches the exact maximum"
    np.testing.assert_array_equal(g.argmax(-1), e.argmax(-1))
    return int(rescored.sum())


def test_lowered_graph_has_the_greedy_head_off_by_default(tiny, tiny_onnx):
    lowered = OrtBackend(tiny_onnx, threads=1)
    portable = OrtBackend(tiny_onnx, threads=1, lowering="portable")
    header = load_onnx_header(lowered.decode_path)
    assert greedy_head.GREEDY_LOGITS in {i.name for i in header.graph.input}
    assert [n.op_type for n in header.graph.node].count("If") == 1
    vocab = tiny.config.vocab_size
    for off, ref in zip(_steps(lowered, vocab, False), _steps(portable, vocab, False)):
        np.testing.assert_allclose(off, ref, atol=1e-4, rtol=1e-5)  # off: the fp32 head


def test_greedy_logits_keep_the_argmax_and_rescore_exactly(tiny, tiny_onnx):
    lowered = OrtBackend(tiny_onnx, threads=1)
    vocab = tiny.config.vocab_size
    rescored = total = 0
    for seed in range(4):
        for on, off in zip(_steps(lowered, vocab, True, seed), _steps(lowered, vocab, False, seed)):
            rescored += assert_greedy_contract(on, off)
            total += on.size
    assert 0 < rescored < total  # the rescoring ran, over candidates only (the rest is the 8-bit head's)
    wide_on, wide_off = _steps(lowered, vocab, True, steps=((greedy_head.MAX_ROWS + 1, 0),))[0], \
        _steps(lowered, vocab, False, steps=((greedy_head.MAX_ROWS + 1, 0),))[0]
    np.testing.assert_array_equal(wide_on, wide_off)  # steps of more rows run the fp32 head
    with lowered.greedy_logits(True):
        pass
    assert not lowered.greedy_flag  # restored after the block


def test_segmented_river_runs_the_greedy_head_in_its_last_segment(tiny, tiny_river_segmented):
    from river.runtime.segmented_backend import SegmentedBackend

    backend = SegmentedBackend(tiny_river_segmented.parent / "segments", threads=1)
    assert backend.lowering == "ort_fused"
    vocab, rescored, total = tiny.config.vocab_size, 0, 0
    for on, off in zip(_steps(backend, vocab, True), _steps(backend, vocab, False)):
        rescored += assert_greedy_contract(on, off)
        total += on.size
    assert 0 < rescored < total


def test_the_bound_covers_the_8bit_error():
    """The error factors bound |approx - exact| for hidden states with outliers (what the graph computes,
    in numpy: int8 activations per block, as accuracy level 4 rounds them)."""
    rng = np.random.default_rng(0)
    k, v, b = 64, 300, greedy_head.BLOCK
    w = (rng.standard_normal((k, v)) * rng.uniform(0.01, 0.2, v)).astype(np.float32)
    packed, scales, zps = ort_block_quant(w, greedy_head.BITS, b, symmetric=False)
    wq = dequantize_nbits(packed, scales, zps, greedy_head.BITS, k)
    err, norm = greedy_head.error_factors(w, wq)
    h = rng.standard_normal((200, k)).astype(np.float32)
    h[:, 3] *= 40  # an outlier channel, like a real model's final norm output
    hb = h.reshape(-1, k // b, b)
    step = np.abs(hb).max(-1) / 127
    hq = (np.round(hb / step[..., None]) * step[..., None]).reshape(h.shape)
    approx, exact = hq @ wq, h @ w
    bound = ((np.abs(hb).sum(-1) + b * step / 2).sum(-1)[:, None] * err
             + (step / 2).sum(-1)[:, None] * norm)
    assert (np.abs(approx - exact) <= bound).all()
    assert (np.abs(approx - exact).max(-1) > 0.05 * bound.max(-1)).all()  # not vacuous


@pytest.mark.parametrize("tied", [True, False])
def test_head_alone_tied_or_not(tied):
    """A head by itself: rows read from an equal embedding table (tied) or by column from its own
    weight (untied); the contract holds on hidden states with an outlier channel."""
    import onnxruntime as ort
    from onnx import numpy_helper

    rng = np.random.default_rng(1)
    k, v = 64, 500
    w = (rng.standard_normal((k, v)) * rng.uniform(0.02, 0.2, v)).astype(np.float32)
    h = gs.Variable("h", np.float32, ["B", "S", k])
    logits = gs.Variable("logits", np.float32, ["B", "S", v])
    ids, emb = gs.Variable("ids", np.int64, ["n"]), gs.Variable("emb", np.float32)
    table = np.ascontiguousarray(w.T) if tied else np.ascontiguousarray(w.T) + 1.0
    graph = gs.Graph(nodes=[gs.Node("MatMul", "head", {}, [h, gs.Constant("W", w)], [logits]),
                            gs.Node("Gather", "embed", {}, [gs.Constant("table", table), ids], [emb])],
                     inputs=[h, ids], outputs=[logits, emb], opset=21)
    node, why = greedy_head.check(graph)
    assert why is None
    greedy_head.lower(graph, node)
    model = gs.export_onnx(graph)
    model.opset_import.add(domain="com.microsoft", version=1)
    model.graph.initializer.append(numpy_helper.from_array(np.array(False), greedy_head.GREEDY_LOGITS))
    then = next(a.g for a in next(n for n in model.graph.node if n.op_type == "If").attribute if a.name == "then_branch")
    reads = {n.name: n.input[0] for n in then.node}
    assert reads.get("/greedy_head/w_rows" if tied else "/greedy_head/w_cols") == ("table" if tied else "W")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 2, k)).astype(np.float32)
    x[..., 5] *= 30
    run = lambda flag: sess.run(["logits"], {"h": x, "ids": np.array([0]), greedy_head.GREEDY_LOGITS: np.array(flag)})[0]  # noqa: E731
    exact = run(False)
    np.testing.assert_allclose(exact, x @ w, rtol=1e-5, atol=1e-4)
    assert 0 < assert_greedy_contract(run(True), exact) < exact.size


def test_check_explains_heads_it_leaves(tiny_onnx):
    graph = gs.import_onnx(load_onnx(tiny_onnx))
    node, why = greedy_head.check(graph)
    assert node is not None and why is None
    logits = node.outputs[0]
    shape, logits.shape = logits.shape, ["rows", 5]
    assert greedy_head.check(graph)[1] == "'logits' is not [batch, sequence, vocab] (shape ['rows', 5])"
    logits.shape = shape
    node.op = "Gemm"  # e.g. a head with a bias
    assert greedy_head.check(graph)[1] == "'logits' is made by Gemm, not by a MatMul"
    graph.outputs = [t for t in graph.outputs if t.name != "logits"]
    assert greedy_head.check(graph)[1] == "the graph has no 'logits' output"


def test_generation_greedy_and_sampled_equal_the_portable_graph(tiny, tiny_onnx):
    from river.models.tokenizer import TextTokenizer

    tok = TextTokenizer(tiny_onnx.parent)
    gens = [Generator(OrtBackend(tiny_onnx, threads=1, lowering=lo), tok) for lo in ("ort", "portable")]
    for cfg in (GenerationConfig(max_new_tokens=12, eos_token_ids=[]),
                GenerationConfig(max_new_tokens=12, eos_token_ids=[], temperature=0.8, seed=3)):
        a, b = (g.generate([3, 5, 7, 9], cfg).token_ids for g in gens)
        assert a == b


@pytest.mark.slow
def test_smollm2_greedy_head(smol, smol_onnx):
    """The real model (its head tied to the embedding table, which the rescoring reads): the contract
    on every step, a few dozen candidates a token, and the same greedy tokens as the fp32 head. With fp32
    matrices: the default lowering runs this Q8_0 head exactly with River's op (test_river_ops.py)."""
    lowered = OrtBackend(smol_onnx, threads=2, lowering="ort-fp32")
    header = load_onnx_header(lowered.decode_path)
    branch = next(n for n in header.graph.node if n.op_type == "If").attribute
    then = next(a.g for a in branch if a.name == "then_branch")
    gather = next(n for n in then.node if n.name == "/greedy_head/w_rows")
    tables = {n.input[0] for n in header.graph.node if n.op_type == "Gather"}
    assert gather.op_type == "Gather" and gather.input[0] in tables  # the embedding table, no second copy
    vocab = smol.config.vocab_size
    for seed in range(2):
        for on, off in zip(_steps(lowered, vocab, True, seed), _steps(lowered, vocab, False, seed)):
            rescored = assert_greedy_contract(on, off)
            if on.shape[1] <= greedy_head.MAX_ROWS:  # else the fp32 head ran: every value exact
                assert on.shape[1] <= rescored < 2000 * on.shape[1]
