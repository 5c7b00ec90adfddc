"""The chained River layout: the same River step as the nested one, with one top-level ``If`` per
layer group instead of ``If`` nodes nested gate by gate.

Why: TensorRT-RTX 1.7 parses nested ``If`` nodes but its builder (Myelin) fails on any nesting
(``MyelinCheckException ... CHECK(i < op->input_size())``), even on a two-level toy graph, while a
sequence of top-level conditionals builds. The nested layout stays the ONNX Runtime form (DESIGN 4);
this one is the fused form TensorRT engines are built from.

Layers are grouped by the gates: group 0 = layers 0..g_0 (backbone, always runs, then gate 0),
group k = layers g_{k-1}+1..g_k (g_G = L-1). For k >= 1 an ``If(exited)`` runs either the twins of
group k (then: the token already left the backbone) or the backbone of group k followed by gate k
(else). ``exited`` accumulates the gates that fired; the final norm and head run once, on whatever
stream comes out (with a quantized river head, an ``If(exited)`` picks the rivers' head or the model's).
A token that exits at gate k runs twins of layers g_k+1..L-1 and the river head: exactly the nested
layout's river k, so both layouts compute the same values (the tests check this).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from river.compiler.river.builder import prepare
from river.compiler.river.gate import gate
from river.compiler.river.manifest import EXIT_LAYER
from river.compiler.river.nested import kv_names
from river.compiler.river.spec import RiverSpec
from river.compiler.river.twins import build_twins
from river.export.contract import LOGITS


def chained_river_graph(model: onnx.ModelProto, spec: RiverSpec) -> onnx.ModelProto:
    """The chained River graph of a contract step graph: inputs and outputs exactly as ``river_graph``."""
    p = prepare(model, spec)
    b = p.builder
    blocks, L, gates, outputs = b.s.blocks, b.s.num_layers, list(spec.gates), b.outputs
    G = len(gates)
    hidden_shape = ["batch_size", "sequence_length", int(b.s.embedding.inputs[0].shape[1])]
    i64 = lambda name, v: gs.Constant(name, np.asarray(v, np.int64))  # noqa: E731
    var = lambda name, dtype, shape: gs.Variable(name, dtype=dtype, shape=shape)  # noqa: E731

    nodes = [n for blk in blocks[:gates[0] + 1] for n in blk.nodes]
    gt = gate(0, blocks[gates[0]].input, blocks[gates[0]].output, b.thresholds)
    nodes += gt.nodes
    stream = blocks[gates[0]].output
    stream.dtype, stream.shape = np.float32, hidden_shape
    exited = gt.exit
    exit_value = var("/river/chain/exit_value0", np.int64, [])
    nodes.append(gs.Node("Where", "/river/chain/exit_value0", {}, [gt.exit, i64("/river/chain/at0", gates[0] + 1),
                                                                   i64("/river/chain/none", L)], [exit_value]))
    presents = {n: outputs[n] for n in kv_names(range(gates[0] + 1))}

    for k in range(1, G + 1):
        lo, hi = gates[k - 1] + 1, (gates[k] if k < G else L - 1)
        names = kv_names(range(lo, hi + 1))
        # then: the twins of this group (the token left the backbone at an earlier gate, and the
        # stream entering the group is what its twins made of the exit state)
        twins = build_twins(b, spec.kind, range(lo, hi + 1), stream, stream, f"twin{k}")
        no_exit = gs.Constant(f"/river/chain/no_exit{k}", np.array(False))
        then_outs = [twins.stream] + [twins.presents[n] for n in names] + [no_exit]
        # else: the backbone of this group, then its gate
        e_map: dict[int, gs.Tensor] = {id(blocks[lo].input): stream}
        else_nodes = b.clone([n for blk in blocks[lo:hi + 1] for n in blk.nodes], e_map, f"backbone{k}", twin=False)
        e_stream = e_map[id(blocks[hi].output)]
        if k < G:
            gk = gate(k, e_map[id(blocks[hi].input)], e_stream, b.thresholds)
            else_nodes += gk.nodes
            fired = gk.exit
        else:
            fired = gs.Constant(f"/river/chain/no_gate{k}", np.array(False))
        else_outs = [e_stream] + [e_map[id(outputs[n])] for n in names] + [fired]
        for t in (twins.stream, e_stream):
            t.dtype, t.shape = np.float32, hidden_shape
        if_outs = [var(f"/river/chain/hidden{k}", np.float32, hidden_shape)]
        if_outs += [var(f"{n}@chain{k}", outputs[n].dtype, outputs[n].shape) for n in names]
        if_outs += [var(f"/river/chain/fired{k}", np.bool_, [])]
        nodes.append(gs.Node("If", f"/river/group{k}/If", {"then_branch": b.branch(twins.nodes, then_outs, f"twins{k}"),
                                                           "else_branch": b.branch(else_nodes, else_outs, f"backbone{k}")},
                             [exited], if_outs))
        stream = if_outs[0]
        presents.update(zip(names, if_outs[1:-1]))
        if k < G:
            now, value = var(f"/river/chain/exited{k}", np.bool_, []), var(f"/river/chain/exit_value{k}", np.int64, [])
            nodes.append(gs.Node("Or", f"/river/chain/exited{k}", {}, [exited, if_outs[-1]], [now]))
            nodes.append(gs.Node("Where", f"/river/chain/exit_value{k}", {},
                                 [if_outs[-1], i64(f"/river/chain/at{k}", gates[k] + 1), exit_value], [value]))
            exited, exit_value = now, value

    if spec.head == "fp32":  # the rivers' head is the backbone's: one head for whichever stream came out
        head_nodes, logits = b.head(stream, "head")
    else:  # a token that exited takes the rivers' quantized head, one that stayed the model's own
        logits = var(f"{LOGITS}@chain", np.float32, None)
        river_nodes, river_logits = b.head(stream, "river_head")
        own_nodes, own_logits = b.head(stream, "head", river=False)
        head_nodes = [gs.Node("If", "/river/head/If", {"then_branch": b.branch(river_nodes, [river_logits], "river_head"),
                                                       "else_branch": b.branch(own_nodes, [own_logits], "head")},
                              [exited], [logits])]
    exit_node, exit_layer = b.exit_layer(exit_value, "chain")
    nodes += head_nodes + [exit_node]
    final = [(LOGITS, logits)] + [(n, presents[n]) for n in kv_names(range(L))] + [(EXIT_LAYER, exit_layer)]
    return b.finish(p.model, nodes, final, "chained")
