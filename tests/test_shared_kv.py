"""The shared-KV pass (Concat -> in-place TensorScatter) on real exported graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from river.compiler.lowering.shared_kv import WRITE_INDICES, check, to_shared_kv
from river.errors import NotADecoderGraph
from river.export import contract as C
from river.runtime.ort_backend import OrtBackend


def test_pass_applies_to_our_export(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    assert check(proto) == []
    shared = to_shared_kv(proto)
    onnx.checker.check_model(shared, full_check=True)
    ops = [n.op_type for n in shared.graph.node]
    assert ops.count("TensorScatter") == 2 * 4
    producers = {o: n for n in shared.graph.node for o in n.output}
    for layer in range(4):
        node = producers[C.present_name(layer, "key")]
        assert node.op_type == "TensorScatter"
        assert list(node.input) == [C.past_name(layer, "key"), node.input[1], WRITE_INDICES]
    assert shared.graph.input[-1].name == WRITE_INDICES
    # present has the buffer's (capacity) length, not past + S
    dims = [d.dim_param or d.dim_value for d in shared.graph.output[1].type.tensor_type.shape.dim]
    assert dims[2] == "past_sequence_length"


def test_pass_refuses_graph_without_kv_concat(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    producers = {o: n for n in proto.graph.node for o in n.output}
    concat = producers[C.present_name(2, "value")]
    concat.op_type = "Sum"  # same inputs, no longer a cache concatenation
    del concat.attribute[:]
    with pytest.raises(NotADecoderGraph, match="present.2.value is not a cache concatenation"):
        to_shared_kv(proto)


def test_pass_refuses_non_decoder():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(NotADecoderGraph, match="missing input_ids"):
        to_shared_kv(helper.make_model(g))


def test_shared_decode_equals_contract_graph(tiny, tiny_onnx):
    """Decode through the in-place graph vs. the contract graph fed with concatenated presents."""
    from tests_helpers import torch_step

    backend = OrtBackend(tiny_onnx, threads=1)
    cache = backend.new_cache(capacity=24)
    prompt = np.arange(70, 80, dtype=np.int64)[None]
    logits = backend.prefill(prompt, cache)
    cache.length = prompt.shape[1]
    ref_logits, ref_past = torch_step(tiny.model, prompt)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    for step in range(6):
        tok = np.array([[int(logits[0, -1].argmax())]])
        pos = cache.length
        logits = backend.decode(tok, cache).copy()
        cache.length += 1
        ref_logits, ref_past = torch_step(tiny.model, tok, ref_past, pos)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
        for layer in range(4):
            np.testing.assert_allclose(cache.keys[layer][:, :, :pos + 1], ref_past[2 * layer].numpy(), atol=1e-5)
            np.testing.assert_allclose(cache.values[layer][:, :, :pos + 1], ref_past[2 * layer + 1].numpy(), atol=1e-5)
