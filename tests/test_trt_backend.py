"""TensorRT backend (runtime/trt_backend.py): what can be checked without a GPU.

The binding plans (which buffer backs each engine tensor, with which shape) are pure functions of the
engines' I/O names, taken here from the segment graphs (an engine keeps its ONNX I/O names). Running
engines needs a CUDA GPU: that test is skipped here with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from river.compiler.river.segments import SegmentIndex, write_segments
from river.compiler.river.spec import RiverSpec
from river.errors import CacheOverflow, RiverError
from river.export.contract import StepContract
from river.runtime.parity import trt_can_run
from river.runtime.trt_backend import (
    DeviceKVCache,
    TrtBackend,
    check_in_place,
    decode_bindings,
    fused_bindings,
    prefill_bindings,
)

CONTRACT = StepContract(num_layers=4, num_kv_heads=2, head_dim=16, vocab_size=259, kv_dtype=1)


@pytest.fixture(scope="module")
def segments(tiny_onnx, tmp_path_factory) -> SegmentIndex:
    out = tmp_path_factory.mktemp("trt-backend") / "segments"
    write_segments(tiny_onnx, RiverSpec.from_name("int8", (0, 2), twin_format="dq"), out)
    return SegmentIndex.load(out)


def test_decode_plan_is_in_place_and_chains_the_stream(segments):
    plans = {}
    for seg in segments.segments:
        outputs = seg.outputs
        plans[seg.name] = decode_bindings(seg.shared_kv_inputs, outputs, CONTRACT, batch=2, capacity=64,
                                          width=64, vocab=259, gates=2)
        assert check_in_place(plans[seg.name]) == []
    b1 = {b.name: b for b in plans["backbone1"]}
    assert b1["past_key_values.1.key"].buffer == b1["present.1.key"].buffer == "cache.key.1"
    assert b1["past_key_values.1.key"].shape == (2, 2, 64, 16)
    assert b1["attention_mask"].shape == (2, 64) and b1["write_indices"].shape == (2,)
    assert b1["gate1.exit"].shape == () and b1["gate1.similarity"].shape == (2,)
    # the residual stream a backbone segment writes is the buffer its river and the next backbone read
    b0 = {b.name: b for b in plans["backbone0"]}
    r0 = {b.name: b for b in plans["river0"]}
    assert b0["hidden.0"].buffer == r0["hidden.0"].buffer == b1["hidden.0"].buffer and not b0["hidden.0"].is_input
    assert r0["logits"].buffer == {b.name: b for b in plans["backbone2"]}["logits"].buffer == "logits"
    # each layer's cache is written by exactly one segment on any route
    for route in ([["backbone0", "river0"]], [["backbone0", "backbone1", "river1"]], [["backbone0", "backbone1", "backbone2"]]):
        written = [b.buffer for name in route[0] for b in plans[name] if b.buffer.startswith("cache.") and not b.is_input]
        assert sorted(written) == sorted(f"cache.{k}.{l}" for l in range(4) for k in ("key", "value"))


def test_prefill_plan_uses_scratch_presents(segments):
    seg = segments.backbone(1)
    plan = {b.name: b for b in prefill_bindings(seg.inputs, seg.outputs, CONTRACT, batch=1, seq=7, width=64, vocab=259, gates=2)}
    assert plan["past_key_values.1.key"].buffer == "empty" and plan["past_key_values.1.key"].shape == (1, 2, 0, 16)
    assert plan["present.2.value"].buffer == "scratch.value.2" and plan["present.2.value"].shape == (1, 2, 7, 16)
    assert plan["hidden.0"].shape == (1, 7, 64) and plan["attention_mask"].shape == (1, 7)
    assert check_in_place(list(plan.values()))  # prefill is not in place: presents are scratch


def test_fused_plan_ping_pongs():
    names_in = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{l}.{k}" for l in range(4) for k in ("key", "value")] + ["exit_thresholds"]
    names_out = ["logits"] + [f"present.{l}.{k}" for l in range(4) for k in ("key", "value")] + ["exit_layer"]
    even = {b.name: b for b in fused_bindings(names_in, names_out, CONTRACT, batch=1, seq=1, past=9, vocab=259, gates=2, parity=0)}
    odd = {b.name: b for b in fused_bindings(names_in, names_out, CONTRACT, batch=1, seq=1, past=10, vocab=259, gates=2, parity=1)}
    assert even["past_key_values.0.key"].buffer == "pp0.key.0" and even["present.0.key"].buffer == "pp1.key.0"
    assert even["present.0.key"].shape == odd["past_key_values.0.key"].shape == (1, 2, 10, 16)
    assert odd["present.0.key"].buffer == "pp0.key.0" and even["attention_mask"].shape == (1, 10)
    first = {b.name: b for b in fused_bindings(names_in, names_out, CONTRACT, batch=1, seq=5, past=0, vocab=259, gates=2, parity=0)}
    assert first["past_key_values.3.value"].buffer == "empty" and first["present.3.value"].shape == (1, 2, 5, 16)
    with pytest.raises(RiverError, match="no place"):
        fused_bindings(names_in + ["mystery"], names_out, CONTRACT, batch=1, seq=1, past=1, vocab=259, gates=2, parity=0)


@pytest.mark.parametrize("layout", ["static", "pingpong"])
def test_device_cache_bookkeeping_on_cpu(layout):
    cache = DeviceKVCache(CONTRACT, batch=1, capacity=8, layout=layout, device="cpu")
    k = torch.randn(1, 2, 5, 16)
    cache.write(2, k, k + 1, at=0)
    cache.length = 5
    assert torch.equal(cache.kv(2, "key"), k) and torch.equal(cache.kv(2, "value"), k + 1)
    cache.require_room(3)
    with pytest.raises(CacheOverflow):
        cache.require_room(4)
    if layout == "static":
        cache.write(2, k[:, :, :1], k[:, :, :1], at=5)
        cache.truncate(3)
        assert cache.length == 3
    else:
        with pytest.raises(RiverError, match="position 0"):
            cache.write(2, k[:, :, :1], k[:, :, :1], at=5)


def test_backend_without_gpu_says_why(tmp_path):
    if trt_can_run() is None:
        pytest.skip("a GPU with TensorRT is here: the no-GPU message does not apply")
    with pytest.raises(RiverError, match="CUDA GPU|TensorRT is not available"):
        TrtBackend(tmp_path, "segmented")
    with pytest.raises(RiverError, match="unknown TensorRT backend mode"):
        TrtBackend(tmp_path, "lazy")


@pytest.mark.skipif(trt_can_run() is not None, reason=f"TensorRT engines cannot run here: {trt_can_run()}")
def test_trt_backend_matches_onnx_runtime_on_gpu(tiny_onnx, tmp_path):  # pragma: no cover - needs a GPU
    from river.compiler.compile import compile_river
    from river.compiler.tensorrt.engines import compile_trt
    from river.runtime.parity import check_parity

    river = compile_river(tiny_onnx, tmp_path / "river", gates=[0, 2], river="int8", log=None).parent
    compile_trt(tiny_onnx, RiverSpec.from_name("int8", (0, 2)), river, capacity=64, max_seq=16, max_past=64)
    report = check_parity(river, atol=1e-3, rtol=1e-3)  # TensorRT's kernels sum in another order than ORT's
    assert report.passed, report.lines()
    assert {"polygraphy-trt-fused", "river-trt-fused", "river-trt-segmented"} <= set(report.runners)
    assert np.isfinite(report.max_abs())
