"""Segmented River: the River graph cut at its gates into separate graphs that a runtime chains.

Why: a fused River graph puts the exits behind ONNX ``If`` nodes. TensorRT's conditionals may not
run lazily (DESIGN 7), ONNX Runtime's CUDA provider syncs on every ``If``, and TensorRT's in-place KV
update (``TensorScatter`` -> KVCacheUpdate) needs each cache to be a network input, which a tensor
seen from inside an ``If`` branch is not. Segments have no control flow: the runtime reads the gate's
output and picks the next segment itself.

Segments (G gates at layers g_0 < ... < g_{G-1}, L layers):

- ``backbone{k}`` (k < G): backbone layers g_{k-1}+1 .. g_k and gate k. Input: ``hidden.{g_{k-1}}``
  (the residual stream after layer g_{k-1}; segment 0 starts from ``input_ids``). Outputs:
  ``hidden.{g_k}``, ``gate{k}.exit`` (0-D bool: every row clears its threshold),
  ``gate{k}.similarity`` [B], and the presents of its layers.
- ``river{k}``: twins of layers g_k+1 .. L-1 from ``hidden.{g_k}``, then final norm and head.
  Outputs: ``logits`` and the presents of the twin layers (the KV share).
- ``backbone{G}`` (role ``final``): backbone layers g_{G-1}+1 .. L-1 and the head.

The prologue (attention mask, RoPE tables: O(B*S*T) integer/elementwise work) is recomputed by every
segment that needs it rather than being a segment of its own: each segment then takes the contract's
own inputs (``attention_mask``, ``position_ids``, ``past_key_values.*``), so engine profiles and
runtime bindings stay those of the step graph, and no [B,1,S,T] mask travels between engines.

Every segment is written in two forms that share one weights file (``segments.onnx.data``, each
tensor once): the contract form (``present = Concat(past, new)``, any past length: prefill and
TensorRT's dynamic engines) and the shared-KV form (``TensorScatter`` into the cache buffer,
``write_indices`` input: in-place decode). ``segments.json`` indexes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from river.atomic import atomic_dir, require_empty
from river.compiler.graph_io import complete_types, load_onnx, stamp
from river.compiler.lowering.shared_kv import to_shared_kv
from river.compiler.river.builder import contract_types, prepare
from river.compiler.river.gate import gate
from river.compiler.river.manifest import SEGMENTS_FILE, RiverInfo
from river.compiler.river.nested import exit_river
from river.compiler.river.spec import RiverSpec, default_thresholds
from river.errors import ModelNotFound, RiverError
from river.export.contract import LOGITS, StepContract, past_name, present_name

DATA_FILE = "segments.onnx.data"
FORMAT = 1
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside each graph
_ALIGN = 4096  # page-aligned offsets let runtimes map weights instead of copying them


def hidden_name(layer: int) -> str:
    """Residual stream after backbone layer ``layer`` (what crosses a segment boundary)."""
    return f"hidden.{layer}"


def exit_name(gate_index: int) -> str:
    return f"gate{gate_index}.exit"


def similarity_name(gate_index: int) -> str:
    return f"gate{gate_index}.similarity"


@dataclass
class Segment:
    name: str
    role: str  # "backbone" (ends at a gate) | "river" (from a gate to the head) | "final" (backbone to the head)
    gate: int | None  # gate index the segment ends at (backbone) or starts from (river); None for final
    first: int  # first layer whose KV it writes
    last: int  # last layer whose KV it writes
    onnx: str  # contract (Concat) form, file name inside the segments folder
    shared_kv_onnx: str | None  # shared-KV (TensorScatter) form
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    shared_kv_inputs: list[str] = field(default_factory=list)

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def hidden_in(self) -> str | None:
        return next((n for n in self.inputs if n.startswith("hidden.")), None)


@dataclass
class SegmentIndex:
    """``segments.json``: what a runtime needs to chain the segments."""

    folder: Path
    num_layers: int
    gates: list[int]
    kind: str
    precision: str
    block: int
    thresholds: list[float]  # default per-gate thresholds (segments take exit_thresholds as a plain input)
    segments: list[Segment]
    twin_format: str = "dq"  # quantized twins: "ort" (MatMulNBits) or "dq" (DequantizeLinear, TensorRT)
    head: str = "fp32"  # the precision of the rivers' head
    data: str = DATA_FILE
    format: int = FORMAT

    def segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)

    def backbone(self, k: int) -> Segment:
        return self.segment(f"backbone{k}")

    def river(self, k: int) -> Segment:
        return self.segment(f"river{k}")

    def path(self, segment: Segment, shared_kv: bool = False) -> Path:
        name = segment.shared_kv_onnx if shared_kv else segment.onnx
        if name is None:
            raise RiverError(f"segment {segment.name} has no shared-KV form in {self.folder}")
        return self.folder / name

    def exit_layer(self, exit_gate: int | None) -> int:
        return self.num_layers if exit_gate is None else self.gates[exit_gate] + 1

    def info(self) -> RiverInfo:
        """The River facts every segment carries (its metadata)."""
        return RiverInfo.of(self, "segment")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("folder")
        return d

    @classmethod
    def load(cls, folder: str | Path) -> SegmentIndex:
        folder = Path(folder)
        if folder.is_file() and folder.name == SEGMENTS_FILE:
            folder = folder.parent
        path = folder / SEGMENTS_FILE
        if not path.is_file():
            raise ModelNotFound(f"no {SEGMENTS_FILE} in {folder}: not a segmented River folder (see river.compiler.river.segments)")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise RiverError(f"{path}: segments format {data.get('format')} is not {FORMAT}; re-export the segments")
        data["segments"] = [Segment(**s) for s in data["segments"]]
        if "flavour" in data:  # the twin format's name before 0.2
            data["twin_format"] = data.pop("flavour")
        return cls(folder=folder, **data)


# --- cutting ------------------------------------------------------------------------------------

def _collect(outputs: list[gs.Tensor], stop: set[int]) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """Nodes needed for ``outputs`` (topological order) and the producer-less variables they read,
    walking producers backwards and stopping at the ``stop`` tensors (the segment's own inputs)."""
    order: list[gs.Node] = []
    done: set[int] = set()
    free: dict[int, gs.Tensor] = {}
    stack: list[tuple[gs.Node, bool]] = []

    def visit_tensor(t: gs.Tensor):
        if id(t) in stop or isinstance(t, gs.Constant) or not t.name:
            return
        if not t.inputs:
            free[id(t)] = t
            return
        node = t.inputs[0]
        if id(node) not in done:
            stack.append((node, False))

    for t in outputs:
        visit_tensor(t)
        while stack:  # iterative post-order DFS: a node is emitted after everything it reads
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            for inp in node.inputs:
                visit_tensor(inp)
            if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
                raise RiverError(f"segment would contain control flow ({node.op} '{node.name}')")
    return order, list(free.values())


class _Cutter:
    """Exports named cuts of one graphsurgeon graph (nodes are shared; names are set per export)."""

    def __init__(self, builder, source: onnx.ModelProto, spec: RiverSpec):
        self.b, self.thresholds, self.spec = builder, builder.thresholds, spec
        self.graph = builder.s.graph
        self.source = source
        kv = next(v for v in source.graph.input if v.name == past_name(0, "key")).type.tensor_type
        width = int(builder.s.embedding.inputs[0].shape[1])
        hidden = onnx.helper.make_tensor_type_proto(kv.elem_type, ["batch_size", "sequence_length", width])
        boundary = {".exit": onnx.helper.make_tensor_type_proto(onnx.TensorProto.BOOL, []),
                    ".similarity": onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, ["batch_size"])}
        contract = contract_types(source)

        def type_of(name: str):
            """Boundary tensors get the contract's types (symbolic axes TensorRT profiles are made from)."""
            if name.startswith("hidden."):
                return hidden
            return next((t for suffix, t in boundary.items() if name.endswith(suffix)), None) or contract(name)

        self.type_of = type_of

    def export(self, name: str, inputs: list[tuple[str, gs.Tensor]], outputs: list[tuple[str, gs.Tensor]],
               props: dict[str, str]) -> onnx.ModelProto:
        order, free = _collect([t for _, t in outputs], {id(t) for _, t in inputs})
        graph_inputs = {id(t): t for t in self.graph.inputs}
        graph_inputs[id(self.thresholds)] = self.thresholds
        stray = [t.name for t in free if id(t) not in graph_inputs]
        if stray:
            raise RiverError(f"segment {name} reads tensors nothing produces: {', '.join(stray[:5])}")
        used = {id(t) for t in free}
        ordered_inputs = [t for _, t in inputs]
        ordered_inputs += [t for t in self.graph.inputs if id(t) in used]
        if id(self.thresholds) in used:
            ordered_inputs.append(self.thresholds)
        renames = [(t, n) for n, t in inputs + outputs]
        saved = [(t, t.name) for t, _ in renames]
        try:
            for t, n in renames:
                t.name = n
            g = gs.Graph(nodes=order, inputs=ordered_inputs, outputs=[t for _, t in outputs], name=name,
                         opset=self.graph.opset, import_domains=self.graph.import_domains)
            model = gs.export_onnx(g, do_type_check=False)
        finally:
            for t, n in saved:
                t.name = n
        complete_types(model, self.type_of)
        info = RiverInfo.of(self.spec, "segment")
        return stamp(model, self.source, info.to_props() | {f"river.segment.{k}": v for k, v in props.items()})


