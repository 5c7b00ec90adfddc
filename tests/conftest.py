"""Shared fixtures: the tiny random model and the real SmolLM2-135M, each exported once per run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Keep derived artefacts (tokenizer conversions, exports) of a test run out of the user's cache.
os.environ.setdefault("RIVER_CACHE_DIR", tempfile.mkdtemp(prefix="river-test-cache-"))


@pytest.fixture(scope="session")
def tiny():
    from river.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def tiny_onnx(tiny, tmp_path_factory) -> Path:
    from river.export import export_model

    return export_model(tiny, tmp_path_factory.mktemp("tiny") / "export")


@pytest.fixture(scope="session")
def smol():
    from river.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_onnx(smol, tmp_path_factory) -> Path:
    from river.export import export_model

    return export_model(smol, tmp_path_factory.mktemp("smol") / "export")
