"""Backend conformance: every backend that runs here (ONNX Runtime, segmented ONNX Runtime, the torch
reference) goes through the same protocol checks and the same generation tests, in exit and verify
mode; TensorRT (GPU only) must explain why it cannot run. Also the layering the redesign promises:
the compiler never imports the runtime and the generation path never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from river.cli import main as river_export
from river.compiler.river.manifest import DISABLED, FORCED_EXIT
from river.errors import RiverError
from river.runtime.cli import main as river_generate
from river.runtime.generate import GenerationConfig
from river.runtime.loading import open_backend, open_generator, open_verifier
from tests_helpers import assert_one_line_error

HERE = ("ort", "segmented", "torch")
PROMPT = [5, 17, 33, 2, 41, 8]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def river_dir(tmp_path_factory) -> Path:
    """tiny-random compiled with attention-only twins (a river that computes something other than the
    backbone) after layers 0 and 2, with its segments, through the river-export command."""
    out = tmp_path_factory.mktemp("conformance") / "river"
    assert river_export(["tiny-random", "-o", str(out), "--river", "attn", "--gates", "0,2", "--segmented",
                         "--no-draft"]) == 0
    return out


@pytest.fixture(scope="module")
def full_tokens(river_dir) -> list[int]:
    """The full model's greedy tokens: the River graph with every gate off (invariant 1)."""
    gen = open_generator(str(river_dir), backend="ort", thresholds="off")
    return gen.generate(PROMPT, GenerationConfig(max_new_tokens=12, eos_token_ids=()), chat=False).token_ids


def _teacher_forced(backend, thresholds) -> tuple[list[np.ndarray], list[int], list[np.ndarray]]:
    """Logits and exit layers of prefill + 6 decode steps over fixed tokens, and the final valid KV."""
    cache = backend.new_cache(16)
    logits = [np.array(backend.prefill(np.asarray([PROMPT]), cache))]
    cache.length = len(PROMPT)
    backend.set_thresholds(thresholds)
    exits = []
    for token in (3, 9, 27, 11, 4, 60):
        logits.append(np.array(backend.decode(np.asarray([[token]]), cache)))
        cache.length += 1
        exits.append(backend.last_exit_layer)
    kv = [cache.valid_kv(layer, kind) for layer in range(backend.contract.num_layers) for kind in ("key", "value")]
    backend.release(cache)
    return logits, exits, kv


@pytest.mark.parametrize("name", HERE)
def test_backend_full_depth_equals_the_full_model(name, river_dir, full_tokens):
    gen = open_generator(str(river_dir), backend=name, thresholds="off")
    assert gen.backend.name == name
    got = gen.generate(PROMPT, GenerationConfig(max_new_tokens=12, eos_token_ids=()), chat=False)
    assert got.token_ids == full_tokens


@pytest.mark.parametrize("thresholds, exit_layer", [([FORCED_EXIT, DISABLED], 1), ([DISABLED, FORCED_EXIT], 3),
                                                    ([DISABLED, DISABLED], 4)])
def test_backends_agree_on_exits_logits_and_kv(river_dir, thresholds, exit_layer):
    runs = {name: _teacher_forced(open_backend(str(river_dir), name)[0], thresholds) for name in HERE}
    ref_logits, ref_exits, ref_kv = runs["ort"]
    assert ref_exits == [exit_layer] * 6
    for name, (logits, exits, kv) in runs.items():
        assert exits == ref_exits, name
        for a, b in zip(logits, ref_logits):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
        for a, b in zip(kv, ref_kv):  # every layer written at every position: the KV share, no hole
            assert np.all(np.isfinite(a)) and a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
    if exit_layer < 4:  # the river really computed something else than the backbone
        full_logits = runs["ort"][0] if thresholds == [DISABLED, DISABLED] else \
            _teacher_forced(open_backend(str(river_dir), "ort")[0], [DISABLED, DISABLED])[0]
        assert max(np.abs(a - b).max() for a, b in zip(ref_logits[1:], full_logits[1:])) > 1e-3


