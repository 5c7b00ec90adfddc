"""Parity harness (runtime/parity.py, Polygraphy Comparator) and the GPU check script's CPU smoke run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from river.compiler.compile import compile_river
from river.compiler.river.manifest import DISABLED
from river.compiler.river.segments import write_segments
from river.compiler.river.spec import RiverSpec
from river.runtime.parity import StepDataLoader, check_parity, threshold_patterns

GATES = [0, 2]


@pytest.fixture(scope="module")
def river_dir(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "river"
    compile_river(tiny_onnx, out, gates=GATES, river="int8", thresholds=[0.5, 0.9], log=None)
    write_segments(tiny_onnx, RiverSpec.from_manifest(out), out / "segments")
    return out


def test_threshold_patterns():
    pats = threshold_patterns(2, np.array([0.5, 0.75], np.float32))
    assert [p.tolist() for p in pats] == [[-2, DISABLED], [DISABLED, -2], [DISABLED, DISABLED], [0.5, 0.75]]
    assert len(threshold_patterns(2, np.full(2, DISABLED, np.float32))) == 3


def test_data_loader_makes_real_decode_steps(river_dir):
    loader = StepDataLoader(river_dir / "model.onnx", batch=2, past=5, contexts=2)
    assert len(loader) == 2 * 4
    feed = next(iter(loader))
    assert feed["input_ids"].shape == (2, 1) and feed["position_ids"].tolist() == [[5], [5]]
    assert feed["attention_mask"].shape == (2, 6) and feed["past_key_values.3.value"].shape == (2, 2, 5, 16)
    assert np.abs(feed["past_key_values.0.key"]).max() > 0  # a real prefix, not zeros


def test_parity_fused_and_segmented_runtime(river_dir):
    report = check_parity(river_dir, contexts=2, past=6)
    assert report.passed, "\n".join(report.lines())
    assert report.runners == ["onnxrt-river-graph", "river-ort-fused", "river-ort-segmented"]
    assert report.max_abs() <= 1e-5
    exits = report.exits["onnxrt-river-graph"]  # per context: exit at gate 0, at gate 1, none, defaults
    assert len(exits) == 8 and exits[0:3] == exits[4:7] == [1, 3, 4]
    assert report.exits["river-ort-segmented"] == report.exits["onnxrt-river-graph"]
    assert "river-trt" in report.skipped  # no GPU here: why is recorded
    assert report.lines()[0].startswith("parity: PASS")


def test_parity_catches_a_mismatch(river_dir, tiny_onnx, tmp_path):
    """Segments whose weights were altered (1% on one tensor) are caught; segments with other twins
    than the River graph are not compared with it (skipped, with the reason)."""
    import onnx

    from river.compiler.river.segments import DATA_FILE, SegmentIndex

    write_segments(tiny_onnx, RiverSpec.from_manifest(river_dir), tmp_path / "segments")
    index = SegmentIndex.load(tmp_path / "segments")
    model = onnx.load(str(index.path(index.river(0))), load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == 1)
    where = {e.key: int(e.value) for e in weight.external_data if e.key != "location"}
    data = np.memmap(tmp_path / "segments" / DATA_FILE, dtype=np.uint8, mode="r+")
    values = data[where["offset"]:where["offset"] + where["length"]].view(np.float32)
    values *= 1.01
    data.flush()
    del data
    report = check_parity(river_dir, segments=tmp_path / "segments", contexts=1, trt=False)
    assert not report.passed
    bad = [c["pair"] for c in report.comparisons if not c["passed"]]
    assert bad == ["onnxrt-river-graph vs river-ort-segmented"]
    assert any("MISMATCH" in line for line in report.lines())

    write_segments(tiny_onnx, RiverSpec.from_name("fp32", GATES), tmp_path / "fp32")
    report = check_parity(river_dir, segments=tmp_path / "fp32", contexts=1, trt=False)
    assert report.passed and "same twins" in report.skipped["river-ort-segmented"]


def test_gpu_check_script_runs_on_cpu(tmp_path, capsys):
    """The GPU check's smoke run: tiny model on the CPU, torch reference and ONNX Runtime sections."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--device", "cpu", "--model", "tiny-random", "--steps", "3", "--prompt-len", "6",
                      "--threads", "1", "--no-trt-build", "--out", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "torch reference on cpu" in out and "ONNX Runtime (CPU): fused River graph vs segmented" in out
    assert "exit@gate0" in out and "no-exit" in out
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["torch"]["full_ms"] > 0 and data["tensorrt"] == {"skipped": "--no-trt-build"}


def test_parity_of_the_tensorrt_forms(river_dir, tiny_onnx, tmp_path):
    """river-export --trt --check on a machine without a GPU: the TensorRT forms (chained graph and
    segments, DequantizeLinear twins) are checked in ONNX Runtime against the graph the fused engine
    was built from; the engines themselves are reported as skipped, with the reason."""
    import shutil

    from river.compiler.tensorrt import package as trt_package
    from river.compiler.tensorrt.engines import compile_trt

    pytest.importorskip("tensorrt" if trt_package.TRT_PACKAGE == "tensorrt" else "tensorrt_rtx", reason=trt_package.INSTALL_HINT)
    folder = tmp_path / "river"
    shutil.copytree(river_dir, folder)
    report = compile_trt(tiny_onnx, RiverSpec.from_manifest(folder), folder, capacity=32, max_seq=8, max_past=32)
    assert report.build("fused").conditionals == len(GATES)
    assert sorted(p.name for p in (folder / "trt").iterdir()) == ["chained", "engines", "segments"]
    parity = check_parity(folder, contexts=1)
    assert parity.passed, "\n".join(parity.lines())
    assert {"river-ort-chained", "river-ort-segmented-trt-forms", "onnxrt-chained-graph"} <= set(parity.runners)
    assert parity.max_abs() <= 1e-5 and "river-trt" in parity.skipped
