"""Open a generator for a model name, .gguf file, HF directory or exported step graph (.onnx)."""

from __future__ import annotations

import json
from pathlib import Path

from river.compiler.river_pass import DISABLED
from river.errors import ModelNotFound, RiverError
from river.export.onnx_export import META_FILE
from river.runtime.generate import Generator
from river.runtime.ort_backend import OrtBackend


def parse_thresholds(text: str | None, backend: OrtBackend):
    """'off', comma-separated numbers, or a JSON thresholds file (see river-export --thresholds)."""
    if text is None:
        return None
    if backend.river is None:
        raise RiverError("--thresholds applies to River graphs; this model has no exit gates")
    gates = backend.river["gates"]
    if text == "off":
        return [DISABLED] * len(gates)
    if Path(text).is_file():
        from river.compiler.compile import read_thresholds

        return list(read_thresholds(text, gates))
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise RiverError(f"bad thresholds '{text}': give numbers separated by commas, 'off', or a JSON file") from None
    if len(values) != len(gates):
        raise RiverError(f"{len(values)} thresholds for {len(gates)} gates (after layers {gates})")
    return values


def open_generator(model: str, threads: int | None = None, tokenizer: str | None = None,
                   max_length: int | None = None, thresholds: str | None = None) -> Generator:

    if (Path(model) / "segments.json").is_file():  # the segmented River form (river-export --segmented)
        from river.runtime.segmented_backend import SegmentedBackend

        backend = SegmentedBackend(model, threads=threads)
        onnx_path = Path(model).parent / "model.onnx"
        return _generator(backend, onnx_path, tokenizer, max_length, thresholds)
    onnx_path = step_graph_path(model)
    backend = OrtBackend(onnx_path, threads=threads)  # validates the decoder contract first
    return _generator(backend, onnx_path, tokenizer, max_length, thresholds)


def step_graph_path(model: str) -> Path:
    """The .onnx file itself, or the cached step graph of a model name / .gguf / HF directory."""
    if model.endswith(".onnx"):
        if not Path(model).is_file():
            raise ModelNotFound(f"ONNX file not found: {model}")
        return Path(model)
    from river.export.store import exported_model_path

    return exported_model_path(model)


def _generator(backend, onnx_path: Path, tokenizer, max_length, thresholds) -> Generator:
    from transformers import AutoTokenizer

    chosen = parse_thresholds(thresholds, backend)
    if chosen is not None:
        backend.set_thresholds(chosen)
    tok_dir = Path(tokenizer) if tokenizer else onnx_path.parent
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
        raise ModelNotFound(f"no tokenizer next to {onnx_path}; pass --tokenizer DIR (a folder with tokenizer.json)")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    eos: list[int] = []
    meta = onnx_path.parent / META_FILE
    if meta.is_file():
        cfg = json.loads(meta.read_text()).get("config", {})
        eos = list(cfg.get("eos_token_ids", []))
        max_length = max_length or cfg.get("max_position_embeddings")
    if not eos and tok.eos_token_id is not None:
        eos = [tok.eos_token_id]
    return Generator(backend, tok, eos, max_length=max_length)


def open_verifier(model: str, threads: int | None = None, tokenizer: str | None = None,
                  max_length: int | None = None, draft: str = "graph", draft_exit: int | None = None,
                  draft_gate: int = 0, k: int = 4, adaptive: bool = False):
    """A verify-mode generator. ``draft="graph"``: a draft graph (``runtime/draft_model.py``) over
    the plain backbone; ``draft="river"``: the River graph's own exit at gate index ``draft_gate``."""
    from river.compiler.ort_session import shared_thread_pool
    from river.runtime.draft_model import verify_pair
    from river.runtime.speculative import SpeculativeGenerator

    if draft not in ("graph", "river"):
        raise RiverError(f"unknown draft '{draft}' (choose graph or river)")
    if draft == "river":
        gen = open_generator(model, threads=threads, tokenizer=tokenizer, max_length=max_length)
        return SpeculativeGenerator(gen.backend, gen.tokenizer, gen.eos_token_ids, draft_gate=draft_gate, k=k,
                                    adaptive=adaptive, max_length=gen.max_length)
    onnx_path = step_graph_path(model)
    backbone_path, draft_path = verify_pair(onnx_path, draft_exit)
    backbone = OrtBackend(backbone_path, threads=threads)
    # Sessions with a pool each must not both spin on the cores: without the shared pool the draft
    # runs on the calling thread (measured: 2-thread pools each made verify mode 0.75x of the full model)
    draft_backend = OrtBackend(draft_path, threads=threads if shared_thread_pool() else 1, single_token=True)
    gen = _generator(backbone, onnx_path, tokenizer, max_length, None)  # tokenizer, EOS, context
    return SpeculativeGenerator(backbone, gen.tokenizer, gen.eos_token_ids, draft=draft_backend, k=k,
                                adaptive=adaptive, max_length=gen.max_length)
