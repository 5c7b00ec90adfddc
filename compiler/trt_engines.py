"""TensorRT engines for a River model: the fused graph and every segment, from one call.

Forms (see ``river_chain`` and ``segments`` for why each exists):

- ``fused``: the *chained* River graph (one top-level ``If`` per layer group). TensorRT-RTX 1.7's
  builder fails on nested ``If`` nodes, so the nested ONNX Runtime layout is not what engines are
  built from. Contract (Concat) KV: dynamic batch/sequence/past axes.
- ``segment``: each segment in the contract form (dynamic axes): prefill, and any runtime that does
  not keep a static cache.
- ``segment.kv``: each segment in the shared-KV form with a *static* cache capacity: TensorRT imports
  ``TensorScatter`` as an in-place KVCacheUpdate layer, which wants the cache as a network input with
  a static sequence length, its output bound to the same memory. Only segments qualify: inside an
  ``If`` branch the cache is not a network input, and the builder refuses it.

Twins are block-wise symmetric ``DequantizeLinear`` weights (what ``river_pass`` writes); TensorRT
wants blocks of 64 or 128. Every build goes through ``tensorrt_build.build_engine``, so a node the
parser rejects is named with the parser's reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from river.atomic import atomic_dir
from river.compiler.graph_io import load_onnx, load_onnx_header, save_onnx_atomic
from river.compiler.river_chain import chained_river_graph
from river.compiler.river_pass import RiverSpec, river_metadata
from river.compiler.segments import INDEX as SEGMENTS_INDEX
from river.compiler.segments import SegmentIndex, write_segments
from river.compiler.tensorrt_build import PAST, TOTAL, BuildReport, build_engine, default_profiles
from river.errors import RiverError

ENGINES_INDEX = "engines.json"
TRT_BLOCKS = (64, 128)
TRT_DIR, CHAINED_DIR, SEGMENTS_DIR, ENGINES_DIR = "trt", "chained", "segments", "engines"


def check_twins_for_trt(precision: str, block: int, flavour: str = "dq") -> None:
    """TensorRT's block-wise weight-only DequantizeLinear takes blocks of 64 or 128; the ONNX Runtime
    flavour (com.microsoft MatMulNBits) does not import at all."""
    if precision != "fp32" and flavour != "dq":
        raise RiverError(f"{precision} twins in the '{flavour}' flavour (MatMulNBits) do not import into TensorRT: "
                         "compile the TensorRT forms with flavour 'dq' (DequantizeLinear twins)")
    if precision != "fp32" and block not in TRT_BLOCKS:
        raise RiverError(f"{precision} twins with block size {block}: TensorRT's block-wise DequantizeLinear "
                         f"needs a block of {' or '.join(map(str, TRT_BLOCKS))} (river-export --block)")


def fuse_shared_input_int8_dq(model: onnx.ModelProto, base_dir: str | Path) -> int:
    """Merge INT8 weight-only ``DequantizeLinear -> MatMul`` pairs that read the same activation
    (a twin's q/k/v projections, its gate/up projections) into one DQ + MatMul + Split.

    Why: TensorRT documents INT8 as activation+weight quantization and INT4 as the weight-only path;
    TensorRT-RTX 1.7's builder crashes (Myelin ``CHECK(is_value())``) when it fuses three or more
    INT8 block-wise weight-only GEMMs that share an input. One GEMM over the concatenated weights
    computes the same columns from the same dequantized values. Returns the number of merges.
    """
    base_dir = Path(base_dir)
    main_inits = {t.name: t for t in model.graph.initializer}
    merged = 0

    def array(name: str, graph) -> np.ndarray | None:
        t = next((x for x in graph.initializer if x.name == name), None)
        t = main_inits.get(name) if t is None else t
        if t is None:
            return None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            from onnx.external_data_helper import load_external_data_for_tensor

            t = onnx.TensorProto.FromString(t.SerializeToString())
            load_external_data_for_tensor(t, str(base_dir))
        return onnx.numpy_helper.to_array(t)

    def walk(graph) -> None:
        nonlocal merged
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
        nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
        producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        readers: dict[str, int] = {}
        for n in nodes:
            for name in n.input:
                readers[name] = readers.get(name, 0) + 1
        groups: dict[tuple, list] = {}
        for i, mm in enumerate(nodes):
            if mm.op_type != "MatMul" or mm.input[1] not in producer or readers.get(mm.input[1]) != 1:
                continue
            j = producer[mm.input[1]]
            dq = nodes[j]
            if dq.op_type != "DequantizeLinear" or len(dq.input) != 2:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            if attrs.get("axis", 1) != 0 or "block_size" not in attrs:
                continue
            q = array(dq.input[0], graph)
            if q is None or q.dtype != np.int8 or q.ndim != 2:
                continue
            groups.setdefault((mm.input[0], attrs["block_size"], q.shape[0]), []).append((i, j, q))
        replaced: dict[int, list] = {}
        dropped: set[int] = set()
        for (x, block, _), members in groups.items():
            if len(members) < 2:
                continue
            scales = [array(nodes[j].input[1], graph) for _, j, _ in members]
            tag = f"{nodes[members[0][0]].name}@fused{len(members)}"
            widths = [q.shape[1] for _, _, q in members]
            graph.initializer.extend([
                onnx.numpy_helper.from_array(np.concatenate([q for _, _, q in members], 1), f"{tag}/q"),
                onnx.numpy_helper.from_array(np.concatenate(scales, 1).astype(np.float32), f"{tag}/scale"),
                onnx.numpy_helper.from_array(np.array(widths, np.int64), f"{tag}/widths")])
            first = min(i for i, _, _ in members)  # the earliest MatMul: after x, before any reader of its outputs
            replaced[first] = [
                onnx.helper.make_node("DequantizeLinear", [f"{tag}/q", f"{tag}/scale"], [f"{tag}/w"],
                                      name=f"{tag}/DequantizeLinear", axis=0, block_size=block),
                onnx.helper.make_node("MatMul", [x, f"{tag}/w"], [f"{tag}/y"], name=f"{tag}/MatMul"),
                onnx.helper.make_node("Split", [f"{tag}/y", f"{tag}/widths"], [nodes[i].output[0] for i, _, _ in members],
                                      name=f"{tag}/Split", axis=-1)]
            dropped |= {k for i, j, _ in members for k in (i, j)}
            merged += 1
        if replaced:
            out = []
            for k, n in enumerate(nodes):
                out += replaced.get(k, [])
                if k not in dropped:
                    out.append(n)
            del graph.node[:]
            graph.node.extend(out)

    walk(model.graph)
    return merged


def trt_onnx(src: str | Path, capacity: int | None = None) -> Path:
    """A TensorRT-ready copy of ``src``'s graph, written next to it (it shares ``src``'s weights file).

    - inputs with a default (``exit_thresholds``) lose the default: TensorRT's parser turns an
      initializer-backed input into a constant, and thresholds must stay settable per step;
    - INT8 twin projections that share an input are merged (``fuse_shared_input_int8_dq``);
    - with ``capacity``, the cache axes (past = total = buffer length in the shared-KV form) become
      static, as TensorRT's KVCacheUpdate requires.
    The caller deletes the copy (a dot file) after the build.
    """
    src = Path(src)
    model = load_onnx_header(src)
    inputs = {i.name for i in model.graph.input}
    keep = [t for t in model.graph.initializer if t.name not in inputs]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if capacity is not None:
        for vi in list(model.graph.input) + list(model.graph.output):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in (PAST, TOTAL):
                    d.Clear()
                    d.dim_value = int(capacity)
        del model.graph.value_info[:]
    fuse_shared_input_int8_dq(model, src.parent)
    dst = src.with_name(f".{src.stem}.trt{'' if capacity is None else f'-c{capacity}'}.onnx")
    dst.write_bytes(model.SerializeToString())
    return dst


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
    flavour: str
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
        path = folder / ENGINES_INDEX
        if not path.is_file():
            raise RiverError(f"no {ENGINES_INDEX} in {folder}: build engines with river.compiler.trt_engines")
        data = json.loads(path.read_text())
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
    meta = river_metadata(header)
    if meta is not None:
        check_twins_for_trt(meta["precision"], meta["block"], meta.get("flavour", "dq"))
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
                       report.conditional_layers, report.plan_bytes, round(report.seconds, 3), report.flavour,
                       report.version, _profile_json(profiles))


def build_river_engines(out_dir: str | Path, *, fused_onnx: str | Path | None = None,
                        segments_dir: str | Path | None = None, step_onnx: str | Path | None = None,
                        capacity: int | None = None, precision: str = "fp32", max_batch: int = 1,
                        max_seq: int = 256, max_past: int = 2048, timing_cache=None,
                        segment_names: list[str] | None = None) -> EnginesReport:
    """Engines for whichever forms are given, into ``out_dir`` (+ ``engines.json``), atomically.

    ``fused_onnx``: a chained River graph (``river_chain``); a nested one is built as given (and
    fails on TensorRT-RTX 1.7, see module docstring). ``segments_dir``: a folder written by
    ``segments.write_segments``: one engine per segment (contract form) and, with ``capacity``, one
    per segment in the shared-KV form with that static cache length. ``step_onnx``: the plain step
    graph (the no-exit baseline engine). ``segment_names`` limits which segments are built.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RiverError(f"output folder {out_dir} exists and is not empty")
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
            meta = river_metadata(load_onnx_header(fused_onnx)) or {}
            gates = meta.get("gates", gates)
            builds.append(build_one(fused_onnx, tmp / "fused.plan", name="fused", form="fused", **common))
        if segments_dir is not None:
            index = SegmentIndex.load(segments_dir)
            gates = list(index.gates)
            check_twins_for_trt(index.precision, index.block, index.flavour)
            for seg in index.segments:
                if segment_names is not None and seg.name not in segment_names:
                    continue
                builds.append(build_one(index.path(seg), tmp / f"{seg.name}.plan", name=seg.name, form="segment", **common))
                if capacity is not None:
                    builds.append(build_one(index.path(seg, shared_kv=True), tmp / f"{seg.name}.kv.plan",
                                            name=f"{seg.name}.kv", form="segment.kv", capacity=capacity, **common))
        report = EnginesReport(out_dir, builds, precision, None if segments_dir is None else str(Path(segments_dir).resolve()), gates)
        (tmp / ENGINES_INDEX).write_text(json.dumps(report.to_json(relative_to=out_dir), indent=2))
    return report