def segment_graphs(step_model: onnx.ModelProto, spec: RiverSpec) -> list[tuple[Segment, onnx.ModelProto]]:
    """Cut the River graph of ``step_model`` at its gates (see module docstring).

    Works on the contract step graph and on its shared-KV form alike: the pieces are the River pass's
    own (``gate``, ``exit_river``), so a segment computes exactly what the matching part of the
    fused graph computes.
    """
    p = prepare(step_model, spec)
    b = p.builder
    s, L, gates = b.s, b.s.num_layers, list(spec.gates)
    outputs = b.outputs
    cut = _Cutter(b, p.model, spec)

    def presents(tensors: dict, layers) -> list[tuple[str, gs.Tensor]]:
        return [(present_name(l, k), tensors[present_name(l, k)]) for l in layers for k in ("key", "value")]

    result = []
    prev = None  # (layer, tensor) of the stream entering the next backbone segment
    for gi, g in enumerate(gates):
        gt = gate(gi, s.blocks[g].input, s.blocks[g].output, b.thresholds)
        first = 0 if prev is None else prev[0] + 1
        ins = [] if prev is None else [(hidden_name(prev[0]), prev[1])]
        outs = [(hidden_name(g), s.blocks[g].output), (exit_name(gi), gt.exit), (similarity_name(gi), gt.similarity)]
        outs += presents(outputs, range(first, g + 1))
        seg = Segment(f"backbone{gi}", "backbone", gi, first, g, f"backbone{gi}.onnx", None)
        result.append((seg, cut.export(seg.name, ins, outs, {"name": seg.name, "role": seg.role})))

        _, river_outs = exit_river(b, gi, g)  # logits, presents g+1..L-1, exit_layer (not needed here)
        twin = dict(zip([LOGITS] + [present_name(l, k) for l in range(g + 1, L) for k in ("key", "value")], river_outs))
        seg = Segment(f"river{gi}", "river", gi, g + 1, L - 1, f"river{gi}.onnx", None)
        r_outs = [(LOGITS, twin[LOGITS])] + presents(twin, range(g + 1, L))
        result.append((seg, cut.export(seg.name, [(hidden_name(g), s.blocks[g].output)], r_outs,
                                       {"name": seg.name, "role": seg.role})))
        prev = (g, s.blocks[g].output)
    G = len(gates)
    seg = Segment(f"backbone{G}", "final", None, prev[0] + 1, L - 1, f"backbone{G}.onnx", None)
    outs = [(LOGITS, outputs[LOGITS])] + presents(outputs, range(prev[0] + 1, L))
    result.append((seg, cut.export(seg.name, [(hidden_name(prev[0]), prev[1])], outs, {"name": seg.name, "role": seg.role})))
    for seg, m in result:
        seg.inputs = [i.name for i in m.graph.input]
        seg.outputs = [o.name for o in m.graph.output]
    return result


