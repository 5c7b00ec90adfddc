"""Weight-only quantization for river twins, block-wise along the input dimension, symmetric.

Two twin formats, each with one definition shared by the compiler (which writes the twin weights) and
the torch reference (which dequantizes the very same values):

- ``dq`` (the TensorRT format, also runs in ONNX Runtime): ``DequantizeLinear(q, scale, axis=0,
  block_size=B)`` (opset 21), int8/int4 values in [-(2^(b-1)-1), 2^(b-1)-1], positive scales, zero
  points 0, which TensorRT 10+ imports as block-wise weight-only quantization.
- ``ort`` (the ONNX Runtime format): ``com.microsoft.MatMulNBits`` with weights packed by ONNX
  Runtime's own block quantizer (``DefaultWeightOnlyQuantizer``, symmetric), which ORT prepacks,
  at accuracy level 4 (``NBITS_ACCURACY``): ONNX Runtime's integer CPU path, which quantizes each
  row of the activation to int8 per block of the input dimension (``nbits_activations``: the same
  in torch, for the reference).

Why accuracy level 4 rather than dynamic int8 (``DynamicQuantizeLinear`` -> ``MatMulInteger``, the
twins' format before): one activation scale per block of one row loses far less than one scale per
tensor (``river-bench --quick`` on SmolLM2, every weight MatMul and the head at 8 bits: 91.7%
teacher-forced agreement against 80.3%), a row's product no longer depends on the other rows of its
batch (a segmented River's rivers run batched), and the kernel is fast: a 576x1536 GEMV at 2 threads
takes 43 us against fp32's 124 us when the weights are out of cache (21 against 33 in cache); level 1
(fp32 compute) takes 1.7 ms at 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from river.compiler.river.manifest import TWIN_FORMATS

BITS = {"int8": 8, "int4": 4}  # twin precision -> bits
NBITS_ACCURACY = 4  # MatMulNBits' accuracy_level for every twin and draft product: int8 activations per block


@dataclass(frozen=True)
class QuantizedWeight:
    """The dq format: signed integers (int8 storage) and float scales per block."""

    q: np.ndarray  # [K, N] integer values
    scale: np.ndarray  # float32 [K / block, N]
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        return (self.q.astype(np.float32) * np.repeat(self.scale, self.block, axis=0)).astype(np.float32)


@dataclass(frozen=True)
class PackedWeight:
    """The ort format: MatMulNBits layout, B [N, K/block, blob] uint8, scales [N, K/block]."""

    packed: np.ndarray
    scales: np.ndarray
    bits: int
    block: int
    k: int
    n: int

    def unpacked(self) -> np.ndarray:
        """Unsigned stored values [N, K/block, block]."""
        return unpack_nbits(self.packed, self.bits).reshape(self.n, -1, self.block)

    def dequantize(self) -> np.ndarray:
        """[K, N] float32, as MatMulNBits computes it (default zero point 2^(bits-1))."""
        values = (self.unpacked() - 2 ** (self.bits - 1)).astype(np.float32) * self.scales[:, :, None]
        return values.reshape(self.n, self.k).T.astype(np.float32).copy()


def quantize_blockwise(weight: np.ndarray, bits: int, block: int = 64) -> QuantizedWeight:
    """The dq format of a MatMul weight [K (input), N (output)], blocks of ``block`` rows along K."""
    k, n = weight.shape
    if k % block:
        raise ValueError(f"weight input dimension {k} is not a multiple of the block size {block}")
    qmax = 2 ** (bits - 1) - 1
    blocks = weight.astype(np.float32).reshape(k // block, block, n)
    amax = np.abs(blocks).max(axis=1)  # [K/block, N]
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -qmax, qmax).astype(np.int8).reshape(k, n)
    return QuantizedWeight(q, scale, bits, block)


def pack_nbits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned stored values -> MatMulNBits bytes along the last axis (4 bits: two a byte, low nibble
    first, an odd count padded with a zero nibble); ``unpack_nbits``' inverse."""
    v = np.asarray(values).astype(np.uint8)
    if bits == 8:
        return v
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack_nbits(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits bytes -> unsigned stored values (int32; 4 bits: two a byte, low nibble first)."""
    if bits == 8:
        return packed.astype(np.int32)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int32)


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The [K, N] weight a MatMulNBits twin holds (tests, and the greedy head's error bound)."""
    n, blocks, _ = packed.shape
    q = unpack_nbits(packed, bits).astype(np.float32)
    zp = unpack_nbits(zero_points, bits).reshape(n, -1)[:, :blocks].astype(np.float32)
    w = (q - zp[:, :, None]) * scales.reshape(n, blocks)[:, :, None]
    return w.reshape(n, -1)[:, :k].T.astype(np.float32)


def ort_block_quant(weight: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [K, N] weight as MatMulNBits inputs, by ONNX Runtime's own block quantizer: packed
    [N, K/block, blob] uint8, scales [N, K/block] float32, zero points [N, ceil(K/block*bits/8)] uint8
    (ignored by MatMulNBits when symmetric: it then assumes 2^(bits-1))."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    k = weight.shape[0]
    if k % block:
        raise ValueError(f"weight input dimension {k} is not a multiple of the block size {block}")
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight, dtype=np.float32))
    return packed, scales.astype(np.float32), zero_points


def quantize_ort(weight: np.ndarray, bits: int, block: int = 64) -> PackedWeight:
    """The ort format, packed by ONNX Runtime's own block quantizer (symmetric)."""
    packed, scales, _zero_points = ort_block_quant(weight, bits, block, symmetric=True)
    return PackedWeight(packed, scales, bits, block, *weight.shape)


def quantize(weight: np.ndarray, bits: int, block: int, twin_format: str):
    if twin_format not in TWIN_FORMATS:
        raise ValueError(f"unknown twin format '{twin_format}' (choose from {', '.join(TWIN_FORMATS)})")
    return quantize_ort(weight, bits, block) if twin_format == "ort" else quantize_blockwise(weight, bits, block)


def nbits_activations(x, block: int):
    """The activation ``MatMulNBits`` at accuracy level 4 multiplies, in torch: each row of ``x``
    [..., K] quantized to int8 per block of ``block`` inputs (scale = the block's max |x| / 127 in
    float32, round to nearest even) and dequantized, as float64 so that its product with the
    dequantized weight is exact (ONNX Runtime sums the integer products in another order, within
    ~1e-6 of that).

    Exact per product, not over many layers: an input within float noise of a rounding boundary
    (ONNX Runtime's layer input differs from torch's in its last bits) may round the other way, a
    step's worth of difference that the layers after it carry on."""
    import torch

    xf = x.detach().to(torch.float32)
    blocks = xf.reshape(*xf.shape[:-1], -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    q = torch.round(blocks / torch.where(scale > 0, scale, torch.ones_like(scale)))
    return (q.to(torch.float64) * scale.to(torch.float64)).reshape(xf.shape)
