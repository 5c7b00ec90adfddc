"""Lowering for TensorRT: a River/segment ONNX file made ready for TensorRT's parser and builder.

- TensorRT's block-wise weight-only ``DequantizeLinear`` takes blocks of 64 or 128, and the ONNX
  Runtime twin format (com.microsoft MatMulNBits) does not import at all (``check_twins_for_trt``);
- inputs with a default (``exit_thresholds``) lose the default, INT8 twin projections that share an
  input are merged, and the shared-KV form gets a static cache length (``trt_onnx``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from river.compiler.graph_io import load_onnx_header, walk_graphs
from river.compiler.tensorrt.build import PAST, TOTAL
from river.errors import RiverError

TRT_BLOCKS = (64, 128)


def check_twins_for_trt(precision: str, block: int, twin_format: str = "dq") -> None:
    """TensorRT's block-wise weight-only DequantizeLinear takes blocks of 64 or 128; the ONNX Runtime
    twin format (com.microsoft MatMulNBits) does not import at all."""
    if precision != "fp32" and twin_format != "dq":
        raise RiverError(f"{precision} twins in the '{twin_format}' twin format (MatMulNBits) do not import into "
                         "TensorRT: compile the TensorRT forms with twin format 'dq' (DequantizeLinear twins)")
    if precision != "fp32" and block not in TRT_BLOCKS:
        raise RiverError(f"{precision} twins with block size {block}: TensorRT's block-wise DequantizeLinear "
                         f"needs a block of {' or '.join(map(str, TRT_BLOCKS))} (river-export --block)")


def fuse_shared_input_int8_dq(model: onnx.ModelProto, base_dir: str | Path) -> int:
    """Merge INT8 weight-only ``DequantizeLinear -> MatMul`` pairs that read the same activation
    (a twin's q/k/v projections, its gate/up projections) into one DQ + MatMul + Split.

    Why: TensorRT documents INT8 as activation+weight quantization and INT4 as the weight-only path;
    TensorRT-RTX 1.7's builder crashes (Myelin ``CHECK(is_value())``) when it fuses three or more
    INT8 block-wise weight-only GEMMs that share an input. One GEMM over the concatenated weights
    computes the same columns from the same dequantized values. Returns the number of merges.
    """
    base_dir = Path(base_dir)
    main_inits = {t.name: t for t in model.graph.initializer}
    merged = 0

    def array(name: str, graph) -> np.ndarray | None:
        t = next((x for x in graph.initializer if x.name == name), None)
        t = main_inits.get(name) if t is None else t
        if t is None:
            return None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            from onnx.external_data_helper import load_external_data_for_tensor

            t = onnx.TensorProto.FromString(t.SerializeToString())
            load_external_data_for_tensor(t, str(base_dir))
        return onnx.numpy_helper.to_array(t)

    def merge(graph) -> None:
        nonlocal merged
        nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]
        producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        readers: dict[str, int] = {}
        for n in nodes:
            for name in n.input:
                readers[name] = readers.get(name, 0) + 1
        groups: dict[tuple, list] = {}
        for i, mm in enumerate(nodes):
            if mm.op_type != "MatMul" or mm.input[1] not in producer or readers.get(mm.input[1]) != 1:
                continue
            j = producer[mm.input[1]]
            dq = nodes[j]
            if dq.op_type != "DequantizeLinear" or len(dq.input) != 2:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
            if attrs.get("axis", 1) != 0 or "block_size" not in attrs:
                continue
            q = array(dq.input[0], graph)
            if q is None or q.dtype != np.int8 or q.ndim != 2:
                continue
            groups.setdefault((mm.input[0], attrs["block_size"], q.shape[0]), []).append((i, j, q))
        replaced: dict[int, list] = {}
        dropped: set[int] = set()
        for (x, block, _), members in groups.items():
            if len(members) < 2:
                continue
            scales = [array(nodes[j].input[1], graph) for _, j, _ in members]
            tag = f"{nodes[members[0][0]].name}@fused{len(members)}"
            widths = [q.shape[1] for _, _, q in members]
            graph.initializer.extend([
                onnx.numpy_helper.from_array(np.concatenate([q for _, _, q in members], 1), f"{tag}/q"),
                onnx.numpy_helper.from_array(np.concatenate(scales, 1).astype(np.float32), f"{tag}/scale"),
                onnx.numpy_helper.from_array(np.array(widths, np.int64), f"{tag}/widths")])
            first = min(i for i, _, _ in members)  # the earliest MatMul: after x, before any reader of its outputs
            replaced[first] = [
                onnx.helper.make_node("DequantizeLinear", [f"{tag}/q", f"{tag}/scale"], [f"{tag}/w"],
                                      name=f"{tag}/DequantizeLinear", axis=0, block_size=block),
                onnx.helper.make_node("MatMul", [x, f"{tag}/w"], [f"{tag}/y"], name=f"{tag}/MatMul"),
                onnx.helper.make_node("Split", [f"{tag}/y", f"{tag}/widths"], [nodes[i].output[0] for i, _, _ in members],
                                      name=f"{tag}/Split", axis=-1)]
            dropped |= {k for i, j, _ in members for k in (i, j)}
            merged += 1
        if replaced:
            out = []
            for k, n in enumerate(nodes):
                out += replaced.get(k, [])
                if k not in dropped:
                    out.append(n)
            del graph.node[:]
            graph.node.extend(out)

    for graph in reversed(list(walk_graphs(model.graph))):  # branches first: a parent copies its nodes
        merge(graph)
    return merged


def trt_onnx(src: str | Path, capacity: int | None = None) -> Path:
    """A TensorRT-ready copy of ``src``'s graph, written next to it (it shares ``src``'s weights file).

    - inputs with a default (``exit_thresholds``) lose the default: TensorRT's parser turns an
      initializer-backed input into a constant, and thresholds must stay settable per step;
    - INT8 twin projections that share an input are merged (``fuse_shared_input_int8_dq``);
    - with ``capacity``, the cache axes (past = total = buffer length in the shared-KV form) become
      static, as TensorRT's KVCacheUpdate requires.
    The caller deletes the copy (a dot file) after the build.
    """
    src = Path(src)
    model = load_onnx_header(src)
    inputs = {i.name for i in model.graph.input}
    keep = [t for t in model.graph.initializer if t.name not in inputs]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if capacity is not None:
        for vi in list(model.graph.input) + list(model.graph.output):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in (PAST, TOTAL):
                    d.Clear()
                    d.dim_value = int(capacity)
        del model.graph.value_info[:]
    fuse_shared_input_int8_dq(model, src.parent)
    dst = src.with_name(f".{src.stem}.trt{'' if capacity is None else f'-c{capacity}'}.onnx")
    dst.write_bytes(model.SerializeToString())
    return dst