# --- writing ------------------------------------------------------------------------------------

def _externalize(models: list[tuple[str, onnx.ModelProto]], folder: Path, data_name: str = DATA_FILE) -> None:
    """Write each model to ``folder/<file>`` with its large tensors in one shared data file, each
    tensor name stored once (the segments share backbone weights, twins and the head between forms)."""
    offsets: dict[str, tuple[int, int, tuple, int]] = {}
    with open(folder / data_name, "wb") as data:
        for file_name, model in models:
            for t in model.graph.initializer:
                if not t.HasField("raw_data"):
                    if _nbytes_estimate(t) < _EXTERNAL_MIN_BYTES:
                        continue
                    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
                raw = t.raw_data
                if len(raw) < _EXTERNAL_MIN_BYTES:
                    continue
                sig = (tuple(t.dims), t.data_type)
                if t.name in offsets:
                    offset, length, seen_sig, crc = offsets[t.name]
                    if (length, seen_sig, crc) != (len(raw), sig, _crc(raw)):
                        raise RiverError(f"two different tensors named {t.name!r} in the segments")
                else:
                    pad = (-data.tell()) % _ALIGN
                    data.write(b"\0" * pad)
                    offset = data.tell()
                    data.write(raw)
                    offsets[t.name] = (offset, len(raw), sig, _crc(raw))
                    length = len(raw)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            (folder / file_name).write_bytes(model.SerializeToString())


