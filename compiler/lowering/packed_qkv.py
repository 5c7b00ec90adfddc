"""Rewrite: the three projections a fused attention reads -> one product over packed weights.

``GroupQueryAttention(q_proj(x), k_proj(x), v_proj(x), ...)`` computes three GEMVs a decode step, two of
them narrow (the KV heads); ONNX Runtime's op also takes the projections packed, ``[q | k | v]`` in one
tensor with key and value left out, so one product over ``concat(Wq, Wk, Wv)`` does the work of three
(the same floats: each output column is the same dot product).

Applies to projections with constant weights - fp32 ``MatMul``, or ``MatMulNBits`` alike in bits, block
and accuracy (the draft's and the River's twins) - over one shared input and no other reader (``check``
says why not).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from river.compiler.lowering.packed_matmuls import packed_product, signature


def _projection(t: gs.Tensor) -> tuple[gs.Node | None, str | None]:
    node = t.inputs[0] if len(t.inputs) == 1 else None
    if node is None or node.op not in ("MatMul", "MatMulNBits"):
        return None, f"'{t.name}' is not made by a MatMul or MatMulNBits"
    if signature(node) is None:
        return None, f"'{node.name}' has no constant weights"
    if len(t.outputs) != 1:
        return None, f"'{t.name}' has other readers"
    return node, None


def _match(attention: gs.Node) -> tuple[list[gs.Node] | None, str | None]:
    if attention.op != "GroupQueryAttention" or len(attention.inputs) < 3:
        return None, "not a GroupQueryAttention with separate query, key and value"
    if any(t.name == "" for t in attention.inputs[:3]):
        return None, "already packed"
    nodes = []
    for t in attention.inputs[:3]:
        node, why = _projection(t)
        if why:
            return None, why
        nodes.append(node)
    if len({id(n.inputs[0]) for n in nodes}) != 1:
        return None, "the projections read different inputs"
    if len({signature(n) for n in nodes}) != 1:
        return None, "the projections differ in weight type or quantization"
    return nodes, None


def check(attention: gs.Node) -> str | None:
    """Why the projections of ``attention`` are not packed (None: they are packable)."""
    return _match(attention)[1]


def pack_qkv(g: gs.Graph, attention: gs.Node) -> bool:
    """Pack ``attention``'s projections in place in ``g``; whether it did."""
    nodes, _why = _match(attention)
    if nodes is None:
        return False
    packed = packed_product(g, nodes, f"{attention.name}/qkv")
    rest = list(attention.inputs[3:])
    for n in nodes:
        n.outputs = []
    attention.inputs = [packed, gs.Variable.empty(), gs.Variable.empty(), *rest]
    return True
