"""What a River rewrite is asked to build: gates, twin kind and precision, twin format, default
thresholds (``RiverSpec``), with the checks that turn a bad request into one clear RiverError."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from river.compiler.river import twins
from river.compiler.river.manifest import DISABLED, TWIN_FORMATS
from river.errors import RiverError

PRECISIONS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class RiverSpec:
    gates: tuple[int, ...]  # backbone layer indices after which a token may exit
    kind: str = "full"  # a twin kind of the registry (river.compiler.river.twins)
    precision: str = "int8"
    block: int = 64  # quantization block along the input dimension
    thresholds: tuple[float, ...] | None = None  # default thresholds (None: every gate disabled)
    twin_format: str = "ort"  # quantized twins: "ort" (MatMulNBits, accuracy level 4) or "dq" (DequantizeLinear, TensorRT)
    head: str = "fp32"  # the precision of the LM head a river ends with (the backbone keeps the model's head)

    @classmethod
    def from_name(cls, river: str, gates, **kw) -> RiverSpec:
        """The CLI's ``--river`` names (int8, int4, fp32, attn, kv, and any registered kind)."""
        kind, precision = twins.resolve(river)
        return cls(tuple(gates), kind, kw.pop("precision", None) or precision, **kw)

    @classmethod
    def from_manifest(cls, river_dir) -> RiverSpec:
        """The spec a ``river-export`` folder was compiled with (its ``river.json``): the other forms
        of the same River (segments, TensorRT forms) are built from it."""
        from river.compiler.river.manifest import RiverManifest

        m = RiverManifest.load(river_dir)
        return cls(tuple(m.gates), m.kind, m.precision, m.block,
                   None if m.thresholds is None else tuple(m.thresholds), m.twin_format, m.head)


def check_spec(spec: RiverSpec, num_layers: int) -> None:
    """Why a spec cannot apply to a model with ``num_layers`` layers (raises RiverError)."""
    twins.get(spec.kind)
    if spec.twin_format not in TWIN_FORMATS:
        raise RiverError(f"unknown twin format '{spec.twin_format}' (choose from {', '.join(TWIN_FORMATS)})")
    if spec.precision not in PRECISIONS:
        raise RiverError(f"unknown twin precision '{spec.precision}' (choose from {', '.join(PRECISIONS)})")
    if spec.head not in PRECISIONS:
        raise RiverError(f"unknown river head precision '{spec.head}' (choose from {', '.join(PRECISIONS)})")
    if not spec.gates:
        raise RiverError("no gates: give at least one gate layer")
    if list(spec.gates) != sorted(set(spec.gates)):
        raise RiverError(f"gate layers must be strictly increasing: {list(spec.gates)}")
    bad = [g for g in spec.gates if not 0 <= g < num_layers - 1]
    if bad:
        raise RiverError(f"gate layers {bad} out of range: a gate sits after layer 0..{num_layers - 2} "
                         f"(the model has {num_layers} layers; a gate after the last layer exits nothing)")
    if spec.thresholds is not None and len(spec.thresholds) != len(spec.gates):
        raise RiverError(f"{len(spec.thresholds)} thresholds for {len(spec.gates)} gates")


def default_gates(num_layers: int) -> tuple[int, ...]:
    """The middle band where exits pay off: gates after layers L/2 .. 3L/4, every L/10 layers or so."""
    lo, hi = num_layers // 2 - 1, (3 * num_layers) // 4 - 1
    step = max(1, num_layers // 10)
    return tuple(range(max(lo, 0), max(hi, lo) + 1, step))


def default_thresholds(spec: RiverSpec) -> np.ndarray:
    """The spec's thresholds, or every gate disabled."""
    return np.array(spec.thresholds if spec.thresholds is not None else [DISABLED] * len(spec.gates), np.float32)
