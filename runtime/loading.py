"""Open a backend, a generator or a verifier for whatever the user names: a registered model name,
a .gguf file, a Hugging Face directory, an exported step graph or River graph (``model.onnx``), a
segments folder, or a TensorRT engine folder. ``open_backend`` is the one place that picks a backend.
"""

from __future__ import annotations

from pathlib import Path

from river.compiler import ort_ops
from river.compiler.river.manifest import (
    DISABLED,
    ENGINES_DIR,
    ENGINES_FILE,
    MANIFEST_FILE,
    SEGMENTS_DIR,
    SEGMENTS_FILE,
    TRT_DIR,
    RiverManifest,
    check_thresholds,
)
from river.errors import CacheOverflow, ModelNotFound, RiverError
from river.export.contract import eos_token_ids, exported_config
from river.runtime.backend import StepBackend
from river.runtime.generate import Generator
from river.runtime.speculative import ADAPTIVE_K, DRAFT_K, K_MAX

BACKENDS = ("ort", "segmented", "tensorrt", "torch")
# ONNX Runtime steps: its fused lowering where it applies, or the portable graph. Weights on a 4-bit grid
# (GGUF Q4_1), and Q8_0 ones (a tied head), run under "ort" from that form with River's exact ops when
# their library is built (else as fp32 matrices), under "ort-fp32" as fp32 matrices, under "ort-grid"
# with MatMulNBits and an offset path, under "ort-int8" (lossy: llama.cpp's arithmetic) from that form by
# int8 activations (see grid_form)
LOWERINGS = ("ort", "ort-fp32", "ort-grid", "ort-int8", "portable")
RIVER_GRID_FORMS = {"ort": "river", "ort-int8": "river-int8"}  # lowerings that need River's ops


def grid_form(lowering: str) -> str:
    """How a lowering runs products by weights on a 4-bit grid (``ort_fused.GRID_FORMS``)."""
    if lowering == "ort-grid":
        return "nbits"
    return RIVER_GRID_FORMS[lowering] if lowering in RIVER_GRID_FORMS and ort_ops.library() is not None else "fp32"


def parse_thresholds(text: str | None, backend: StepBackend):
    """'off', comma-separated numbers, or a JSON thresholds file (see river-export --thresholds)."""
    if text is None:
        return None
    if backend.river is None:
        raise RiverError("--thresholds applies to River graphs; this model has no exit gates")
    gates = list(backend.river.gates)
    if text == "off":
        return [DISABLED] * len(gates)
    if Path(text).is_file():
        from river.compiler.compile import read_thresholds

        return list(read_thresholds(text, gates))
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise RiverError(f"bad thresholds '{text}': give numbers separated by commas, 'off', or a JSON file") from None
    return list(check_thresholds(values, len(gates), f"--thresholds (gates after layers {gates})"))


def recall_points(model: str) -> dict[str, dict]:
    """The recall points (``compiler/river/recall.py``) river-export --calibrate recorded for a model
    folder (or its model.onnx / segments folder); {} if none."""
    path = Path(model)
    folder = _river_folder(path.parent if path.suffix == ".onnx" else path)
    if not (folder / MANIFEST_FILE).is_file():
        return {}
    from river.compiler.river.manifest import RiverManifest

    return RiverManifest.load(folder).recall_points or {}


def parse_recall(text: str | None, model: str) -> tuple[list[float] | None, float]:
    """``--recall``: a margin in [0, 1) (the thresholds stay), or the name of a calibrated recall point:
    (its gate thresholds, its margin). None: (None, RECALL_OFF)."""
    from river.compiler.river.recall import RECALL_OFF, check_recall

    if text is None:
        return None, RECALL_OFF
    points = recall_points(model)
    if text in points:
        return [float(x) for x in points[text]["thresholds"]], check_recall(points[text]["recall"], f"recall point {text}")
    try:
        float(text)
    except ValueError:
        known = ", ".join(points) or "none here: river-export --calibrate records them"
        raise RiverError(f"--recall {text!r}: give a margin in [0, 1) or a calibrated recall point ({known})") from None
    return None, check_recall(text, "--recall margin")


def step_graph_path(model: str) -> Path:
    """The .onnx file itself, or the cached step graph of a model name / .gguf / HF directory."""
    if model.endswith(".onnx"):
        if not Path(model).is_file():
            raise ModelNotFound(f"ONNX file not found: {model}")
        return Path(model)
    if (Path(model) / MANIFEST_FILE).is_file():  # a river-export output folder
        return Path(model) / "model.onnx"
    from river.export.store import exported_model_path

    return exported_model_path(model)


def _find(model: str, index: str, sub: Path) -> Path | None:
    """A folder holding ``index``: the model itself, or its ``sub`` folder (for a model.onnx: beside
    it), where river-export writes it."""
    path = Path(model)
    base = path.parent if path.suffix == ".onnx" else path
    for folder in (base, base / sub):
        if (folder / index).is_file():
            return folder
    return None


