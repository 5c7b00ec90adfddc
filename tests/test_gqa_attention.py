"""Grouped-query attention without repeat_kv (compiler/lowering/gqa_attention.py), on real exported graphs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import river.compiler.lowering.shared_kv as shared_kv
from river.compiler.graph_io import load_onnx
from river.compiler.lowering.gqa_attention import check, matmul_input_shapes, ungroup_attention
from river.compiler.lowering.shared_kv import WRITE_INDICES
from river.compiler.ort_session import make_session


def _attention_matmuls(model):
    graph = gs.import_onnx(model)
    shapes = matmul_input_shapes(model)
    for n in graph.nodes:
        if n.op == "MatMul" and n.inputs[0].name in shapes:
            n.inputs[0].shape = shapes[n.inputs[0].name]
    return graph, [n for n in graph.nodes if n.op == "MatMul" and check(n) is None]


def test_finds_both_attention_products_of_every_layer(tiny_onnx):
    model = load_onnx(tiny_onnx)
    graph, matches = _attention_matmuls(model)
    assert len(matches) == 2 * 4  # scores and weighted values, 4 layers
    weight_gemm = next(n for n in graph.nodes if n.op == "MatMul" and isinstance(n.inputs[1], gs.Constant))
    assert check(weight_gemm) == "not Unsqueeze -> Expand -> Reshape"
    assert ungroup_attention(graph, matmul_input_shapes(model)) == 8
    graph.cleanup()
    assert not [n for n in graph.nodes if n.op == "Expand"]  # no copy of the cache left


@pytest.mark.parametrize("steps", [1, 3])
def test_shared_kv_graph_with_and_without_rewrite_agree(tiny_onnx, monkeypatch, steps):
    model = load_onnx(tiny_onnx)
    rewritten = shared_kv.to_shared_kv(model)
    monkeypatch.setattr(shared_kv, "ungroup_attention", lambda graph, shapes=None: 0)
    plain = shared_kv.to_shared_kv(model)
    assert sum(n.op_type == "Expand" for n in plain.graph.node) == 8
    assert sum(n.op_type == "Expand" for n in rewritten.graph.node) == 0
    rng = np.random.default_rng(steps)
    cap, past = 12, 5
    feeds = {"input_ids": rng.integers(0, 256, (1, steps)), "position_ids": np.arange(past, past + steps)[None],
             "attention_mask": (np.arange(cap) < past + steps).astype(np.int64)[None],
             WRITE_INDICES: np.array([past], np.int64)}
    for layer in range(4):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal((1, 2, cap, 16)).astype(np.float32)
    out_a = make_session(rewritten, threads=1).run(None, feeds)
    out_b = make_session(plain, threads=1).run(None, feeds)
    for a, b in zip(out_a, out_b):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
