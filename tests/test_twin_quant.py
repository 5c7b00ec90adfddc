"""Twin quantization checked from outside the compiler: the twin weights are read back from the River
graph's ONNX initializers and dequantized with plain numpy written from the operator specs (not with
``compiler/quantize.py``), then compared with the backbone weight they stand for, and the River
graph's own twin nodes, run alone in ONNX Runtime, are compared with ``x @ W_dequantized``.

Specs: com.microsoft MatMulNBits (B [N, K/block, block*bits/8] uint8, low nibble first at 4 bits;
scales [N * K/block]; no zero point input: 2^(bits-1); accuracy level 4: each activation row quantized
to int8 per block of K, symmetric, scale = max |x| / 127); ONNX DequantizeLinear with ``block_size``
on axis 0 (y[k, n] = q[k, n] * scale[k // block, n]; INT4 two a byte, low nibble first, signed).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from river.compiler.compile import compile_river
from river.compiler.ort_session import make_session

TWIN_OPS = {"MatMulNBits", "DequantizeLinear", "MatMulInteger"}  # MatMulInteger: the dynamic int8 twins of before


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node, the exit branches' (If subgraphs) included."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                out += all_nodes(sub)
    return out


def all_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor by name: initializers of the graph and its subgraphs, Constant nodes' values."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            out[node.output[0]] = node.attribute[0].t
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                out.update(all_constants(sub))
    return out


def raw_bytes(t: onnx.TensorProto) -> np.ndarray:
    """The stored bytes of a packed (INT4) initializer: raw_data, or one byte per int32_data entry."""
    return np.frombuffer(t.raw_data, np.uint8) if t.raw_data else np.asarray(t.int32_data, np.uint8)


def nibbles(data: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values, two a byte, low nibble first."""
    return np.stack([data & 0x0F, data >> 4], axis=-1).reshape(-1).astype(np.int64)


