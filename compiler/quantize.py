"""Weight-only quantization for river twins: block-wise, symmetric, zero points 0.

One definition used by the compiler (to write the twin weights) and by the torch reference (to
dequantize the very same values), so both compute with identical twin weights. The ONNX form is
``DequantizeLinear(q, scale, axis=0, block_size=B)`` (opset 21), which ONNX Runtime runs and
TensorRT 10+ imports as block-wise weight-only quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantizedWeight:
    q: np.ndarray  # int8 storage of the integer values, same shape as the weight [K, N]
    scale: np.ndarray  # float32 [K / block, N]
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        return (self.q.astype(np.float32) * np.repeat(self.scale, self.block, axis=0)).astype(np.float32)


def quantize_blockwise(weight: np.ndarray, bits: int, block: int = 64) -> QuantizedWeight:
    """Quantize a MatMul weight [K (input), N (output)] in blocks of ``block`` rows along K."""
    k, n = weight.shape
    if k % block:
        raise ValueError(f"weight input dimension {k} is not a multiple of the block size {block}")
    qmax = 2 ** (bits - 1) - 1
    blocks = weight.astype(np.float32).reshape(k // block, block, n)
    amax = np.abs(blocks).max(axis=1)  # [K/block, N]
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -qmax, qmax).astype(np.int8).reshape(k, n)
    return QuantizedWeight(q, scale, bits, block)
