"""The chained River layout: the same River step as ``river_graph``, with one top-level ``If`` per
layer group instead of ``If`` nodes nested gate by gate.

Why: TensorRT-RTX 1.7 parses nested ``If`` nodes but its builder (Myelin) fails on any nesting
(``MyelinCheckException ... CHECK(i < op->input_size())``), even on a two-level toy graph, while a
sequence of top-level conditionals builds. The nested layout stays the ONNX Runtime form (DESIGN 4);
this one is the fused form TensorRT engines are built from.

Layers are grouped by the gates: group 0 = layers 0..g_0 (backbone, always runs, then gate 0),
group k = layers g_{k-1}+1..g_k (g_G = L-1). For k >= 1 an ``If(exited)`` runs either the twins of
group k (then: the token already left the backbone) or the backbone of group k followed by gate k
(else). ``exited`` accumulates the gates that fired; the final norm and head run once, on whatever
stream comes out. A token that exits at gate k runs twins of layers g_k+1..L-1 and the head: exactly
the nested layout's river k, so both layouts compute the same values (the tests check this).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from river.compiler.graph_io import hoist_initializers
from river.compiler.river_pass import (
    EXIT_LAYER,
    THRESHOLDS,
    RiverSpec,
    _complete_types,
    _copy_metadata,
    default_thresholds,
    is_quantized_weight,
    prepare,
)
from river.compiler.structure import Block
from river.export.contract import LOGITS, present_name

LAYOUT_KEY = "river.layout"


def _kv_names(layers) -> list[str]:
    return [present_name(l, k) for l in layers for k in ("key", "value")]


def chained_river_graph(model: onnx.ModelProto, spec: RiverSpec) -> onnx.ModelProto:
    """The chained River graph of a contract step graph: inputs and outputs exactly as ``river_graph``."""
    b, thresholds, batch_node, model = prepare(model, spec)
    s, graph = b.s, b.s.graph
    blocks, L, gates, outputs = s.blocks, s.num_layers, list(spec.gates), b.outputs
    G = len(gates)
    hidden_shape = ["batch_size", "sequence_length", int(s.embedding.inputs[0].shape[1])]
    i64 = lambda name, v: gs.Constant(name, np.asarray(v, np.int64))

    def var(name, dtype, shape):
        return gs.Variable(name, dtype=dtype, shape=shape)

    nodes = [n for blk in blocks[:gates[0] + 1] for n in blk.nodes]
    gate_nodes, cond = b.gate(0, blocks[gates[0]], thresholds)
    nodes += gate_nodes
    stream = blocks[gates[0]].output
    stream.dtype, stream.shape = np.float32, hidden_shape
    exited = cond
    exit_value = var("/river/chain/exit_value0", np.int64, [])
    nodes.append(gs.Node("Where", "/river/chain/exit_value0", {}, [cond, i64("/river/chain/at0", gates[0] + 1),
                                                                   i64("/river/chain/none", L)], [exit_value]))
    presents = {n: outputs[n] for n in _kv_names(range(gates[0] + 1))}

    for k in range(1, G + 1):
        lo, hi = gates[k - 1] + 1, (gates[k] if k < G else L - 1)
        kv_names = _kv_names(range(lo, hi + 1))
        # then: the twins of this group (the token left the backbone at an earlier gate)
        t_map: dict[int, gs.Tensor] = {}
        then_nodes, t_stream = [], stream
        for l in range(lo, hi + 1):
            blk = blocks[l]
            if spec.kind == "kv":  # K/V of the exit state; the stream itself stays the exit state
                t_map[id(blk.input)] = stream
                then_nodes += b.clone(blk.kv_nodes(outputs), t_map, f"twin{k}")
                continue
            t_map[id(blk.input)] = t_stream
            if spec.kind == "attn":
                mlp = {id(n) for n in blk.mlp_nodes()}
                then_nodes += b.clone([n for n in blk.nodes if id(n) not in mlp], t_map, f"twin{k}")
                t_stream = t_map[id(blk.mid)]
                t_map[id(blk.output)] = t_stream
            else:
                then_nodes += b.clone(blk.nodes, t_map, f"twin{k}")
                t_stream = t_map[id(blk.output)]
        no_exit = gs.Constant(f"/river/chain/no_exit{k}", np.array(False))
        then_outs = [t_stream] + [t_map[id(outputs[n])] for n in kv_names] + [no_exit]
        # else: the backbone of this group, then its gate
        e_map: dict[int, gs.Tensor] = {id(blocks[lo].input): stream}
        else_nodes = b.clone([n for blk in blocks[lo:hi + 1] for n in blk.nodes], e_map, f"backbone{k}", twin=False)
        e_stream = e_map[id(blocks[hi].output)]
        if k < G:
            proxy = Block(hi, e_map[id(blocks[hi].input)], e_map[id(blocks[hi].mid)], e_stream)
            g_nodes, fired = b.gate(k, proxy, thresholds)
            else_nodes += g_nodes
        else:
            fired = gs.Constant(f"/river/chain/no_gate{k}", np.array(False))
        else_outs = [e_stream] + [e_map[id(outputs[n])] for n in kv_names] + [fired]
        for t in (t_stream, e_stream):
            t.dtype, t.shape = np.float32, hidden_shape
        then_graph = b._branch(then_nodes, then_outs, f"twins{k}")
        else_graph = b._branch(else_nodes, else_outs, f"backbone{k}")
        if_outs = [var(f"/river/chain/hidden{k}", np.float32, hidden_shape)]
        if_outs += [var(f"{n}@chain{k}", outputs[n].dtype, outputs[n].shape) for n in kv_names]
        if_outs += [var(f"/river/chain/fired{k}", np.bool_, [])]
        nodes.append(gs.Node("If", f"/river/group{k}/If", {"then_branch": then_graph, "else_branch": else_graph},
                             [exited], if_outs))
        stream = if_outs[0]
        presents.update(zip(kv_names, if_outs[1:-1]))
        if k < G:
            now, value = var(f"/river/chain/exited{k}", np.bool_, []), var(f"/river/chain/exit_value{k}", np.int64, [])
            nodes.append(gs.Node("Or", f"/river/chain/exited{k}", {}, [exited, if_outs[-1]], [now]))
            nodes.append(gs.Node("Where", f"/river/chain/exit_value{k}", {},
                                 [if_outs[-1], i64(f"/river/chain/at{k}", gates[k] + 1), exit_value], [value]))
            exited, exit_value = now, value

    h_map = {id(s.final_hidden): stream}
    nodes += b.clone(list(s.head), h_map, "head", twin=False)
    exit_layer = var(EXIT_LAYER, np.int64, ["batch_size"])
    nodes.append(gs.Node("Expand", "/river/chain/exit_layer", {}, [exit_value, b.batch], [exit_layer]))

    for old in graph.outputs:
        old.name = f"{old.name}@backbone"
    final = [(LOGITS, h_map[id(outputs[LOGITS])])] + [(n, presents[n]) for n in _kv_names(range(L))]
    for name, t in final:
        t.name = name
    graph.nodes = list(s.prologue) + [batch_node] + nodes
    graph.inputs.append(thresholds)
    graph.outputs = [t for _, t in final] + [exit_layer]
    graph.cleanup().toposort()
    result = hoist_initializers(gs.export_onnx(graph, do_type_check=False), keep_local=is_quantized_weight)
    result.graph.initializer.append(onnx.numpy_helper.from_array(default_thresholds(spec), THRESHOLDS))
    _copy_metadata(model, result, spec)
    result.metadata_props.append(onnx.StringStringEntryProto(key=LAYOUT_KEY, value="chained"))
    _complete_types(result, model)
    return result
