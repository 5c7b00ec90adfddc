"""Grid weights (compiler/lowering/grid_weights.py): a weight on a 4-bit grid per block (Q4_1,
dequantized) is computed in fp32 from its 4-bit form and equals the fp32 product; other weights stay."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from river.compiler.graph_io import load_onnx, load_onnx_header, walk_nodes
from river.compiler.lowering import grid_weights
from river.runtime.ort_backend import OrtBackend
from tests_helpers import on_grid


def test_grid_weight_is_found_and_computed_exactly():
    rng = np.random.default_rng(0)
    w = on_grid(rng.standard_normal((96, 40)).astype(np.float32) * 0.1, rng)
    assert grid_weights.grid_of(w) is not None
    assert grid_weights.grid_of(w + rng.standard_normal(w.shape).astype(np.float32) * 1e-3) is None  # off the grid
    assert grid_weights.grid_of(w[:80]) is None  # not whole blocks
    x = gs.Variable("x", np.float32, ["B", "S", 96])
    y = gs.Variable("y", np.float32, ["B", "S", 40])
    other = gs.Variable("z", np.float32, ["B", "S", 40])
    graph = gs.Graph(nodes=[gs.Node("MatMul", "grid", {}, [x, gs.Constant("w", w)], [y]),
                            gs.Node("MatMul", "plain", {}, [x, gs.Constant("v", w + rng.standard_normal(w.shape).astype(np.float32) * 1e-3)], [other])],
                     inputs=[x], outputs=[y, other], opset=21)
    assert grid_weights.rewrite(graph) == 1  # the off-grid weight stays an fp32 MatMul
    ops = [n.op for n in graph.nodes]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 3  # plain, block sums, offsets
    model = gs.export_onnx(graph)
    model.opset_import.add(domain="com.microsoft", version=1)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    xs = rng.standard_normal((2, 3, 96)).astype(np.float32)
    got = sess.run(["y"], {"x": xs})[0]
    np.testing.assert_allclose(got, xs @ w, rtol=0, atol=1e-5 * np.abs(xs @ w).max())


def test_tiny_on_grid_lowered_equals_portable(tiny, tiny_on_grid):
    from test_ort_lowering import _assert_same_steps

    grid, portable = (OrtBackend(tiny_on_grid, threads=1, lowering=lo) for lo in ("ort-grid", "portable"))
    assert grid.lowering == "ort_fused"
    ops = [n.op_type for n in load_onnx_header(grid.decode_path).graph.node]
    assert ops.count("MatMulNBits") == 4 * tiny.config.num_layers  # packed qkv, o, gate|up, down
    _assert_same_steps(grid, portable, tiny.config.vocab_size)
    assert grid.grid_weights == 4 * tiny.config.num_layers and grid.grid_form == "nbits"


def test_without_river_ops_grid_weights_run_fp32_and_the_cli_says_why(tiny_onnx, tiny_on_grid, capsys, monkeypatch):
    """No ops library (no compiler here, or another CPU): the default lowering leaves grid weights as
    fp32 MatMuls and counts them, and river-generate says why and what would run them from their form."""
    from river.compiler import ort_ops
    from river.runtime import cli as generate_cli

    monkeypatch.setattr(ort_ops, "status", lambda: (None, "River's ONNX Runtime ops are not built (run `x`)"))
    plain = OrtBackend(tiny_on_grid, threads=1)
    ops = [n.op_type for n in load_onnx_header(plain.decode_path).graph.node]
    assert "MatMulNBits" not in ops and "Q41MatMul" not in ops
    assert plain.grid_weights == 4 * plain.contract.num_layers and plain.grid_form == "fp32"
    said = {}
    for name, path, lowering in (("grid", tiny_on_grid, "ort"), ("fp32", tiny_onnx, "ort"), ("asked", tiny_on_grid, "ort-grid"),
                                 ("int8", tiny_on_grid, "ort-int8")):
        assert generate_cli.main(["hello", "--model", str(path), "--max-new-tokens", "4", "--threads", "1",
                                  "--lowering", lowering]) == 0
        said[name] = capsys.readouterr().err
    assert "lie on a 4-bit grid" in said["grid"] and "ops are not built" in said["grid"]
    assert "ops are not built" in said["int8"] and "lossy" not in said["int8"]  # exact fp32 without the ops
    assert "4-bit grid" not in said["fp32"] and "4-bit grid" not in said["asked"]
    assert OrtBackend(tiny_onnx, threads=1).grid_weights == 0


def test_river_graph_on_grid_lowered_equals_portable_under_every_exit(tiny, tiny_on_grid, tmp_path):
    """A River graph of a grid model: the backbone's weights inside the If branches run from their 4-bit
    form; the twins (already quantized) stay as they are; every exit pattern equals the portable graph."""
    from river.compiler.compile import compile_river
    from river.compiler.river.manifest import DISABLED
    from test_ort_lowering import _assert_same_steps

    river = compile_river(tiny_on_grid, tmp_path / "river", gates="0,2", river="int8", log=None)
    grid, portable = (OrtBackend(river, threads=1, lowering=lo) for lo in ("ort-grid", "portable"))
    assert grid.lowering == "ort_fused", grid.lowering_reason
    lowered = load_onnx(grid.decode_path)
    ops = [n.op_type for n in walk_nodes(lowered.graph)]
    twins = [n for n in walk_nodes(lowered.graph) if n.op_type == "MatMulNBits" and "@q41" not in n.input[1]]
    assert ops.count("MatMulNBits") - len(twins) >= 4 * tiny.config.num_layers  # every backbone layer's products
    assert twins and all(dict((a.name, a.i) for a in n.attribute)["bits"] == 8 for n in twins)
    patterns = [[-2, DISABLED], [DISABLED, -2], [DISABLED, DISABLED], [-2, -2]]
    _assert_same_steps(grid, portable, tiny.config.vocab_size, thresholds=patterns)


def test_river_segments_on_grid_lowered_equal_portable(tiny, tiny_on_grid, tmp_path):
    """The segmented River under ort-grid: backbone segments run their weights from the 4-bit form, and
    greedy generation under every exit pattern equals the portable segments' (tokens and exits)."""
    from river.compiler.compile import compile_river
    from river.compiler.river.manifest import DISABLED
    from river.compiler.river.segments import write_segments
    from river.compiler.river.spec import RiverSpec
    from river.runtime.segmented_backend import SegmentedBackend
    from tests_helpers import assert_same_generation

    river = compile_river(tiny_on_grid, tmp_path / "river", gates="0,2", river="int8", log=None)
    write_segments(tiny_on_grid, RiverSpec.from_manifest(river.parent), river.parent / "segments")
    grid, portable = (SegmentedBackend(river.parent / "segments", threads=1, lowering=lo) for lo in ("ort-grid", "portable"))
    assert (grid.lowering, grid.lowering_reason) == ("ort_fused", "")
    backbone = load_onnx_header(grid._lowered["backbone1"])
    assert any(n.op_type == "MatMulNBits" and "@q41" in n.input[1] for n in backbone.graph.node)
    assert_same_generation((grid, portable), tiny.tokenizer, ([-2, DISABLED], [DISABLED, -2], [DISABLED, DISABLED]))


