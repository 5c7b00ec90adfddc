"""``write_triton_repo``: the Triton model repository for a River graph (DESIGN section 6).

Three models: ``river_step`` (the River step graph for the onnxruntime backend), ``river_step_trt``
(the same contract for the tensorrt_plan backend; the plan is optional) and ``river_generate`` (the
decoupled Python-backend model in ``model.py`` beside this file, copied in as ``1/model.py``, with the
River model files in ``1/river``). It runs our runtime in-process by default, or with ``bls=True``
calls a step model through Triton's BLS API.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from river.atomic import atomic_dir
from river.compiler.graph_io import load_onnx_header
from river.compiler.draft_graph import DRAFT_FILE
from river.compiler.river.manifest import CALIBRATION_FILE, MANIFEST_FILE, SEGMENTS_DIR, SEGMENTS_FILE, SIDE_FILES, RiverInfo
from river.errors import ModelNotFound, RiverError
from river.export.contract import StepContract
from river.runtime.triton.config import (
    DEFAULT_MAX_TOKENS,
    GENERATE_MODEL,
    RIVER_SUBDIR,
    STEP_BACKENDS,
    STEP_MODEL,
    STEP_MODEL_OF,
    STEP_TRT_MODEL,
    generate_config,
    step_config,
    validate_config,
    write_config,
)
from river.runtime.triton.readme import TRT_NOTE, repo_readme

MODEL_PY = Path(__file__).with_name("model.py")
RIVER_FILES = ("model.onnx", "model.onnx.data", MANIFEST_FILE, *SIDE_FILES, DRAFT_FILE, DRAFT_FILE + ".data",
               CALIBRATION_FILE)


def _copy(src: Path, dst: Path) -> None:
    """Copies, not hard links: ONNX Runtime refuses external weight files (model.onnx.data) that have more
    than one link ("potential hardlink attack"), and a link would break the source folder as well."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _river_source(river_dir: str | Path) -> Path:
    path = Path(river_dir)
    folder = path.parent if path.suffix == ".onnx" else path
    if not (folder / "model.onnx").is_file():
        raise ModelNotFound(f"no model.onnx in {folder}: give a River graph folder (river-export's output)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ModelNotFound(f"no tokenizer files next to {folder / 'model.onnx'}")
    return folder


def _segments(src: Path, river: RiverInfo | None, dst: Path) -> None:
    """The segmented River beside the repository's River graph: the scheduler's rows of one batch exit
    at their own gates only in that form. Copied from the River folder, else written from the step
    graph the River graph was compiled from (river.json); without either, exit-mode rows run one at a
    time."""
    if river is None:
        return
    if (src / SEGMENTS_DIR / SEGMENTS_FILE).is_file():
        for path in sorted((src / SEGMENTS_DIR).iterdir()):
            if path.is_file():
                _copy(path, dst / path.name)
        return
    from river.compiler.river.manifest import RiverManifest
    from river.compiler.river.segments import write_segments
    from river.compiler.river.spec import RiverSpec

    source = RiverManifest.load(src).source_path if (src / MANIFEST_FILE).is_file() else None
    if source is not None and source.is_file():
        write_segments(source, RiverSpec.from_manifest(src), dst)


def _bls_step_model(step_backends: Sequence[str], chosen: str | None) -> str:
    chosen = chosen or STEP_MODEL_OF["onnxruntime" if "onnxruntime" in step_backends else "tensorrt_plan"]
    if chosen not in (STEP_MODEL_OF[b] for b in step_backends):
        raise RiverError(f"bls=True needs its step model '{chosen}' in the repository")
    return chosen


def write_triton_repo(river_dir: str | Path, repo_dir: str | Path, *,
                      step_backends: Sequence[str] = STEP_BACKENDS, plan_path: str | Path | None = None,
                      instances: int = 1, max_length: int | None = None, bls: bool = False,
                      bls_step_model: str | None = None, threads: int | None = None, max_rows: int = 8, max_queue: int | None = None,
                      prefill_budget: int | None = None,
                      default_max_tokens: int = DEFAULT_MAX_TOKENS, step_instances: int = 1,
                      ort_kind: str = "KIND_CPU") -> Path:
    """Write the model repository for the River graph in ``river_dir`` to ``repo_dir``; return ``repo_dir``.

    ``instances``: Python-backend instances of the generation model (one process each, one ONNX Runtime
    backend each); ``max_length``: KV cache capacity per request (default: the model's context);
    ``threads``: ONNX Runtime intra-op threads per instance; ``max_rows``: requests one instance
    batches (rows of its KV pool); ``max_queue``: requests that may wait for a row (default 4 x max_rows;
    beyond that a request is refused as UNAVAILABLE); ``prefill_budget``: prompt tokens one step may
    prefill (default 32: lower bounds the per-token latency a joining request causes the running
    streams, higher raises throughput under bursts); ``ort_kind``: instance kind of the onnxruntime step model (TensorRT's is KIND_GPU).
    Written into a temporary sibling folder, validated, then renamed: nothing partial is
    left on failure, and an existing non-empty ``repo_dir`` is refused.
    """
    src = _river_source(river_dir)
    unknown = [b for b in step_backends if b not in STEP_BACKENDS]
    if unknown:
        raise RiverError(f"unknown step backends {unknown}; choose from {list(STEP_BACKENDS)}")
    if plan_path is not None and "tensorrt_plan" not in step_backends:
        raise RiverError("plan_path given but 'tensorrt_plan' is not among step_backends")
    if plan_path is not None and not Path(plan_path).is_file():
        raise ModelNotFound(f"TensorRT plan not found: {plan_path}")
    if instances < 1 or step_instances < 1 or max_rows < 1:
        raise RiverError("instances, step_instances and max_rows must be >= 1")
    if max_queue is not None and max_queue < 0:
        raise RiverError("max_queue must be >= 0")
    if prefill_budget is not None and prefill_budget < 1:
        raise RiverError("prefill_budget must be >= 1")
    if max_length is not None and max_length < 2:
        raise RiverError("max_length must leave room for a prompt and one new token (>= 2)")
    if bls:
        bls_step_model = _bls_step_model(step_backends, bls_step_model)
    header = load_onnx_header(src / "model.onnx")
    contract = StepContract.from_model(header, str(src / "model.onnx"))
    river = RiverInfo.from_model(header)

    repo_dir = Path(repo_dir)
    with atomic_dir(repo_dir, what="repository folder") as tmp:
        configs = []
        if "onnxruntime" in step_backends:
            d = tmp / STEP_MODEL
            for name in ("model.onnx", "model.onnx.data"):
                if (src / name).is_file():
                    _copy(src / name, d / "1" / name)
            configs.append(write_config(step_config(STEP_MODEL, contract, river, backend="onnxruntime",
                                                    instances=step_instances, kind=ort_kind), d))
        if "tensorrt_plan" in step_backends:
            d = tmp / STEP_TRT_MODEL
            (d / "1").mkdir(parents=True)
            if plan_path is not None:
                _copy(Path(plan_path), d / "1" / "model.plan")
            else:
                (d / "README.md").write_text(TRT_NOTE.format(name=STEP_TRT_MODEL))
            configs.append(write_config(step_config(STEP_TRT_MODEL, contract, river, backend="tensorrt_plan",
                                                    instances=step_instances, kind="KIND_GPU"), d))
        d = tmp / GENERATE_MODEL
        for name in RIVER_FILES:
            if (src / name).is_file():
                _copy(src / name, d / "1" / RIVER_SUBDIR / name)
        _segments(src, river, d / "1" / RIVER_SUBDIR / SEGMENTS_DIR)
        _copy(MODEL_PY, d / "1" / "model.py")
        params = {"mode": "bls" if bls else "ort", "river_dir": RIVER_SUBDIR, "max_rows": max_rows,
                  "default_max_tokens": default_max_tokens}
        if bls:
            params["step_model"] = bls_step_model
        if max_queue is not None:
            params["max_queue"] = max_queue
        if prefill_budget is not None:
            params["prefill_budget"] = prefill_budget
        if max_length is not None:
            params["max_length"] = max_length
        if threads is not None:
            params["threads"] = threads
        configs.append(write_config(generate_config(GENERATE_MODEL, instances=instances, params=params), d))
        (tmp / "README.md").write_text(repo_readme(contract, river, step_backends, plan_path is not None, bls))
        for path in configs:
            validate_config(path)
    return repo_dir
