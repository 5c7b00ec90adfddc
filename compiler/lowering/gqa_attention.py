"""Rewrite: grouped-query attention without ``repeat_kv`` (no per-step copy of the whole cache).

Exported Llama-style decoders repeat each KV head for its group of query heads before attention:
``Unsqueeze(kv, 2) -> Expand -> Reshape [B, H, T, D]`` (then a Transpose for the keys). Every step
that copies the *whole* cache - ``H / Hkv`` times, twice per layer - which on a small model costs
as much as several weight GEMMs and grows with the sequence. Query head ``h`` reads KV head
``h // n_rep``, so the same products come from viewing the queries as ``[B, Hkv, n_rep * S, D]``:

    scores = Reshape(MatMul(Reshape(Q, [0, Hkv, -1, D]), Transpose(K)), [0, H, -1, 0])
    output = Reshape(MatMul(Reshape(P, [0, Hkv, -1, 0]), V), [0, H, -1, 0])

Each score is the same dot product as before; only the batching of the GEMM changes. The reshapes
are views of contiguous tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from river.compiler.graph_io import walk_graphs, walk_nodes
from river.compiler.lowering.patterns import constant_values, producer


def _int_list(t) -> list[int] | None:
    """The integers a Constant (initializer or Constant node output) holds."""
    values = constant_values(t)
    return None if values is None else [int(x) for x in np.ravel(values)]


def _repeated_kv(t: gs.Tensor) -> tuple[gs.Tensor | None, str | None]:
    """(the unrepeated KV tensor [B,Hkv,T,D], None) behind ``t``, or (None, why not)."""
    reshape = producer(t, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsqueeze is None:
        return None, "not Unsqueeze -> Expand -> Reshape"
    axes = _int_list(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else unsqueeze.attrs.get("axes")
    if list(axes or []) != [2]:
        return None, f"repeat axis is {axes}, not 2"
    kv = unsqueeze.inputs[0]
    if not kv.shape or len(kv.shape) != 4 or not isinstance(kv.shape[1], int) or not isinstance(kv.shape[3], int):
        return None, "KV tensor has no static [B, Hkv, T, D] shape"
    if len(reshape.outputs[0].outputs) != 1:
        return None, "the repeated KV has other readers"
    return kv, None


def _match(matmul: gs.Node) -> tuple[tuple | None, str | None]:
    """((KV tensor, keys transposed?), None) for an attention product over repeated KV heads,
    else (None, why not)."""
    if matmul.op != "MatMul" or len(matmul.inputs) != 2:
        return None, "not a MatMul"
    b = matmul.inputs[1]
    transpose = producer(b, "Transpose")
    if transpose is not None:
        if transpose.attrs.get("perm") != [0, 1, 3, 2]:
            return None, f"key transpose perm {transpose.attrs.get('perm')}"
        if len(b.outputs) != 1:
            return None, "the transposed keys have other readers"
        b = transpose.inputs[0]
    kv, why = _repeated_kv(b)
    if why:
        return None, why
    a = matmul.inputs[0]
    if not a.shape or len(a.shape) != 4 or not isinstance(a.shape[1], int):
        return None, "query/probabilities have no static head count"
    heads, kv_heads = a.shape[1], kv.shape[1]
    if heads % kv_heads or heads == kv_heads:
        return None, f"{heads} heads over {kv_heads} KV heads is not grouped-query attention"
    return (kv, transpose is not None), None


def check(matmul: gs.Node) -> str | None:
    """Why ``matmul`` is not an attention product over repeated KV heads (None: it is)."""
    return _match(matmul)[1]


def matmul_input_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Static-where-possible shapes of every MatMul input (graph and subgraphs), by ONNX shape
    inference with data propagation: the head count of exported attention is usually computed."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes, no rewrite: the graph stays as it was
        return {}
    wanted = {name for n in walk_nodes(inferred.graph) if n.op_type == "MatMul" for name in n.input}
    dims = lambda vi: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)  # noqa: E731
                       for d in vi.type.tensor_type.shape.dim]
    shapes = {vi.name: dims(vi) for g in walk_graphs(inferred.graph) for vi in g.value_info}
    return {k: v for k, v in shapes.items() if k in wanted}


def _merged(known, inferred):
    """Per dimension, a static size wins over a symbolic one."""
    if not known or len(known) != len(inferred):
        return inferred
    return [i if isinstance(i, int) and not isinstance(k, int) else k for k, i in zip(known, inferred)]


def ungroup_attention(graph: gs.Graph, shapes: dict[str, list] | None = None) -> int:
    """Rewrite every attention MatMul over repeated KV heads in ``graph`` and its subgraphs; returns
    how many were rewritten. ``shapes`` (see ``matmul_input_shapes``) fills in unknown input shapes."""
    count = 0
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for node in list(g.nodes):
            if shapes and node.op == "MatMul" and node.inputs and node.inputs[0].name in shapes:
                node.inputs[0].shape = _merged(node.inputs[0].shape, shapes[node.inputs[0].name])
            match, _why = _match(node)
            if match is None:
                continue
            kv, keys = match
            a = node.inputs[0]
            heads, kv_heads, d = a.shape[1], kv.shape[1], kv.shape[3]
            name = node.name
            last = d if keys else 0  # queries end in D; probabilities keep T
            grouped_a = gs.Variable(f"{name}/grouped_a", dtype=a.dtype)
            grouped_out = gs.Variable(f"{name}/grouped_out", dtype=node.outputs[0].dtype)
            new = [gs.Node("Reshape", f"{name}/group", {}, [a, gs.Constant(f"{name}/group_shape", np.array([0, kv_heads, -1, last], np.int64))], [grouped_a])]
            rhs = kv
            if keys:
                rhs = gs.Variable(f"{name}/kv_t", dtype=kv.dtype)
                new.append(gs.Node("Transpose", f"{name}/kv_transpose", {"perm": [0, 1, 3, 2]}, [kv], [rhs]))
            out = node.outputs[0]
            new.append(gs.Node("MatMul", f"{name}/grouped", {}, [grouped_a, rhs], [grouped_out]))
            new.append(gs.Node("Reshape", f"{name}/ungroup", {}, [grouped_out, gs.Constant(f"{name}/ungroup_shape", np.array([0, heads, -1, 0], np.int64))], [out]))
            node.inputs, node.outputs = [], []
            g.nodes.extend(new)
            count += 1
        g.cleanup()
    return count