@pytest.mark.parametrize("name", HERE)
def test_verify_mode_over_every_backend_is_lossless(name, river_dir, full_tokens):
    gen = open_verifier(str(river_dir), draft="river", draft_gate=0, k=3, backend=name)
    got = gen.generate(PROMPT, GenerationConfig(max_new_tokens=12, eos_token_ids=()), chat=False)
    assert got.token_ids == full_tokens
    assert gen.stats.rounds > 0 and gen.stats.drafted > 0
    # the operating point the user set is still in place afterwards (drafts and verification restore it)
    np.testing.assert_array_equal(gen.backend.thresholds, gen.backend.default_thresholds)


@pytest.mark.parametrize("name", HERE)
def test_protocol_errors_and_release(name, river_dir):
    backend, _ = open_backend(str(river_dir), name)
    cache = backend.new_cache(12)
    backend.prefill(np.asarray([PROMPT]), cache)
    cache.length = len(PROMPT)
    with pytest.raises(ValueError, match="empty cache"):
        backend.prefill(np.asarray([PROMPT]), cache)
    with pytest.raises(RiverError, match="3 thresholds for 2 gates"):
        backend.set_thresholds([0.5, 0.5, 0.5])
    with pytest.raises(RiverError, match="finite"):
        backend.set_thresholds([float("nan"), 0.5])
    with pytest.raises(RiverError, match="not a number"):
        backend.set_thresholds([True, 0.5])
    first = np.array(backend.decode(np.asarray([[3]]), cache))
    backend.release(cache)  # a released cache can be bound again and gives the same step
    np.testing.assert_allclose(backend.decode(np.asarray([[3]]), cache), first, atol=1e-5)
    with pytest.raises(RiverError, match="do not fit"):
        backend.extend(np.asarray([[1] * 7]), cache)


def test_tensorrt_backend_says_why_it_cannot_run(river_dir, tmp_path):
    with pytest.raises(RiverError, match="--trt"):
        open_backend(str(river_dir), "tensorrt")
    (tmp_path / "engines.json").write_text("{}")
    with pytest.raises(RiverError, match="GPU|TensorRT"):
        open_backend(str(tmp_path), "tensorrt")
    # where river-export --trt writes them: <river folder>/trt/engines/engines.json
    (tmp_path / "river" / "trt" / "engines").mkdir(parents=True)
    (tmp_path / "river" / "trt" / "engines" / "engines.json").write_text("{}")
    with pytest.raises(RiverError, match="GPU|TensorRT"):
        open_backend(str(tmp_path / "river"), "tensorrt")


def test_torch_backend_refuses_a_graph_without_weights(tiny_onnx):
    with pytest.raises(RiverError, match="torch weights"):
        open_backend(str(tiny_onnx), "torch")


def test_river_generate_reaches_each_backend(river_dir, capsys):
    for name in HERE:
        assert river_generate(["--model", str(river_dir), "--backend", name, "--raw", "--max-new-tokens", "4", "hi"]) == 0
    assert river_generate(["--model", str(river_dir), "--backend", "tensorrt", "hi"]) == 2
    assert "--trt" in assert_one_line_error(capsys.readouterr().err, "river-generate")


def test_generation_path_loads_no_torch(river_dir):
    code = ("import sys; from river.runtime.loading import open_generator; import river.runtime.cli; "
            f"g = open_generator({str(river_dir)!r}, backend='ort'); g.generate([5, 6], chat=False); "
            f"g = open_generator({str(river_dir)!r}, backend='segmented'); g.generate([5, 6], chat=False); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("layer, later", [("models", ("river.export", "river.compiler", "river.runtime")),
                                          ("export", ("river.compiler", "river.runtime")),
                                          ("compiler", ("river.runtime",))])
def test_layers_never_import_a_later_layer(layer, later):
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / layer).rglob("*.py")
           for m in _imports(p) if m.startswith(later)}
    assert not bad, sorted(bad)
