"""``river-export``'s job as a Python API: step graph in, River graph + manifest out, atomically."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import onnx

from river.atomic import atomic_dir
from river.compiler.draft_graph import DRAFT_FILE, draft_graph, draft_metadata
from river.compiler.graph_io import graph_files, load_onnx, load_onnx_header, save_onnx_atomic, walk_nodes
from river.compiler.river.manifest import (
    CALIBRATION_FILE,
    DISABLED,
    EXIT_LAYER,
    SIDE_FILES,
    THRESHOLDS,
    RiverManifest,
    check_thresholds,
)
from river.compiler.river.nested import river_graph
from river.compiler.river.spec import RiverSpec, check_spec, default_gates
from river.compiler.structure import check_wiring
from river.errors import NotADecoderGraph, RiverError, read_json
from river.export.contract import StepContract, eos_token_ids
from river.models.cache import cached_sha256


def check_supported_ops(model: onnx.ModelProto, source: str = "model") -> None:
    """Refuse graphs the River rewrite cannot handle: non-standard ops, or existing control flow."""
    unsupported: dict[str, int] = {}
    for node in walk_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            key = f"{node.domain}.{node.op_type}"
            unsupported[key] = unsupported.get(key, 0) + 1
        if node.op_type in ("If", "Loop", "Scan"):
            raise NotADecoderGraph(f"{source} already contains control flow ({node.op_type} '{node.name}'): "
                                   "is it already a River graph? Give the plain step graph.")
    if unsupported:
        ops = ", ".join(f"{k} (x{v})" for k, v in sorted(unsupported.items()))
        raise NotADecoderGraph(
            f"{source} uses ops outside the standard ONNX domain: {ops}. River needs plain ONNX ops with the "
            "KV cache as Concat(past, new) (as Optimum's text-generation-with-past export writes them)."
        )


def read_thresholds(path: str | Path, gates: Sequence[int]) -> tuple[float, ...]:
    """A JSON list, or an object with "thresholds" (and optionally "gates", which must match);
    the values pass ``check_thresholds`` (finite numbers, one per gate)."""
    path = Path(path)
    if not path.exists():
        raise RiverError(f"thresholds file not found: {path}")
    data = read_json(path)
    if isinstance(data, dict):
        if "gates" in data and data["gates"] != list(gates):
            raise RiverError(f"thresholds in {path} are for gates {data['gates']!r}, not {list(gates)}")
        data = data.get("thresholds")
    return check_thresholds(data, len(gates), f"thresholds file {path}")


def parse_gates(text: str | None, num_layers: int) -> tuple[int, ...]:
    """``--gates``: None or 'auto' for the default band; an empty list is a mistake, not 'auto'."""
    if text in (None, "auto"):
        return default_gates(num_layers)
    if not text.strip():
        raise RiverError("empty gate list: give layer indices like 14,16,18, or 'auto'")
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise RiverError(f"bad gate list '{text}': expected comma-separated layer indices like 14,16,18") from None


def river_spec(num_layers: int, *, gates: str | Sequence[int] | None = None, river: str = "int8",
               thresholds: str | Path | Sequence[float] | None = None, block: int = 64, twin_format: str = "ort",
               calibrate=None, budget: str | float | None = None, metric: str | None = None,
               threads: int | None = None, draft_exit: int | None = -1, head: str = "fp32") -> RiverSpec:
    """The RiverSpec that river-export's options ask for, every option checked against the model's
    layer count. Called as soon as the layer count is known (graph header, model config) so that a
    bad option fails in a second, not after the draft graph or the step graph export."""
    from river.compiler.calibrate import check_metric, read_prompts, resolve_budget
    from river.compiler.draft_graph import exit_range_error
    from river.compiler.ort_session import check_threads

    gate_list = parse_gates(gates, num_layers) if gates is None or isinstance(gates, str) else tuple(gates)
    if thresholds is not None and not isinstance(thresholds, (list, tuple)):
        thresholds = read_thresholds(thresholds, gate_list)
    if calibrate is not None and thresholds is not None:
        raise RiverError("give either --thresholds or --calibrate, not both")
    if calibrate is None and (budget is not None or metric is not None):
        raise RiverError("--budget and --metric choose the operating point of --calibrate: add --calibrate PROMPTS")
    if isinstance(calibrate, (str, Path)):
        read_prompts(calibrate)
    if budget is not None:
        resolve_budget(budget)
    if metric is not None:
        check_metric(metric)
    check_threads(threads)
    spec = RiverSpec.from_name(river, gate_list, block=block, twin_format=twin_format, head=head,
                               thresholds=None if thresholds is None else check_thresholds(thresholds, len(gate_list)))
    check_spec(spec, num_layers)
    reason = None if draft_exit is None else exit_range_error(draft_exit, num_layers)
    if reason:
        raise RiverError(reason)
    return spec


def compile_river(source_onnx: str | Path, out_dir: str | Path, *, gates: str | Sequence[int] | None = None,
                  river: str = "int8", thresholds: str | Path | Sequence[float] | None = None, block: int = 64,
                  model_name: str | None = None, twin_format: str = "ort", calibrate: str | Path | Sequence[str] | None = None,
                  budget: str | float | None = None, metric: str | None = None, calibration_tokens: int = 32,
                  threads: int | None = None, draft_exit: int | None = -1, head: str = "fp32", log=sys.stderr) -> Path:
    """Rewrite ``source_onnx`` (a step graph) into ``out_dir/model.onnx`` + ``river.json``.

    Everything is written into a temporary sibling folder and renamed into place at the end: a failure
    leaves nothing behind, and an existing non-empty ``out_dir`` is refused up front. With
    ``draft_exit`` (not None) the verify-mode draft graph is written beside it as ``draft.onnx``.
    """
    from tqdm import tqdm

    source_onnx, out_dir = Path(source_onnx), Path(out_dir)
    bar = tqdm(total=5, desc="river-export", unit="step", file=log, disable=log is None)
    try:
        t0 = time.perf_counter()
        with atomic_dir(out_dir) as tmp:
            bar.set_postfix_str("loading")
            header = load_onnx_header(source_onnx)
            contract = StepContract.from_model(header, str(source_onnx))
            check_supported_ops(header, str(source_onnx))
            check_wiring(header, str(source_onnx))
            spec = river_spec(contract.num_layers, gates=gates, river=river, thresholds=thresholds, block=block,
                              twin_format=twin_format, calibrate=calibrate, budget=budget, metric=metric,
                              threads=threads, draft_exit=draft_exit, head=head)
            budget, metric = "balanced" if budget is None else budget, metric or "flip"
            if calibrate is not None and not (source_onnx.parent / "tokenizer.json").is_file():
                raise RiverError(f"calibration needs the tokenizer next to {source_onnx} (tokenizer.json)")
            model = load_onnx(source_onnx)
            bar.update()
            draft_info = None
            if draft_exit is not None:
                bar.set_postfix_str(f"draft graph (8-bit twins after layer {draft_exit})")
                draft = draft_graph(model, draft_exit)
                save_onnx_atomic(draft, tmp / DRAFT_FILE)
                draft_info = {"file": DRAFT_FILE, **draft_metadata(draft)}
                del draft
            bar.update()
            bar.set_postfix_str(f"rewriting ({spec.kind} twins, {spec.precision}, gates {list(spec.gates)})")
            rewritten = river_graph(model, spec)
            del model
            bar.update()
            bar.set_postfix_str("checking and writing")
            save_onnx_atomic(rewritten, tmp / "model.onnx")
            bar.update()
            calibration = None
            if calibrate is not None:
                from river.compiler.calibrate import (
                    BUDGETS,
                    calibrate_river,
                    read_prompts,
                    resolve_budget,
                    set_default_thresholds,
                )
                from river.compiler.ort_session import make_session

                prompts = read_prompts(calibrate) if isinstance(calibrate, (str, Path)) else list(calibrate)
                from river.models.tokenizer import TextTokenizer

                tokenizer = TextTokenizer(source_onnx.parent)
                point = budget if isinstance(budget, str) else "chosen"  # the operating point baked in
                calibration = calibrate_river(source_onnx, tmp / "model.onnx", prompts, tokenizer,
                                              lambda graph: make_session(graph, threads),
                                              new_tokens=calibration_tokens, metric=metric,
                                              budgets={**BUDGETS, point: resolve_budget(budget)},
                                              eos=eos_token_ids(source_onnx.parent, tokenizer), log=log)
                picked = calibration["operating_points"][point]["thresholds"]
                set_default_thresholds(tmp / "model.onnx", picked)
                spec = dataclasses.replace(spec, thresholds=tuple(picked))
                (tmp / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2))
            RiverManifest(
                model=model_name or source_onnx.parent.name,
                source={"path": str(source_onnx.resolve()),
                        "sha256": cached_sha256(graph_files(source_onnx))},
                num_layers=contract.num_layers, gates=list(spec.gates), river=river, kind=spec.kind,
                precision=spec.precision, block=spec.block, twin_format=spec.twin_format, head=spec.head,
                thresholds=list(spec.thresholds) if spec.thresholds is not None else None,
                operating_points=None if calibration is None else
                {k: v["thresholds"] for k, v in calibration["operating_points"].items()},
                recall_points=None if calibration is None else
                {k: {"thresholds": v["thresholds"], "recall": v["recall"]} for k, v in calibration["recall_points"].items()},
                calibration=None if calibration is None else
                {"metric": metric, "budget": budget, "tokens": calibration["tokens"], "file": CALIBRATION_FILE},
                thresholds_note=None if spec.thresholds is not None else
                f"no thresholds given: every gate is disabled ({DISABLED}) until calibrated; pass {THRESHOLDS} at run time",
                draft=draft_info,
                inputs_added=[THRESHOLDS], outputs_added=[EXIT_LAYER],
            ).save(tmp)
            for name in SIDE_FILES:  # tokenizer and model metadata travel with the graph
                if (source_onnx.parent / name).is_file():
                    shutil.copy2(source_onnx.parent / name, tmp / name)
        bar.update()
        bar.set_postfix_str(f"done in {time.perf_counter() - t0:.1f}s")
    finally:
        bar.close()
    return out_dir / "model.onnx"
