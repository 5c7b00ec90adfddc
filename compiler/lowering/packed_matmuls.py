"""Rewrite: sibling products over one input -> one product over packed weights, then a Split.

A gated MLP computes ``gate = x @ Wg`` and ``up = x @ Wu`` from the same ``x``: two GEMVs a decode step.
One product over ``concat(Wg, Wu)`` followed by a ``Split`` computes the same floats (each output
column is the same dot product) in one kernel call with twice the columns to share among the threads
(SmolLM2, 2 threads: ~4% per decode step, measured with the lowered graph).

Products: fp32 ``MatMul`` with a constant 2-D weight, and ``MatMulNBits`` (the draft's twins) whose
constants are packed row by row of the output (B [N, blocks, blob], scales and zero points per row), so
its packed form stacks the rows. Siblings read the same tensor and agree on everything but N (``groups``
finds them); ``packed_product`` is shared with ``packed_qkv.py``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

NBITS_ROW_INPUTS = (1, 2, 3)  # MatMulNBits' B, scales, zero_points: one slice per output row


def constant_weight(node: gs.Node) -> np.ndarray | None:
    """The constant 2-D weight of a ``MatMul``, else None."""
    if node.op != "MatMul" or len(node.inputs) != 2 or not node.outputs or not isinstance(node.inputs[1], gs.Constant):
        return None
    w = node.inputs[1].values
    return w if w.ndim == 2 else None


def _nbits_rows(node: gs.Node) -> list[np.ndarray] | None:
    """A MatMulNBits' per-row constants (B, scales, zero points), each [N, ...]; None if not packable."""
    if node.op != "MatMulNBits" or not node.outputs or len(node.inputs) > 4:
        return None
    n = int(node.attrs["N"])
    parts = [node.inputs[i] for i in NBITS_ROW_INPUTS if i < len(node.inputs)]
    if not all(isinstance(t, gs.Constant) for t in parts):
        return None
    return [t.values.reshape(n, -1) for t in parts]


def signature(node: gs.Node) -> tuple | None:
    """What siblings must share to be packed together (None: this node is not a packable product)."""
    w = constant_weight(node)
    if w is not None:
        return ("MatMul", w.dtype.str, w.shape[0])
    rows = _nbits_rows(node)
    if rows is not None:
        attrs = tuple(sorted((k, v) for k, v in node.attrs.items() if k != "N"))
        return ("MatMulNBits", attrs, tuple((r.dtype.str, r.shape[1]) for r in rows))
    return None


def width(node: gs.Node) -> int:
    """N: the output columns of a packable product."""
    return int(node.attrs["N"]) if node.op == "MatMulNBits" else constant_weight(node).shape[1]


def packed_product(g: gs.Graph, nodes: list[gs.Node], name: str) -> gs.Variable:
    """One product in ``g`` over ``nodes``' shared input and their weights side by side; its output.

    The packed constants are named after the first weight (a River's backbone layer and its twins
    share the node names, not the weights; the twins' names keep the builder's ``@q`` mark, so they
    stay local to their branch, where ONNX Runtime prepacks them)."""
    out = gs.Variable(f"{name}/packed", dtype=nodes[0].outputs[0].dtype)
    first = nodes[0]
    weight_name = first.inputs[1].name
    if first.op == "MatMul":
        weight = np.ascontiguousarray(np.concatenate([constant_weight(n) for n in nodes], axis=1))
        g.nodes.append(gs.Node("MatMul", f"{name}/packed_product", {},
                               [first.inputs[0], gs.Constant(f"{weight_name}/packed", weight)], [out]))
        return out
    n = sum(width(node) for node in nodes)
    stacked = [np.concatenate(rows, axis=0) for rows in zip(*(_nbits_rows(node) for node in nodes))]
    shapes = [first.inputs[i].values.shape for i in NBITS_ROW_INPUTS if i < len(first.inputs)]
    constants = [gs.Constant(f"{weight_name}/packed_{i}", np.ascontiguousarray(
        rows.reshape((n, *shape[1:]) if len(shape) > 1 else (-1,))))
        for i, (rows, shape) in enumerate(zip(stacked, shapes))]
    g.nodes.append(gs.Node("MatMulNBits", f"{name}/packed_product", {**first.attrs, "N": n},
                           [first.inputs[0], *constants], [out], domain=first.domain))
    return out


def groups(g: gs.Graph) -> list[list[gs.Node]]:
    """Products of ``g`` that can be packed: two or more with one signature reading the same tensor."""
    by_key: dict[tuple, list[gs.Node]] = {}
    for node in g.nodes:
        sig = signature(node)
        if sig is not None:
            by_key.setdefault((id(node.inputs[0]), sig), []).append(node)
    return [nodes for nodes in by_key.values() if len(nodes) > 1]


def pack_siblings(g: gs.Graph, nodes: list[gs.Node]) -> None:
    """Replace ``nodes`` (one of ``groups(g)``) by one packed product and a Split into their outputs."""
    sizes = np.array([width(n) for n in nodes], np.int64)
    packed = packed_product(g, nodes, nodes[0].name)
    outs = [n.outputs[0] for n in nodes]
    for n in nodes:
        n.outputs = []
    g.nodes.append(gs.Node("Split", f"{nodes[0].name}/unpack", {"axis": -1},
                           [packed, gs.Constant(f"{nodes[0].name}/unpack_sizes", sizes)], outs))
