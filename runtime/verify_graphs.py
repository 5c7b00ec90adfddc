"""Find or make the draft graph and the backbone step graph that verify mode pairs.

The draft comes from ``draft.onnx`` beside the model (``river-export`` writes one), else it is
derived from the plain step graph with ``compiler/draft_graph.py`` and cached by the source's
fingerprint, like the shared-KV form. The backbone that verifies is the plain step graph: the model
itself, or for a River graph the step graph it was compiled from (``river.json``; refused when it no
longer has the recorded sha256), which runs the same weights without the River graph's ``If``
overhead; when that file is gone, the River graph with every gate off.
"""

from __future__ import annotations

from pathlib import Path

from river.compiler.draft_graph import DRAFT_FILE, DRAFT_FORMAT, draft_graph, draft_metadata
from river.compiler.graph_io import derived_graph, graph_files, load_onnx_header
from river.compiler.river.manifest import MANIFEST_FILE, RiverInfo, RiverManifest
from river.errors import ModelNotFound, RiverError
from river.models.cache import cached_sha256


def _check_source(source: Path, sha256: str | None) -> None:
    """The backbone must be the very graph the River graph was compiled from, or verify mode would
    silently verify against other weights (hashed once per file fingerprint, not every run)."""
    if sha256 is not None and cached_sha256(graph_files(source)) != sha256:
        raise RiverError(f"{source} changed since river-export compiled this River graph from it (sha256 mismatch): "
                         "re-run river-export, or draft with the River graph's own exit (--draft river)")


def verify_pair(model_path: str | Path, exit_after: int | None = None) -> tuple[Path, Path]:
    """(backbone step graph, draft graph) for ``model_path`` (a plain step graph or a River graph).
    ``exit_after``: the draft's last backbone layer (-1: every layer a twin); None takes the shipped
    ``draft.onnx`` whatever its exit, else -1."""
    model_path = Path(model_path)
    is_river = RiverInfo.from_model(load_onnx_header(model_path)) is not None
    backbone = model_path
    if is_river:
        manifest = RiverManifest.load(model_path.parent) if (model_path.parent / MANIFEST_FILE).is_file() else None
        source = manifest.source_path if manifest is not None else None
        if source is not None and source.is_file():
            _check_source(source, manifest.source.get("sha256"))
            backbone = source
    shipped = model_path.parent / DRAFT_FILE
    if shipped.is_file():
        meta = draft_metadata(load_onnx_header(shipped)) or {}
        if exit_after is None or meta.get("exit_after") == exit_after:
            return backbone, shipped
    if is_river and backbone == model_path:
        raise ModelNotFound(f"no {DRAFT_FILE} with that exit beside {model_path} and the step graph it was compiled "
                            "from is gone: re-run river-export, or draft with the River graph's own exit (--draft river)")
    exit_after = -1 if exit_after is None else exit_after
    return backbone, derived_graph("draft", backbone, DRAFT_FORMAT, lambda m: draft_graph(m, exit_after), f"-e{exit_after}")
