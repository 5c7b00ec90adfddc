"""ONNX Runtime sessions with the project's options (used by the compiler's calibration and the runtime)."""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort

_PROTO_LIMIT = 1_800_000_000  # serialized protos near 2 GiB must go through a file


def session_options(threads: int | None = None, matmul_accuracy: int = 1, optimization: str = "all",
                    prepacking: bool = True) -> ort.SessionOptions:
    """ORT options. ``matmul_accuracy``: ONNX Runtime fuses our twins' DequantizeLinear -> MatMul into
    MatMulNBits; its accuracy level 4 (ORT's default) quantizes activations to int8 as well, level 1
    computes in fp32 and matches the weight-only twins the compiler wrote. We default to 1."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmul_accuracy))
    if not prepacking:  # ORT prepacks only a graph's own initializers: off, both graphs run the same GEMMs
        so.add_session_config_entry("session.disable_prepacking", "1")
    # "basic" (no fusions) makes two graphs with the same ops compute bit-alike; "all" is for speed
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[optimization]
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def make_session(model: onnx.ModelProto, threads: int | None = None, providers=None,
                 matmul_accuracy: int = 1, optimization: str = "all", prepacking: bool = True) -> ort.InferenceSession:
    providers = providers or ["CPUExecutionProvider"]
    so = session_options(threads, matmul_accuracy, optimization, prepacking)
    if model.ByteSize() < _PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, so, providers=providers)
