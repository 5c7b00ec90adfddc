"""The nested River layout (the ONNX Runtime form, DESIGN section 4): after each gate layer g a
similarity gate and an ONNX ``If``:

- then-branch, the *exit river*: twins of layers g+1..L-1 from the exit state, each writing
  ``present.{l}`` (the KV share), then the final norm and head;
- else-branch: the backbone continues to the next gate (the next, nested ``If``) or to the head.

Inputs: the step graph's plus ``exit_thresholds`` [G] (a graph input with a same-named initializer as
its default). Outputs: the step graph's plus ``exit_layer`` [B] int64 (backbone layers run; L when the
token never exited). Twins reference the outer graph's weights (fp32 twins duplicate nothing;
quantized twins add one quantized copy per layer, shared by every gate's river).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from river.compiler.river.builder import Builder, prepare
from river.compiler.river.gate import gate
from river.compiler.river.manifest import EXIT_LAYER
from river.compiler.river.spec import RiverSpec
from river.compiler.river.twins import build_twins
from river.export.contract import LOGITS, present_name


def kv_names(layers) -> list[str]:
    return [present_name(l, k) for l in layers for k in ("key", "value")]


def exit_river(b: Builder, gi: int, g: int) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """River ``gi``: twins of layers g+1..L-1 from the exit state after layer ``g``, then the head.
    Outputs: logits, the twins' presents, exit_layer (= g + 1)."""
    tag = f"river{gi}"
    L, h_exit = b.s.num_layers, b.s.blocks[g].output
    twins = build_twins(b, b.spec.kind, range(g + 1, L), h_exit, h_exit, tag)
    head_nodes, logits = b.head(twins.stream, tag)
    node, exit_out = b.exit_layer(g + 1, tag)
    outs = [logits] + [twins.presents[n] for n in kv_names(range(g + 1, L))] + [exit_out]
    return twins.nodes + head_nodes + [node], outs


def _tail(b: Builder, gi: int, start: int) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """Nodes from layer ``start`` on; outputs: logits, presents of layers >= start, exit_layer."""
    blocks, L, gates = b.s.blocks, b.s.num_layers, b.spec.gates
    if gi == len(gates):
        nodes = [n for blk in blocks[start:] for n in blk.nodes] + list(b.s.head)
        node, exit_out = b.exit_layer(L, "backbone")
        outs = [b.outputs[LOGITS]] + [b.outputs[n] for n in kv_names(range(start, L))]
        return nodes + [node], outs + [exit_out]
    g = gates[gi]
    nodes = [n for blk in blocks[start:g + 1] for n in blk.nodes]
    gt = gate(gi, blocks[g].input, blocks[g].output, b.thresholds)
    nodes += gt.nodes
    then_nodes, then_outs = exit_river(b, gi, g)
    else_nodes, else_outs = _tail(b, gi + 1, g + 1)
    names = [LOGITS] + kv_names(range(g + 1, L)) + [EXIT_LAYER]
    if_outs = [gs.Variable(f"{n}@if{gi}", dtype=t.dtype, shape=None) for n, t in zip(names, then_outs)]
    nodes.append(gs.Node("If", f"/river/gate{gi}/If", {"then_branch": b.branch(then_nodes, then_outs, f"river{gi}"),
                                                       "else_branch": b.branch(else_nodes, else_outs, f"backbone{gi}")},
                         [gt.exit], if_outs))
    outs = [if_outs[0]] + [b.outputs[n] for n in kv_names(range(start, g + 1))] + if_outs[1:]
    return nodes, outs


def river_graph(model: onnx.ModelProto, spec: RiverSpec) -> onnx.ModelProto:
    """The nested River graph of a contract step graph (see module docstring)."""
    p = prepare(model, spec)
    b, L = p.builder, p.builder.s.num_layers
    nodes, outs = _tail(b, 0, 0)
    names = [LOGITS] + kv_names(range(L)) + [EXIT_LAYER]
    return b.finish(p.model, nodes, list(zip(names, outs)), "nested")
