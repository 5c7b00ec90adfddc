"""Pass: quantize every weight MatMul of a step graph from some layer on (no exits, no gates).

One pass, two users: the uniform baselines (every layer, with the River twins' own operators, so
River and uniform quantization differ only in where they apply) and verify mode's draft graph
(``draft_graph``: 8-bit MatMulNBits twins after the draft exit). A *quantizer* decides the
operators: ``quantizable(weight)`` and ``quantizer(node, a, weight, tag, out) -> nodes``, plus the
opset it needs (``min_opset``, None for none).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from river.compiler.graph_io import hoist_initializers, lift_opset, stamp
from river.compiler.lowering.gqa_attention import matmul_input_shapes, ungroup_attention
from river.compiler.river.builder import TwinMatMuls
from river.compiler.structure import discover
from river.export.contract import StepContract


def quantize_weights(model: onnx.ModelProto, quantizer, *, after_layer: int = -1, head: bool = True,
                     ungroup: bool = False, tag: str = "quant", props: dict[str, str] | None = None
                     ) -> tuple[onnx.ModelProto, int]:
    """The graph with the weight MatMuls of layers after ``after_layer`` (and, with ``head``, the LM
    head) replaced by ``quantizer``'s twins; returns (model, how many were replaced). ``ungroup``
    also rewrites grouped-query attention without the ``repeat_kv`` copy (``gqa_attention``)."""
    contract = StepContract.from_model(model)
    if quantizer.min_opset:
        model = lift_opset(model, quantizer.min_opset)
    shapes = matmul_input_shapes(model) if ungroup else None  # before twins: inference cannot see through them
    graph = gs.import_onnx(model)
    if ungroup:
        ungroup_attention(graph, shapes)
    structure = discover(graph, contract)
    targets = [n for b in structure.blocks[after_layer + 1:] for n in b.nodes] + (list(structure.head) if head else [])
    count = 0
    for node in targets:
        weight = node.inputs[1] if node.op == "MatMul" and len(node.inputs) == 2 else None
        if not isinstance(weight, gs.Constant) or not quantizer.quantizable(weight):
            continue
        a, out = node.inputs[0], node.outputs[0]
        node.inputs, node.outputs = [], []
        graph.nodes += quantizer(node, a, weight, tag, out)
        count += 1
    graph.cleanup().toposort()
    result = hoist_initializers(gs.export_onnx(graph, do_type_check=False))
    return stamp(result, model, props or {}), count


def uniform_quantized(model: onnx.ModelProto, precision: str = "int8", twin_format: str = "ort", block: int = 64,
                      include_head: bool = True) -> onnx.ModelProto:
    """The uniform baseline: every weight MatMul as a River twin at ``precision`` (no exits)."""
    quantizer = TwinMatMuls(precision, block, twin_format)
    result, _ = quantize_weights(model, quantizer, head=include_head, tag="uniform",
                                 props={"river.uniform": f"{precision}/{twin_format}"})
    return result
