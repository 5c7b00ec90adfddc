"""Structure discovery on real exported graphs: ours (TorchScript), Optimum, and torch dynamo."""

from __future__ import annotations

import onnx
import pytest

from river.compiler.structure import discover_model
from river.errors import NotADecoderGraph
from river.export.contract import present_name


def assert_structure(path, layers):
    s = discover_model(onnx.load(str(path)))
    assert s.num_layers == layers
    assert s.embedding.op == "Gather"
    outputs = {t.name: t for t in s.graph.outputs}
    for b in s.blocks:
        assert b.nodes, f"block {b.index} is empty"
        # the block's presents come from its own nodes, and its residual Adds close the block
        for kind in ("key", "value"):
            assert any(outputs[present_name(b.index, kind)].inputs[0] is n for n in b.nodes)
        assert b.output.inputs[0].op == "Add" and b.mid.inputs[0].op == "Add"
        assert b.mlp_nodes() and all(any(n is m for m in b.nodes) for n in b.mlp_nodes())
        assert 0 < len(b.kv_nodes(outputs)) < len(b.nodes)
    for i in range(1, layers):
        assert s.blocks[i].input is s.blocks[i - 1].output  # blocks chain on the residual stream
    assert any(n.op == "MatMul" for n in s.head)
    return s


def test_our_export(tiny_onnx):
    s = assert_structure(tiny_onnx, 4)
    assert "node-name scopes agree" in s.how


def test_optimum_export(tiny_optimum_onnx):
    assert_structure(tiny_optimum_onnx, 4)


def test_dynamo_export(tiny_dynamo_onnx):
    assert_structure(tiny_dynamo_onnx, 4)


@pytest.mark.slow
def test_smollm2_our_export_and_optimum(smol_onnx, smol_optimum_onnx):
    assert_structure(smol_onnx, 30)
    assert_structure(smol_optimum_onnx, 30)


def test_graph_without_residual_chain_is_refused(tiny_onnx):
    model = onnx.load(str(tiny_onnx))
    for node in model.graph.node:  # break the residual: the MLP Add of layer 1 becomes a Mul
        if node.name == "/model/layers.1/Add_1":
            node.op_type = "Mul"
    with pytest.raises(NotADecoderGraph, match=r"no residual chain of 8 Adds \(sequential blocks\) or 4 \(parallel blocks\) found .*\(found 3\)"):
        discover_model(model)


def test_graph_without_embedding_is_refused(tiny_onnx):
    model = onnx.load(str(tiny_onnx))
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == "input_ids":
            node.op_type = "GatherElements"
    with pytest.raises(NotADecoderGraph, match="no embedding found"):
        discover_model(model)
