"""A cache of exported step graphs, so ``river-generate --model NAME`` exports a model only once."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from river.atomic import build_once
from river.export.onnx_export import MODEL_FILE, OPSET, export_model
from river.models.cache import cache_root, file_fingerprint, files_fingerprint
from river.models.registry import REGISTRY, load_model, smollm2_gguf_path

EXPORT_FORMAT = 2  # bump when the exported graph changes, to invalidate cached exports


def _source_fingerprint(name_or_path: str) -> str:
    if name_or_path == "smollm2-135m":
        return file_fingerprint(smollm2_gguf_path())
    if name_or_path in REGISTRY:
        return name_or_path
    path = Path(name_or_path)
    if path.is_file():
        return file_fingerprint(path)
    if path.is_dir():
        return files_fingerprint(sorted(f for f in path.iterdir() if f.is_file()))
    return name_or_path  # load_model reports the error


def exported_model_path(name_or_path: str, log=None) -> Path:
    """Path of the cached step graph of a model name, .gguf file or HF directory; exports on a miss
    (progress to ``log``, default the stderr of the moment: a default bound at import outlives it)."""
    log = sys.stderr if log is None else log
    slug = Path(name_or_path).name.replace(".", "_")
    key = hashlib.sha256(f"{_source_fingerprint(name_or_path)}|{OPSET}|{EXPORT_FORMAT}".encode()).hexdigest()[:12]
    out = cache_root() / "onnx" / f"{slug}-{key}"

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        print(f"[river] loading {name_or_path} ...", file=log, flush=True)
        loaded = load_model(name_or_path)
        print(f"[river] exporting {loaded.name} to ONNX (once; cached in {out}) ...", file=log, flush=True)
        export_model(loaded, tmp)
        print(f"[river] exported in {time.perf_counter() - t0:.1f}s", file=log, flush=True)

    return build_once(out, build) / MODEL_FILE
