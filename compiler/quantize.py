"""Weight-only quantization for river twins, block-wise along the input dimension, symmetric.

Two twin formats, each with one definition shared by the compiler (which writes the twin weights) and
the torch reference (which dequantizes the very same values):

- ``dq`` (the TensorRT format, also runs in ONNX Runtime): ``DequantizeLinear(q, scale, axis=0,
  block_size=B)`` (opset 21), int8/int4 values in [-(2^(b-1)-1), 2^(b-1)-1], positive scales, zero
  points 0, which TensorRT 10+ imports as block-wise weight-only quantization.
- ``ort`` (the ONNX Runtime format): ``com.microsoft.MatMulNBits`` with weights packed by ONNX
  Runtime's own block quantizer (``DefaultWeightOnlyQuantizer``, symmetric), which ORT prepacks
  for its fast int8/int4 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from river.compiler.river.manifest import TWIN_FORMATS

BITS = {"int8": 8, "int4": 4}  # twin precision -> bits


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


def unpack_nbits(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits bytes -> unsigned stored values (int32; 4 bits: two a byte, low nibble first)."""
    if bits == 8:
        return packed.astype(np.int32)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int32)


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


@dataclass(frozen=True)
class ChannelQuantizedWeight:
    """Dynamic-int8 twin weights (ort format, int8): per output channel, symmetric, zero point 0.

    At run time the activation is quantized per tensor (``DynamicQuantizeLinear``, uint8) and the
    product is an integer ``MatMulInteger``: the pattern ONNX Runtime fuses into its fast
    ``DynamicQuantizeMatMul`` kernel (MatMulNBits at 8 bits has no fast fp32 CPU path)."""

    q: np.ndarray  # int8 [K, N]
    scale: np.ndarray  # float32 [N]

    def dequantize(self) -> np.ndarray:
        return (self.q.astype(np.float32) * self.scale[None, :]).astype(np.float32)


def quantize_channels_int8(weight: np.ndarray) -> ChannelQuantizedWeight:
    amax = np.abs(weight.astype(np.float32)).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[None, :]), -127, 127).astype(np.int8)
    return ChannelQuantizedWeight(q, scale)


def dynamic_int8_matmul(x, weight: ChannelQuantizedWeight):
    """What DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul computes, in torch (float64 keeps
    the integer products exact). ``x`` is a torch tensor [..., K]; returns float32 [..., N]."""
    import torch

    xd = x.detach().to(torch.float64)
    lo, hi = torch.clamp(xd.min(), max=0.0), torch.clamp(xd.max(), min=0.0)
    scale = ((hi - lo) / 255.0).to(torch.float32).to(torch.float64)  # ONNX computes the scale in fp32
    if float(scale) == 0.0:
        return torch.zeros(*x.shape[:-1], weight.q.shape[1], dtype=torch.float32)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    xq = torch.clamp(torch.round(xd / scale) + zp, 0, 255)
    wq = torch.from_numpy(weight.q.astype(np.float64))
    acc = torch.matmul(xq - zp, wq)
    combined = (scale.to(torch.float32) * torch.from_numpy(weight.scale)).to(torch.float64)
    return (acc.to(torch.float32).to(torch.float64) * combined).to(torch.float32)
