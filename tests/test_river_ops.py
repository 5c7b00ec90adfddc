"""River's exact products by a GGUF's Q4_1 and Q8_0 weights (compiler/lowering/q41_matmul.py and
q80_matmul.py, the ops in compiler/ort_ops): which weights they take and why they leave the others, that
the kernels compute the fp32 product of the very weights the export holds on every instruction set,
thread count and row count, that lowered graphs with them equal the portable ones (poisoned caches, in
place), and that the library is built, found and refused as a user expects."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from river.compiler import ort_ops
from river.compiler.graph_io import load_onnx, load_onnx_header, walk_nodes
from river.compiler.lowering import q41_matmul, q41_twins, q80_matmul
from river.compiler.ort_session import make_session
from river.errors import RiverError
from river.runtime.ort_backend import OrtBackend
from tests_helpers import on_grid


@pytest.fixture(scope="module", autouse=True)
def built():
    """The library, built for these sources (./setup.sh builds it; a clean checkout's test run too);
    skipped on a CPU that runs neither kernel."""
    from river.compiler.ort_ops.build import build

    build()
    if "this CPU" in ort_ops.status()[1]:
        pytest.skip(ort_ops.status()[1])
    assert ort_ops.library() is not None, ort_ops.status()[1]


INT8_TWIN_TOL = 0.15  # int8 activations in a tiny random model's twins (logits and K/V of order 1): 0.09-0.10 seen
INT8_MODEL_REL = 0.35  # every layer's activations rounded: |int8 - exact| / |exact|, logits and K/V (0.02-0.23 seen; unrelated outputs: ~1.4)
RULES = {"q41": q41_matmul, "q80": q80_matmul, "q41i8": q41_matmul}  # q41i8: a twin's (marked) weight


def q80_weight(k: int, n: int, rng) -> np.ndarray:
    """A Q8_0 weight as a GGUF dequantizes it: per block of 32 inputs, w = d * q, q in -127..127."""
    d = (rng.random((k // 32, n)) * 0.01 + 1e-4).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (k // 32, 32, n)).astype(np.float32)
    q[:, 0] = 127  # every block reaches its largest level (as Q8_0's d = max|w| / 127 makes it)
    return (d[:, None] * q).reshape(k, n).astype(np.float32)


WEIGHTS = {"q41": lambda k, n, rng: on_grid(rng.standard_normal((k, n)).astype(np.float32) * 0.05, rng),
           "q80": q80_weight}
WEIGHTS["q41i8"] = WEIGHTS["q41"]


def int8_product(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What Q41MatMulInt8 computes, in float64: x quantized per row and block of 32 (xq = round half to
    even of x * (127 / max|x|), in fp32; scale max|x| / 127) times the exact weights."""
    k = x.shape[-1]
    b = x.reshape(*x.shape[:-1], k // 32, 32)
    top = np.abs(b).max(-1, keepdims=True)
    inv = np.where(top > 0, np.float32(127) / np.where(top > 0, top, 1), 0).astype(np.float32)
    xq = np.clip(np.rint((b * inv).astype(np.float32)), -127, 127)
    scale = (top / np.float32(127)).astype(np.float32).astype(np.float64)
    return ((xq * scale).reshape(x.shape)) @ w.astype(np.float64)


def product_graph(w: np.ndarray, form: str | None):
    """One MatMul by ``w``; with ``form``, rewritten by that rule."""
    k, n = w.shape
    x, y = gs.Variable("x", np.float32, ["B", "S", k]), gs.Variable("y", np.float32, ["B", "S", n])
    name = "w" + (q41_twins.MARK if form == "q41i8" else "")
    graph = gs.Graph(nodes=[gs.Node("MatMul", "product", {}, [x, gs.Constant(name, w)], [y])], inputs=[x], outputs=[y],
                     opset=21)
    if form:
        assert RULES[form].rewrite(graph) == 1
    model = gs.export_onnx(graph)
    model.opset_import.add(domain=ort_ops.DOMAIN, version=1)
    return model


def test_check_takes_q41_weights_and_explains_the_others():
    rng = np.random.default_rng(0)
    w = on_grid(rng.standard_normal((64, 96)).astype(np.float32), rng)
    parts, why = q41_matmul.check(w)
    assert parts is not None and why == ""
    q, d, m = parts
    assert (q.shape, q.dtype, d.shape, d.dtype) == ((3, 64, 16), np.uint8, (3, 2, 32), np.float16)
    # the packing holds every level: column j of group g, input i is nibble j % 16 of byte [g, i, j % 16]
    levels = np.where(np.arange(32) < 16, q[:, :, np.arange(32) % 16] & 15, q[:, :, np.arange(32) % 16] >> 4)
    made = d.astype(np.float32).repeat(32, axis=1) * levels + m.astype(np.float32).repeat(32, axis=1)  # [N/32, K, 32]
    assert np.array_equal(made.transpose(1, 0, 2).reshape(64, 96), w)
    noisy = w + rng.standard_normal(w.shape).astype(np.float32) * 1e-3
    assert "not on a 4-bit grid" in q41_matmul.check(noisy)[1]
    assert "multiples of 32" in q41_matmul.check(w[:, :80])[1]
    assert "fp32 matrix" in q41_matmul.check(w.astype(np.float64))[1]
    # on a grid, but with a step fp16 cannot hold: the weights would not come back bit for bit
    odd = (np.float32(1 / 3) * np.tile(np.arange(16, dtype=np.float32), 4)[:, None] * np.ones((1, 32), np.float32))
    assert "bit for bit" in q41_matmul.check(odd)[1]


def test_check_takes_q80_weights_and_explains_the_others():
    rng = np.random.default_rng(1)
    w = q80_weight(64, 96, rng)
    parts, why = q80_matmul.check(w)
    assert parts is not None and why == ""
    q, d = parts
    assert (q.shape, q.dtype, d.shape, d.dtype) == ((3, 64, 32), np.int8, (3, 2, 32), np.float16)
    made = d.astype(np.float32).repeat(32, axis=1) * q  # [N/32, K, 32]
    assert np.array_equal(made.transpose(1, 0, 2).reshape(64, 96), w)
    assert "8-bit grid" in q80_matmul.check(w + np.float32(1e-4))[1]
    assert "multiples of 32" in q80_matmul.check(w[:, :80])[1]
    assert "8-bit grid" in q80_matmul.check(on_grid(w, rng))[1]  # a Q4_1 weight has offsets: not Q8_0
    assert "4-bit grid" in q41_matmul.check(w)[1]  # and a Q8_0 weight is no Q4_1 one


def test_twin_rule_takes_twins_of_q41_weights_and_explains_the_others():
    """q41_twins: a builder-made twin product (MatMulNBits over ``W@q8p``, int8 activations) whose
    backbone weight W is a Q4_1 weight becomes an fp32 MatMul by W under the mark, one constant shared
    by every twin of W; anything else stays, with the reason."""
    rng = np.random.default_rng(4)
    w = on_grid(rng.standard_normal((64, 96)).astype(np.float32), rng)
    off = rng.standard_normal((64, 96)).astype(np.float32)
    weights = {"W": gs.Constant("W", w), "OFF": gs.Constant("OFF", off)}
    x = gs.Variable("x", np.float32, [1, 64])
    made = iter(range(100))

    def twin(weight: str, accuracy: int = 4, n: int = 96) -> gs.Node:
        attrs = {"K": 64, "N": n, "bits": 8, "block_size": 32, "accuracy_level": accuracy}
        consts = [gs.Constant(f"{weight}@q8p", np.zeros((n, 2, 32), np.uint8)), gs.Constant(f"{weight}@q8s", np.ones(n * 2, np.float32))]
        i = next(made)
        return gs.Node("MatMulNBits", f"twin{i}", attrs, [x, *consts], [gs.Variable(f"y{i}", np.float32)])

    assert q41_twins.check(twin("W"), weights) == (weights["W"], "")
    plain = twin("W")
    plain.inputs[1] = gs.Constant("packed", np.zeros((96, 2, 32), np.uint8))
    assert "not a twin" in q41_twins.check(plain, weights)[1]
    assert "fp32 activations" in q41_twins.check(twin("W", accuracy=1), weights)[1]
    assert "not in this graph" in q41_twins.check(twin("GONE"), weights)[1]
    assert "not a Q4_1 weight" in q41_twins.check(twin("OFF"), weights)[1]
    assert "64 x 64" in q41_twins.check(twin("W", n=64), weights)[1]

    nodes = [twin("W"), twin("W"), twin("OFF"), twin("W", accuracy=1)]
    head = gs.Node("MatMul", "backbone", {}, [x, weights["W"]], [gs.Variable("yb", np.float32)])
    graph = gs.Graph(nodes=[head, *nodes], inputs=[x], outputs=[t for n in [head, *nodes] for t in n.outputs], opset=21)
    assert q41_twins.mark(graph) == 2
    ops = [(n.op, n.inputs[1].name) for n in graph.nodes]
    assert ops.count(("MatMul", "W" + q41_twins.MARK)) == 2 and ("MatMulNBits", "OFF@q8p") in ops
    assert nodes[0].inputs[1] is nodes[1].inputs[1] and nodes[0].inputs[1].values is w  # shared, not copied
    assert q41_matmul.rewrite(graph) == 3  # the backbone's exact product and the twins' int8 ones
    assert sorted(n.op for n in graph.nodes if n.op.startswith("Q41")) == ["Q41MatMul", "Q41MatMulInt8", "Q41MatMulInt8"]


@pytest.mark.parametrize("form", ["q41", "q80"])
@pytest.mark.parametrize("k,n", [(64, 96), (576, 960), (1536, 576)])
def test_op_computes_the_fp32_product_of_the_same_weights(form, k, n):
    """Rows 1-17 (every row-chunk size and remainder of both kernels), column groups odd and even: the op
    equals the float64 product within fp32 rounding, like ONNX Runtime's fp32 MatMul."""
    rng = np.random.default_rng(k + n)
    w = WEIGHTS[form](k, n, rng)
    plain, ours = (make_session(product_graph(w, f), threads=2) for f in (None, form))
    for rows in (1, 2, 3, 4, 5, 8, 9, 17):
        x = rng.standard_normal((1, rows, k)).astype(np.float32)
        exact = x.astype(np.float64) @ w.astype(np.float64)
        scale = np.abs(exact).max()
        got, fp32 = ours.run(None, {"x": x})[0], plain.run(None, {"x": x})[0]
        assert got.shape == (1, rows, n)
        assert np.abs(got - exact).max() <= 4e-6 * scale, rows
        assert np.abs(got - exact).max() <= 8 * max(np.abs(fp32 - exact).max(), 1e-7 * scale), rows


@pytest.mark.parametrize("k,n", [(64, 96), (576, 960), (1536, 576)])
def test_int8_op_computes_the_product_of_int8_activations_by_the_exact_weights(k, n):
    """Q41MatMulInt8 (River's twins): the product of the int8-rounded activations by the exact Q4_1
    weights, within fp32 rounding, rows 1-9 (every chunk of 4 and remainder); only the activations'
    rounding stands between it and the exact product."""
    rng = np.random.default_rng(k * n)
    w = WEIGHTS["q41i8"](k, n, rng)
    model = product_graph(w, "q41i8")
    assert [node.op_type for node in model.graph.node] == ["Q41MatMulInt8"]
    ours = make_session(model, threads=2)
    for rows in (1, 2, 3, 4, 5, 8, 9):
        x = rng.standard_normal((1, rows, k)).astype(np.float32)
        x[0, 0, :32] = 0  # an all-zero block: scale 0
        got, want = ours.run(None, {"x": x})[0], int8_product(x, w)
        exact = x.astype(np.float64) @ w.astype(np.float64)
        scale = np.abs(exact).max()
        assert np.abs(got - want).max() <= 2e-6 * scale, rows
        assert 1e-5 * scale < np.abs(got - exact).max() <= 2e-2 * scale, rows  # rounded activations, not exact


@pytest.mark.parametrize("form", ["q41", "q80", "q41i8"])
def test_result_does_not_depend_on_instruction_set_threads_or_rows(form, monkeypatch):
    """Each column sums its blocks in one order: AVX2 and AVX-512 kernels, one thread or two, a step of
    many rows or of one, give the same bits."""
    rng = np.random.default_rng(3)
    w = WEIGHTS[form](576, 960, rng)
    model = product_graph(w, form)
    x = rng.standard_normal((2, 5, 576)).astype(np.float32)
    results = {}
    for isa in (["avx512", "avx2"] if ort_ops.isa() == "avx512" else ["avx2"]):
        monkeypatch.setenv("RIVER_OPS_ISA", isa)
        for threads in (1, 2):
            results[isa, threads] = make_session(model, threads=threads).run(None, {"x": x})[0]
    first = next(iter(results.values()))
    assert all(np.array_equal(r, first) for r in results.values()), list(results)
    # ten rows take the buffered path (prefill), one row the streamed one: each row alone, the same bits
    monkeypatch.delenv("RIVER_OPS_ISA")
    session = make_session(model, threads=2)
    alone = np.stack([session.run(None, {"x": x[b:b + 1, s:s + 1]})[0][0, 0] for b in range(2) for s in range(5)])
    assert np.array_equal(alone.reshape(first.shape), first)


def test_tiny_on_grid_lowered_equals_portable(tiny, tiny_on_grid):
    """The default lowering runs every layer product of a Q4_1 model with the op; steps (prefill,
    verification, decode, rollbacks) equal the portable graph on logits and K/V, the cache poisoned past
    the valid positions and bound in place."""
    from test_ort_lowering import _assert_same_steps

    lowered, portable = (OrtBackend(tiny_on_grid, threads=1, lowering=lo) for lo in ("ort", "portable"))
    assert (lowered.lowering, lowered.grid_form) == ("ort_fused", "river")
    ops = [n.op_type for n in load_onnx_header(lowered.decode_path).graph.node]
    assert ops.count("Q41MatMul") == lowered.grid_weights == 4 * tiny.config.num_layers  # qkv, o, gate|up, down
    _assert_same_steps(lowered, portable, tiny.config.vocab_size)


def test_int8_lowering_runs_every_layer_product_with_int8_activations(tiny, tiny_on_grid, capsys):
    """--lowering ort-int8 (lossy): every layer product of a Q4_1 model runs Q41MatMulInt8; steps stay
    within int8 rounding of the exact model (relative norm), in place, nothing written past the new
    positions; river-generate says it is lossy."""
    from river.runtime import cli as generate_cli
    from test_ort_lowering import _assert_same_steps

    int8, exact = (OrtBackend(tiny_on_grid, threads=1, lowering=lo) for lo in ("ort-int8", "portable"))
    assert (int8.lowering, int8.grid_form) == ("ort_fused", "river-int8")
    ops = [n.op_type for n in load_onnx_header(int8.decode_path).graph.node]
    assert ops.count("Q41MatMulInt8") == int8.grid_weights == 4 * tiny.config.num_layers and "Q41MatMul" not in ops
    _assert_same_steps(int8, exact, tiny.config.vocab_size, relative=INT8_MODEL_REL)
    assert generate_cli.main(["hi", "--model", str(tiny_on_grid), "--max-new-tokens", "2", "--threads", "1",
                              "--lowering", "ort-int8"]) == 0
    assert "lossy" in capsys.readouterr().err  # river-generate says the text is not the model's own


def test_river_graph_on_grid_runs_the_ops_inside_branches(tiny, tiny_on_grid, tmp_path):
    """A River graph of a Q4_1 model: the backbone's products inside the If branches run Q41MatMul and
    equal the portable graph with every gate off; the 8-bit twins run Q41MatMulInt8 over the backbone's
    own weights, so under every exit pattern the steps stay within int8 rounding of exact (fp32) twins,
    with no hole, nothing written past the new positions and the cache bound in place."""
    from river.compiler.compile import compile_river
    from river.compiler.river.manifest import DISABLED
    from test_ort_lowering import _assert_same_steps

    river = compile_river(tiny_on_grid, tmp_path / "river", gates="0,2", river="int8", log=None)
    exact_twins = compile_river(tiny_on_grid, tmp_path / "exact", gates="0,2", river="fp32", log=None)
    lowered, portable = (OrtBackend(river, threads=1, lowering=lo) for lo in ("ort", "portable"))
    ops = [n.op_type for n in walk_nodes(load_onnx(lowered.decode_path).graph)]
    assert ops.count("Q41MatMul") >= 4 * tiny.config.num_layers
    assert ops.count("Q41MatMulInt8") >= 4 * (tiny.config.num_layers - 1) and "MatMulNBits" not in ops
    _assert_same_steps(lowered, portable, tiny.config.vocab_size, thresholds=[[DISABLED, DISABLED]])
    patterns = [[-2, DISABLED], [DISABLED, -2], [DISABLED, DISABLED], [-2, -2]]
    reference = OrtBackend(exact_twins, threads=1, lowering="portable")
    _assert_same_steps(lowered, reference, tiny.config.vocab_size, thresholds=patterns, tol=INT8_TWIN_TOL)
    # and closer to the exact twins than the portable 8-bit twins are (exact weights, rounded activations)
    ours, theirs = (_largest_logit_gap(b, reference, tiny.config.vocab_size, patterns) for b in (lowered, portable))
    assert 0 < ours < theirs, (ours, theirs)


def _largest_logit_gap(backend, reference, vocab, patterns) -> float:
    """The largest |logit difference| between two River backends over decode steps under ``patterns``."""
    rng = np.random.default_rng(5)
    caches = [b.new_cache(64) for b in (backend, reference)]
    gap = 0.0
    for i in range(8):
        tokens = rng.integers(1, vocab, (1, 6 if i == 0 else 1)).astype(np.int64)
        outs = []
        for b, cache in zip((backend, reference), caches):
            b.set_thresholds(patterns[i % len(patterns)])
            outs.append(np.array(b.extend(tokens, cache)))
            cache.length += tokens.shape[1]
        gap = max(gap, float(np.abs(outs[0] - outs[1]).max()))
    return gap


def test_river_segments_run_the_twins_with_int8_activations(tiny, tiny_on_grid, tmp_path):
    """The segmented River: a segment of twins lacks its backbone's weights, so its lowering reads them
    from the backbone segments; its twins run Q41MatMulInt8, and greedy generation under every exit
    pattern equals the fused River graph's (tokens and exits)."""
    from river.compiler.compile import compile_river
    from river.compiler.river.manifest import DISABLED
    from river.compiler.river.segments import write_segments
    from river.compiler.river.spec import RiverSpec
    from river.runtime.segmented_backend import SegmentedBackend
    from tests_helpers import assert_same_generation

    river = compile_river(tiny_on_grid, tmp_path / "river", gates="0,2", river="int8", log=None)
    write_segments(tiny_on_grid, RiverSpec.from_manifest(river.parent), river.parent / "segments")
    segmented, fused = SegmentedBackend(river.parent / "segments", threads=1), OrtBackend(river, threads=1)
    for k in range(2):
        ops = [n.op_type for n in load_onnx_header(segmented._lowered[f"river{k}"]).graph.node]
        assert "Q41MatMulInt8" in ops and "MatMulNBits" not in ops, k
    assert_same_generation((segmented, fused), tiny.tokenizer, ([-2, DISABLED], [DISABLED, -2], [DISABLED, DISABLED]))


def test_stale_or_missing_library_is_not_used_and_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setattr(ort_ops, "STAMP", tmp_path / "sources.sha256")
    ort_ops.status.cache_clear()
    try:
        assert ort_ops.library() is None and "built from other sources" in ort_ops.status()[1]
        monkeypatch.setattr(ort_ops, "LIBRARY", tmp_path / "libriver_ops.so")
        ort_ops.status.cache_clear()
        assert ort_ops.library() is None and ort_ops.BUILD_COMMAND in ort_ops.status()[1]
    finally:
        monkeypatch.undo()
        ort_ops.status.cache_clear()
    assert ort_ops.library() is not None


def test_build_errors_are_one_line_and_keep_the_library(tmp_path, monkeypatch, capsys):
    from river.compiler.ort_ops import build
    from tests_helpers import assert_one_line_error

    before = ort_ops.LIBRARY.read_bytes()
    monkeypatch.setattr(ort_ops, "STAMP", tmp_path / "stale")  # forces a rebuild attempt
    assert build.main(["--cxx", "no-such-compiler-here"]) == 2
    assert "no C++ compiler" in assert_one_line_error(capsys.readouterr().err, "river-ops-build")
    (tmp_path / "headers").mkdir()
    with pytest.raises(RiverError, match="lacks"):
        build.build(headers=tmp_path / "headers")
    assert ort_ops.LIBRARY.read_bytes() == before
    assert not list(ort_ops.BUILD_DIR.glob(".*.tmp"))


@pytest.mark.slow
def test_smollm2_default_lowering_runs_every_layer_with_the_op(smol, smol_onnx):
    """The real model: its 210 Q4_1 weights (packed into 120 products) all run with Q41MatMul by default,
    its head (tied to the Q8_0 embedding table) with Q80MatMul instead of the greedy head, and greedy
    and sampled text equal the portable graph's (logits and K/V: test_ort_lowering's SmolLM2 test)."""
    from river.models.tokenizer import TextTokenizer
    from river.runtime.generate import GenerationConfig, Generator

    lowered, portable = (OrtBackend(smol_onnx, threads=2, lowering=lo) for lo in ("ort", "portable"))
    ops = [n.op_type for n in load_onnx_header(lowered.decode_path).graph.node]
    assert ops.count("Q41MatMul") == 4 * smol.config.num_layers
    assert ops.count("Q80MatMul") == 1 and "If" not in ops  # the head: exact, no greedy form needed
    tok = TextTokenizer(smol_onnx.parent)
    for prompt, cfg in (("What is a river delta?", GenerationConfig(max_new_tokens=32, eos_token_ids=[])),
                        ("Write a haiku about the sea.", GenerationConfig(max_new_tokens=32, eos_token_ids=[],
                                                                          temperature=0.8, seed=5))):
        a, b = (Generator(backend, tok).generate(prompt, cfg).token_ids for backend in (lowered, portable))
        assert a == b