def _nbytes_estimate(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n  # at least one byte per element except INT4 (half): a lower bound is all we need


def _crc(raw: bytes) -> int:
    import zlib

    return zlib.crc32(raw[:1 << 16]) ^ len(raw)  # cheap: the head of the tensor and its length


def write_segments(step: str | Path | onnx.ModelProto, spec: RiverSpec, out_dir: str | Path, *,
                   shared_kv: bool = True, check: bool = True) -> Path:
    """Write the segments of ``step`` (a contract step graph) to ``out_dir`` with ``segments.json``.

    Written into a temporary sibling folder and renamed into place: a failure leaves nothing behind.
    Returns the index path.
    """
    out_dir = Path(out_dir)
    require_empty(out_dir)
    model = load_onnx(step) if not isinstance(step, onnx.ModelProto) else step
    concat = segment_graphs(model, spec)
    kv = segment_graphs(to_shared_kv(model), spec) if shared_kv else []
    L = StepContract.from_model(model).num_layers
    with atomic_dir(out_dir) as tmp:
        files = [(seg.onnx, m) for seg, m in concat]
        for (seg, _), (kseg, km) in zip(concat, kv):
            seg.shared_kv_onnx = seg.onnx.replace(".onnx", ".kv.onnx")
            seg.shared_kv_inputs = kseg.inputs
            files.append((seg.shared_kv_onnx, km))
        _externalize(files, tmp)
        if check:
            for name, _ in files:
                onnx.checker.check_model(str(tmp / name), full_check=True)
        index = SegmentIndex(folder=out_dir, num_layers=L, gates=list(spec.gates), kind=spec.kind,
                             precision=spec.precision, block=spec.block, twin_format=spec.twin_format,
                             head=spec.head, thresholds=[float(x) for x in default_thresholds(spec)],
                             segments=[seg for seg, _ in concat])
        (tmp / SEGMENTS_FILE).write_text(json.dumps(index.to_json(), indent=2))
    return out_dir / SEGMENTS_FILE
