"""TensorRT engines for River (compiler/tensorrt/engines.py): the fused (chained) River graph and every
segment parse with conditionals where there are If nodes and build. Runs without a GPU through
TensorRT-RTX; the build times land in the test log (-s)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from river.compiler.tensorrt import package as trt_package

pytest.importorskip("tensorrt" if trt_package.TRT_PACKAGE == "tensorrt" else "tensorrt_rtx", reason=trt_package.INSTALL_HINT)

from test_river_pass import step_feeds

from river.compiler.graph_io import save_onnx_atomic, walk_nodes
from river.compiler.lowering.tensorrt import check_twins_for_trt, fuse_shared_input_int8_dq, trt_onnx
from river.compiler.river.chained import chained_river_graph
from river.compiler.river.manifest import DISABLED, FORCED_EXIT, THRESHOLDS
from river.compiler.river.nested import river_graph
from river.compiler.river.segments import SegmentIndex
from river.compiler.river.spec import RiverSpec, default_gates
from river.compiler.tensorrt.engines import EnginesReport, build_river_engines, compile_trt, write_trt_forms
from river.errors import RiverError

GATES = (0, 2)
SMALL = {"max_seq": 16, "max_past": 64}


def _dq(river: str, gates=GATES, head: str = "fp32") -> RiverSpec:
    return RiverSpec.from_name(river, gates, twin_format="dq", head=head)


@pytest.fixture(scope="module")
def tiny_proto(tiny_onnx):
    return onnx.load(str(tiny_onnx))


@pytest.mark.parametrize("river, head", [("fp32", "fp32"), ("int8", "fp32"), ("int4", "fp32"), ("int8", "int8")])
def test_fused_river_engine_builds_with_conditionals(tiny_proto, tmp_path, river, head):
    """The chained River builds with its conditionals (with a quantized river head: one more, on the head)."""
    path = save_onnx_atomic(chained_river_graph(tiny_proto, _dq(river, head=head)), tmp_path / "chained" / "model.onnx")
    report = build_river_engines(tmp_path / "engines", fused_onnx=path, **SMALL)
    fused = report.build("fused")
    print(f"\n[tiny {river}] fused build {fused.seconds:.1f}s, {fused.plan_bytes / 1e6:.1f} MB, "
          f"{fused.conditionals} conditionals, {fused.layers} layers")
    assert fused.conditionals >= len(GATES) + (head != "fp32") and fused.conditional_layers > fused.conditionals
    assert (tmp_path / "engines" / "fused.plan").stat().st_size == fused.plan_bytes > 0
    assert EnginesReport.load(tmp_path / "engines").build("fused").plan == "fused.plan"
    assert sorted(p.name for p in (tmp_path / "chained").iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp copy left


@pytest.mark.parametrize("river, capacity", [("int8", 64), ("fp32", None), ("int4", None)])
def test_segment_engines_build(tiny_onnx, tmp_path, river, capacity):
    """Every segment builds (no conditionals in a segment); with a capacity, the shared-KV form too
    (TensorScatter -> KVCacheUpdate needs the static cache length)."""
    forms = write_trt_forms(tiny_onnx, RiverSpec.from_name(river, GATES), tmp_path / "river", fused=False)
    report = build_river_engines(tmp_path / "engines", segments_dir=forms["segments"], capacity=capacity, **SMALL)
    index = SegmentIndex.load(forms["segments"])
    assert index.twin_format == "dq"  # write_trt_forms always writes the TensorRT twin format
    expected = [s.name for s in index.segments]
    if capacity:
        expected = [n for s in expected for n in (s, f"{s}.kv")]
    assert [b.name for b in report.builds] == expected
    assert all(b.conditionals == 0 and b.plan_bytes > 0 for b in report.builds)
    kv = [b for b in report.builds if b.form == "segment.kv"]
    for b in kv:
        pasts = [shapes for name, shapes in b.profiles.items() if name.startswith("past_key_values.")]
        assert b.capacity == capacity and pasts and all(s[k][2] == capacity for s in pasts for k in range(3))
    print(f"\n[tiny {river}] segments: {report.seconds('segment'):.1f}s contract form, "
          f"{report.seconds('segment.kv'):.1f}s shared-KV form")


def test_unsupported_node_in_river_branch_is_named(tiny_proto, tmp_path):
    """A node TensorRT cannot import, inside a twin branch of the River graph: the parser's reason
    and the node's name come back, and no plan is written."""
    model = chained_river_graph(tiny_proto, _dq("fp32"))
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    victim = next(n for n in then.node if n.op_type == "MatMul")
    victim.op_type, victim.domain = "FusedMatMul", "com.microsoft"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    path = save_onnx_atomic(model, tmp_path / "bad" / "model.onnx", check=False)
    with pytest.raises(RiverError, match=rf"node '{victim.name}' \(FusedMatMul\).*parseGraph|node '{victim.name}'"):
        build_river_engines(tmp_path / "engines", fused_onnx=path, **SMALL)
    assert not (tmp_path / "engines").exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]


