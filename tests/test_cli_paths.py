"""The paths users run first, through the commands themselves: the README's calibrated export,
verify mode's options, --thresholds, model inputs other than a graph, the installed entry points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from tests_helpers import assert_one_line_error

from river import cli as export_cli
from river.compiler.river.manifest import DISABLED, FORCED_EXIT, THRESHOLDS
from river.runtime import cli as generate_cli
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend

PROMPTS = ["The river runs to the sea", "Once upon a time", "def add(a, b):", "Two plus two is"]


def baked_thresholds(graph: Path) -> list[float]:
    model = onnx.load(str(graph), load_external_data=False)
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == THRESHOLDS)).tolist()


def greedy_text(tiny, tiny_onnx, prompt: str, n: int) -> str:
    gen = Generator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer)
    return gen.generate(prompt, GenerationConfig(max_new_tokens=n), chat=False).text


@pytest.fixture(scope="module")
def river_dir(tiny_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paths") / "river"
    assert export_cli.main([str(tiny_onnx), "-o", str(out), "--gates", "1,2"]) == 0
    return out


@pytest.mark.parametrize("budget, metric, point", [("fast", None, "fast"), ("0.3", "kl", "0.3")])
def test_readme_export_with_calibration(tmp_path, monkeypatch, capsys, budget, metric, point):
    """river-export MODEL -o OUT --calibrate FILE --budget B --metric M: the prompts file is read,
    calibration.json is written, and the baked thresholds are the chosen operating point's."""
    from river.compiler import calibrate

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    read = []
    real = calibrate.read_prompts
    monkeypatch.setattr(calibrate, "read_prompts", lambda path: read.append(Path(path)) or real(path))
    out = tmp_path / "out"
    args = ["tiny-random", "-o", str(out), "--calibrate", str(tmp_path / "prompts.txt"), "--budget", budget]
    assert export_cli.main(args + (["--metric", metric] if metric else [])) == 0
    assert read and all(p == tmp_path / "prompts.txt" for p in read)
    calibration = json.loads((out / "calibration.json").read_text())
    manifest = json.loads((out / "river.json").read_text())
    chosen = calibration["operating_points"][point]["thresholds"]
    assert calibration["metric"] == (metric or "flip") and manifest["calibration"]["metric"] == (metric or "flip")
    assert manifest["thresholds"] == chosen == manifest["operating_points"][point]
    np.testing.assert_allclose(baked_thresholds(out / "model.onnx"), chosen, rtol=1e-6)
    assert capsys.readouterr().out.strip() == str(out / "model.onnx")


def _run(capsys, argv) -> tuple[str, str]:
    assert generate_cli.main(argv) == 0
    captured = capsys.readouterr()
    return captured.out.rstrip("\n"), captured.err


def test_thresholds_off_and_file(river_dir, tmp_path, capsys):
    model = str(river_dir / "model.onnx")
    base = ["--model", model, "--raw", "--max-new-tokens", "6", "--stats"]
    _, err = _run(capsys, base + ["--thresholds", "off", "hi"])
    assert "exit after layer 4" in err and "exit after layer 2" not in err  # every gate off: the full depth
    forced = tmp_path / "t.json"
    forced.write_text(json.dumps({"gates": [1, 2], "thresholds": [FORCED_EXIT, DISABLED]}))
    _, err = _run(capsys, base + ["--thresholds", str(forced), "hi"])
    assert "[river] exit layers (layers run per decode step): {2: 5}" in err  # the first gate always fires


def test_verify_mode_options_through_the_cli(tiny, tiny_onnx, river_dir, capsys):
    """--draft river / --draft-gate / --draft-exit: each lossless (the full model's greedy text)."""
    expected = greedy_text(tiny, tiny_onnx, "hello there", 12)
    base = ["--mode", "verify", "--raw", "--max-new-tokens", "12"]
    for extra in (["--model", str(river_dir), "--draft", "river", "--draft-gate", "0"],
                  ["--model", str(river_dir), "--draft", "river", "--draft-gate", "1"],
                  ["--model", str(tiny_onnx), "--draft-exit", "0"],
                  ["--model", str(river_dir), "--draft-exit", "1"],
                  ["--model", str(river_dir)]):  # the shipped draft.onnx
        out, err = _run(capsys, base + extra + ["hello there"])
        assert out == expected, extra
        assert "acceptance" in err
    for extra, message in ((["--model", str(river_dir), "--draft", "river", "--draft-gate", "5"], "gate index 5"),
                           (["--model", str(tiny_onnx), "--draft-exit", "99"], "out of range"),
                           (["--model", str(tiny_onnx), "--draft", "river"], "")):
        assert generate_cli.main(base + extra + ["hi"]) == 2
        assert message in assert_one_line_error(capsys.readouterr().err, "river-generate")


