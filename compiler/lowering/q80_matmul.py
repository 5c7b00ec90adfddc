"""Rewrite: an fp32 ``MatMul`` by a GGUF Q8_0 weight (dequantized: ``w = d * q`` per block of 32 inputs,
q in -127..127, d fp16) as River's own ``ai.river::Q80MatMul`` over the weight's 8-bit form.

Why: a GGUF keeps the embedding table in Q8_0 (SmolLM2: ``token_embd``), and a tied LM head is that
table, 113 MB in fp32 that every step reads. Our kernel (``compiler/ort_ops/kernels.cpp``) makes each
weight as ``d * q`` in fp32 - exact for an fp16 d and an 8-bit q, so the very value the export holds -
and sums as the Q4_1 kernel does; logits stay exact, for greedy decoding and sampling alike, and the
greedy head (``greedy_head.py``) is not needed where this rule applies.

``check`` says why a weight is left as it is: fp32 [K, N] with K and N multiples of 32, every block
on a symmetric 8-bit grid whose step is an fp16 value, and ``d * q`` giving back every weight bit for
bit.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from river.compiler.lowering.q41_matmul import BLOCK, by_group, rewrite_products, shape_refusal

OP = "Q80MatMul"
LEVELS = 127  # Q8_0: q in -127..127, d = the block's largest |w| / 127


def check(w: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """(the op's (q, d) for weight ``w`` [K, N], "") when the rule applies, else (None, why not)."""
    why = shape_refusal(w)
    if why:
        return None, why
    first, why = _levels(w[:BLOCK])  # one row of blocks decides most weights cheaply
    if first is None:
        return None, why
    levels, why = _levels(w)
    if levels is None:
        return None, why
    q, d = levels
    return (by_group(q), by_group(d)), ""


def _levels(w: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """(q int8 [K, N], d fp16 [K/32, N]) of whole blocks of ``w``, or (None, why not)."""
    k, n = w.shape
    blocks = w.reshape(k // BLOCK, BLOCK, n)
    with np.errstate(over="ignore"):
        d = (np.abs(blocks).max(axis=1).astype(np.float64) / LEVELS).astype(np.float16)
    if not np.isfinite(d).all():
        return None, "a block's step is beyond fp16"
    d32 = d.astype(np.float32)
    q = np.rint(blocks / np.where(d32 > 0, d32, 1)[:, None])
    if np.abs(q).max() > LEVELS:
        return None, "some block of 32 inputs is not on an 8-bit grid (not a Q8_0 weight)"
    made = d32[:, None] * q.astype(np.float32)  # exact: fp16 d times an 8-bit q
    if not np.array_equal(made.reshape(k, n).view(np.uint32), w.view(np.uint32)):
        return None, "some block of 32 inputs is not on an 8-bit grid with an fp16 step (not a Q8_0 weight)"
    return (q.reshape(k, n).astype(np.int8), d), ""


def rewrite(graph: gs.Graph) -> int:
    """Every MatMul of ``graph`` (not its subgraphs) by a Q8_0 weight, rewritten; returns how many."""
    return rewrite_products(graph, OP, check, "q80op")
