"""Build one TensorRT engine (plan) from an ONNX step graph (plain, River, or a segment).

The ONNX parser does the import, so whatever it rejects is reported as a RiverError naming the node;
one optimization profile covers every dynamic axis. With TensorRT-RTX the build needs no GPU, which
is what lets CI prove our graphs parse and build (see ``package``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from river.atomic import write_bytes_atomic
from river.compiler.graph_io import load_onnx_header
from river.compiler.tensorrt.package import TRT_PACKAGE, require_trt
from river.errors import ModelNotFound, RiverError

log = logging.getLogger("river.tensorrt")

Shape = tuple[int, ...]
Profiles = dict[str, tuple[Shape, Shape, Shape]]

DEFAULT_WORKSPACE_BYTES = 4 << 30  # scratch the engine may claim at run time; ample for our models
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")

# Symbolic axes of the step-graph contract (river.export.contract).
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
WRITE_INDICES = "write_indices"  # present only in the shared-KV form, where TOTAL is the buffer length

# An engine built by TensorRT-RTX on a machine without a driver logs this after real errors; it
# would read as the cause of a failure that has another one.
_NO_DRIVER_NOISE = "CUDA driver version is insufficient"


@dataclass
class BuildReport:
    """What a build produced, for logs and tests."""

    layers: int  # layers in the parsed network (inside If branches included)
    conditional_layers: int  # IIfConditional boundary layers: condition, conditional inputs/outputs
    conditionals: int  # IIfConditional constructs (one condition layer each)
    plan_bytes: int
    seconds: float  # parse + build
    trt_package: str  # "tensorrt" | "tensorrt-rtx"
    version: str
    plan_path: Path | None = None
    plan: bytes | None = field(default=None, repr=False)  # the plan itself when no plan_path was given


def default_profiles(
    onnx_model: onnx.ModelProto | str | Path, max_batch: int = 1, max_seq: int = 256, max_past: int = 2048
) -> Profiles:
    """min/opt/max for every input of a step graph, from its symbolic dims (static dims kept).

    The three points must each be a consistent step (TensorRT checks shape constraints at them):
    total = past + seq in the contract graph, total = past (the buffer capacity) in the shared-KV
    form. opt is a decode step (seq 1) half-way into the cache, the shape that dominates generation.
    Symbolic dims with other names get 1 / 1 / max_seq.
    """
    model = onnx_model if isinstance(onnx_model, onnx.ModelProto) else load_onnx_header(onnx_model)
    inputs = model.graph.input
    shared_kv = any(i.name == WRITE_INDICES for i in inputs)
    batch = (1, max_batch, max_batch)
    seq = (1, 1, max_seq)
    past = (1, max(1, max_past // 2), max_past) if shared_kv else (0, max_past // 2, max_past)
    total = past if shared_kv else tuple(p + s for p, s in zip(past, seq))
    known = {BATCH: batch, SEQ: seq, PAST: past, TOTAL: total}
    profiles: Profiles = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            continue  # fully static: nothing for a profile to say
        points: list[list[int]] = [[], [], []]
        for d in dims:
            rng = (d.dim_value,) * 3 if d.HasField("dim_value") else known.get(d.dim_param, (1, 1, max_seq))
            for k in range(3):
                points[k].append(rng[k])
        profiles[value.name] = tuple(tuple(p) for p in points)  # type: ignore[assignment]
    return profiles


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path | None = None,
    *,
    profiles: Profiles | None = None,
    precision: str = "fp32",
    timing_cache: str | Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> BuildReport:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and build a serialized engine.

    ``profiles`` maps input name -> (min, opt, max) shapes; by default ``default_profiles`` of the
    graph. ``precision``: "fp32" is IEEE fp32 math where the graph says float (TF32 off); "tf32"
    lets fp32 matmuls use TF32; "fp16"/"bf16" let a weakly typed TensorRT (10.x) pick reduced
    precision kernels. TensorRT-RTX (and TensorRT 11) build strongly typed networks only: the graph's
    own tensor types decide, they have no fp16/bf16 builder flags, and asking for them is an error -
    convert the ONNX graph itself (e.g. ModelOpt AutoCast) instead.
    ``timing_cache``: a file read before and written after the build (TensorRT only; TensorRT-RTX
    ignores timing caches and documents that using one makes the build query a GPU).
    The plan is written atomically to ``plan_path`` when given, else returned in the report.
    """
    trt = require_trt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ModelNotFound(f"ONNX file not found: {onnx_path}")
    if precision not in PRECISIONS:
        raise RiverError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    reduced = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
    if reduced and not hasattr(trt.BuilderFlag, reduced):
        raise RiverError(
            f"precision {precision!r} needs a weakly typed build, and {TRT_PACKAGE} {trt.__version__} builds "
            f"strongly typed networks only (the graph's own tensor types decide): convert the ONNX graph "
            f"to {precision} (e.g. with ModelOpt AutoCast) and build that"
        )
    if profiles is None:
        profiles = default_profiles(onnx_path)

    start = time.perf_counter()
    logger = _make_logger(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # full TensorRT without a usable GPU fails here
        raise RiverError(f"{TRT_PACKAGE} could not create a builder: {_errors(logger) or exc}") from exc
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 0 if reduced or strongly_typed is None else 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse of bytes) so external weights next to the model are found
    if not parser.parse_from_file(str(onnx_path)):
        raise RiverError(_parser_failure(parser, onnx_path, logger))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if reduced:
        config.set_flag(getattr(trt.BuilderFlag, reduced))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; fp32 should mean fp32
    elif precision == "tf32" and hasattr(trt.BuilderFlag, "TF32"):
        config.set_flag(trt.BuilderFlag.TF32)
    _add_profile(builder, network, config, profiles, logger)
    cache = _load_timing_cache(trt, config, timing_cache)

    try:
        plan = builder.build_serialized_network(network, config)
    except Exception as exc:
        raise RiverError(f"{TRT_PACKAGE} failed to build {onnx_path}: {exc}; {_errors(logger)}") from exc
    if plan is None:  # build errors are logged, not raised
        raise RiverError(f"{TRT_PACKAGE} failed to build {onnx_path}: {_errors(logger) or 'no reason logged'}")
    seconds = time.perf_counter() - start
    if cache is not None:
        write_bytes_atomic(Path(timing_cache), memoryview(cache.serialize()))

    kinds = [network.get_layer(i).type for i in range(network.num_layers)]
    boundary = {getattr(trt.LayerType, n, None) for n in ("CONDITION", "CONDITIONAL_INPUT", "CONDITIONAL_OUTPUT")}
    report = BuildReport(
        layers=len(kinds),
        conditional_layers=sum(k in boundary for k in kinds),
        conditionals=sum(k == getattr(trt.LayerType, "CONDITION", None) for k in kinds),
        plan_bytes=plan.nbytes,
        seconds=seconds,
        trt_package=TRT_PACKAGE,
        version=trt.__version__,
    )
    if plan_path is not None:
        report.plan_path = write_bytes_atomic(Path(plan_path), memoryview(plan))
    else:
        report.plan = bytes(memoryview(plan))
    log.info("built %s in %.1fs: %s", onnx_path, seconds, report)
    return report


