"""Rewrite: a decoder's attention block -> ONNX Runtime's ``GroupQueryAttention`` over shared KV buffers.

An exported Llama-style attention is some forty nodes a layer: reshapes and transposes of Q/K/V, the
rotary embedding (slices, a negation, a concatenation, products), ``Concat(past, new)``, ``repeat_kv``,
the scaled scores, the mask, softmax, the weighted sum. ONNX Runtime's fused contrib op does all of it in
one kernel, reads each row's valid length only (not the whole capacity, masked) and, when ``present``
is bound to ``past``'s memory, writes the new K/V in place at each row's length:

    out, present_k, present_v = GroupQueryAttention(q_proj, k_proj, v_proj, past_k, past_v,
                                                    seqlens_k, total_length, cos_cache, sin_cache)

The rule matches from each ``Softmax`` (``check`` says why a block does not match) and needs nothing
but the graph: the head counts from the shapes, the scale from the constant, the rotary tables by
evaluating the graph's own cos/sin subgraph at every position (any RoPE scaling comes out as the graph
computes it). It declines what it cannot prove: interleaved or partial rotary, extra readers of the
cache, a key not made the way the query is.

Semantics of the rewritten graph (what ``runtime`` guarantees): ``attention_mask`` [B,C] is each row's
contiguous valid prefix including the new tokens, and the new tokens' positions continue it
(``seqlens_k = sum(mask) - 1``). ONNX Runtime (1.32, CPU) runs several new tokens over a non-empty
past for one row at a time only; the backend splits such steps by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from river.compiler.lowering.patterns import MS_DOMAIN, constant_values, producer

ROTARY_HEAD_MULTIPLE = 16  # ORT's CPU kernel rotates heads whose size is a multiple of 16 only


def _unreshaped(t):
    """The input of the Reshape that makes ``t`` (grouped-query attention without repeat_kv views the
    query heads as [B, Hkv, n_rep * S, D] around its products: ``gqa_attention.py``), else ``t``."""
    reshape = producer(t, "Reshape")
    return reshape.inputs[0] if reshape is not None else t


def _only_reader(t, op: str) -> gs.Node | None:
    readers = t.outputs
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _scalar(t) -> float | None:
    values = constant_values(t)
    return float(np.ravel(values)[0]) if values is not None and values.size == 1 else None


def _heads_from(t: gs.Tensor, d: int) -> tuple[gs.Tensor | None, str | None]:
    """(the [B,S,N*D] projection behind ``Transpose(Reshape(proj), [0,2,1,3])``, None) or (None, why)."""
    transpose = producer(t, "Transpose")
    if transpose is None or transpose.attrs.get("perm") != [0, 2, 1, 3]:
        return None, "heads are not Transpose(Reshape(projection), [0, 2, 1, 3])"
    reshape = producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None, "heads are not split by a Reshape"
    proj = reshape.inputs[0]
    shape = transpose.inputs[0].shape
    if shape and len(shape) == 4 and isinstance(shape[3], int) and shape[3] != d:
        return None, f"head size {shape[3]} is not the cache's {d}"
    return proj, None


def _width(t: gs.Tensor) -> int | None:
    """The static last dimension of a projection's output: from its shape, else from its weight (the
    graph is not shape-inferred: that would copy every weight, and contrib ops such as MatMulNBits are
    unknown to it). Follows elementwise ops (a twin's dequantization scale) up to the product."""
    for _ in range(4):
        if t.shape and isinstance(t.shape[-1], int):
            return t.shape[-1]
        node = t.inputs[0] if len(t.inputs) == 1 else None
        if node is None:
            return None
        if node.op == "MatMulNBits":
            return int(node.attrs["N"])
        if node.op in ("MatMul", "MatMulInteger") and isinstance(node.inputs[1], gs.Constant):
            return int(node.inputs[1].shape[-1])
        if node.op not in ("Mul", "Add", "Cast"):
            return None
        t = next((i for i in node.inputs if isinstance(i, gs.Variable)), None)
        if t is None:
            return None
    return None


@dataclass
class Rotary:
    source: gs.Tensor  # the [B,N,S,D] heads before rotation
    cos: gs.Tensor  # [.., S, D] tables the graph computes from position_ids
    sin: gs.Tensor


def _rotary(t: gs.Tensor) -> tuple[Rotary | None, str | None]:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = Concat(-x2, x1)`` (non-interleaved)."""
    add = producer(t, "Add")
    if add is None:
        return None, "no rotary embedding (Add of two products) on the heads"
    muls = [producer(i, "Mul") for i in add.inputs]
    if any(m is None for m in muls):
        return None, "the rotary Add is not of two products"
    for plain, rotated in (muls, muls[::-1]):
        for x_at in (0, 1):
            x, cos = plain.inputs[x_at], plain.inputs[1 - x_at]
            for r_at in (0, 1):
                concat = producer(rotated.inputs[r_at], "Concat")
                if concat is None or len(concat.inputs) != 2 or concat.attrs.get("axis") not in (-1, 3):
                    continue
                neg = producer(concat.inputs[0], "Neg")
                first, second = (producer(neg.inputs[0], "Slice") if neg else None), producer(concat.inputs[1], "Slice")
                if first is None or second is None or first.inputs[0] is not x or second.inputs[0] is not x:
                    continue
                return Rotary(x, cos, rotated.inputs[1 - r_at]), None
    return None, "the heads' rotation is not x*cos + Concat(-x2, x1)*sin"


def _kv_repeat_source(t: gs.Tensor) -> gs.Tensor:
    """The cache tensor behind ``repeat_kv`` (Unsqueeze -> Expand -> Reshape), or ``t`` itself."""
    reshape = producer(t, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape else None
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand else None
    return unsqueeze.inputs[0] if unsqueeze is not None else t


def _cache_concat(t: gs.Tensor) -> tuple[gs.Node | None, str | None]:
    concat = producer(t, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attrs.get("axis") not in (2, -2):
        return None, "the attended keys/values are not Concat(past, new, axis=2)"
    past = concat.inputs[0]
    if not isinstance(past, gs.Variable) or past.inputs or not past.name.startswith("past_key_values."):
        return None, f"the cache concatenation's past '{past.name}' is not a past_key_values input"
    return concat, None


@dataclass
class AttentionBlock:
    """One matched attention: what the fused op reads and which tensors it takes over."""

    query: gs.Tensor  # [B,S,H*D] q projection
    key: gs.Tensor  # [B,S,Hkv*D]
    value: gs.Tensor
    key_concat: gs.Node  # Concat(past_k, new_k) -> present key
    value_concat: gs.Node
    output: gs.Tensor  # [B,S,H*D], read by the output projection
    output_node: gs.Node  # the Reshape that makes it
    rotary: Rotary  # of the query (the key's uses the same tables)
    num_heads: int
    kv_heads: int
    head_size: int
    scale: float


def _scores(add_mask: gs.Node) -> tuple[tuple | None, str | None]:
    """(scores MatMul, scale) of ``Add(scale * (Q @ K^T), mask)``."""
    for t in add_mask.inputs:
        for op in ("Mul", "Div"):
            node = producer(t, op)
            if node is None:
                continue
            for i in (0, 1):
                matmul, c = producer(_unreshaped(node.inputs[i]), "MatMul"), _scalar(node.inputs[1 - i])
                if matmul is not None and c is not None and (op == "Mul" or i == 0):
                    return (matmul, c if op == "Mul" else 1.0 / c), None
        matmul = producer(_unreshaped(t), "MatMul")
        if matmul is not None:
            return (matmul, None), None
    return None, "softmax input is not Add(scaled Q @ K^T, mask)"


def match(softmax: gs.Node) -> tuple[AttentionBlock | None, str | None]:
    """The attention block around ``softmax``, or (None, why it is not one this rule lowers)."""
    if softmax.op != "Softmax" or softmax.attrs.get("axis", -1) not in (-1, 3):
        return None, "not a Softmax over the last axis"
    add = producer(softmax.inputs[0], "Add")
    if add is None:
        return None, "softmax input is not masked scores (Add)"
    found, why = _scores(add)
    if why:
        return None, why
    qk, scale = found
    probs = softmax.outputs[0]
    grouped = _only_reader(probs, "Reshape")
    pv = _only_reader(grouped.outputs[0] if grouped else probs, "MatMul")
    if pv is None or pv.inputs[0] is not (grouped.outputs[0] if grouped else probs):
        return None, "the probabilities are not read by one MatMul"
    ungrouped = _only_reader(pv.outputs[0], "Reshape")
    back = _only_reader(ungrouped.outputs[0] if ungrouped else pv.outputs[0], "Transpose")
    if back is None or back.attrs.get("perm") != [0, 2, 1, 3]:
        return None, "the weighted sum is not transposed back to [B, S, H, D]"
    merge = _only_reader(back.outputs[0], "Reshape")
    if merge is None:
        return None, "the heads are not merged by one Reshape"
    k_t = producer(qk.inputs[1], "Transpose")
    if k_t is None or k_t.attrs.get("perm") != [0, 1, 3, 2]:
        return None, "the keys are not transposed [0, 1, 3, 2] for the scores"
    key_concat, why = _cache_concat(_kv_repeat_source(k_t.inputs[0]))
    if why:
        return None, why
    value_concat, why = _cache_concat(_kv_repeat_source(pv.inputs[1]))
    if why:
        return None, why
    past_k = key_concat.inputs[0]
    if not past_k.shape or len(past_k.shape) != 4 or not all(isinstance(x, int) for x in (past_k.shape[1], past_k.shape[3])):
        return None, "the past keys have no static [B, Hkv, T, D] shape"
    kv_heads, d = past_k.shape[1], past_k.shape[3]
    q_rot, why = _rotary(_unreshaped(qk.inputs[0]))
    if why:
        return None, "query: " + why
    k_rot, why = _rotary(key_concat.inputs[1])
    if why:
        return None, "key: " + why
    if k_rot.cos is not q_rot.cos or k_rot.sin is not q_rot.sin:
        return None, "query and key are rotated by different tables"
    query, why = _heads_from(q_rot.source, d)
    key, why2 = _heads_from(k_rot.source, d)
    value, why3 = _heads_from(value_concat.inputs[1], d)
    if why or why2 or why3:
        return None, why or why2 or why3
    width = _width(query)
    if not isinstance(width, int) or width % d:
        return None, f"the query width {width} is not a static multiple of the head size {d}"
    heads = width // d
    if heads % kv_heads:
        return None, f"{heads} query heads are not groups of the {kv_heads} KV heads"
    if d % ROTARY_HEAD_MULTIPLE:
        return None, f"head size {d} is not a multiple of {ROTARY_HEAD_MULTIPLE} (ONNX Runtime's fused rotary)"
    scale = 1.0 if scale is None else scale
    return AttentionBlock(query, key, value, key_concat, value_concat, merge.outputs[0], merge, q_rot,
                          heads, kv_heads, d, scale), None


def check(softmax: gs.Node) -> str | None:
    """Why the attention around ``softmax`` is not lowered (None: it is)."""
    return match(softmax)[1]


def rotary_tables(graph: gs.Graph, cos: gs.Tensor, sin: gs.Tensor, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [positions, D/2] for ``GroupQueryAttention``: the graph's own tables evaluated at
    positions 0..positions-1 (its sub-graph from ``position_ids``), halved (non-interleaved rotary
    repeats each frequency in both halves; anything else raises ValueError)."""
    from river.compiler.ort_session import make_session

    pos = next((t for t in graph.inputs if t.name == "position_ids"), None)
    if pos is None:
        raise ValueError("the rotary tables are not computed from position_ids")
    nodes, seen, todo = [], set(), [cos, sin]
    while todo:  # the tables' producers, back to the graph's inputs (no copy of the whole graph)
        t = todo.pop()
        for node in t.inputs:
            if id(node) not in seen:
                seen.add(id(node))
                nodes.append(node)
                todo.extend(node.inputs)
    needs = {t.name for n in nodes for t in n.inputs if isinstance(t, gs.Variable) and not t.inputs}
    if needs != {"position_ids"}:
        raise ValueError(f"the rotary tables depend on {sorted(needs)}, not on position_ids alone")
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[pos], outputs=[cos, sin], opset=graph.opset),
                           do_type_check=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = 1, positions
    for out in model.graph.output:
        out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        out.type.tensor_type.ClearField("shape")
    session = make_session(model, threads=1)  # the project's options: a process's shared thread pool, if any
    cos_t, sin_t = session.run(None, {"position_ids": np.arange(positions, dtype=np.int64)[None]})
    cos_t, sin_t = (np.asarray(x, np.float32).reshape(positions, -1) for x in (cos_t, sin_t))
    half = cos_t.shape[1] // 2
    if not (np.array_equal(cos_t[:, :half], cos_t[:, half:]) and np.array_equal(sin_t[:, :half], sin_t[:, half:])):
        raise ValueError("the rotary tables are not two equal halves (interleaved or partial rotary)")
    return np.ascontiguousarray(cos_t[:, :half]), np.ascontiguousarray(sin_t[:, :half])


