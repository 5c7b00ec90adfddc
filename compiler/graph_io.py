"""Graph utilities every pass shares: loading (clear errors) and atomic saving, recursive node walks,
opsets, completing types, stamping metadata, hoisting initializers out of ``If`` branches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from river.atomic import build_once, temp_prefix
from river.errors import InvalidModelFile, ModelNotFound


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The model with its external weights, or a clear error for a missing/unreadable file."""
    return _load(path, external=True)


def load_onnx_header(path: str | Path) -> onnx.ModelProto:
    """The graph without external weights (fast; enough to check signatures and structure)."""
    return _load(path, external=False)


def _load(path: str | Path, external: bool) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=external)
    except Exception as exc:
        raise InvalidModelFile(f"cannot read {path} as an ONNX model: {exc}") from exc


def save_onnx_atomic(model: onnx.ModelProto, path: str | Path, check: bool = True) -> Path:
    """Write model + ``<name>.data`` next to each other via temporary names, then rename both.

    The data file is renamed first so a reader never sees a graph whose weights are missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = path.name + ".data"
    tmp_data = path.parent / (tmp.name + ".data")
    try:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=tmp_data.name, size_threshold=1024)
        if check:
            onnx.checker.check_model(str(tmp), full_check=True)
        # Re-point the graph at the final data file name, then rename both into place.
        proto = onnx.load(str(tmp), load_external_data=False)
        for tensor in _external_tensors(proto):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
        if tmp_data.exists():
            tmp_data.chmod(0o644)
            tmp_data.replace(path.parent / data_name)
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)
        raise
    return path


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def hoist_initializers(model: onnx.ModelProto, keep_local=lambda name: False) -> onnx.ModelProto:
    """Move initializers that several ``If`` branches hold to the main graph, once per name.

    onnx-graphsurgeon exports a constant into each branch that uses it, which would store a weight
    once per branch; ONNX lets branches read outer-scope initializers, so shared ones are kept once
    in the main graph. Weights used by one branch only stay there: ONNX Runtime prepacks (and fuses)
    only initializers of the node's own graph, so a backbone layer moved into an ``else`` branch
    keeps running the same packed GEMMs as in the plain graph (bit-identical results, same speed).
    ``keep_local`` names stay in their branches even when repeated (quantized twins: ORT prepacks
    MatMulNBits weights only when they are local).
    """
    main = model.graph
    graphs = list(walk_graphs(main))[1:]
    count: dict[str, int] = {}
    for g in [main] + graphs:
        for t in g.initializer:
            count[t.name] = count.get(t.name, 0) + 1
    have = {t.name: t for t in main.initializer}
    for sub in graphs:
        keep = []
        for t in sub.initializer:
            if count[t.name] == 1 or keep_local(t.name):
                keep.append(t)
            elif t.name not in have:
                main.initializer.append(t)
                have[t.name] = t
            elif not _same_tensor(have[t.name], t):  # a pass named two different tensors alike
                raise ValueError(f"two different initializers are both named '{t.name}': one would silently "
                                 "replace the other")
        del sub.initializer[:]
        sub.initializer.extend(keep)
    return model


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    return a.data_type == b.data_type and list(a.dims) == list(b.dims) and (
        a.SerializeToString() == b.SerializeToString()
        or np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)))


def without_initializers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` without the initializers ``names`` (inputs with defaults, detached while a pass
    runs: onnx-graphsurgeon would take them for constants)."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    keep = [t for t in stripped.graph.initializer if t.name not in names]
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(keep)
    return stripped


def rewrite_step_graph(model: onnx.ModelProto, rewrite, keep_local=lambda name: False) -> onnx.ModelProto:
    """Run ``rewrite(model) -> gs.Graph`` (a pass over a step graph) and export its result whole: inputs
    with defaults (``exit_thresholds``) stay runtime inputs with their defaults (onnx-graphsurgeon
    would take them for constants and copy them into the If branches that read them), initializers
    shared by branches are hoisted (``hoist_initializers``) and the metadata is kept."""
    import onnx_graphsurgeon as gs

    input_names = {i.name for i in model.graph.input}
    defaults = [t for t in model.graph.initializer if t.name in input_names]
    graph = rewrite(without_initializers(model, {t.name for t in defaults}) if defaults else model)
    graph.toposort()
    result = hoist_initializers(gs.export_onnx(graph, do_type_check=False), keep_local=keep_local)
    have = {i.name for i in result.graph.input}
    result.graph.input.extend(i for i in model.graph.input if i.name not in have)
    result.graph.initializer.extend(defaults)
    del result.metadata_props[:]
    result.metadata_props.extend(model.metadata_props)
    return result


def walk_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (``If`` branches), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attr.g)


def walk_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_graphs(attr.g)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version (0 when it declares none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def lift_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model at default-domain opset ``version`` or later (converted only when older)."""
    if default_opset(model) >= version:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, version)


