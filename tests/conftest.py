"""Shared fixtures: the tiny random model and the real SmolLM2-135M, each exported once per run."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Keep derived artefacts (tokenizer conversions, exports) of a test run out of the user's cache; the
# run removes the folder it made (1-2.5 GB a run: left behind, repeated runs filled the disk)
_RUN_CACHE = None
if "RIVER_CACHE_DIR" not in os.environ:
    _RUN_CACHE = os.environ["RIVER_CACHE_DIR"] = tempfile.mkdtemp(prefix="river-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _RUN_CACHE is not None:
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    from river.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def tiny_onnx(tiny, tmp_path_factory) -> Path:
    from river.export import export_model

    return export_model(tiny, tmp_path_factory.mktemp("tiny") / "export")


@pytest.fixture(scope="session")
def tiny_river_segmented(tiny_onnx, tmp_path_factory) -> Path:
    """The tiny model compiled once with int8 twins and gates after layers 0 and 2, its segments beside
    it (river-export --segmented): the River graph's path. Tests read it and never write into it."""
    from river.compiler.compile import compile_river
    from river.compiler.river.segments import write_segments
    from river.compiler.river.spec import RiverSpec

    path = compile_river(tiny_onnx, tmp_path_factory.mktemp("tiny-river") / "int8", gates=[0, 2], river="int8", log=None)
    write_segments(tiny_onnx, RiverSpec.from_manifest(path.parent), path.parent / "segments")
    return path


@pytest.fixture(scope="session")
def tiny_on_grid(tiny, tiny_onnx, tmp_path_factory):
    """The tiny model with every layer weight on a Q4_1 grid (what a GGUF of it would dequantize to); the
    embedding and head stay as they are (a GGUF keeps them in Q8_0 or better)."""
    import numpy as np
    import onnx

    from river.compiler.graph_io import load_onnx, save_onnx_atomic
    from tests_helpers import on_grid

    rng = np.random.default_rng(1)
    model = load_onnx(tiny_onnx)
    for init in model.graph.initializer:
        w = onnx.numpy_helper.to_array(init)
        if w.ndim == 2 and w.dtype == np.float32 and w.shape[0] % 32 == 0 and tiny.config.vocab_size not in w.shape:
            init.CopyFrom(onnx.numpy_helper.from_array(on_grid(w, rng), init.name))
    path = tmp_path_factory.mktemp("grid") / "model.onnx"
    for f in tiny_onnx.parent.iterdir():
        if f.suffix != ".onnx" and not f.name.startswith("model.onnx"):
            (path.parent / f.name).write_bytes(f.read_bytes())
    return save_onnx_atomic(model, path)


@pytest.fixture(scope="session")
def smol():
    from river.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_onnx(smol, tmp_path_factory) -> Path:
    from river.export import export_model

    return export_model(smol, tmp_path_factory.mktemp("smol") / "export")


@pytest.fixture(scope="session")
def smol_river_model(smol_onnx, tmp_path_factory) -> Path:
    """SmolLM2 compiled once with river-export's defaults (int8 twins, default gates, draft graph):
    the River graph's path. Tests that need another River compile their own."""
    from river.compiler.compile import compile_river

    return compile_river(smol_onnx, tmp_path_factory.mktemp("smol-river") / "river", log=None)


@pytest.fixture(scope="session")
def smol_segments(smol, smol_onnx, tmp_path_factory):
    """SmolLM2's segments (river-export --segmented) at the default gates, int8 twins and an int8 river
    head, written once: (the segments folder, its RiverSpec). Tests read it and never write into it."""
    from river.compiler.river.segments import write_segments
    from river.compiler.river.spec import RiverSpec, default_gates

    spec = RiverSpec.from_name("int8", default_gates(smol.config.num_layers), head="int8")
    return write_segments(smol_onnx, spec, tmp_path_factory.mktemp("smol-segments") / "segments").parent, spec


def optimum_export(loaded, work: Path) -> Path:
    """Export through Hugging Face Optimum (text-generation-with-past) from a local HF directory."""
    from optimum.exporters.onnx import main_export

    from river.models.hf_dir import save_hf_dir

    hf_dir = save_hf_dir(loaded.model, work / "hf", loaded.tokenizer)
    main_export(str(hf_dir), output=str(work / "optimum"), task="text-generation-with-past", device="cpu")
    return work / "optimum" / "model.onnx"


def dynamo_export(loaded, work: Path) -> Path:
    """Export through ``torch.onnx.export(dynamo=True)`` (flat node names)."""
    import torch

    from river.export import contract as C

    cfg = loaded.config
    b, s, p = 2, 3, 5
    args = [torch.randint(0, cfg.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).repeat(b, 1)]
    args += [torch.zeros(b, cfg.num_kv_heads, p, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    dim = torch.export.Dim
    batch, seq, past, total = dim("batch_size"), dim("sequence_length"), dim("past_sequence_length"), dim("total_sequence_length")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple([{0: batch, 2: past}] * (2 * cfg.num_layers)))
    work.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(loaded.model, tuple(args), dynamo=True, dynamic_shapes=shapes,
                                input_names=C.input_names(cfg.num_layers), output_names=C.output_names(cfg.num_layers))
    program.save(str(work / "model.onnx"))
    return work / "model.onnx"


@pytest.fixture(scope="session")
def tiny_optimum_onnx(tiny, tmp_path_factory) -> Path:
    return optimum_export(tiny, tmp_path_factory.mktemp("tiny-optimum"))


@pytest.fixture(scope="session")
def tiny_dynamo_onnx(tiny, tmp_path_factory) -> Path:
    return dynamo_export(tiny, tmp_path_factory.mktemp("tiny-dynamo"))


@pytest.fixture(scope="session")
def smol_optimum_onnx(smol, tmp_path_factory) -> Path:
    return optimum_export(smol, tmp_path_factory.mktemp("smol-optimum"))
