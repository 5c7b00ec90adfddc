"""Pass: make a step graph write its KV cache in place (shared KV buffers).

A contract graph (DESIGN 3) builds ``present = Concat(past, new)``: every step copies the whole cache.
This pass replaces each such Concat with ``TensorScatter(past, new, write_indices)`` (ONNX opset 24).
``past_key_values.*`` then *are* the runtime's preallocated buffers [B,Hkv,C,D] (C = capacity), the
new K/V land at ``write_indices`` (per row, the number of valid positions), and ``present.*`` is the
same buffer. ONNX Runtime writes in place when the output is bound to the input's memory, so a decode
step touches only the new positions.

Semantics of the rewritten graph: ``attention_mask`` is [B,C] with 1 for every valid position
*including* the new ones; the new tokens are the last S query positions of the mask. This is exact for
decode steps (S = 1): the causal rule "key j <= C-1" admits every slot and the mask selects the valid
ones. Steps with S > 1 over a non-empty cache need a causal mask by position and are not served by
this form; the runtime prefills with the contract graph.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import version_converter

from river.errors import NotADecoderGraph
from river.export.contract import StepContract, past_name, present_name

WRITE_INDICES = "write_indices"
TENSOR_SCATTER_OPSET = 24


def check(model: onnx.ModelProto) -> list[str]:
    """Why the pass cannot apply (empty when it can): every present must be Concat(past, new) on axis 2."""
    contract = StepContract.from_model(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    problems = []
    for layer in range(contract.num_layers):
        for kind in ("key", "value"):
            node = producers.get(present_name(layer, kind))
            if node is None or node.op_type != "Concat":
                problems.append(f"{present_name(layer, kind)} is not produced by a Concat")
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            if axis not in (2, -2) or len(node.input) != 2 or node.input[0] != past_name(layer, kind):
                problems.append(f"{node.name}: expected Concat({past_name(layer, kind)}, new, axis=2)")
    return problems


def to_shared_kv(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return the shared-KV (in-place) form of a contract step graph."""
    problems = check(model)
    if problems:
        raise NotADecoderGraph("cannot make the KV cache shared: " + "; ".join(problems[:3]))
    contract = StepContract.from_model(model)
    if _default_opset(model) < TENSOR_SCATTER_OPSET:
        model = version_converter.convert_version(model, TENSOR_SCATTER_OPSET)
    irm = ir.serde.deserialize_model(model)
    graph = irm.graph
    batch = graph.inputs[0].shape[0] if graph.inputs[0].shape is not None else "batch_size"
    write_indices = ir.Value(name=WRITE_INDICES, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch]))
    graph.inputs.append(write_indices)
    outputs = {v.name: v for v in graph.outputs}
    for layer in range(contract.num_layers):
        for kind in ("key", "value"):
            old = outputs[present_name(layer, kind)]
            concat = old.producer()
            past, new = concat.inputs
            scatter = ir.Node("", "TensorScatter", [past, new, write_indices], [ir.AttrInt64("axis", 2)],
                              name=concat.name + "/shared_kv", num_outputs=1)
            graph.insert_after(concat, scatter)
            out = scatter.outputs[0]
            out.type, out.shape = past.type, past.shape
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(concat, safe=True)
            out.name = present_name(layer, kind)
    graph.sort()
    result = ir.serde.serialize_model(irm)
    return result


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
