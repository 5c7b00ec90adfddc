"""Rewrite: an fp32 weight whose values lie on a 4-bit grid per block - what a GGUF's Q4_1 tensors
dequantize to, ``w = d * q + m`` with q in 0..15 per block of 32 inputs - as the same values in 4 bits,
computed in fp32.

Why: SmolLM2's layers arrive as Q4_1; exported to fp32 they are 425 MB that every decode step reads
(from DRAM: they do not fit the cache); on their grid, with scales and offsets, ~80 MB. ``MatMulNBits`` at
accuracy level 1 dequantizes and multiplies in fp32, but its zero point is an integer and Q4_1's
offset ``m`` is any float. So each weight becomes

    y = MatMulNBits(x; q, scale d, zero point z = round(-m / d))      # d * (q - z) = w - r
      + MatMul(MatMul(x, block indicator), r)                          # r = m + d * z, one per block

where the second product (K/32 x N) restores the offset exactly. The result equals ``x @ w`` up to
fp32 rounding (the values d*(q-z) and r are each rounded once, and the sums run in another order):
SmolLM2's logits move by up to 1.8e-4 of values up to 35 (1e-5 of their largest), wider than the other
fused kernels move them (1e-4): why the runtime's ``ort-grid`` lowering is opt-in.

Only weights whose every block sits on such a grid (within 1e-6 of the block's largest value) are
rewritten; any other weight stays an fp32 MatMul, so a model trained and exported in fp32 is untouched.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from river.compiler.lowering.patterns import MS_DOMAIN, constant_values
from river.compiler.quantize import pack_nbits

BLOCK, LEVELS = 32, 15  # Q4_1: 32 inputs a block, q in 0..15
TOLERANCE = 1e-6  # of the block's largest |w|: the grid is exact up to fp32 rounding of d * q + m
FP32_COMPUTE = 1  # MatMulNBits accuracy level 1: fp32 activations, dequantized fp32 weights


def grid_levels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(offset, step, levels) of each block of a [K, N] weight on a 4-bit grid per block of 32 inputs;
    None when any block is not (or the weight is not fp32 whole blocks)."""
    if w.ndim != 2 or w.dtype != np.float32 or w.shape[0] % BLOCK or _off_grid(_blocks(w[:BLOCK])):
        return None  # the first row of blocks decides most weights cheaply (fp32-trained ones fail it)
    blocks = _blocks(w)
    grid = _grid(blocks)
    return None if _off_grid(blocks, grid) else grid


def grid_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """MatMulNBits' (packed [N, K/32, 16], scales [N*K/32], zero points [N, ceil(K/64)]) and the offset
    residual [K/32, N] of a [K, N] weight on a 4-bit grid per block; None when any block is not."""
    grid = grid_levels(w)
    if grid is None:
        return None
    lo, d, q = grid
    z = np.clip(np.rint(-lo / d), 0, LEVELS)
    residual = (lo + d * z).astype(np.float32)  # what d * (q - z) leaves out of w, per block and column
    packed = pack_nbits(q.transpose(2, 0, 1), 4)  # [N, K/32, 16]
    zero_points = pack_nbits(z.T, 4)  # [N, ceil(K/64)]
    return packed, d.T.reshape(-1).astype(np.float32), zero_points, residual


def _blocks(w: np.ndarray) -> np.ndarray:
    """[K, N] -> [K/32, 32, N] in float64: the grid is checked without fp32 rounding of its own."""
    return w.reshape(w.shape[0] // BLOCK, BLOCK, w.shape[1]).astype(np.float64)


def _grid(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, step, levels) of each block [K/32, 32, N] on the 4-bit grid its min and max span."""
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    d = (hi - lo) / LEVELS
    d = np.where(d > 0, d, 1.0)
    return lo, d, np.rint((blocks - lo[:, None]) / d[:, None])


def _off_grid(blocks: np.ndarray, grid=None) -> bool:
    """Whether some block ([K/32, 32, N]) is off its 4-bit grid (``grid``: ``_grid(blocks)``, if made)."""
    lo, d, q = grid or _grid(blocks)
    scale = np.maximum(np.abs(blocks).max(axis=1), 1e-30)
    return not (np.abs(lo[:, None] + d[:, None] * q - blocks) <= TOLERANCE * scale[:, None]).all()


def _block_indicator(k: int) -> np.ndarray:
    """[K, K/32] ones where input i belongs to block b: x @ it sums each block (any rank of x)."""
    return np.repeat(np.eye(k // BLOCK, dtype=np.float32), BLOCK, axis=0)


def weight_products(graph: gs.Graph):
    """(node, weight) for every MatMul of ``graph`` (not its subgraphs) by a constant weight."""
    for node in [n for n in graph.nodes if n.op == "MatMul" and len(n.inputs) == 2]:
        w = constant_values(node.inputs[1])
        if w is not None:
            yield node, w


def count(graph: gs.Graph) -> int:
    """How many products of ``graph`` (not its subgraphs) ``rewrite`` would rewrite (checked, not
    packed): the default lowering records it, so the runtime can tell that ``--lowering ort-grid`` applies."""
    return sum(grid_levels(w) is not None for _, w in weight_products(graph))


def rewrite(graph: gs.Graph) -> int:
    """Every MatMul of ``graph`` (not its subgraphs) by a constant grid weight, rewritten; returns how
    many. Constants are named ``<weight>@q41...`` so that ``If`` branches keep theirs (ONNX Runtime
    prepacks a MatMulNBits weight only when it is the branch's own)."""
    done = 0
    for node, w in list(weight_products(graph)):
        grid = grid_of(w)
        if grid is None:
            continue
        packed, scales, zero_points, residual = grid
        k, n = w.shape
        x, out, name = node.inputs[0], node.outputs[0], node.inputs[1].name
        c = lambda suffix, value: gs.Constant(f"{name}@q41{suffix}", value)  # noqa: E731
        v = lambda suffix: gs.Variable(f"{node.name}/q41/{suffix}", dtype=np.float32)  # noqa: E731
        main, sums, offset = v("main"), v("block_sums"), v("offset")
        node.inputs, node.outputs = [], []
        graph.nodes += [
            gs.Node("MatMulNBits", f"{node.name}/q41", {"K": k, "N": n, "bits": 4, "block_size": BLOCK,
                                                          "accuracy_level": FP32_COMPUTE},
                    [x, c("p", packed), c("s", scales), c("z", zero_points)], [main], domain=MS_DOMAIN),
            gs.Node("MatMul", f"{node.name}/q41/block_sums", {}, [x, c("blocks", _block_indicator(k))], [sums]),
            gs.Node("MatMul", f"{node.name}/q41/offset", {}, [sums, c("r", residual)], [offset]),
            gs.Node("Add", f"{node.name}/q41/add", {}, [main, offset], [out]),
        ]
        done += 1
    if done:
        graph.cleanup()
    return done
