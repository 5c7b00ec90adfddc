"""Rewrite: residual ``Add`` + RMSNorm -> ONNX Runtime's ``SkipSimplifiedLayerNormalization``.

A pre-norm decoder adds each block's output to the residual stream and normalizes the sum for the
next block: ``h = a + b; y = w * h / sqrt(mean(h^2) + eps)``. Exported, that is eight nodes (an Add, then
Pow, ReduceMean, Add, Sqrt, Div or Reciprocal, Mul, Mul); ONNX Runtime's contrib op does both in one
kernel and still hands out the sum ``h`` (its fourth output) for the residual stream:

    y, _, _, h = SkipSimplifiedLayerNormalization(a, b, w, epsilon=eps)

Only norms whose input is a residual ``Add`` in the same graph are rewritten (``check`` says why not);
the first norm, over the embeddings, is left to ONNX Runtime's own ``SimplifiedLayerNormalization``
fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from river.compiler.lowering.patterns import MS_DOMAIN, constant_values, producer


@dataclass
class RmsNorm:
    scale: gs.Node  # Mul(weight, normalized): its output is the norm's
    weight: gs.Tensor
    x: gs.Tensor  # the normalized input
    epsilon: float


def match_norm(scale: gs.Node) -> tuple[RmsNorm | None, str | None]:
    """The RMSNorm ending in ``scale`` = Mul(weight, Mul(x, 1/sqrt(mean(x^2) + eps)))."""
    if scale.op != "Mul" or len(scale.inputs) != 2:
        return None, "not a Mul"
    for w_at in (0, 1):
        weight, normed = scale.inputs[w_at], scale.inputs[1 - w_at]
        w = constant_values(weight)
        mul = producer(normed, "Mul")
        if w is None or w.ndim != 1 or mul is None:
            continue
        for x_at in (0, 1):
            x, inv = mul.inputs[x_at], mul.inputs[1 - x_at]
            sqrt = None
            div = producer(inv, "Div")
            if div is not None and constant_values(div.inputs[0]) is not None and np.all(constant_values(div.inputs[0]) == 1):
                sqrt = producer(div.inputs[1], "Sqrt")
            recip = producer(inv, "Reciprocal")
            if recip is not None:
                sqrt = producer(recip.inputs[0], "Sqrt")
            add = producer(sqrt.inputs[0], "Add") if sqrt is not None else None
            if add is None:
                continue
            for e_at in (0, 1):
                eps, mean = constant_values(add.inputs[e_at]), producer(add.inputs[1 - e_at], "ReduceMean")
                if eps is None or eps.size != 1 or mean is None:
                    continue
                axes = constant_values(mean.inputs[1]) if len(mean.inputs) > 1 else mean.attrs.get("axes")
                if axes is None or list(np.ravel(axes)) != [-1] or mean.attrs.get("keepdims", 1) != 1:
                    continue
                pow_ = producer(mean.inputs[0], "Pow")
                two = constant_values(pow_.inputs[1]) if pow_ is not None else None
                if pow_ is None or pow_.inputs[0] is not x or two is None or float(np.ravel(two)[0]) != 2.0:
                    continue
                return RmsNorm(scale, weight, x, float(np.ravel(eps)[0])), None
    return None, "not weight * x / sqrt(mean(x^2, -1) + eps)"


def check(scale: gs.Node, graph_nodes: set[int]) -> str | None:
    """Why the norm ending in ``scale`` is not fused with its residual Add (None: it is fusable).
    ``graph_nodes``: ids of the nodes of the graph ``scale`` is in."""
    norm, why = match_norm(scale)
    if why:
        return why
    add = producer(norm.x, "Add")
    if add is None or id(add) not in graph_nodes:
        return "the norm's input is not a residual Add in the same graph"
    if any(constant_values(t) is not None for t in add.inputs):
        return "the Add adds a constant (a bias, not a residual)"
    return None


def fuse_skip_norm(g: gs.Graph, scale: gs.Node, graph_nodes: set[int]) -> bool:
    """Rewrite the residual Add + the norm ending in ``scale``; whether it did."""
    if check(scale, graph_nodes) is not None:
        return False
    norm, _ = match_norm(scale)
    add = norm.x.inputs[0]
    a, b = add.inputs
    out = scale.outputs[0]
    add.outputs, scale.outputs = [], []
    g.nodes.append(gs.Node("SkipSimplifiedLayerNormalization", f"{scale.name}/skip_norm", {"epsilon": norm.epsilon},
                           [a, b, norm.weight], [out, gs.Variable.empty(), gs.Variable.empty(), norm.x],
                           domain=MS_DOMAIN))
    return True
