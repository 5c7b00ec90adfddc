"""What a River graph says about itself, defined once: the threshold constants, the graph metadata
(``RiverInfo``, stored as ONNX model properties) and the output folder's manifest (``river.json``,
``RiverManifest``). Every reader and writer (compiler, runtime, Triton, benchmark) goes through here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import onnx

from river.atomic import write_bytes_atomic
from river.errors import RiverError, read_json

THRESHOLDS = "exit_thresholds"  # graph input [G] float32 (with a same-named initializer as its default)
EXIT_LAYER = "exit_layer"  # graph output [B] int64: backbone layers run (L: never exited)
DISABLED = 2.0  # cosine similarity never reaches 2: a gate with this threshold never fires
FORCED_EXIT = -2.0  # cosine similarity is always >= -1: a gate with this threshold always fires
TWIN_FORMATS = ("ort", "dq")  # quantized twins: ORT MatMulNBits (accuracy level 4), or DequantizeLinear (TensorRT)

MANIFEST_FILE = "river.json"
CALIBRATION_FILE = "calibration.json"  # --calibrate's report: similarity data and the named operating points
MANIFEST_FORMAT = 2
# the layout of a river-export output folder: model.onnx + river.json, and with --segmented / --trt
SEGMENTS_DIR, SEGMENTS_FILE = "segments", "segments.json"  # the ONNX Runtime segments and their index
TRT_DIR, CHAINED_DIR, ENGINES_DIR, ENGINES_FILE = "trt", "chained", "engines", "engines.json"  # trt/{chained,segments,engines}
# files of the source folder that travel with a compiled River graph (tokenizer, model metadata)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "tokenizer.model", "river_model.json", "generation_config.json", "config.json")

_PROP = "river."


def check_thresholds(values: Sequence[float], num_gates: int, source: str = "thresholds") -> tuple[float, ...]:
    """Per-gate thresholds as floats, or a RiverError saying what is wrong (count, type, NaN/inf)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RiverError(f"{source}: expected a list of {num_gates} numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise RiverError(f"{source}: {v!r} is not a number")
        f = float(v)
        if not math.isfinite(f):
            raise RiverError(f"{source}: {v!r} is not a finite number (use {DISABLED} to disable a gate)")
        out.append(f)
    if len(out) != num_gates:
        raise RiverError(f"{source}: {len(out)} thresholds for {num_gates} gates")
    return tuple(out)


@dataclass(frozen=True)
class RiverInfo:
    """The River facts a graph (or a segment of one) carries in its metadata properties."""

    gates: tuple[int, ...]
    kind: str
    precision: str
    block: int = 64
    twin_format: str = "ort"
    layout: str = "nested"  # nested | chained | segment
    head: str = "fp32"  # the precision of the head a river ends with (the backbone's head is the model's own)

    @classmethod
    def of(cls, spec, layout: str) -> RiverInfo:
        """The facts of a ``RiverSpec`` built in ``layout``."""
        return cls(tuple(spec.gates), spec.kind, spec.precision, spec.block, spec.twin_format, layout, spec.head)

    def to_props(self) -> dict[str, str]:
        return {f"{_PROP}gates": ",".join(map(str, self.gates)), f"{_PROP}kind": self.kind,
                f"{_PROP}precision": self.precision, f"{_PROP}block": str(self.block),
                f"{_PROP}twin_format": self.twin_format, f"{_PROP}layout": self.layout, f"{_PROP}head": self.head}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> RiverInfo | None:
        if f"{_PROP}gates" not in props:
            return None
        fmt = props.get(f"{_PROP}twin_format", props.get(f"{_PROP}flavour", "dq"))  # graphs written before 0.2
        return cls(tuple(int(g) for g in props[f"{_PROP}gates"].split(",")), props[f"{_PROP}kind"],
                   props[f"{_PROP}precision"], int(props.get(f"{_PROP}block", 64)), fmt,
                   props.get(f"{_PROP}layout", "nested"), props.get(f"{_PROP}head", "fp32"))

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> RiverInfo | None:
        """The River facts of a graph; None for a plain step graph."""
        return cls.from_props({p.key: p.value for p in model.metadata_props})


# operators only the twins of River graphs from earlier river-export builds hold: dynamic per-tensor int8
# (DynamicQuantizeLinear -> MatMulInteger), slower and far less accurate than today's MatMulNBits twins
LEGACY_TWIN_OPS = {"DynamicQuantizeLinear"}


def legacy_twins_note(model: onnx.ModelProto) -> str | None:
    """What to tell the user of a River graph whose twins are the old dynamic-int8 ones (None otherwise).
    Reads nodes only: a header (no weights) is enough."""
    from river.compiler.graph_io import walk_nodes

    if RiverInfo.from_model(model) is None or not any(n.op_type in LEGACY_TWIN_OPS for n in walk_nodes(model.graph)):
        return None
    return ("this River graph's twins are the old dynamic per-tensor int8 (MatMulInteger); re-run river-export for "
            "MatMulNBits twins (faster; whole-model 8-bit agreement 91.7% against 80.3%)")


def set_props(model: onnx.ModelProto, extra: dict[str, str]) -> None:
    """Add/replace metadata properties, keeping the others."""
    props = {p.key: p.value for p in model.metadata_props} | extra
    onnx.helper.set_model_props(model, props)


@dataclass
class RiverManifest:
    """``river.json``: how an output folder was compiled and what it holds."""

    model: str
    source: dict  # {"path": step graph compiled from, "sha256": of the graph and its weights}
    num_layers: int
    gates: list[int]
    river: str  # the --river name (int8, int4, fp32, attn, kv, or a registered twin kind)
    kind: str
    precision: str
    block: int
    twin_format: str
    thresholds: list[float] | None
    operating_points: dict | None = None
    recall_points: dict | None = None  # name -> {"thresholds": [...], "recall": margin} (compiler/river/recall.py)
    calibration: dict | None = None
    draft: dict | None = None
    thresholds_note: str | None = None
    head: str = "fp32"  # the precision of the rivers' head (--river-head)
    inputs_added: list[str] = field(default_factory=lambda: [THRESHOLDS])
    outputs_added: list[str] = field(default_factory=lambda: [EXIT_LAYER])
    format: int = MANIFEST_FORMAT

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/river.json`` atomically (temporary file, then rename)."""
        return write_bytes_atomic(Path(folder) / MANIFEST_FILE,
                                  json.dumps(asdict(self), indent=2, allow_nan=False).encode())

    @classmethod
    def load(cls, folder: str | Path) -> RiverManifest:
        folder = Path(folder)
        path = folder if folder.name == MANIFEST_FILE else folder / MANIFEST_FILE
        if not path.is_file():
            raise RiverError(f"no {MANIFEST_FILE} in {path.parent}: not a river-export output folder")
        data = read_json(path)
        if not isinstance(data, dict):
            raise RiverError(f"{path}: expected a JSON object")
        if data.get("format") == 1:  # the first format: "flavour" for the twin format
            data["twin_format"] = data.pop("flavour", "ort")
            data["format"] = MANIFEST_FORMAT
        if data.get("format") != MANIFEST_FORMAT:
            raise RiverError(f"{path}: manifest format {data.get('format')} is not {MANIFEST_FORMAT}; re-run river-export")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise RiverError(f"{path}: {exc}") from None

    @property
    def source_path(self) -> Path | None:
        path = (self.source or {}).get("path")
        return Path(path) if path else None

    def info(self) -> RiverInfo:
        return RiverInfo.of(self, "nested")