@pytest.mark.xfail(strict=False, reason="TensorRT-RTX 1.7's builder (Myelin) fails on nested If nodes; "
                   "the chained layout is what engines are built from")
def test_nested_river_graph_builds(tiny_proto, tmp_path):
    path = save_onnx_atomic(river_graph(tiny_proto, _dq("kv")), tmp_path / "nested" / "model.onnx")
    build_river_engines(tmp_path / "engines", fused_onnx=path, **SMALL)


def test_trt_ready_copy(tiny_proto, tiny, tmp_path):
    """The copy TensorRT parses: thresholds stay an input (no default), INT8 projections sharing an
    input are merged, the cache axes become static on request, and it computes the same values."""
    path = save_onnx_atomic(chained_river_graph(tiny_proto, _dq("int8")), tmp_path / "chained" / "model.onnx")
    model = onnx.load(str(path), load_external_data=False)
    ready = trt_onnx(path)
    copy = onnx.load(str(ready), load_external_data=False)
    assert THRESHOLDS not in {t.name for t in copy.graph.initializer}
    dq = lambda m: sum(n.op_type == "DequantizeLinear" for n in walk_nodes(m.graph))
    assert dq(copy) < dq(model)  # q/k/v and gate/up merged per twin layer
    feeds = step_feeds(tiny.config, batch=1, seq=1, past=5)
    for thr in ([FORCED_EXIT, DISABLED], [DISABLED, FORCED_EXIT], [DISABLED, DISABLED]):
        thr = np.array(thr, np.float32)
        a = _run_path(path, {**feeds, THRESHOLDS: thr})
        b = _run_path(ready, {**feeds, THRESHOLDS: thr})  # the copy reads the original's weights file
        assert max(np.abs(x - y).max() for x, y in zip(a, b)) <= 1e-5
    ready.unlink()
    static = onnx.load(str(trt_onnx(path, capacity=32)), load_external_data=False)
    dims = [d.dim_value for d in static.graph.input[3].type.tensor_type.shape.dim]
    assert dims[2] == 32


def _run_path(path, feeds):
    import onnxruntime as ort

    from river.compiler.ort_session import session_options

    return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_twins_must_suit_tensorrt(tiny_onnx, tmp_path):
    with pytest.raises(RiverError, match="block of 64 or 128"):
        check_twins_for_trt("int4", 32)
    with pytest.raises(RiverError, match="MatMulNBits"):
        check_twins_for_trt("int8", 64, "ort")
    check_twins_for_trt("fp32", 32, "ort")  # nothing quantized: anything goes
    with pytest.raises(RiverError, match="block of 64 or 128"):
        compile_trt(tiny_onnx, RiverSpec.from_name("int4", GATES, block=32), tmp_path / "r")
    assert not (tmp_path / "r").exists()
    assert fuse_shared_input_int8_dq(onnx.ModelProto(), tmp_path) == 0


@pytest.mark.slow
def test_smollm2_fused_and_segmented_int8_build(smol_onnx, smol, tmp_path):
    gates = default_gates(smol.config.num_layers)
    spec = RiverSpec.from_name("int8", gates)
    report = compile_trt(smol_onnx, spec, tmp_path / "river", capacity=256, max_seq=64, max_past=256)
    fused = report.build("fused")
    assert fused.conditionals >= len(gates)
    segs = [b for b in report.builds if b.form != "fused"]
    assert len(segs) == 2 * (2 * len(gates) + 1) and all(b.conditionals == 0 for b in segs)
    print(f"\n[SmolLM2 int8, gates {list(gates)}] fused {report.seconds('fused'):.1f}s; segments "
          f"{report.seconds('segment'):.1f}s contract form + {report.seconds('segment.kv'):.1f}s shared-KV form")