def fuse(g: gs.Graph, block: AttentionBlock, inputs: dict[str, gs.Tensor]) -> gs.Node:
    """Replace ``block`` in ``g`` by one GroupQueryAttention node reading ``inputs`` (seqlens_k,
    total_sequence_length, cos_cache, sin_cache, made once per graph by the pass)."""
    present_k, present_v = block.key_concat.outputs[0], block.value_concat.outputs[0]
    for node in (block.key_concat, block.value_concat, block.output_node):
        node.outputs = []
    base, at, tag = block.output.name.partition("@")  # a River twin's tag: its backbone layer has the same scope
    name = f"{base.rsplit('/', 1)[0]}/GroupQueryAttention{at}{tag}"
    node = gs.Node("GroupQueryAttention", name,
                   {"num_heads": block.num_heads, "kv_num_heads": block.kv_heads, "scale": float(block.scale),
                    "do_rotary": 1, "rotary_interleaved": 0},
                   [block.query, block.key, block.value, block.key_concat.inputs[0], block.value_concat.inputs[0],
                    inputs["seqlens_k"], inputs["total_sequence_length"], inputs["cos_cache"], inputs["sin_cache"]],
                   [block.output, present_k, present_v], domain=MS_DOMAIN)
    g.nodes.append(node)
    return node