def test_adaptive_changes_k(river_dir, monkeypatch, capsys):
    from river.runtime.speculative import DraftPayoff, SpeculativeGenerator

    asked: list[int] = []
    real = SpeculativeGenerator.draft
    monkeypatch.setattr(DraftPayoff, "drafts", lambda self: True)  # every round drafts, whatever the timings
    monkeypatch.setattr(SpeculativeGenerator, "draft", lambda self, pending, cache, k, *a: asked.append(k) or
                        real(self, pending, cache, k, *a))
    base = ["--model", str(river_dir), "--mode", "verify", "--raw", "--max-new-tokens", "40", "--draft-k", "2"]
    _run(capsys, base + ["--no-adaptive", "hello there"])
    fixed, asked[:] = list(asked), []
    _run(capsys, base + ["hello there"])  # adaptive k is the default
    default, asked[:] = list(asked), []
    _run(capsys, base + ["--adaptive", "hello there"])
    assert set(fixed[:-1]) == {2}  # the last round may be cut short by max_new_tokens
    assert set(asked) != {2} and len(set(asked)) > 1, asked  # grown on full acceptance / shrunk on rejection
    assert default == asked


def test_hf_directory_input(tiny, tiny_onnx, tmp_path, capsys):
    from river.models.hf_dir import save_hf_dir

    hf = save_hf_dir(tiny.model, tmp_path / "hf", tiny.tokenizer)
    out = tmp_path / "out"
    assert export_cli.main([str(hf), "-o", str(out), "--gates", "1,2"]) == 0
    assert {"model.onnx", "draft.onnx", "river.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "river.json").read_text())["model"] == str(hf)
    assert capsys.readouterr().out.strip() == str(out / "model.onnx")
    text, _ = _run(capsys, ["--model", str(out), "--raw", "--max-new-tokens", "8", "--thresholds", "off", "hello"])
    assert text == greedy_text(tiny, tiny_onnx, "hello", 8)


@pytest.mark.slow
def test_gguf_file_input(smol, tmp_path, capsys):
    """A .gguf path (the default model's file) given to river-export directly, not by name. No writer
    for a tiny GGUF with a tokenizer transformers can read is at hand, so this uses SmolLM2's file."""
    from river.models.registry import smollm2_gguf_path

    out = tmp_path / "out"
    assert export_cli.main([str(smollm2_gguf_path()), "-o", str(out), "--no-draft", "--gates", "14"]) == 0
    manifest = json.loads((out / "river.json").read_text())
    assert manifest["num_layers"] == smol.config.num_layers and manifest["gates"] == [14]
    capsys.readouterr()
    text, _ = _run(capsys, ["--model", str(out), "--max-new-tokens", "4", "--thresholds", "off", "What is 2+2?"])
    assert text


def test_installed_commands_share_one_thread_pool(tiny_onnx, monkeypatch, capsys):
    """The console entry points (what pyproject installs) call use_shared_thread_pool; main() does not."""
    from importlib.metadata import entry_points

    from river.compiler import ort_session
    from river.runtime.bench import cli as bench_cli

    installed = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert installed["river-generate"] == "river.runtime.cli:console"
    assert installed["river-bench"] == "river.runtime.bench.cli:console"

    pools = []
    monkeypatch.setattr(ort_session, "use_shared_thread_pool", lambda threads=None: pools.append(threads))
    argv = ["river-generate", "--model", str(tiny_onnx), "--threads", "1", "--max-new-tokens", "2", "hi"]
    monkeypatch.setattr(sys, "argv", argv)
    assert generate_cli.console() == 0 and pools == [1]
    assert generate_cli.main(argv[1:]) == 0 and pools == [1]  # library callers keep per-session pools
    calls = []
    monkeypatch.setattr(bench_cli, "main", lambda argv=None, shared_pool=False: calls.append(shared_pool) or 0)
    assert bench_cli.console() == 0 and calls == [True]
