"""ONNX Runtime sessions with the project's options (used by the compiler's calibration and the runtime)."""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort

from river.compiler import ort_ops
from river.errors import RiverError

_PROTO_LIMIT = 1_800_000_000  # serialized protos near 2 GiB must go through a file
_shared_pool_threads: int | None = None


def check_threads(threads: int | None) -> None:
    """``--threads``: None (all cores) or a positive count; the CLIs check it before any work."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise RiverError(f"--threads must be a positive number of threads, not {threads!r}")


def use_shared_thread_pool(threads: int | None = None) -> None:
    """Give every session this process creates from now on one intra-op thread pool.

    Why: verify mode alternates two sessions (draft, backbone) step by step. With a pool each, the
    pool that just ran keeps its threads spinning on the cores the other session needs (SmolLM2,
    2 cores: verify mode fell from 1.4x to 0.75x of the full model). ONNX Runtime's global pool is
    process-wide and, once made, refuses sessions that ask for their own pool, so only entry points
    that own their process call this (the CLIs, the benchmarks); library code never does.
    """
    global _shared_pool_threads
    check_threads(threads)
    if _shared_pool_threads is not None:
        return
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
    _shared_pool_threads = threads or 0


def shared_thread_pool() -> bool:
    """Whether this process's sessions share one thread pool (see ``use_shared_thread_pool``)."""
    return _shared_pool_threads is not None


def graph_input_names(session: ort.InferenceSession) -> set[str]:
    """Every input a session's graph takes, those with a default too: ONNX Runtime lists the latter
    apart, as overridable initializers (``greedy_logits``, a River graph's thresholds)."""
    return {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}


def session_options(threads: int | None = None, matmul_accuracy: int = 1, optimization: str = "all",
                    prepacking: bool = True, spinning: bool = True) -> ort.SessionOptions:
    """ORT options. ``matmul_accuracy``: ONNX Runtime fuses our twins' DequantizeLinear -> MatMul into
    MatMulNBits; its accuracy level 4 (ORT's default) quantizes activations to int8 as well, level 1
    computes in fp32 and matches the weight-only twins the compiler wrote. We default to 1."""
    check_threads(threads)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(matmul_accuracy))
    if not prepacking:  # ORT prepacks only a graph's own initializers: off, both graphs run the same GEMMs
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:  # sessions that alternate with a pool each: an idle pool must not spin on the next one's cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # "basic" (no fusions) makes two graphs with the same ops compute bit-alike; "all" is for speed
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[optimization]
    if _shared_pool_threads is not None:
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads or 0
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    library = ort_ops.library()  # River's own ops (Q41MatMul), when built: graphs lowered to them need it
    if library is not None:
        so.register_custom_ops_library(str(library))
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
