"""What the lowering rules ask of a tensor while they match: the node of a given op that makes it, and
the constant it holds (an initializer or a ``Constant`` node's value). One home for both, and for the
domain of ONNX Runtime's contrib ops that the rules write."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (GroupQueryAttention, MatMulNBits, ...)


def producer(t, op: str) -> gs.Node | None:
    """The node that makes ``t`` when it is one ``op`` node, else None."""
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == op:
        return t.inputs[0]
    return None


def constant_values(t) -> np.ndarray | None:
    """The values of ``t`` when it is a constant (initializer or ``Constant`` node output), else None."""
    node = producer(t, "Constant")
    if node is not None:
        t = node.attrs.get("value")
    return t.values if isinstance(t, gs.Constant) else None
