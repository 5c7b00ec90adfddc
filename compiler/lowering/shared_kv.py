"""Pass: make a step graph (plain or River) write its KV cache in place (shared KV buffers).

A contract graph (DESIGN 3) builds ``present = Concat(past, new)``: every step copies the whole cache.
This pass replaces every such Concat, including those inside River ``If`` branches, with
``TensorScatter(past, new, write_indices)`` (ONNX opset 24). ``past_key_values.*`` then *are* the
runtime's preallocated buffers [B,Hkv,C,D] (C = capacity), the new K/V land at ``write_indices`` (per
row, the number of valid positions), and ``present.*`` is the same buffer. ONNX Runtime writes in
place when the output is bound to the input's memory (also through ``If``), so a decode step touches
only the new positions.

Semantics of the rewritten graph: ``attention_mask`` is [B,C] with 1 for every valid position
*including* the new ones. This is exact for decode steps (S = 1): the causal rule "key j <= C-1"
admits every slot and the mask selects the valid ones. For S > 1 over a non-empty cache it is exact
only when the graph masks causally by position (our exports, marked ``river.causal_mask=position``);
graphs that mask by index (Optimum's) prefill with the contract graph and run one token per step.

Attention then reads the buffers as they are: grouped-query attention's ``repeat_kv`` copy of the
whole cache is rewritten away (``gqa_attention.py``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from river.compiler.graph_io import lift_opset, rewrite_step_graph
from river.compiler.lowering.gqa_attention import matmul_input_shapes, ungroup_attention
from river.compiler.river.builder import is_quantized_weight
from river.errors import NotADecoderGraph
from river.export.contract import StepContract, past_name, present_name

SHARED_KV_FORMAT = 9  # the version of this pass's output: bump it when the output changes (cached graphs)

WRITE_INDICES = "write_indices"
TENSOR_SCATTER_OPSET = 24


def _all_nodes(graph: gs.Graph):
    return (node for g in [graph, *graph.subgraphs(recursive=True)] for node in g.nodes)


def _kv_concats(graph: gs.Graph, past: gs.Tensor) -> tuple[list[gs.Node], list[gs.Node]]:
    """(Concat(past, new, axis=2) consumers of ``past``, any other consumers)."""
    concats, others = [], []
    for node in _all_nodes(graph):
        if not any(t is past for t in node.inputs):
            continue
        if node.op == "Concat" and node.inputs[0] is past and len(node.inputs) == 2 and node.attrs.get("axis") in (2, -2):
            concats.append(node)
        else:
            others.append(node)
    return concats, others


def check(model: onnx.ModelProto) -> list[str]:
    """Why the pass cannot apply (empty when it can): each past must feed only Concat(past, new, axis=2)."""
    contract = StepContract.from_model(model)
    graph = gs.import_onnx(model)
    inputs = {t.name: t for t in graph.inputs}
    problems = []
    for layer in range(contract.num_layers):
        for kind in ("key", "value"):
            past = inputs[past_name(layer, kind)]
            concats, others = _kv_concats(graph, past)
            if not concats:
                problems.append(f"{past.name} feeds no Concat(past, new, axis=2): {present_name(layer, kind)} is not a cache concatenation")
            for node in others:
                if node.op != "Shape":  # Shape(past) is rewritten (see _virtual_past_shape)
                    problems.append(f"{past.name} is also read by {node.op} node '{node.name}'")
    return problems


def to_shared_kv(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return the shared-KV (in-place) form of a contract or River step graph."""
    problems = check(model)
    if problems:
        raise NotADecoderGraph("cannot make the KV cache shared: " + "; ".join(problems[:3]))
    contract = StepContract.from_model(model)
    return rewrite_step_graph(lift_opset(model, TENSOR_SCATTER_OPSET), lambda m: _scatter_in_place(m, contract),
                              keep_local=is_quantized_weight)


def _scatter_in_place(model: onnx.ModelProto, contract: StepContract) -> gs.Graph:
    attention_shapes = matmul_input_shapes(model)
    graph = gs.import_onnx(model)
    inputs = {t.name: t for t in graph.inputs}
    batch = graph.inputs[0].shape[0] if graph.inputs[0].shape else "batch_size"
    write_indices = gs.Variable(WRITE_INDICES, dtype=np.int64, shape=[batch])
    graph.inputs.append(write_indices)
    outputs = {t.name: t for t in graph.outputs}
    past_shape = None
    for layer in range(contract.num_layers):
        for kind in ("key", "value"):
            past = inputs[past_name(layer, kind)]
            concats, shapes = _kv_concats(graph, past)
            for node in shapes:
                if past_shape is None:
                    past_shape = _virtual_past_shape(graph, inputs, contract)
                node.op = "Slice"
                start, end = node.attrs.get("start", 0), node.attrs.get("end", 4)
                node.inputs = [past_shape, _i64(f"{node.name}/start", [start]), _i64(f"{node.name}/end", [end])]
                node.attrs = {}
            for node in concats:
                node.op = "TensorScatter"
                node.inputs.append(write_indices)
                node.attrs = {"axis": 2}
                node.name = f"{node.name}/shared_kv"
            outputs[present_name(layer, kind)].shape = list(past.shape)
    ungroup_attention(graph, attention_shapes)  # attention reads the cache in place, no repeat_kv copy
    return graph


def _i64(name, values) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, dtype=np.int64))


def _virtual_past_shape(graph: gs.Graph, inputs: dict, contract: StepContract) -> gs.Variable:
    """[B, Hkv, P, D] with P = mask length - S: what ``Shape(past)`` meant in the contract graph.

    Exports that derive the past length from ``Shape(past_key_values.*)`` (Optimum does) would see
    the buffer capacity C instead; with this P the total length P + S equals the mask's, C.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    v = lambda name: gs.Variable(f"/shared_kv/{name}", dtype=np.int64)  # noqa: E731
    ids_shape, mask_shape, batch, seq, total, past_len, shape = (
        v("ids_shape"), v("mask_shape"), v("batch"), v("seq"), v("total"), v("past_len"), v("past_shape"))
    graph.nodes += [
        gs.Node("Shape", "/shared_kv/ids_shape", {}, [ids], [ids_shape]),
        gs.Node("Shape", "/shared_kv/mask_shape", {}, [mask], [mask_shape]),
        gs.Node("Slice", "/shared_kv/batch", {}, [ids_shape, _i64("/shared_kv/c0", [0]), _i64("/shared_kv/c1", [1])], [batch]),
        gs.Node("Slice", "/shared_kv/seq", {}, [ids_shape, _i64("/shared_kv/c1b", [1]), _i64("/shared_kv/c2", [2])], [seq]),
        gs.Node("Slice", "/shared_kv/total", {}, [mask_shape, _i64("/shared_kv/c1c", [1]), _i64("/shared_kv/c2b", [2])], [total]),
        gs.Node("Sub", "/shared_kv/past_len", {}, [total, seq], [past_len]),
        gs.Node("Concat", "/shared_kv/past_shape", {"axis": 0},
                [batch, _i64("/shared_kv/heads", [contract.num_kv_heads]), past_len, _i64("/shared_kv/dim", [contract.head_dim])], [shape]),
    ]
    return shape