def complete_types(model: onnx.ModelProto, type_of) -> None:
    """Give graph inputs/outputs (main graph and every subgraph) the type ``type_of(name)`` returns
    (None leaves one as it is); drop shapeless value_info (shape inference recomputes it).

    Why: onnx-graphsurgeon leaves new tensors untyped, and ONNX wants every graph output typed with
    a shape; boundary tensors should carry the contract's symbolic axes (TensorRT profiles use them).
    """
    for graph in walk_graphs(model.graph):
        keep = [vi for vi in graph.value_info if vi.type.tensor_type.HasField("shape")]
        del graph.value_info[:]
        graph.value_info.extend(keep)
        for vi in list(graph.input) + list(graph.output):
            t = type_of(vi.name)
            if t is not None:
                vi.type.CopyFrom(t)


def stamp(model: onnx.ModelProto, source: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    """A pass's output describes itself: the source's metadata plus ``props``, its IR version (or
    later), our producer name, and an opset import for every non-default domain its nodes use."""
    model.ir_version = max(model.ir_version, source.ir_version)
    model.producer_name = "river-llm"
    domains = {n.domain for n in walk_nodes(model.graph) if n.domain not in ("", "ai.onnx")}
    have = {o.domain for o in model.opset_import}
    model.opset_import.extend(onnx.helper.make_opsetid(d, 1) for d in sorted(domains - have))
    onnx.helper.set_model_props(model, {p.key: p.value for p in source.metadata_props} | props)
    return model


def graph_files(path: str | Path) -> list[Path]:
    """The graph file and every external data file it references: what its identity depends on."""
    path = Path(path)
    locations = {entry.value for t in _external_tensors(load_onnx_header(path))
                 for entry in t.external_data if entry.key == "location"}
    return [path] + [path.parent / loc for loc in sorted(locations) if (path.parent / loc).is_file()]


def derived_graph(kind: str, source: Path, version: int, make: Callable[[onnx.ModelProto], onnx.ModelProto],
                  variant: str = "") -> Path:
    """The graph ``make`` derives from ``source`` (the shared-KV form, a draft graph), built once and cached
    by the fingerprint of the source graph and its weights, the pass's ``version`` (bumped when its output
    changes) and ``variant``; concurrent runs build it once."""
    from river.models.cache import cache_root, files_fingerprint

    entry = cache_root() / kind / f"{files_fingerprint(graph_files(source))}{variant}-v{version}"

    def build(tmp: Path) -> None:  # a cache miss: the time to let go of what other versions built
        save_onnx_atomic(make(load_onnx(source)), tmp / "model.onnx")
        _drop_other_versions(entry, version)

    return build_once(entry, build) / "model.onnx"


def _drop_other_versions(entry: Path, version: int) -> None:
    """Remove the entries of the same source and variant that another version of the pass built. This
    code never reads them again (the version changes when the output does), and left behind they fill
    the disk: one lowering cache held 28 GB after a week of format bumps. Best effort: a folder another
    process removes first, or cannot be removed, is left."""
    import glob
    import shutil

    prefix = entry.name[:-len(str(version))]  # "<fingerprint><variant>-v"
    for other in entry.parent.glob(glob.escape(prefix) + "*"):
        if other != entry and other.name[len(prefix):].isdigit() and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
