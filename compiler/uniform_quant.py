"""Pass: quantize every weight MatMul of a step graph (no exits) - the honest competitor to River.

Uses the very same twin operators as the river (ORT flavour: dynamic int8 / MatMulNBits int4; dq
flavour: block DequantizeLinear), so River and uniform quantization differ only in where they apply.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from river.compiler.graph_io import hoist_initializers
from river.compiler.river_pass import RIVER_OPSET, RiverSpec, _Builder, _default_opset, _walk_nodes
from river.compiler.structure import discover
from river.export.contract import StepContract


def uniform_quantized(model: onnx.ModelProto, precision: str = "int8", flavour: str = "ort", block: int = 64,
                      include_head: bool = True) -> onnx.ModelProto:
    contract = StepContract.from_model(model)
    if _default_opset(model) < RIVER_OPSET:
        model = version_converter.convert_version(model, RIVER_OPSET)
    graph = gs.import_onnx(model)
    structure = discover(graph, contract)
    builder = _Builder(structure, RiverSpec((0,), "full", precision, block, None, flavour))
    targets = [n for b in structure.blocks for n in b.nodes] + (list(structure.head) if include_head else [])
    for node in targets:
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant) or not builder.quantizable(weight):
            continue
        a, out = node.inputs[0], node.outputs[0]
        node.outputs = []
        node.inputs = []
        graph.nodes += builder.twin_matmul(node, a, weight, "uniform", out)
    graph.cleanup().toposort()
    result = hoist_initializers(gs.export_onnx(graph, do_type_check=False))
    if any(n.domain == "com.microsoft" for n in _walk_nodes(result.graph)):
        result.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    props = {p.key: p.value for p in model.metadata_props} | {"river.uniform": f"{precision}/{flavour}"}
    onnx.helper.set_model_props(result, props)
    return result
