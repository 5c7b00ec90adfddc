"""Rewrite: an fp32 ``MatMul`` by a GGUF Q4_1 weight (dequantized: ``w = d * q + m`` per block of 32
inputs, q in 0..15, d and m fp16) as River's own ``ai.river::Q41MatMul`` over the weight's 4-bit form.

Why: SmolLM2's layers arrive as Q4_1; in fp32 they are 425 MB that every decode step reads, in 4 bits
with fp16 scales and offsets 66 MB. ONNX Runtime has no exact kernel for that form (``MatMulNBits``'
zero point is an integer, so ``grid_weights.py`` needs an offset path and still moves logits by 1.8e-4).
Our kernel (``compiler/ort_ops/kernels.cpp``) makes every weight as ``fmadd(d, q, m)`` in fp32 - the
very fp32 value the export holds - so only the order of the sums differs from the fp32 ``MatMul``, as
with any other fp32 kernel.

``check`` says why a product is left as it is: the weight must be fp32 [K, N] with K and N multiples of
32, every block on a 4-bit grid (``grid_weights.grid_levels``) whose step and offset are fp16 values, and
``fmadd(d, q, m)`` must give back every weight bit for bit. Only then is it rewritten; a model trained
and exported in fp32 stays as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from river.compiler.lowering.grid_weights import BLOCK, grid_levels, weight_products
from river.compiler.ort_ops import DOMAIN

OP = "Q41MatMul"
OP_INT8 = "Q41MatMulInt8"  # the same weights by int8 activations (River's twins)
GROUP = 32  # output columns a group: the kernel's packing unit


def check(w: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray] | None, str]:
    """(the op's (q, d, m) for weight ``w`` [K, N], "") when the rule applies, else (None, why not)."""
    found, why = levels(w)
    return (None, why) if found is None else (pack(*found), "")


def check_int8(w: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray] | None, str]:
    """As ``check``, in the layout of ``Q41MatMulInt8`` (int8 activations: River's twins, q41_twins.py)."""
    found, why = levels(w)
    return (None, why) if found is None else (pack_int8(*found), "")


def levels(w: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray] | None, str]:
    """(levels q [K, N] uint8, fp16 d and m [K/32, N]) of a Q4_1 weight ``w``, "" - else (None, why not)."""
    why = shape_refusal(w)
    if why:
        return None, why
    k, n = w.shape
    grid = grid_levels(w)
    if grid is None:
        return None, "some block of 32 inputs is not on a 4-bit grid (not a Q4_1 weight)"
    lo, step, found = grid  # [K/32, N], [K/32, N], [K/32, 32, N]
    with np.errstate(over="ignore"):
        d, m = step.astype(np.float16), lo.astype(np.float16)
    if not (np.isfinite(d).all() and np.isfinite(m).all()):
        return None, "a block's step or offset is beyond fp16"
    q = found.astype(np.uint8)
    # d * q is exact in fp32 (11 + 4 bits), so this is fmadd(d, q, m): one rounding, as the kernel's
    made = (d.astype(np.float32)[:, None] * q.astype(np.float32) + m.astype(np.float32)[:, None]).reshape(k, n)
    if not np.array_equal(made.view(np.uint32), w.view(np.uint32)):
        return None, "fp16 scales and offsets do not give the weight back bit for bit"
    return (q.reshape(k, n), d, m), ""


def shape_refusal(w: np.ndarray) -> str:
    """Why the kernels cannot take weight ``w`` as it is shaped ("" when they can): fp32 [K, N], K and N
    multiples of 32 (blocks of inputs, groups of output columns)."""
    if w.ndim != 2 or w.dtype != np.float32:
        return f"the weight is {w.dtype} of rank {w.ndim}, not a fp32 matrix"
    if w.shape[0] % BLOCK or w.shape[1] % GROUP:
        return f"the weight is {w.shape[0]} x {w.shape[1]}; both must be multiples of 32"
    return ""


def pack(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's layout of levels q [K, N] and fp16 d, m [K/32, N]: q [N/32, K, 16] (byte j of a group
    row: column j in the low nibble, 16 + j in the high), d and m [N/32, K/32, 32]."""
    grouped = by_group(q)  # [N/32, K, 32]
    packed = (grouped[..., :GROUP // 2] | (grouped[..., GROUP // 2:] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), by_group(d), by_group(m)


def pack_int8(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Q41MatMulInt8``'s layout: q [N/32, K/4, 64], quads of 4 inputs x 32 columns whose byte 4 j + t
    holds input t of column j (low nibble) and of column 16 + j (high) - each lane of a vector of the
    kernel then holds 4 inputs of one column, what an integer dot product instruction takes. d and m
    as ``pack``'s."""
    packed, d, m = pack(q, d, m)  # [N/32, K, 16]
    groups, k, _ = packed.shape
    quads = packed.reshape(groups, k // 4, 4, GROUP // 2).transpose(0, 1, 3, 2).reshape(groups, k // 4, 64)
    return np.ascontiguousarray(quads), d, m


def by_group(a: np.ndarray) -> np.ndarray:
    """[rows, N] -> [N/32, rows, 32]: the kernels' unit is a group of 32 output columns."""
    rows, n = a.shape
    return np.ascontiguousarray(a.reshape(rows, n // GROUP, GROUP).transpose(1, 0, 2))


def rewrite(graph: gs.Graph, int8: bool = False) -> int:
    """Every MatMul of ``graph`` (not its subgraphs) by a Q4_1 weight, rewritten; returns how many. A
    product whose weight carries ``q41_twins.MARK`` (a twin's) becomes ``Q41MatMulInt8``, and with
    ``int8`` every one does (``--lowering ort-int8``)."""
    from river.compiler.lowering.q41_twins import is_marked

    int8_product = (lambda name: True) if int8 else is_marked
    done = rewrite_products(graph, OP, check, "q41op", lambda name: not int8_product(name))
    return done + rewrite_products(graph, OP_INT8, check_int8, "q41i8op", int8_product)


def rewrite_products(graph: gs.Graph, op: str, check_weight, tag: str, takes=lambda name: True) -> int:
    """Every MatMul of ``graph`` (not its subgraphs) whose weight ``check_weight`` takes (and whose
    weight's name ``takes``), as River's ``op`` over the parts it returns; returns how many. Constants
    are named ``<weight>@<tag><i>`` so that ``If`` branches keep their own."""
    done = 0
    for node, w in list(weight_products(graph)):
        if not takes(node.inputs[1].name):
            continue
        parts, _ = check_weight(w)
        if parts is None:
            continue
        name = node.inputs[1].name
        constants = [gs.Constant(f"{name}@{tag}{i}", v) for i, v in enumerate(parts)]
        node.op, node.domain = op, DOMAIN
        node.attrs = {"K": int(w.shape[0]), "N": int(w.shape[1])}
        node.inputs = [node.inputs[0], *constants]
        done += 1
    if done:
        graph.cleanup()
    return done
