"""Build River's ONNX Runtime ops library (``python -m river.compiler.ort_ops.build``; ``./setup.sh`` runs it).

Needs a C++17 compiler (``$CXX``, default g++) and ONNX Runtime's C API headers, which no Python package
ships: they are taken from the npm registry's ``com.github.asus4.onnxruntime`` (ONNX Runtime's own
framework build, MIT licence; C API version 29, and the library asks the runtime for version 17 only),
checked against the registry's checksum, or from ``--headers DIR`` / ``$RIVER_ORT_HEADERS``. Each kernel is
compiled twice, for AVX2 + FMA + F16C and for AVX-512, and the library picks one at run time. The result
is written to a temporary path and renamed, so a failed build leaves the last good library in place.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from river.compiler import ort_ops
from river.errors import RiverError, run_command

HEADERS = ("onnxruntime_c_api.h", "onnxruntime_error_code.h", "onnxruntime_ep_c_api.h")
HEADERS_PACKAGE = ("https://registry.npmjs.org/com.github.asus4.onnxruntime/-/com.github.asus4.onnxruntime-0.4.9.tgz",
                   "3659f34012db8208ffb7f67d704204cb08792fed")  # (tarball, the registry's sha1)
HEADERS_IN_PACKAGE = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers/"
ISAS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma", "-mf16c", "-DRIVER_AVX512"], "avx2": ["-mavx2", "-mfma", "-mf16c"]}
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden"]


def fetch_headers(into: Path) -> None:
    """ONNX Runtime's C API headers from the npm registry into ``into`` (skipped when already there)."""
    if all((into / h).exists() for h in HEADERS):
        return
    url, sha1 = HEADERS_PACKAGE
    print(f"fetching ONNX Runtime's C API headers from {url.split('/-/')[0]} ...", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
    except OSError as exc:
        raise RiverError(f"could not download ONNX Runtime's headers ({exc}); pass --headers DIR (setup.sh: "
                         f"RIVER_ORT_HEADERS=DIR) with {', '.join(HEADERS)}, or SKIP_RIVER_OPS=1 ./setup.sh to run "
                         "without River's ops") from None
    if hashlib.sha1(data).hexdigest() != sha1:
        raise RiverError(f"the download of {url} does not match the registry's checksum; try again")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name in HEADERS:
            member = tar.extractfile(HEADERS_IN_PACKAGE + name)
            (into / name).write_bytes(member.read())


def compile_library(headers: Path, out: Path, cxx: str) -> None:
    """The library from the sources beside this file, written to ``out``."""
    src = ort_ops.HERE
    with tempfile.TemporaryDirectory() as tmp:
        objects = []
        for isa, flags in ISAS.items():
            obj = Path(tmp) / f"kernels_{isa}.o"
            _run([cxx, *FLAGS, *flags, "-c", str(src / "kernels.cpp"), "-o", str(obj)])
            objects.append(str(obj))
        _run([cxx, *FLAGS, "-shared", f"-I{headers}", str(src / "river_ops.cpp"), *objects, "-o", str(out)])


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RiverError(f"building River's ONNX Runtime ops failed: {' '.join(cmd[:1])} said: "
                         f"{(done.stderr.strip().splitlines() or ['(nothing)'])[0]}")


def build(headers: Path | None = None, cxx: str | None = None) -> Path:
    """Build the library for these sources (a no-op when it is); returns its path."""
    if ort_ops.built_from_sources():
        return ort_ops.LIBRARY
    digest = ort_ops.sources_digest()  # of the sources compiled below
    cxx = cxx or os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RiverError(f"no C++ compiler '{cxx}' to build River's ONNX Runtime ops: install g++ or set CXX "
                         "(or SKIP_RIVER_OPS=1 ./setup.sh: Q4_1 and Q8_0 weights then run as fp32 matrices)")
    build_dir = ort_ops.BUILD_DIR
    if headers is None:
        headers = build_dir / "include"
        fetch_headers(headers)
    elif not all((headers / h).exists() for h in HEADERS):
        raise RiverError(f"{headers} lacks some of {', '.join(HEADERS)}")
    print("compiling River's ONNX Runtime ops (Q41MatMul, Q80MatMul, Q41MatMulInt8: AVX2 and AVX-512 kernels) ...", flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f".{ort_ops.LIBRARY.name}.{os.getpid()}.tmp"
    try:
        compile_library(headers, tmp, cxx)
        os.replace(tmp, ort_ops.LIBRARY)
    finally:
        tmp.unlink(missing_ok=True)
    ort_ops.STAMP.write_text(digest + "\n")
    ort_ops.status.cache_clear()
    return ort_ops.LIBRARY


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m river.compiler.ort_ops.build", description=__doc__.split("\n\n")[0],
                                epilog="The library lands in river/compiler/ort_ops/build/; every River session "
                                       "registers it, and the ONNX Runtime lowering runs Q4_1 and Q8_0 weights with it.")
    p.add_argument("--headers", type=Path, default=os.environ.get("RIVER_ORT_HEADERS") or None,
                   help="a folder with ONNX Runtime's C API headers (default: fetched from the npm registry)")
    p.add_argument("--cxx", help="the C++ compiler (default: $CXX or g++)")
    args = p.parse_args(argv)

    def body() -> int:
        path = build(args.headers, args.cxx)
        print(f"River's ONNX Runtime ops: {path} ({ort_ops.isa() or 'not runnable on this CPU'})")
        return 0

    return run_command("river-ops-build", body, ort_ops.BUILD_DIR)


if __name__ == "__main__":
    sys.exit(main())