def _river_folder(folder: Path) -> Path:
    """The river-export folder (tokenizer, river.json) a segments or engines folder belongs to."""
    return next((f for f in (folder, *list(folder.parents)[:2]) if (f / MANIFEST_FILE).is_file()), folder)


def open_backend(model: str, backend: str = "auto", threads: int | None = None,
                 lowering: str = "ort") -> tuple[StepBackend, Path | object]:
    """(backend, where the tokenizer comes from: a folder, or a loaded tokenizer for the torch backend).

    ``auto``: a segments folder runs segmented, anything else on ONNX Runtime. ``lowering``: for the
    ONNX Runtime backend (``LOWERINGS``)."""
    if backend not in ("auto", *BACKENDS):
        raise RiverError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    segments = _find(model, SEGMENTS_FILE, Path(SEGMENTS_DIR))
    if backend == "auto":
        backend = "segmented" if segments is not None and Path(model).suffix != ".onnx" else "ort"
    if backend == "ort":
        from river.runtime.ort_backend import OrtBackend

        path = step_graph_path(model)
        return OrtBackend(path, threads=threads, lowering=lowering), path.parent
    if backend == "segmented":
        if segments is None:
            raise ModelNotFound(f"no {SEGMENTS_FILE} in {model} or its {SEGMENTS_DIR}/ folder: write one with "
                                "river-export --segmented")
        from river.runtime.segmented_backend import SegmentedBackend

        return SegmentedBackend(segments, threads=threads), _river_folder(segments)
    if backend == "tensorrt":
        engines = _find(model, ENGINES_FILE, Path(TRT_DIR, ENGINES_DIR))
        if engines is None:
            raise ModelNotFound(f"no {ENGINES_FILE} in {model} or its {TRT_DIR}/{ENGINES_DIR}/ folder: build engines "
                                "with river-export --trt")
        from river.runtime.trt_backend import TrtBackend

        return TrtBackend(engines), _river_folder(engines)
    return _torch_backend(model)


def _torch_backend(model: str) -> tuple[StepBackend, object]:
    """The torch reference: a registered name / .gguf / HF directory runs the plain model; a River
    output folder (or its model.onnx) runs the torch River of the model it was compiled from."""
    from river.models.registry import load_model
    from river.runtime.torch_backend import TorchBackend

    path = Path(model)
    folder = path.parent if path.suffix == ".onnx" else path
    if (folder / MANIFEST_FILE).is_file():
        import onnx

        from river.compiler.graph_io import load_onnx_header
        from river.compiler.river.manifest import THRESHOLDS, RiverInfo

        manifest = RiverManifest.load(folder)
        try:
            loaded = load_model(manifest.model)
        except ModelNotFound:
            raise RiverError(f"the torch backend needs the torch weights of '{manifest.model}' (the model {folder} was "
                             "compiled from): give a registered name, a .gguf file or a Hugging Face directory") from None
        header = load_onnx_header(folder / "model.onnx")
        defaults = next((onnx.numpy_helper.to_array(i).tolist() for i in header.graph.initializer if i.name == THRESHOLDS),
                        None)
        return TorchBackend(loaded.model, RiverInfo.from_model(header), defaults), loaded.tokenizer
    if path.suffix == ".onnx":
        raise RiverError(f"the torch backend needs torch weights, not an ONNX graph ({model}): give a registered "
                         "name, a .gguf file, a Hugging Face directory, or a river-export output folder")
    loaded = load_model(model)
    return TorchBackend(loaded.model), loaded.tokenizer


def open_generator(model: str, threads: int | None = None, tokenizer: str | None = None,
                   max_length: int | None = None, thresholds: str | None = None, backend: str = "auto",
                   lowering: str = "ort") -> Generator:
    chosen, where = open_backend(model, backend, threads, lowering)
    return _generator(chosen, where, tokenizer, max_length, thresholds)


def _load_tokenizer(where, tokenizer: str | None):
    from river.models.tokenizer import TextTokenizer

    if tokenizer is None and not isinstance(where, Path):
        return where  # a loaded tokenizer (torch backend)
    return TextTokenizer(Path(tokenizer) if tokenizer else where)


def _generator(backend: StepBackend, where, tokenizer, max_length, thresholds) -> Generator:
    chosen = parse_thresholds(thresholds, backend)
    if chosen is not None:
        backend.set_thresholds(chosen)
    tok = _load_tokenizer(where, tokenizer)
    folder = where if isinstance(where, Path) else None
    context = exported_config(folder).get("max_position_embeddings")
    if max_length is not None and context and max_length > context:
        raise CacheOverflow(f"--max-length {max_length} is beyond the model's context of {context} positions")
    max_length = context if max_length is None else max_length
    return Generator(backend, tok, eos_token_ids(folder, tok), max_length=max_length)


