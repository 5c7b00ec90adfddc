"""The draft graph (compiler/draft_graph.py): the river's exit path as a straight-line step graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from river.compiler.draft_graph import check, draft_graph, draft_metadata
from river.compiler.quantize import dequantize_nbits
from river.compiler.graph_io import load_onnx, save_onnx_atomic
from river.runtime.ort_backend import OrtBackend


@pytest.fixture(scope="module")
def tiny_model_proto(tiny_onnx):
    return load_onnx(tiny_onnx)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_check_explains_refusals(tiny_model_proto):
    assert check(tiny_model_proto, -1) is None and check(tiny_model_proto, 2) is None
    assert "out of range" in check(tiny_model_proto, 3)  # 4 layers: the last layer cannot be the exit
    assert "out of range" in check(tiny_model_proto, -2)
    with pytest.raises(ValueError, match="out of range"):
        draft_graph(tiny_model_proto, 7)


@pytest.mark.parametrize("exit_after, head", [(-1, True), (1, True), (2, False)])
def test_twins_replace_exactly_the_weight_gemms_after_the_exit(tiny_model_proto, exit_after, head):
    draft = draft_graph(tiny_model_proto, exit_after, head=head)
    layers_twinned = 4 - 1 - exit_after
    assert _ops(draft).count("MatMulNBits") == 7 * layers_twinned + int(head)
    meta = draft_metadata(draft)
    assert meta["exit_after"] == exit_after and meta["bits"] == 8 and meta["twins"] == 7 * layers_twinned + int(head)
    onnx.checker.check_model(draft)
    # every twin holds its backbone weight to within half a quantization step
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in tiny_model_proto.graph.initializer}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in draft.graph.initializer}
    for node in draft.graph.node:
        if node.op_type == "MatMulNBits":
            packed, scales, zps = (inits[n] for n in node.input[1:4])
            source = weights[node.input[1].rsplit("@", 1)[0]]
            w = dequantize_nbits(packed, scales, zps, 8, source.shape[0])
            block = next(a.i for a in node.attribute if a.name == "block_size")
            assert block == (64 if source.shape[0] % 64 == 0 else 32)  # DRAFT_BLOCK where it divides K
            step = np.repeat(scales.reshape(source.shape[1], -1).T, block, axis=0)
            assert np.all(np.abs(w - source) <= 0.51 * step + 1e-7), node.name


def test_layers_up_to_the_exit_are_the_backbone(tiny, tiny_onnx, tiny_model_proto, tmp_path):
    """K/V of layers <= exit are the full model's, bit for bit; the rest are close (8-bit twins)."""
    path = save_onnx_atomic(draft_graph(tiny_model_proto, 1), tmp_path / "draft.onnx")
    full, draft = OrtBackend(tiny_onnx, threads=1), OrtBackend(path, threads=1)
    ids = np.asarray([[72, 101, 108, 108, 111, 32, 116]])
    caches = []
    for backend in (full, draft):
        cache, logits = backend.new_cache(16), []
        for i in range(ids.shape[1]):  # one token a step, as a draft runs
            logits.append(backend.extend(ids[:, i:i + 1], cache)[0, -1].copy())
            cache.length += 1
        caches.append((cache, np.stack(logits)))
    (fc, fl), (dc, dl) = caches
    for layer in range(4):
        k_full, k_draft = fc.keys[layer][:, :, :7], dc.keys[layer][:, :, :7]
        if layer <= 1:
            np.testing.assert_array_equal(k_draft, k_full)
            np.testing.assert_array_equal(dc.values[layer][:, :, :7], fc.values[layer][:, :, :7])
        else:
            assert 0 < np.abs(k_draft - k_full).max() < 0.05 * np.abs(k_full).max()
    assert (dl.argmax(-1) == fl.argmax(-1)).mean() >= 6 / 7
    cos = (dl * fl).sum(-1) / np.linalg.norm(dl, axis=-1) / np.linalg.norm(fl, axis=-1)
    assert cos.min() > 0.99


def test_refuses_a_river_graph(tiny_onnx, tmp_path):
    from river.compiler.compile import compile_river

    river = compile_river(tiny_onnx, tmp_path / "r", gates="1", log=None, draft_exit=None)
    assert not (tmp_path / "r" / "draft.onnx").exists()
    with pytest.raises(ValueError, match="already a River graph"):
        draft_graph(load_onnx(river), -1)
