"""River's own ONNX Runtime custom ops (one C++ library, ``libriver_ops.so``): where it is, whether it is
built for these sources, and what this CPU runs of it.

Why a library of our own: the exact products by a GGUF's Q4_1 and Q8_0 weights (``ai.river::Q41MatMul``,
``ai.river::Q80MatMul``; ``kernels.cpp``) have no ONNX Runtime kernel - ``MatMulNBits`` takes integer zero
points only, and its exact Q4_1 form with an offset path costs ~2x ours - and River's twins of Q4_1 weights
(``ai.river::Q41MatMulInt8``: the same 4-bit weights by int8 activations, cheaper than the exact product).
``build.py`` compiles the library (``./setup.sh`` runs it); every session the project makes registers it when it is there (``compiler/ort_session.py``), and
the lowering writes the ops only when it is (``library``), so a machine without a compiler runs fp32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
from pathlib import Path

DOMAIN = "ai.river"  # the ops' ONNX domain (opset version 1)
HERE = Path(__file__).parent
SOURCES = ("river_ops.cpp", "kernels.cpp", "kernels.h")
BUILD_DIR = HERE / "build"
LIBRARY = BUILD_DIR / "libriver_ops.so"
STAMP = BUILD_DIR / "sources.sha256"  # the sources the library was built from
BUILD_COMMAND = "python -m river.compiler.ort_ops.build"


def sources_digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()


def built_from_sources() -> bool:
    """Whether the library exists and was built from the sources beside it (``build.py`` stamps them)."""
    return LIBRARY.exists() and STAMP.exists() and STAMP.read_text().strip() == sources_digest()


@functools.lru_cache(maxsize=1)
def status() -> tuple[Path | None, str]:
    """(the library, "") when it is built from these sources and runs on this CPU, else (None, why not)."""
    if not LIBRARY.exists():
        return None, f"River's ONNX Runtime ops are not built (run `{BUILD_COMMAND}` or ./setup.sh)"
    if not built_from_sources():
        return None, f"River's ONNX Runtime ops were built from other sources (run `{BUILD_COMMAND}`)"
    if _library_isa() == "none":
        return None, "this CPU has neither AVX-512 nor AVX2 with FMA and F16C (River's kernels need one)"
    return LIBRARY, ""


def library() -> Path | None:
    """The ops library to register in a session, or None (``status`` says why)."""
    return status()[0]


def isa() -> str:
    """The instruction set this CPU runs the kernels with ("avx512", "avx2"), "" without the library."""
    return "" if library() is None else _library_isa()


def _library_isa() -> str:
    """What the built library says this CPU runs: "avx512", "avx2" or "none"."""
    fn = ctypes.CDLL(str(LIBRARY)).RiverOpsIsa
    fn.restype = ctypes.c_char_p
    return fn().decode()