def open_verifier(model: str, threads: int | None = None, tokenizer: str | None = None,
                  max_length: int | None = None, draft: str = "graph", draft_exit: int | None = None,
                  draft_gate: int = 0, k: int = DRAFT_K, adaptive: bool = ADAPTIVE_K, backend: str = "auto",
                  lowering: str = "ort"):
    """A verify-mode generator. ``draft="graph"``: a draft graph (``runtime/verify_graphs.py``) over
    the plain backbone (ONNX Runtime); ``draft="river"``: the River graph's own exit at gate index
    ``draft_gate``, on any backend that runs several tokens a step."""
    from river.compiler.ort_session import shared_thread_pool
    from river.runtime.speculative import SpeculativeGenerator

    if draft not in ("graph", "river"):
        raise RiverError(f"unknown draft '{draft}' (choose graph or river)")
    if draft == "river":
        gen = open_generator(model, threads=threads, tokenizer=tokenizer, max_length=max_length, backend=backend,
                             lowering=lowering)
        return SpeculativeGenerator(gen.backend, gen.tokenizer, gen.eos_token_ids, draft_gate=draft_gate, k=k,
                                    adaptive=adaptive, max_length=gen.max_length)
    if backend not in ("auto", "ort"):
        raise RiverError(f"the draft graph runs on ONNX Runtime; with --backend {backend} draft with the River "
                         "graph's own exit (--draft river)")
    from river.runtime.verify_graphs import verify_pair
    from river.runtime.ort_backend import OrtBackend

    onnx_path = step_graph_path(model)
    backbone_path, draft_path = verify_pair(onnx_path, draft_exit)
    backbone = OrtBackend(backbone_path, threads=threads, lowering=lowering)
    # Sessions with a pool each must not both spin on the cores: without the shared pool the draft
    # runs on the calling thread (measured: 2-thread pools each made verify mode 0.75x of the full model)
    draft_backend = OrtBackend(draft_path, threads=threads if shared_thread_pool() else 1, single_token=True,
                               lowering=lowering, positions=backbone.context)  # no config beside a cached draft
    gen = _generator(backbone, onnx_path.parent, tokenizer, max_length, None)  # tokenizer, EOS, context
    return SpeculativeGenerator(backbone, gen.tokenizer, gen.eos_token_ids, draft=draft_backend, k=k,
                                adaptive=adaptive, max_length=gen.max_length)


def operating_points(folder: Path) -> dict[str, list[float]]:
    """The named operating points (budget -> thresholds) river-export --calibrate recorded, {} if none."""
    from river.compiler.river.manifest import CALIBRATION_FILE
    from river.errors import read_json

    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return {}
    points = read_json(path).get("operating_points", {})
    return {name: list(p["thresholds"]) for name, p in points.items() if isinstance(p, dict) and "thresholds" in p}


def open_scheduler(model: str, threads: int | None = None, tokenizer: str | None = None,
                   max_length: int | None = None, *, max_rows: int = 8, max_queue: int = 64,
                   prefill_chunk: int = 16, k_max: int = K_MAX, prefill_budget: int | None = None,
                   verify_drafts_up_to: int | None = None, draft_payoff: bool = True):
    """The continuous-batching scheduler (``runtime/batching``) for a river-export folder.

    It decodes with the segmented River where the folder has one (each row of a batch exits at its
    own gate), else with the River graph (exit-mode rows then run one at a time). Verify mode drafts
    with the folder's draft graph (else the River's own exit at its first gate) and verifies with the
    decoder, every gate off, so all three share one KV pool. ``verify_drafts_up_to``: None (a Triton
    model without the parameter) = the scheduler's default; ``draft_payoff``: whether measured
    payoffs (else that rule alone) decide when greedy verify rows draft."""
    from river.compiler.draft_graph import DRAFT_FILE
    from river.runtime.batching.scheduler import VERIFY_DRAFTS_UP_TO, Scheduler
    from river.runtime.ort_backend import OrtBackend

    path = Path(model)
    folder = path.parent if path.suffix == ".onnx" else path
    gen = open_generator(str(folder), threads=threads, tokenizer=tokenizer, max_length=max_length)
    draft = OrtBackend(folder / DRAFT_FILE, threads=threads) if (folder / DRAFT_FILE).is_file() else None
    return Scheduler(gen.backend, gen.tokenizer, gen.eos_token_ids, draft=draft, max_rows=max_rows,
                     max_queue=max_queue, max_length=gen.max_length, prefill_chunk=prefill_chunk, k_max=k_max,
                     budgets=operating_points(folder), recall_points=recall_points(str(folder)),
                     prefill_budget=prefill_budget,
                     verify_drafts_up_to=VERIFY_DRAFTS_UP_TO if verify_drafts_up_to is None else verify_drafts_up_to,
                     draft_payoff=draft_payoff)
