"""Pass: the ONNX Runtime lowering of a step graph (plain, River with ``If`` branches, draft).

Rewrites each attention block to ``GroupQueryAttention`` over the shared KV buffers
(``fused_attention.py``): past and present are one buffer of the cache's capacity, each row's valid
length comes from its mask, and attention reads that length only. Its fp32 projections become one
product over packed weights (``packed_qkv.py``), as do other products over one input (the gated MLP's
gate and up: ``packed_matmuls.py``), and each residual Add with the RMSNorm after it becomes
``SkipSimplifiedLayerNormalization`` (``skip_norm.py``). ONNX Runtime's own optimizer fuses the rest
(the first norm into ``SimplifiedLayerNormalization``, SiLU). An fp32 LM head gains the greedy form
greedy decoding switches on (``greedy_head.py``: an 8-bit head, its error bound, the exact logits of
the tokens that can still win); a head it does not take stays as it is, the reason logged. Weights that
lie on a 4-bit grid (a GGUF's Q4_1 tensors, dequantized) run as ``grid`` says (``GRID_FORMS``): fp32
``MatMul``; River's own exact ops over their 4-bit form (``q41_matmul.py``: the same fp32 weights, made
on the fly), which also take Q8_0 weights (``q80_matmul.py``: a GGUF's embedding table, so a tied LM head,
which then needs no greedy form); or ``MatMulNBits`` with an offset path (``grid_weights.py``: logits move
by up to 1e-5 of their largest value). Under River's ops a River graph's 8-bit twins of Q4_1 weights run
those weights' own 4-bit form with int8 activations instead (``q41_twins.py``): cheaper than the
backbone's layers, as a twin must be, and closer to them than the 8-bit copy.

Exactness: the fused attention is causal by position with each row's valid prefix from its mask. For
one new token a step that is every causal graph's semantics; for several, only graphs that mask by
position (``CAUSAL_PROP``) - the runtime runs other graphs' multi-token steps in the contract form, as
it does for their portable form.

All or nothing: when any attention block of the graph does not match (the rule says why), the graph
stays portable - the shared-KV form of ``shared_kv.py`` - and the reason is recorded in the result's
metadata (``LOWERING_PROP`` / ``LOWERING_REASON_PROP``) and logged. The portable form stays the one for
TensorRT and ``--check``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from river.compiler.graph_io import rewrite_step_graph, walk_nodes
from river.compiler.lowering import fused_attention, greedy_head, grid_weights, packed_matmuls, q41_matmul, q41_twins, q80_matmul
from river.compiler.lowering.packed_qkv import pack_qkv
from river.compiler.lowering.patterns import MS_DOMAIN
from river.compiler.lowering.skip_norm import fuse_skip_norm
from river.compiler.lowering.shared_kv import SHARED_KV_FORMAT, to_shared_kv
from river.compiler.ort_ops import DOMAIN as RIVER_OPS_DOMAIN
from river.compiler.river.builder import is_quantized_weight
from river.export.contract import past_layers, past_name, present_name

ORT_LOWERING_FORMAT = 12 + 100 * SHARED_KV_FORMAT  # bump when the output changes (cached graphs)
LOWERING_PROP = "river.lowering"  # "ort_fused" or "portable"
LOWERING_REASON_PROP = "river.lowering_reason"
# products whose weights lie on a 4-bit grid: rewritten (river, nbits) or counted (fp32)
GRID_WEIGHTS_PROP = "river.grid_weights"
# how products by weights on a 4-bit grid run, and the rule that rewrites (or counts) them in a graph
def _river_ops(g: gs.Graph) -> int:
    """River's ops for a (sub)graph's Q4_1 and Q8_0 products (exact; a twin's marked by ``q41_twins.mark``
    with int8 activations); returns the Q4_1 ones (the grid count)."""
    on_grid = q41_matmul.rewrite(g)
    q80_matmul.rewrite(g)
    return on_grid


def _river_int8_ops(g: gs.Graph) -> int:
    """As ``_river_ops``, every Q4_1 product with int8 activations (``Q41MatMulInt8``): ``--lowering
    ort-int8``, llama.cpp's arithmetic over the model's own 4-bit weights. Lossy; the head stays exact."""
    on_grid = q41_matmul.rewrite(g, int8=True)
    q80_matmul.rewrite(g)
    return on_grid


GRID_FORMS = {"fp32": grid_weights.count, "river": _river_ops, "river-int8": _river_int8_ops,
              "nbits": grid_weights.rewrite}


def cache_variant(max_positions: int | None, grid: str) -> str:
    """What, besides the source graph and ``ORT_LOWERING_FORMAT``, names a cached lowered graph."""
    return f"-p{max_positions}" + ("" if grid == "fp32" else f"-{grid}")

log = logging.getLogger("river.lowering")


class NotLowered(ValueError):
    """Why the fused lowering does not apply to a graph (the graph stays portable)."""


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def lowering_of(model: onnx.ModelProto) -> tuple[str, str]:
    """(lowering, reason) recorded in a graph this module produced; ("portable", "") for any other."""
    props = _props(model)
    return props.get(LOWERING_PROP, "portable"), props.get(LOWERING_REASON_PROP, "")


def grid_weights_of(model: onnx.ModelProto) -> int:
    """How many products of a graph this module fused have weights on a 4-bit grid (rewritten to the
    graph's grid form, or counted under fp32; 0 for any other graph)."""
    return int(_props(model).get(GRID_WEIGHTS_PROP, 0))


def lower_for_ort(model: onnx.ModelProto, max_positions: int | None, grid: str = "fp32") -> onnx.ModelProto:
    """The fused form of a step graph, or its portable shared-KV form with the reason it is not fused.
    ``max_positions``: positions the rotary tables cover (the runtime asks for twice the context);
    ``grid``: how weights on a 4-bit grid run (``GRID_FORMS``)."""
    try:
        result = to_ort_fused(model, max_positions, grid)
        lowering, reason = "ort_fused", ""
    except NotLowered as exc:
        result, lowering, reason = to_shared_kv(model), "portable", str(exc)
        log.warning("the ONNX Runtime lowering keeps this graph portable: %s", reason)
    result.metadata_props.add(key=LOWERING_PROP, value=lowering)
    if reason:
        result.metadata_props.add(key=LOWERING_REASON_PROP, value=reason)
    return result


def lower_segment_for_ort(segment: onnx.ModelProto, max_positions: int | None, grid: str = "fp32",
                          backbone_weights=None) -> onnx.ModelProto:
    """The fused form of a River segment (``compiler/river/segments.py``, its contract form), or, when it
    does not fuse, the segment itself marked portable with the reason: the runtime then runs the
    segments' shipped shared-KV forms. ``grid``: as ``lower_for_ort``'s; ``backbone_weights()``: the
    other segments' weights by name, which a segment of twins needs under River's ops (``q41_twins``)."""
    try:
        result, reason = to_ort_fused(segment, max_positions, grid, backbone_weights), ""
    except NotLowered as exc:
        result, reason = segment, str(exc)
    result.metadata_props.add(key=LOWERING_PROP, value="portable" if reason else "ort_fused")
    if reason:
        result.metadata_props.add(key=LOWERING_REASON_PROP, value=reason)
    return result


def to_ort_fused(model: onnx.ModelProto, max_positions: int | None, grid: str = "fp32",
                 backbone_weights=None) -> onnx.ModelProto:
    """The graph (a step graph or a River segment) with every attention block fused (raises
    NotLowered, saying why, when one is not). ``backbone_weights``: see ``lower_segment_for_ort``."""
    if grid not in GRID_FORMS:
        raise ValueError(f"unknown grid form {grid!r} (one of {', '.join(GRID_FORMS)})")
    if not max_positions or max_positions < 1:
        raise NotLowered("the model's context length is unknown (the rotary tables need it)")
    layers, on_grid = past_layers(model), []
    result = rewrite_step_graph(model, lambda m: _fuse_all(m, layers, max_positions, grid, on_grid, backbone_weights),
                                keep_local=is_quantized_weight)
    result.metadata_props.add(key=GRID_WEIGHTS_PROP, value=str(sum(on_grid)))
    for domain in (MS_DOMAIN, RIVER_OPS_DOMAIN):
        if not any(o.domain == domain for o in result.opset_import) and \
                any(n.domain == domain for n in walk_nodes(result.graph)):
            result.opset_import.add(domain=domain, version=1)
    if any(i.name == greedy_head.GREEDY_LOGITS for i in result.graph.input):  # off unless the runtime asks
        result.graph.initializer.append(numpy_helper.from_array(np.array(False), greedy_head.GREEDY_LOGITS))
    return result


def _fuse_all(model: onnx.ModelProto, layers: list[int], max_positions: int, grid: str,
              on_grid: list[int], backbone_weights=None) -> gs.Graph:
    """The fused graph; ``on_grid`` gets, per (sub)graph, its products on a 4-bit grid (rewritten to
    the ``grid`` form, or counted under fp32)."""
    graph = gs.import_onnx(model)
    if grid.startswith("river"):  # before packing: a twin's products then pack like the backbone's
        q41_twins.mark(graph, backbone_weights)
    blocks, reasons = [], []
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for node in g.nodes:
            if node.op == "Softmax":
                block, why = fused_attention.match(node)
                (blocks.append((g, block)) if block else reasons.append(f"'{node.name}': {why}"))
    if reasons:
        raise NotLowered(f"{len(reasons)} attention block(s) not matched, e.g. {reasons[0]}")
    if not blocks:
        raise NotLowered("no attention block (Softmax) found")
    tables = {(b.rotary.cos.name, b.rotary.sin.name) for _, b in blocks}
    if len(tables) != 1:
        raise NotLowered(f"the layers use {len(tables)} different rotary tables")
    first = blocks[0][1].rotary
    try:
        cos, sin = fused_attention.rotary_tables(graph, first.cos, first.sin, max_positions)
    except ValueError as exc:
        raise NotLowered(str(exc)) from None
    shared = _shared_inputs(graph, cos, sin)
    fused = [(g, fused_attention.fuse(g, block, shared)) for g, block in blocks]
    graph.cleanup()  # subgraphs too; graph inputs stay
    for g, node in fused:  # once the unfused attention is gone, the projections have no other reader
        pack_qkv(g, node)
    for g in [graph, *graph.subgraphs(recursive=True)]:
        ids = {id(n) for n in g.nodes}
        for node in [n for n in g.nodes if n.op == "Mul"]:
            fuse_skip_norm(g, node, ids)
        g.cleanup()
        for siblings in packed_matmuls.groups(g):  # what is left: the gated MLP's gate and up
            packed_matmuls.pack_siblings(g, siblings)
        _write_outputs_directly(g)  # which ends with a cleanup
        # after packing: a packed weight is on its parts' grids
        on_grid.append(GRID_FORMS[grid](g))
    _check_cache_use(graph)
    head, why = greedy_head.check(graph)
    if head is not None:
        greedy_head.lower(graph, head)
    else:
        log.debug("the LM head keeps its one form: %s", why)
    outputs = {t.name: t for t in graph.outputs}
    inputs = {t.name: t for t in graph.inputs}
    for layer in layers:
        for kind in ("key", "value"):
            outputs[present_name(layer, kind)].shape = list(inputs[past_name(layer, kind)].shape)
    return graph


def _shared_inputs(graph: gs.Graph, cos: np.ndarray, sin: np.ndarray) -> dict[str, gs.Tensor]:
    """seqlens_k (each row's valid length - 1, from its mask), the total length (the mask's, = the
    buffers' capacity) and the rotary tables: made once, read by every fused attention (branches too)."""
    mask = next(t for t in graph.inputs if t.name == "attention_mask")
    v = lambda name, dtype: gs.Variable(f"/ort_fused/{name}", dtype=dtype)  # noqa: E731
    c = lambda name, value: gs.Constant(f"/ort_fused/{name}", np.asarray(value))  # noqa: E731
    valid, last, seqlens, shape, total64, total = (v("valid", np.int64), v("last", np.int64), v("seqlens_k", np.int32),
                                                   v("mask_shape", np.int64), v("total64", np.int64), v("total", np.int32))
    graph.nodes += [
        gs.Node("ReduceSum", "/ort_fused/valid", {"keepdims": 0}, [mask, c("axes", np.array([1], np.int64))], [valid]),
        gs.Node("Sub", "/ort_fused/last", {}, [valid, c("one", np.array(1, np.int64))], [last]),
        gs.Node("Cast", "/ort_fused/seqlens_k", {"to": onnx.TensorProto.INT32}, [last], [seqlens]),
        gs.Node("Shape", "/ort_fused/mask_shape", {}, [mask], [shape]),
        gs.Node("Gather", "/ort_fused/total64", {"axis": 0}, [shape, c("axis1", np.array(1, np.int64))], [total64]),
        gs.Node("Cast", "/ort_fused/total", {"to": onnx.TensorProto.INT32}, [total64], [total]),
    ]
    return {"seqlens_k": seqlens, "total_sequence_length": total,
            "cos_cache": c("cos_cache", cos), "sin_cache": c("sin_cache", sin)}


def _write_outputs_directly(g: gs.Graph) -> None:
    """Drop ``Identity`` nodes that copy a node's output to a graph output (River ``If`` branches have
    them), so the node writes the output itself: ONNX Runtime hands an ``If`` node's bound output buffer
    down to the node that makes the branch output, and the fused attention writes in place only when
    its present buffer *is* its past one."""
    outputs = {id(t) for t in g.outputs}
    for node in list(g.nodes):
        if node.op != "Identity" or id(node.outputs[0]) not in outputs:
            continue
        source = node.inputs[0]
        if id(source) in outputs or len(source.outputs) != 1 or len(source.inputs) != 1:
            continue
        producer, target = source.inputs[0], node.outputs[0]
        outs = [target if t is source else t for t in producer.outputs]
        node.inputs, node.outputs = [], []
        producer.outputs = outs
    g.cleanup()


def _check_cache_use(graph: gs.Graph) -> None:
    """After fusing: only the fused attention reads a past buffer or writes a present one."""
    producers = {}
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for node in g.nodes:
            for t in node.inputs:
                if t.name.startswith("past_key_values.") and node.op != "GroupQueryAttention":
                    raise NotLowered(f"{t.name} is still read by {node.op} node '{node.name}'")
            for t in node.outputs:
                producers[t.name] = node
    for t in [*graph.outputs, *(o for g in graph.subgraphs(recursive=True) for o in g.outputs)]:
        node = producers.get(t.name)
        if t.name.startswith("present.") and node is not None and node.op not in ("GroupQueryAttention", "If"):
            raise NotLowered(f"{t.name} is made by {node.op} node '{node.name}', not by the fused attention")
