"""TensorRT engines for a River model: the fused graph and every segment, from one call.

Forms (see ``river.chained`` and ``river.segments`` for why each exists):

- ``fused``: the *chained* River graph (one top-level ``If`` per layer group). TensorRT-RTX 1.7's
  builder fails on nested ``If`` nodes, so the nested ONNX Runtime layout is not what engines are
  built from. Contract (Concat) KV: dynamic batch/sequence/past axes.
- ``segment``: each segment in the contract form (dynamic axes): prefill, and any runtime that does
  not keep a static cache.
- ``segment.kv``: each segment in the shared-KV form with a *static* cache capacity: TensorRT imports
  ``TensorScatter`` as an in-place KVCacheUpdate layer, which wants the cache as a network input with
  a static sequence length, its output bound to the same memory. Only segments qualify: inside an
  ``If`` branch the cache is not a network input, and the builder refuses it.

Twins are block-wise symmetric ``DequantizeLinear`` weights (the ``dq`` twin format); TensorRT
wants blocks of 64 or 128 (``lowering.tensorrt``). Every build goes through ``build.build_engine``,
so a node the parser rejects is named with the parser's reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from river.atomic import atomic_dir, require_empty
from river.compiler.graph_io import load_onnx, load_onnx_header, save_onnx_atomic
from river.compiler.lowering.tensorrt import check_twins_for_trt, trt_onnx
from river.compiler.river.chained import chained_river_graph
from river.compiler.river.manifest import (
    CHAINED_DIR,
    ENGINES_DIR,
    ENGINES_FILE,
    SEGMENTS_DIR,
    TRT_DIR,
    RiverInfo,
)
from river.compiler.river.segments import SegmentIndex, write_segments
from river.compiler.river.spec import RiverSpec
from river.compiler.tensorrt.build import BuildReport, build_engine, default_profiles
from river.errors import RiverError



@dataclass
class EngineBuild:
    name: str  # "fused" | segment name | "<segment>.kv"
    form: str  # "fused" | "segment" | "segment.kv" | "step"
    onnx: str
    plan: str  # file name inside the engines folder
    capacity: int | None
    layers: int
    conditionals: int
    conditional_layers: int
    plan_bytes: int
    seconds: float
    trt_package: str  # "tensorrt" | "tensorrt-rtx"
    version: str
    profiles: dict = field(default_factory=dict)


@dataclass
class EnginesReport:
    folder: Path
    builds: list[EngineBuild]
    precision: str
    segments: str | None = None  # segments folder the segment engines came from (relative or absolute)
    gates: list[int] = field(default_factory=list)

    def build(self, name: str) -> EngineBuild:
        return next(b for b in self.builds if b.name == name)

    def seconds(self, form: str) -> float:
        return sum(b.seconds for b in self.builds if b.form == form)

    def to_json(self, relative_to: Path | None = None) -> dict:
        """With ``relative_to`` (the engines folder), source paths are stored relative to it, so a
        folder holding engines and sources together can move."""
        d = asdict(self)
        d.pop("folder")
        if relative_to is not None:
            base = Path(relative_to).resolve()
            d["segments"] = None if self.segments is None else os.path.relpath(self.segments, base)
            for b in d["builds"]:
                b["onnx"] = os.path.relpath(b["onnx"], base)
        return d

    @classmethod
    def load(cls, folder: str | Path) -> EnginesReport:
        folder = Path(folder)
        path = folder / ENGINES_FILE
        if not path.is_file():
            raise RiverError(f"no {ENGINES_FILE} in {folder}: build engines with river.compiler.tensorrt.engines")
        data = json.loads(path.read_text())
        for b in data["builds"]:
            if "flavour" in b:  # the TensorRT package's field name before 0.2
                b["trt_package"] = b.pop("flavour")
        data["builds"] = [EngineBuild(**b) for b in data["builds"]]
        for b in data["builds"]:
            b.onnx = str((folder / b.onnx).resolve())
        if data.get("segments") is not None:
            data["segments"] = str((folder / data["segments"]).resolve())
        return cls(folder=folder, **data)


def _profile_json(profiles) -> dict:
    return {k: [list(p) for p in v] for k, v in profiles.items()}


def build_one(onnx_path: str | Path, plan_path: Path, *, name: str, form: str, capacity: int | None = None,
              precision: str = "fp32", max_batch: int = 1, max_seq: int = 256, max_past: int = 2048,
              timing_cache=None) -> EngineBuild:
    """Build one engine from a River/segment ONNX file (via a TensorRT-ready copy, see ``trt_onnx``)."""
    onnx_path = Path(onnx_path)
    header = load_onnx_header(onnx_path)
    info = RiverInfo.from_model(header)
    if info is not None:
        check_twins_for_trt(info.precision, info.block, info.twin_format)
    ready = trt_onnx(onnx_path, capacity)
    try:
        if capacity is not None:  # decode engines: one new token per row over the static cache
            profiles = default_profiles(ready, max_batch=max_batch, max_seq=1, max_past=capacity)
        else:
            profiles = default_profiles(ready, max_batch=max_batch, max_seq=max_seq, max_past=max_past)
        report: BuildReport = build_engine(ready, plan_path, profiles=profiles, precision=precision,
                                           timing_cache=timing_cache)
    finally:
        ready.unlink(missing_ok=True)
    return EngineBuild(name, form, str(onnx_path.resolve()), plan_path.name, capacity, report.layers, report.conditionals,
                       report.conditional_layers, report.plan_bytes, round(report.seconds, 3), report.trt_package,
                       report.version, _profile_json(profiles))


def build_river_engines(out_dir: str | Path, *, fused_onnx: str | Path | None = None,
                        segments_dir: str | Path | None = None, step_onnx: str | Path | None = None,
                        capacity: int | None = None, precision: str = "fp32", max_batch: int = 1,
                        max_seq: int = 256, max_past: int = 2048, timing_cache=None,
                        segment_names: list[str] | None = None) -> EnginesReport:
    """Engines for whichever forms are given, into ``out_dir`` (+ ``engines.json``), atomically.

    ``fused_onnx``: a chained River graph (``river.chained``); a nested one is built as given (and
    fails on TensorRT-RTX 1.7, see module docstring). ``segments_dir``: a folder written by
    ``river.segments.write_segments``: one engine per segment (contract form) and, with ``capacity``, one
    per segment in the shared-KV form with that static cache length. ``step_onnx``: the plain step
    graph (the no-exit baseline engine). ``segment_names`` limits which segments are built.
    """
    out_dir = Path(out_dir)
    require_empty(out_dir)
    if fused_onnx is None and segments_dir is None and step_onnx is None:
        raise RiverError("nothing to build: give fused_onnx, segments_dir and/or step_onnx")
    common = {"precision": precision, "max_batch": max_batch, "max_seq": max_seq, "max_past": max_past,
              "timing_cache": timing_cache}
    builds: list[EngineBuild] = []
    gates: list[int] = []
    with atomic_dir(out_dir) as tmp:
        if step_onnx is not None:
            builds.append(build_one(step_onnx, tmp / "step.plan", name="step", form="step", **common))
        if fused_onnx is not None:
            info = RiverInfo.from_model(load_onnx_header(fused_onnx))
            gates = list(info.gates) if info is not None else gates
            builds.append(build_one(fused_onnx, tmp / "fused.plan", name="fused", form="fused", **common))
        if segments_dir is not None:
            index = SegmentIndex.load(segments_dir)
            gates = list(index.gates)
            check_twins_for_trt(index.precision, index.block, index.twin_format)
            for seg in index.segments:
                if segment_names is not None and seg.name not in segment_names:
                    continue
                builds.append(build_one(index.path(seg), tmp / f"{seg.name}.plan", name=seg.name, form="segment", **common))
                if capacity is not None:
                    builds.append(build_one(index.path(seg, shared_kv=True), tmp / f"{seg.name}.kv.plan",
                                            name=f"{seg.name}.kv", form="segment.kv", capacity=capacity, **common))
        report = EnginesReport(out_dir, builds, precision, None if segments_dir is None else str(Path(segments_dir).resolve()), gates)
        (tmp / ENGINES_FILE).write_text(json.dumps(report.to_json(relative_to=out_dir), indent=2))
    return report


def write_trt_forms(step: str | Path | onnx.ModelProto, spec: RiverSpec, trt_dir: str | Path, *,
                    fused: bool = True, segmented: bool = True) -> dict[str, Path]:
    """Write the ONNX forms engines are built from into ``trt_dir``: ``chained/model.onnx`` (fused)
    and ``segments/`` (both KV forms), always with the TensorRT twin format (DequantizeLinear).
    Returns {"fused": path, "segments": folder} for what was written."""
    check_twins_for_trt(spec.precision, spec.block)
    spec = dataclasses.replace(spec, twin_format="dq")  # TensorRT reads DequantizeLinear, not MatMulNBits
    trt_dir = Path(trt_dir)
    model = load_onnx(step) if not isinstance(step, onnx.ModelProto) else step
    written: dict[str, Path] = {}
    if fused:
        written["fused"] = save_onnx_atomic(chained_river_graph(model, spec), trt_dir / CHAINED_DIR / "model.onnx")
    if segmented:
        written["segments"] = write_segments(model, spec, trt_dir / SEGMENTS_DIR).parent
    return written


def compile_trt(step: str | Path | onnx.ModelProto, spec: RiverSpec, river_dir: str | Path, *,
                fused: bool = True, segmented: bool = True, capacity: int | None = None,
                precision: str = "fp32", max_batch: int = 1, max_seq: int = 256, max_past: int = 2048,
                timing_cache=None, log=None) -> EnginesReport:
    """``river-export --trt``: the TensorRT forms and their engines, in ``river_dir/trt/``
    (``chained/``, ``segments/``, ``engines/``), beside the ONNX Runtime River graph.

    Kept apart from ``river_dir/segments`` (the ONNX Runtime segments): the TensorRT forms have
    DequantizeLinear twins, the ONNX Runtime ones MatMulNBits. ``capacity`` (static cache length of
    the in-place decode engines) defaults to ``max_past`` when segmented."""
    t0 = time.perf_counter()
    trt_dir = Path(river_dir) / TRT_DIR
    require_empty(trt_dir, "TensorRT folder")
    check_twins_for_trt(spec.precision, spec.block)
    with atomic_dir(trt_dir) as tmp:  # forms and engines side by side, renamed into place at the end
        forms = write_trt_forms(step, spec, tmp, fused=fused, segmented=segmented)
        if log is not None:
            print(f"[river] TensorRT ONNX forms written in {time.perf_counter() - t0:.1f}s", file=log, flush=True)
        if segmented and capacity is None:
            capacity = max_past
        build_river_engines(tmp / ENGINES_DIR, fused_onnx=forms.get("fused"), segments_dir=forms.get("segments"),
                            capacity=capacity if segmented else None, precision=precision, max_batch=max_batch,
                            max_seq=max_seq, max_past=max_past, timing_cache=timing_cache)
    report = EnginesReport.load(trt_dir / ENGINES_DIR)
    if log is not None:
        for b in report.builds:
            print(f"[river] {b.name:14s} {b.form:10s} {b.seconds:6.1f}s {b.plan_bytes / 1e6:8.1f} MB "
                  f"conditionals={b.conditionals}", file=log, flush=True)
    return report

