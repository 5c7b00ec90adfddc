"""Rewrite: the LM head for greedy decoding - an 8-bit head that bounds its own error, then the exact
fp32 logit of every token that could still be the argmax.

Why: greedy decoding and greedy verification read only the argmax of the logits, yet the fp32 head
reads the whole [H, V] weight every step (SmolLM2: 113 MB, 18% of a 2-thread CPU decode step).

How, with the graph input ``greedy_logits`` true (``GREEDY_LOGITS``):

1. ``approx`` = the head as ``MatMulNBits`` (8 bits, asymmetric, blocks of ``BLOCK`` inputs, accuracy
   level 4: ONNX Runtime also rounds each block of the hidden state to int8, scale = max|h| / 127).
   Only for steps of at most ``MAX_ROWS`` rows (B x S); larger ones run the fp32 head.
2. A bound per token and vocabulary entry, ``|approx - exact| <= bound``. Writing a' and w' for the
   rounded hidden state and weight: ``|a.w - a'.w'| <= sum|a'||w - w'| + sum|a - a'||w|``; with the
   largest weight rounding error of column j over its blocks ``e_j`` and its largest block L1 norm
   ``n_j``, ``bound_j = e_j * sum_b(|a_b|_1 + B s_b / 2) + n_j * sum_b(s_b / 2)`` (``s_b`` the block's
   activation step). Both factors are per-column constants made here from the weight itself, so the
   bound costs one [B, S, 3] x [3, V] product (the third row: the rounding allowance). It is widened by 0.1% plus 1e-3 for float rounding.
3. Candidates: the tokens whose ``approx + bound`` reaches the largest ``approx - bound``; their exact
   logits (fp32 dot products with the head's rows) are written over ``approx``. Any other token's value
   is below that largest lower bound, so below the exact maximum: the argmax is the fp32 head's.
   (SmolLM2, 215 tokens of prose: 44 candidates on average, at most 499, of 49,152.)

With ``greedy_logits`` false (its default) the graph computes the fp32 head as before, so sampling
and every caller that reads logits as numbers get the exact ones; the runtime sets it for greedy
decoding only (``StepBackend.greedy_logits``). The exact rows are read from the embedding table when
the head is tied to it (the same values), else gathered from the head's own weight: no second copy.

``check`` says why a graph's head is left alone: the logits must be one fp32 ``MatMul`` by a constant
[H, V] weight whose H is a multiple of ``BLOCK`` (a quantized, soft-capped or River head is not).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from river.compiler.lowering.patterns import MS_DOMAIN, constant_values
from river.compiler.quantize import NBITS_ACCURACY, dequantize_nbits, ort_block_quant
from river.export.contract import LOGITS

GREEDY_LOGITS = "greedy_logits"  # bool scalar graph input (default false): the logits greedy decoding needs
BITS, BLOCK = 8, 32
# Steps of more rows (B x S) run the fp32 head even when greedy: the 8-bit product grows with the rows
# while the fp32 one stays bound by reading the weight (SmolLM2's head, 2 threads: 2.8 against 5.4 ms
# for one row, 3.7-5.0 against 5.6-6.0 for three, 8.1-9.3 against 7.2-8.0 for nine).
MAX_ROWS = 4


def check(graph: gs.Graph) -> tuple[gs.Node | None, str | None]:
    """(the head MatMul, None) when the rule applies to ``graph``, else (None, why not)."""
    out = next((t for t in graph.outputs if t.name == LOGITS), None)
    if out is None:
        return None, f"the graph has no '{LOGITS}' output"
    if len(out.inputs) != 1 or out.inputs[0].op != "MatMul":
        return None, f"'{LOGITS}' is made by {out.inputs[0].op if out.inputs else 'no node'}, not by a MatMul"
    if out.shape is None or len(out.shape) != 3:  # then the head's input is [B, S, H] too
        return None, f"'{LOGITS}' is not [batch, sequence, vocab] (shape {out.shape})"
    node = out.inputs[0]
    weight = constant_values(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None, "the head's weight is not a constant fp32 matrix"
    if weight.shape[0] % BLOCK:
        return None, f"the hidden size {weight.shape[0]} is not a multiple of {BLOCK}"
    if any(t.name == GREEDY_LOGITS for t in graph.inputs):
        return None, "the head is already lowered"
    return node, None


def _rows(graph: gs.Graph, w_in: gs.Tensor, weight: np.ndarray) -> tuple[gs.Tensor, int]:
    """(the table holding the head's rows, the Gather axis for them): the embedding table [V, H] when
    the head is tied to it, else the head's own weight ``w_in`` [H, V], read by column."""
    for node in graph.nodes:
        table = node.inputs[0] if node.op == "Gather" and node.inputs else None
        values = constant_values(table)
        if values is not None and values.shape == weight.shape[::-1] and np.array_equal(values, weight.T):
            return table, 0
    return w_in, 1


def error_factors(weight: np.ndarray, wq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column j of the head: (its largest weight rounding error, its largest block L1 norm)."""
    k, n = weight.shape
    err = np.abs(weight - wq).reshape(k // BLOCK, BLOCK, n).max(axis=1).max(axis=0)
    norm = np.abs(weight).reshape(k // BLOCK, BLOCK, n).sum(axis=1).max(axis=0)
    return err.astype(np.float32), norm.astype(np.float32)


def lower(graph: gs.Graph, head: gs.Node) -> None:
    """Replace ``head`` (``check``'s match) by an ``If`` on the new input ``greedy_logits``."""
    h, w_in, logits = head.inputs[0], head.inputs[1], head.outputs[0]
    weight = constant_values(w_in)
    k, v = weight.shape
    packed, scales, zps = ort_block_quant(weight, BITS, BLOCK, symmetric=False)
    err, norm = error_factors(weight, dequantize_nbits(packed, scales, zps, BITS, k))
    table, axis = _rows(graph, w_in, weight)

    c = lambda name, value: gs.Constant(f"/greedy_head/{name}", np.asarray(value))  # noqa: E731
    t = lambda name, dtype=np.float32: gs.Variable(f"/greedy_head/{name}", dtype=dtype)  # noqa: E731
    last = c("last_axis", np.array([-1], np.int64))

    def reduce_max(name, x, y, keepdims):  # its axes became an input at opset 18
        if graph.opset >= 18:
            return gs.Node("ReduceMax", name, {"keepdims": keepdims}, [x, last], [y])
        return gs.Node("ReduceMax", name, {"keepdims": keepdims, "axes": [-1]}, [x], [y])

    approx, hb, ab, amax, l1, big_l, big_m, sa, act, m_term, b_w, bound = (
        t(n) for n in ("approx", "blocks", "abs", "amax", "l1", "l1_sum", "amax_sum", "m_scaled", "act",
                       "act_step", "factors", "bound"))
    zeros, ones = t("zeros"), t("ones")
    hi, lo, lower_, cand, nz, idx, pos, tok, hrows, wrows, prod, exact = (
        t("hi"), t("lo"), t("lower"), t("candidate", np.bool_), t("nonzero", np.int64), t("index", np.int64),
        t("row_index", np.int64), t("token", np.int64), t("h_rows"), t("w_rows"), t("products"), t("exact"))
    greedy_out = gs.Variable(f"{logits.name}/greedy", dtype=np.float32)
    nodes = [
        gs.Node("MatMulNBits", "/greedy_head/approx",
                {"K": k, "N": v, "bits": BITS, "block_size": BLOCK, "accuracy_level": NBITS_ACCURACY},
                [h, c("q", packed), c("scales", scales.reshape(-1)), c("zero_points", zps)], [approx],
                domain=MS_DOMAIN),
        gs.Node("Reshape", "/greedy_head/blocks", {}, [h, c("block_shape", np.array([0, 0, -1, BLOCK], np.int64))], [hb]),
        gs.Node("Abs", "/greedy_head/abs", {}, [hb], [ab]),
        reduce_max("/greedy_head/amax", ab, amax, 0),
        gs.Node("ReduceSum", "/greedy_head/l1", {"keepdims": 0}, [ab, last], [l1]),
        gs.Node("ReduceSum", "/greedy_head/l1_sum", {"keepdims": 1}, [l1, last], [big_l]),
        gs.Node("ReduceSum", "/greedy_head/amax_sum", {"keepdims": 1}, [amax, last], [big_m]),
        # with s_b = amax_b / 127: [sum_b(|a_b|_1 + B s_b / 2), sum_b(s_b / 2), 1] . [err; norm; rounding]
        gs.Node("Mul", "/greedy_head/m_scaled", {}, [big_m, c("half_steps", np.float32(BLOCK / 254))], [sa]),
        gs.Node("Add", "/greedy_head/act", {}, [big_l, sa], [act]),
        gs.Node("Mul", "/greedy_head/act_step", {}, [big_m, c("half_step", np.float32(1 / 254))], [m_term]),
        gs.Node("Mul", "/greedy_head/zero", {}, [act, c("zero_f", np.float32(0))], [zeros]),
        gs.Node("Add", "/greedy_head/one", {}, [zeros, c("one_f", np.float32(1))], [ones]),  # [B, S, 1]
        gs.Node("Concat", "/greedy_head/factors", {"axis": -1}, [act, m_term, ones], [b_w]),
        gs.Node("MatMul", "/greedy_head/bound", {}, [b_w, c("error_factors", np.stack(
            [err * np.float32(1.001), norm * np.float32(1.001), np.full_like(err, 1e-3)]))], [bound]),
        gs.Node("Add", "/greedy_head/hi", {}, [approx, bound], [hi]),
        gs.Node("Sub", "/greedy_head/lo", {}, [approx, bound], [lo]),
        reduce_max("/greedy_head/lower", lo, lower_, 1),
        gs.Node("GreaterOrEqual", "/greedy_head/candidate", {}, [hi, lower_], [cand]),
        gs.Node("NonZero", "/greedy_head/nonzero", {}, [cand], [nz]),
        gs.Node("Transpose", "/greedy_head/index", {"perm": [1, 0]}, [nz], [idx]),  # [n, 3]: row, position, token
        gs.Node("Slice", "/greedy_head/row_index", {}, [idx, c("zero", np.array([0], np.int64)),
                                                      c("two", np.array([2], np.int64)), c("axis1", np.array([1], np.int64))], [pos]),
        gs.Node("Gather", "/greedy_head/token", {"axis": 1}, [idx, c("two_scalar", np.array(2, np.int64))], [tok]),
        gs.Node("GatherND", "/greedy_head/h_rows", {}, [h, pos], [hrows]),  # [n, H]
    ]
    if axis == 0:
        nodes.append(gs.Node("Gather", "/greedy_head/w_rows", {"axis": 0}, [table, tok], [wrows]))  # [n, H]
    else:
        cols = t("w_cols")
        nodes += [gs.Node("Gather", "/greedy_head/w_cols", {"axis": 1}, [table, tok], [cols]),  # [H, n]
                  gs.Node("Transpose", "/greedy_head/w_rows", {"perm": [1, 0]}, [cols], [wrows])]
    nodes += [
        gs.Node("Mul", "/greedy_head/products", {}, [hrows, wrows], [prod]),
        gs.Node("ReduceSum", "/greedy_head/exact", {"keepdims": 0}, [prod, last], [exact]),
        gs.Node("ScatterND", "/greedy_head/logits", {}, [approx, idx, exact], [greedy_out]),
    ]
    then_graph = gs.Graph(nodes=nodes, outputs=[greedy_out], name="greedy_head")
    exact_out = gs.Variable(f"{logits.name}/exact", dtype=np.float32)
    else_graph = gs.Graph(nodes=[gs.Node("MatMul", head.name, {}, [h, w_in], [exact_out])], outputs=[exact_out],
                          name="exact_head")
    flag = gs.Variable(GREEDY_LOGITS, dtype=np.bool_, shape=[])
    graph.inputs.append(flag)
    head.inputs, head.outputs = [], []
    shape, lead, rows, few, cond = (t("shape", np.int64), t("lead", np.int64), t("rows", np.int64),
                                    t("few_rows", np.bool_), t("cond", np.bool_))
    graph.nodes += [
        gs.Node("Shape", "/greedy_head/shape", {}, [h], [shape]),
        gs.Node("Slice", "/greedy_head/lead", {}, [shape, c("start0", np.array([0], np.int64)),
                                                 c("end2", np.array([2], np.int64))], [lead]),  # [B, S]
        gs.Node("ReduceProd", "/greedy_head/rows", {"keepdims": 0}, [lead], [rows]),
        gs.Node("LessOrEqual", "/greedy_head/few_rows", {}, [rows, c("max_rows", np.int64(MAX_ROWS))], [few]),
        gs.Node("And", "/greedy_head/cond", {}, [flag, few], [cond]),
        gs.Node("If", "/greedy_head/if", {"then_branch": then_graph, "else_branch": else_graph}, [cond], [logits]),
    ]
    graph.cleanup()  # the old head node, now without inputs and outputs