@pytest.mark.slow
def test_smollm2_grid_lowering(smol, smol_onnx):
    """The real model: its 210 layer weights are Q4_1 (all rewritten); every layer's K/V and the logits
    within 1e-4 plus 1e-5 of their largest value of the portable graph's (fp32 sums of the same terms
    in another order), and the same greedy tokens."""
    from river.runtime.generate import GenerationConfig, Generator
    from river.models.tokenizer import TextTokenizer

    grid, portable = (OrtBackend(smol_onnx, threads=2, lowering=lo) for lo in ("ort-grid", "portable"))
    ops = [n.op_type for n in load_onnx_header(grid.decode_path).graph.node]
    assert ops.count("MatMulNBits") == 4 * smol.config.num_layers  # packed qkv, o, gate|up, down
    rng = np.random.default_rng(0)
    caches = [b.new_cache(32) for b in (grid, portable)]
    for s, back in [(6, 0), (3, 0), (1, 0), (4, 2), (1, 0)]:
        tokens = rng.integers(1, smol.config.vocab_size, (1, s)).astype(np.int64)
        outs = []
        for backend, cache in zip((grid, portable), caches):
            cache.truncate(cache.length - back)
            outs.append(np.array(backend.extend(tokens, cache)))
            cache.length += s
        np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5 * np.abs(outs[1]).max() + 1e-4)
        n = caches[0].length
        for a, b in zip(caches[0].buffers(), caches[1].buffers()):
            np.testing.assert_allclose(a[:, :, :n], b[:, :, :n], rtol=0, atol=1e-5 * np.abs(b[:, :, :n]).max() + 1e-4)
    tok = TextTokenizer(smol_onnx.parent)
    cfg = GenerationConfig(max_new_tokens=32, eos_token_ids=[])
    for prompt in ("What is a river delta?", "Write a haiku about the sea."):
        a, b = (Generator(backend, tok).generate(prompt, cfg).token_ids for backend in (grid, portable))
        assert a == b
