"""TensorRT parses and builds our graphs (DESIGN 7). Runs without a GPU through TensorRT-RTX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from river.compiler.tensorrt import package as trt_package

# Skip only when neither package is installed; CI installs tensorrt-rtx with the test extras.
pytest.importorskip("tensorrt" if trt_package.TRT_PACKAGE == "tensorrt" else "tensorrt_rtx", reason=trt_package.INSTALL_HINT)

from river.compiler.tensorrt.build import build_engine, default_profiles  # noqa: E402
from river.errors import RiverError  # noqa: E402


def _save(graph: onnx.GraphProto, path, opsets=(("", 17),)):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_tiny_export_builds(tiny_onnx, tmp_path):
    plan = tmp_path / "engines" / "tiny.plan"
    report = build_engine(tiny_onnx, plan, profiles=default_profiles(tiny_onnx, max_seq=32, max_past=128))
    assert report.layers > 0
    assert report.plan_bytes > 0 and plan.stat().st_size == report.plan_bytes
    assert report.plan_path == plan and report.plan is None
    assert sorted(p.name for p in plan.parent.iterdir()) == ["tiny.plan"]  # no temp file left behind
    assert report.trt_package == trt_package.TRT_PACKAGE


def test_default_profiles_are_consistent_steps(tiny_onnx):
    prof = default_profiles(tiny_onnx, max_batch=2, max_seq=8, max_past=64)
    for k in range(3):  # min, opt, max: each must be one valid step, total = past + seq
        seq = prof["input_ids"][k][1]
        past = prof["past_key_values.0.key"][k][2]
        assert prof["attention_mask"][k][1] == past + seq
        assert prof["position_ids"][k] == prof["input_ids"][k]
    assert prof["past_key_values.0.key"][2] == (2, 2, 64, 16)  # static Hkv and D kept
    assert prof["input_ids"] == ((1, 1), (2, 1), (2, 8))


def test_runtime_if_imports_as_conditional(tmp_path):
    # The condition depends on the input, so the parser cannot fold it: it must become an IIfConditional.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    branch_out = lambda name: [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 4])]  # noqa: E731
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t"])], "then", [], branch_out("t"))
    else_g = helper.make_graph([helper.make_node("Add", ["x", "two"], ["e"])], "else", [], branch_out("e"))
    nodes = [
        helper.make_node("ReduceMin", ["x"], ["lowest"], keepdims=0),  # 0-D float
        helper.make_node("Greater", ["lowest", "threshold"], ["cond"]),  # 0-D bool
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="exit_gate"),
    ]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "threshold"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    graph = helper.make_graph(nodes, "if_graph", [x], [y], initializer=inits)
    onnx.checker.check_model(helper.make_model(graph), full_check=True)
    path = _save(graph, tmp_path / "if.onnx")

    report = build_engine(path, profiles={"x": ((1, 4), (2, 4), (8, 4))})
    assert report.conditionals >= 1
    assert report.conditional_layers >= 3  # condition + conditional input(s) + output
    assert report.plan is not None and len(report.plan) == report.plan_bytes > 0


@pytest.mark.parametrize("op,domain", [("FastGelu", "com.microsoft"), ("Det", "")])
def test_rejected_node_is_named(tmp_path, op, domain):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 3])
    out_shape = [3, 3] if op == "FastGelu" else []
    o = helper.make_tensor_value_info("o", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph([helper.make_node(op, ["a"], ["o"], domain=domain, name="the_bad_node")], "bad", [a], [o])
    opsets = (("", 17),) + (((domain, 1),) if domain else ())
    path = _save(graph, tmp_path / "bad.onnx", opsets)
    plan = tmp_path / "bad.plan"
    with pytest.raises(RiverError, match=rf"node 'the_bad_node' \({op}\)"):
        build_engine(path, plan)
    assert not plan.exists()


@pytest.mark.skipif(trt_package.TRT_PACKAGE != "tensorrt-rtx", reason="TensorRT-RTX is strongly typed only")
def test_reduced_precision_flag_refused_when_strongly_typed(tiny_onnx):
    with pytest.raises(RiverError, match="strongly typed"):
        build_engine(tiny_onnx, precision="fp16")