def _make_logger(trt):
    """A TensorRT logger that keeps errors (for our exceptions) and forwards the rest to logging."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg.strip())
                log.debug("%s", msg)
            elif severity <= trt.ILogger.Severity.WARNING:
                log.debug("%s", msg)

    return Logger()


def _errors(logger, limit: int = 4) -> str:
    errors = logger.errors
    real = [e for e in errors if _NO_DRIVER_NOISE not in e]
    return " | ".join(_one_line(e) for e in (real or errors)[:limit])


def _parser_failure(parser, onnx_path: Path, logger) -> str:
    """One message naming each node the parser rejected, with its reason."""
    parts = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"{err.func()} {str(err.code()).split('.')[-1]}"
        node = err.node()
        desc = _one_line(err.desc())
        if node < 0:
            parts.append(f"graph: {desc} [{where}]")
            continue
        name = getattr(err, "node_name", lambda: "")() or f"#{node}"
        op = getattr(err, "node_operator", lambda: "")() or "?"
        parts.append(f"node {name!r} ({op}): {desc} [{where}]")
    detail = "; ".join(parts) or _errors(logger) or "no reason given"
    return f"{TRT_PACKAGE}'s ONNX parser rejected {onnx_path}: {detail}"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " / ".join([line for line in lines if _NO_DRIVER_NOISE not in line] or lines)


def _add_profile(builder, network, config, profiles: Profiles, logger) -> None:
    """One optimization profile over the dynamic inputs; every dynamic input must be covered."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    dynamic = [n for n, t in inputs.items() if any(d < 0 for d in t.shape)]
    unknown = sorted(set(profiles) - set(inputs))
    if unknown:
        raise RiverError(f"profile names inputs the network does not have: {', '.join(unknown)}")
    missing = [n for n in dynamic if n not in profiles]
    if missing:
        raise RiverError(f"no profile shapes for dynamic inputs: {', '.join(missing)}")
    if not dynamic and not profiles:
        return
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    if config.add_optimization_profile(profile) < 0:
        raise RiverError(f"{TRT_PACKAGE} refused the optimization profile {profiles}: {_errors(logger)}")


def _load_timing_cache(trt, config, path):
    if path is None:
        return None
    if TRT_PACKAGE == "tensorrt-rtx":
        log.info("TensorRT-RTX ignores timing caches; not using %s", path)
        return None
    path = Path(path)
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache

