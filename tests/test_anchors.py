"""benchmarks/anchors.py: its engine-independent parts on tiny-random (other engines skipped, saying so)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "anchors.py"


@pytest.fixture(scope="module")
def anchors():
    spec = importlib.util.spec_from_file_location("anchors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["anchors"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("anchors", None)


def test_agreement(anchors):
    got = anchors.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert got == {"prefix_mean": (2 + 4) / 2, "overall": 7 / 8, "identical": False}
    assert anchors.agreement([[1, 2]], [[1, 2]])["identical"]


def test_engine_tokens_per_second_and_ratio(anchors):
    ref = anchors.Engine(anchors.REFERENCE, None, "")
    other = anchors.Engine("other", None, "")
    ref.record(0.5, [1, 2, 3, 4, 5], 5)
    ref.record(0.3, [1, 2, 3, 4, 5], 5)
    other.record(0.2, [1, 2, 0, 4, 5], 5)
    other.record(0.2, [1, 2, 3, 4, 5], 5)
    rows = {r["engine"]: r for r in anchors.table([ref, other])}
    assert rows["other"]["decode_tokens_per_s"] == pytest.approx(8 / 0.4)
    assert rows["other"]["ratio_to_ours_full"] == pytest.approx((8 / 0.4) / (8 / 0.8))
    assert rows["other"]["greedy"]["prefix_mean"] == 3.5
    with pytest.raises(RuntimeError, match="not 5"):
        other.record(0.1, [1, 2], 5)


def test_run_on_tiny_with_river_points(anchors, tiny_onnx, tmp_path, capsys):
    from river.compiler.calibration_data import CALIBRATION_PROMPTS
    from river.compiler.compile import compile_river

    from river.compiler.river.segments import write_segments
    from river.compiler.river.spec import RiverSpec

    river = compile_river(tiny_onnx, tmp_path / "river", gates="0,2", river="int8", calibrate=CALIBRATION_PROMPTS[:2],
                          budget="balanced", threads=1, log=None).parent
    write_segments(tiny_onnx, RiverSpec.from_manifest(river), river / "segments")  # the recall points run on it
    out = tmp_path / "anchors.json"
    assert anchors.main(["--model", "tiny-random", "--tokens", "6", "--prompts", "2", "--threads", "1",
                         "--engines", "ours,llama.cpp", "--river", str(river), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipping llama.cpp: it runs a GGUF file and tiny-random is not one" in captured.err
    data = json.loads(out.read_text())
    rows = {r["engine"]: r for r in data["engines"]}
    assert list(rows)[:4] == [anchors.REFERENCE, "ours full (fp32, portable graph)", "ours verify (adaptive k)",
                              "ours verify (k=4 fixed)"]
    assert rows["ours verify (adaptive k)"]["greedy"]["identical"]  # lossless
    assert rows["ours verify (k=4 fixed)"]["greedy"]["identical"]
    assert rows["ours full (fp32, portable graph)"]["greedy"]["identical"]  # the lowering changes no token
    assert rows["ours full (fp32 matrices)"]["greedy"]["identical"]
    assert {"ours River safe", "ours River balanced", "ours River fast"} <= set(rows)
    assert {"ours River safe-recall", "ours River balanced-recall", "ours River fast-recall"} <= set(rows)
    for r in rows.values():
        assert r["decode_tokens"] == 2 * 5 and all(len(t) == 6 for t in r["tokens"])
    assert "| ours full (fp32) |" in captured.out


def test_missing_engines_are_skipped_with_a_line(anchors, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_engines(name, *args, **kwargs):
        if name in ("onnxruntime_genai", "llama_cpp"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_engines)
    assert anchors.genai_engines(None, Path("unused"), 1) == []
    assert anchors.llama_cpp_engines(str(Path("m.gguf")), 1, 64) == []
    err = capsys.readouterr().err
    assert "skipping onnxruntime-genai (fp32, int4): not installed" in err
    assert "skipping llama.cpp: llama-cpp-python does not import (llama_cpp): pip install" in err


def test_llama_cpp_built_for_another_cpu_is_skipped_not_fatal(anchors, monkeypatch, capsys):
    """A llama-cpp-python build for another CPU dies of SIGILL on its first token, which would kill the
    whole benchmark: the two-token probe runs in a child process and the engine is skipped with a line."""
    import types

    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))  # no Llama: must not be reached
    monkeypatch.setattr(anchors, "PROBE", "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    assert anchors.llama_cpp_engines("m.gguf", 1, 64) == []
    err = capsys.readouterr().err
    assert "skipping llama.cpp: its build uses an instruction this CPU lacks" in err and "GGML_NATIVE=OFF" in err
    monkeypatch.setattr(anchors, "PROBE", "import sys\nsys.exit(3)\n")
    assert anchors.llama_cpp_engines("m.gguf", 1, 64) == []
    assert "a two-token test run failed (exit status 3)" in capsys.readouterr().err