def dequantize(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray, str]:
    """(W_deq [K, N] float64, the quantization step of every element [K, N], the weight's initializer name)."""
    arr = lambda i: numpy_helper.to_array(inits[node.input[i]])  # noqa: E731
    if node.op_type == "MatMulNBits":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        assert len(node.input) == 3, "a zero point input: the default 2^(bits-1) would not apply"
        packed = raw_bytes(inits[node.input[1]]).reshape(n, k // block, block * bits // 8)
        values = packed.astype(np.int64).reshape(n, -1) if bits == 8 else nibbles(packed).reshape(n, -1)
        step = np.repeat(arr(2).astype(np.float64).reshape(n, k // block), block, axis=1)  # [N, K]
        return ((values - 2 ** (bits - 1)) * step).T, step.T, node.input[1]
    if node.op_type == "DequantizeLinear":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["axis"] == 0 and len(node.input) == 2  # zero point 0
        t = inits[node.input[0]]
        scale = arr(1).astype(np.float64)
        k, n = scale.shape[0] * attrs["block_size"], scale.shape[1]
        if t.data_type == onnx.TensorProto.INT4:
            u = nibbles(raw_bytes(t))[: k * n]
            q = np.where(u >= 8, u - 16, u).reshape(k, n)
        else:
            assert t.data_type == onnx.TensorProto.INT8
            q = numpy_helper.to_array(t).astype(np.int64)
        step = np.repeat(scale, attrs["block_size"], axis=0)
        return q * step, step, node.input[0]
    raise AssertionError(f"unexpected twin operator {node.op_type}")


def twin_subgraph(node: onnx.NodeProto, graph_nodes: list[onnx.NodeProto], inits) -> tuple[onnx.ModelProto, str]:
    """The River graph's own nodes computing one twin MatMul, alone: (model with input "x", its x name)."""
    consumers = lambda name: [n for n in graph_nodes if name in n.input]  # noqa: E731
    if node.op_type == "MatMulNBits":
        nodes, x = [node], node.input[0]
    else:
        nodes = [node] + consumers(node.output[0])
        x = nodes[1].input[0]
    assert nodes[-1].op_type in ("MatMul", "MatMulNBits") and len(nodes[-1].output) == 1
    used = sorted({i for n in nodes for i in n.input if i in inits})
    constants = []
    for name in used:  # Constant nodes' tensors carry no name of their own
        constants.append(onnx.TensorProto())
        constants[-1].CopyFrom(inits[name])
        constants[-1].name = name
    g = helper.make_graph(nodes, "twin", [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [1, None])],
                          [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
                          constants)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets, ir_version=10), x


def block_int8(x: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """The activation as MatMulNBits at accuracy level 4 sees it: each row int8 per block of K
    (symmetric, scale max |x| / 127 in float32, round half to even), back to float."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["accuracy_level"] == 4, "ort twins run ONNX Runtime's int8 path (accuracy level 4)"
    blocks = x.reshape(x.shape[0], -1, attrs["block_size"])
    scale = (np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)).astype(np.float32)
    return (np.rint(blocks / scale) * scale.astype(np.float64)).reshape(x.shape)


@pytest.mark.parametrize("twin_format, precision", [("ort", "int8"), ("ort", "int4"), ("dq", "int8"), ("dq", "int4")])
def test_twin_weights_dequantize_to_the_backbone(tiny_onnx, tmp_path, twin_format, precision):
    river = compile_river(tiny_onnx, tmp_path / "r", gates="0,2", river=precision, twin_format=twin_format, log=None)
    proto = onnx.load(str(river))
    inits, graph = all_constants(proto.graph), all_nodes(proto.graph)
    twins = [n for n in graph if n.op_type in TWIN_OPS and any(i in inits for i in n.input)]
    expected_op = "MatMulNBits" if twin_format == "ort" else "DequantizeLinear"
    assert twins and {n.op_type for n in twins} == {expected_op}
    seen, rng = set(), np.random.default_rng(0)
    levels = 2 ** (int(precision[3:]) - 1) - 1
    for node in twins:
        w_deq, step, name = dequantize(node, inits)
        backbone = numpy_helper.to_array(inits[name.split("@q")[0]]).astype(np.float64)
        assert w_deq.shape == backbone.shape, name
        # within half a quantization step, except where ORT's quantizer clips: it maps a block's
        # largest magnitude to -8 / -128 (its scales carry the sign), so an opposite-sign value beyond
        # 7.5 / 127.5 steps is stored as +7 / +127 (error up to one step); no step is larger than the weight's largest
        # magnitude over the largest positive level
        step, err = np.abs(step), np.abs(w_deq - backbone)
        over = err > step / 2 * (1 + 1e-5) + 1e-12
        clipped = np.isclose(np.abs(w_deq), levels * step, rtol=1e-5) & (err <= step * (1 + 1e-5))
        assert np.all(clipped[over]) and over.mean() < (0.01 if twin_format == "ort" else 1e-9), name
        assert np.all(step > 0) and step.max() <= np.abs(backbone).max() / levels * (1 + 1e-5), name
        if name in seen:
            continue
        seen.add(name)
        model, x_name = twin_subgraph(node, graph, inits)
        session = make_session(model, threads=1)
        x = rng.normal(0, 1, (1, backbone.shape[0])).astype(np.float32)
        got = session.run(None, {x_name: x})[0].astype(np.float64).reshape(1, -1)
        xin = block_int8(x, node) if node.op_type == "MatMulNBits" else x.astype(np.float64)
        want = xin @ w_deq
        tol = 1e-4 * np.abs(x).sum() * np.abs(w_deq).max()  # float32 accumulation
        assert np.abs(got - want).max() <= tol, (name, np.abs(got - want).max(), tol)
        # and the twin is a quantization of this backbone weight, not of another one
        assert np.abs(got - x @ backbone).max() < np.abs(got - x @ np.roll(backbone, 1, axis=1)).max()
    assert len(seen) >= 4
