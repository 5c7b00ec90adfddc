"""The similarity gate: per row, s = cos(h_in, h_out) on the last position of a block; the batch
exits when every row has s >= the gate's threshold. The same nodes serve every layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs


@dataclass
class Gate:
    nodes: list[gs.Node]
    exit: gs.Variable  # 0-D bool: every row clears its threshold
    similarity: gs.Variable  # [B] per-row cosine similarity


def gate(gi: int, h_in: gs.Tensor, h_out: gs.Tensor, thresholds: gs.Tensor) -> Gate:
    """Gate ``gi`` between a block's input and output stream, against ``thresholds[gi]``."""
    t = f"/river/gate{gi}"
    v = lambda name, dtype=np.float32, shape=None: gs.Variable(f"{t}/{name}", dtype=dtype, shape=shape)  # noqa: E731
    c = lambda name, value: gs.Constant(f"{t}/{name}", np.asarray(value))  # noqa: E731
    last, axes = c("last", np.int64(-1)), c("axes", np.array([-1], np.int64))
    a, b = v("h_in"), v("h_out")
    ab, aa, bb = v("ab"), v("aa"), v("bb")
    dot, na2, nb2, norm2, norm, norm_eps, sim = (v(n) for n in ("dot", "na2", "nb2", "norm2", "norm", "norm_eps", "similarity"))
    thr, fire, firef, allf, cond = v("threshold"), v("fire", np.bool_), v("fire_f"), v("all"), v("exit", np.bool_, [])
    node = lambda op, name, inputs, outputs, **attrs: gs.Node(op, f"{t}/{name}", attrs, inputs, outputs)  # noqa: E731
    nodes = [
        node("Gather", "in_last", [h_in, last], [a], axis=1),
        node("Gather", "out_last", [h_out, last], [b], axis=1),
        node("Mul", "mul_ab", [a, b], [ab]),
        node("Mul", "mul_aa", [a, a], [aa]),
        node("Mul", "mul_bb", [b, b], [bb]),
        node("ReduceSum", "dot", [ab, axes], [dot], keepdims=0),
        node("ReduceSum", "na2", [aa, axes], [na2], keepdims=0),
        node("ReduceSum", "nb2", [bb, axes], [nb2], keepdims=0),
        node("Mul", "norm2", [na2, nb2], [norm2]),
        node("Sqrt", "norm", [norm2], [norm]),
        node("Max", "norm_eps", [norm, c("eps", np.float32(1e-12))], [norm_eps]),
        node("Div", "cos", [dot, norm_eps], [sim]),
        node("Gather", "threshold", [thresholds, c("index", np.int64(gi))], [thr], axis=0),
        node("GreaterOrEqual", "fire", [sim, thr], [fire]),
        node("Cast", "fire_f", [fire], [firef], to=onnx.TensorProto.FLOAT),
        node("ReduceMin", "all_rows", [firef], [allf], keepdims=0),
        node("Cast", "exit", [allf], [cond], to=onnx.TensorProto.BOOL),
    ]
    return Gate(nodes, cond, sim)