def spec_from_manifest(river_dir: str | Path) -> RiverSpec:
    """The RiverSpec a ``river-export`` folder was compiled with (``river.json``, and the graph's own
    metadata for what the manifest may not say, such as the twin flavour)."""
    river_dir = Path(river_dir)
    path = river_dir / "river.json"
    if not path.is_file():
        raise RiverError(f"no river.json in {river_dir}: not a river-export output folder")
    m = json.loads(path.read_text())
    meta = river_metadata(load_onnx_header(river_dir / "model.onnx")) if (river_dir / "model.onnx").is_file() else None
    thr = m.get("thresholds")
    extra = {"flavour": m.get("flavour") or (meta or {}).get("flavour")}
    extra = {k: v for k, v in extra.items() if v is not None and k in RiverSpec.__dataclass_fields__}
    return RiverSpec.from_name(m["river"], m["gates"], block=m.get("block", 64),
                               thresholds=None if thr is None else tuple(thr), **extra)


def write_trt_forms(step: str | Path | onnx.ModelProto, spec: RiverSpec, trt_dir: str | Path, *,
                    fused: bool = True, segmented: bool = True) -> dict[str, Path]:
    """Write the ONNX forms engines are built from into ``trt_dir``: ``chained/model.onnx`` (fused)
    and ``segments/`` (both KV forms), always with the TensorRT flavour of the twins (DequantizeLinear).
    Returns {"fused": path, "segments": folder} for what was written."""
    check_twins_for_trt(spec.precision, spec.block)
    spec = dataclasses.replace(spec, flavour="dq")  # TensorRT reads DequantizeLinear, not MatMulNBits
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
    if trt_dir.exists() and (not trt_dir.is_dir() or any(trt_dir.iterdir())):
        raise RiverError(f"{trt_dir} exists and is not empty")
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


__all__ = [
    "SEGMENTS_INDEX",
    "EngineBuild",
    "EnginesReport",
    "build_one",
    "build_river_engines",
    "check_twins_for_trt",
    "compile_trt",
    "spec_from_manifest",
    "trt_onnx",
    "write_trt_forms",
]
