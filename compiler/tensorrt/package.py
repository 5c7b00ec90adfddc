"""One place that decides which TensorRT Python package River uses (``TRT_PACKAGE``).

``tensorrt`` (the production target on GPU machines) wins when it imports; otherwise
``tensorrt_rtx`` (pip package ``tensorrt-rtx``), whose wheels ship their libraries on PyPI and
which parses ONNX and builds engines on a machine without a GPU (it cannot run them there). The two
expose the same API under different module names, so the rest of River imports ``trt`` from here.
"""

from __future__ import annotations

from types import ModuleType

from river.errors import RiverError

INSTALL_HINT = (
    "install TensorRT (`pip install tensorrt`, needs an NVIDIA GPU and driver) or, to parse and build "
    "engines without a GPU, TensorRT-RTX (`pip install tensorrt-rtx`)"
)


def _load() -> tuple[ModuleType | None, str | None, list[str]]:
    reasons = []
    try:
        import tensorrt as module

        # A half-installed `tensorrt` (the index's meta package without its libraries) can import
        # and still lack the builder: only a module with a Builder counts.
        if hasattr(module, "Builder"):
            return module, "tensorrt", reasons
        reasons.append("tensorrt: imported but has no Builder (libraries missing?)")
    except Exception as exc:  # ImportError, or OSError from a library that fails to load
        reasons.append(f"tensorrt: {exc}")
    try:
        import tensorrt_rtx as module

        return module, "tensorrt-rtx", reasons
    except Exception as exc:
        reasons.append(f"tensorrt_rtx: {exc}")
    return None, None, reasons


trt, TRT_PACKAGE, _REASONS = _load()


def require_trt() -> ModuleType:
    """The TensorRT module, or a RiverError saying how to install one."""
    if trt is None:
        raise RiverError(f"TensorRT is not available ({'; '.join(_REASONS)}): {INSTALL_HINT}")
    return trt
