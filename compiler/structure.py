"""Find the structure of a decode-step graph: embedding, decoder blocks on the residual stream, KV
inputs/outputs of each block, the final norm and the head.

It works from the graph's topology, so it serves our TorchScript export, Hugging Face Optimum exports
and ``torch.onnx.export(dynamo=True)`` exports alike (whose node names are flat):

1. the embedding is a Gather of an initializer indexed by ``input_ids``;
2. the residual stream starts at the embedding (after a scaling by a constant, as Gemma and Granite
   multiply it) and is the chain of Add nodes that each take the previous stream value directly. A
   sequential block (pre-norm, sandwich norms, post-norm, scaled residuals) has two links (attention,
   MLP); a parallel block (Phi-2, GPT-NeoX, Falcon, GPT-J: attention and MLP read the same input and
   add into the residual once) has one, so the chain must have 2L or L links;
3. block l spans stream values r_l -> r_{l+1}; its attention Add must depend on ``past_key_values.l``;
4. every node is assigned to the latest stream value it depends on: nothing (prologue: masks, RoPE
   tables), block l, or the final stream value (final norm + head).
Node-name scopes (``/model/layers.N/``) or ``pkg.torch.onnx.name_scopes`` metadata, when present, are
only used to cross-check and to name things in messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from river.errors import NotADecoderGraph
from river.export.contract import (
    INPUT_IDS,
    LOGITS,
    StepContract,
    past_name,
    present_name,
)


@dataclass
class Block:
    index: int
    input: gs.Variable  # residual stream entering the block
    mid: gs.Variable | None  # after the attention residual Add (None: a parallel block has no such point)
    output: gs.Variable  # after the MLP residual Add
    nodes: list[gs.Node] = field(default_factory=list)  # topological order

    def kv_nodes(self, graph_outputs: dict[str, gs.Variable]) -> list[gs.Node]:
        """The block's nodes that its present K/V depend on (norm, K/V projections, RoPE, concat)."""
        targets = [graph_outputs[present_name(self.index, k)] for k in ("key", "value")]
        ancestors = _ancestor_nodes(targets)
        return [n for n in self.nodes if id(n) in ancestors]

    @property
    def parallel(self) -> bool:
        return self.mid is None

    def mlp_nodes(self) -> list[gs.Node]:
        """Nodes that compute the MLP branch (between ``mid`` and ``output``; sequential blocks only)."""
        attn = _ancestor_nodes([self.mid])
        return [n for n in self.nodes if id(n) not in attn]


@dataclass
class DecoderStructure:
    graph: gs.Graph
    contract: StepContract
    embedding: gs.Node
    blocks: list[Block]
    final_hidden: gs.Variable  # residual stream after the last block (input of the final norm)
    prologue: list[gs.Node]  # nodes that depend on no stream value (masks, RoPE tables, shapes)
    head: list[gs.Node]  # final norm + LM head
    how: str  # "topology", plus what cross-checked it

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def check_wiring(model: onnx.ModelProto, source: str = "model") -> None:
    """Every top-level node reads only values defined before it, and standard ops match their schema
    (arity, attributes): a damaged graph gets a one-line error here, not a crash deep in a pass."""
    graph = model.graph
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    defined = {""} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        where = f"{source}: node '{node.name}' ({node.op_type})"
        undefined = [x for x in node.input if x not in defined]
        if undefined:
            raise NotADecoderGraph(f"{where} reads {undefined[0]!r}, which nothing defines before it")
        if node.domain in ("", "ai.onnx") and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                       for a in node.attribute):
            try:
                onnx.checker.check_node(node, ctx)
            except (onnx.checker.ValidationError, onnx.defs.SchemaError) as exc:
                raise NotADecoderGraph(f"{where} is invalid: {str(exc).strip().splitlines()[0]}") from None
        defined.update(node.output)
    missing = [o.name for o in graph.output if o.name not in defined]
    if missing:
        raise NotADecoderGraph(f"{source}: output {missing[0]!r} is computed by no node")
    _check_shapes(model, source)


def _check_shapes(model: onnx.ModelProto, source: str) -> None:
    """Strict ONNX shape inference over the graph with its large weights as typed inputs (no data
    copied or serialized): shapes and types that do not agree are reported before any pass runs."""
    g = model.graph
    small = [t for t in g.initializer if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= 4096]
    kept = {t.name for t in small}
    weights = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer
               if t.name not in kept]
    light = onnx.helper.make_model(onnx.helper.make_graph(g.node, g.name, list(g.input) + weights, g.output, small),
                                   opset_imports=model.opset_import, ir_version=model.ir_version)
    for t in g.initializer:
        if t.raw_data and len(t.raw_data) != int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize:
            raise NotADecoderGraph(f"{source}: initializer '{t.name}' holds {len(t.raw_data)} bytes, not shape {list(t.dims)}")
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise NotADecoderGraph(f"{source}: shapes or types do not agree: {str(exc).strip().splitlines()[0]}") from None


def _ancestor_nodes(values) -> set[int]:
    """ids of every node upstream of ``values`` (gs nodes are not hashable)."""
    seen: set[int] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        for producer in v.inputs:
            if id(producer) not in seen:
                seen.add(id(producer))
                stack.extend(producer.inputs)
    return seen


def _find_embedding(graph: gs.Graph) -> gs.Node:
    ids = next(t for t in graph.inputs if t.name == INPUT_IDS)
    frontier, seen = [ids], set()
    while frontier:  # input_ids may pass through Cast/Reshape before the Gather
        t = frontier.pop()
        for node in t.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) and node.inputs[1] is t:
                if len(node.inputs[0].shape) == 2:
                    return node
            if node.op in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity"):
                frontier.extend(node.outputs[:1])
    raise NotADecoderGraph("no embedding found: no Gather of an initializer indexed by input_ids")


def _aliases(h: gs.Tensor) -> list[gs.Tensor]:
    """``h`` and the outputs of value-preserving nodes applied to it (Optimum's RMSNorm starts with
    a Cast to float32, and the residual is taken after it)."""
    out, stack = [], [h]
    while stack:
        t = stack.pop()
        out.append(t)
        stack += [n.outputs[0] for n in t.outputs if n.op in ("Cast", "Identity") and len(n.outputs) == 1]
    return out


def _constant_expr(t: gs.Tensor, memo: dict[int, bool]) -> bool:
    """Whether ``t`` is computed from constants alone (no graph input upstream)."""
    if isinstance(t, gs.Constant):
        return True
    if id(t) not in memo:
        memo[id(t)] = False  # guards cycles; a producer-less variable is a graph input
        memo[id(t)] = bool(t.inputs) and all(_constant_expr(i, memo) for n in t.inputs for i in n.inputs)
    return memo[id(t)]


def _stream_start(embedded: gs.Variable) -> gs.Variable:
    """The first residual stream value: the embedding, or the embedding times a constant (Gemma's
    sqrt(hidden) normalizer, Granite's embedding multiplier) when that product is all that reads it."""
    memo: dict[int, bool] = {}
    h = embedded
    while True:
        readers = [n for a in _aliases(h) for n in a.outputs if n.op != "Shape"]
        if len(readers) != 1 or readers[0].op != "Mul":
            return h
        other = [i for i in readers[0].inputs if i is not h and not any(i is a for a in _aliases(h))]
        if len(other) != 1 or not _constant_expr(other[0], memo):
            return h
        h = readers[0].outputs[0]


def _residual_chain(start: gs.Variable) -> list[gs.Node]:
    chain, h = [], start
    while True:
        aliases = _aliases(h)
        adds = []
        for a in aliases:
            adds += [n for n in a.outputs if n.op == "Add" and any(i is a for i in n.inputs) and not any(n is x for x in adds)]
        if not adds:
            return chain
        if len(adds) > 1:
            names = ", ".join(n.name for n in adds)
            raise NotADecoderGraph(f"ambiguous residual stream at '{h.name}': several Adds consume it ({names})")
        chain.append(adds[0])
        h = adds[0].outputs[0]


def discover(graph: gs.Graph, contract: StepContract | None = None, model=None) -> DecoderStructure:
    """The decoder structure of ``graph`` (an onnx-graphsurgeon graph of a contract step graph)."""
    if contract is None:
        contract = StepContract.from_model(model if model is not None else gs.export_onnx(graph, do_type_check=False))
    L = contract.num_layers
    embedding = _find_embedding(graph)
    r0 = _stream_start(embedding.outputs[0])
    chain = _residual_chain(r0)
    stream = [r0] + [a.outputs[0] for a in chain]
    if len(chain) == 2 * L:  # sequential blocks: r0, mid0, r1, mid1, r2, ...
        blocks = [Block(l, stream[2 * l], stream[2 * l + 1], stream[2 * l + 2]) for l in range(L)]
    elif len(chain) == L:  # parallel blocks: r0, r1, ...
        blocks = [Block(l, stream[l], None, stream[l + 1]) for l in range(L)]
    else:
        raise NotADecoderGraph(
            f"no residual chain of {2 * L} Adds (sequential blocks) or {L} (parallel blocks) found between "
            f"embedding and head (found {len(chain)}): expected one residual Add per attention and MLP, or one "
            "per layer where both add into the residual together"
        )
    outputs = {t.name: t for t in graph.outputs}

    # label every stream value with its block, then every node with the latest label it depends on
    label: dict[int, int] = {}  # id(tensor) -> latest stream label it depends on
    for l, b in enumerate(blocks):
        label[id(b.input)] = l
        if b.mid is not None:
            label[id(b.mid)] = l
    label[id(blocks[-1].output)] = L
    try:
        graph.toposort()
    except gs.util.exception.OnnxGraphSurgeonException:
        raise NotADecoderGraph("the graph has a cycle (a node depends on its own output): it is not a valid ONNX "
                               "graph; re-export the model") from None
    prologue, head = [], []
    for node in graph.nodes:
        dep = max((label.get(id(t), -1) for t in node.inputs), default=-1)
        for out in node.outputs:
            label.setdefault(id(out), dep)
        if dep < 0:
            prologue.append(node)
        elif dep < L:
            blocks[dep].nodes.append(node)
        else:
            head.append(node)
    # each block's attention must read its own layer's cache, and its present must come from the block
    for b in blocks:
        for kind in ("key", "value"):
            present = outputs[present_name(b.index, kind)]
            producers = present.inputs
            if not producers or not any(producers[0] is n for n in b.nodes):
                raise NotADecoderGraph(f"{present.name} is not computed inside decoder block {b.index} "
                                       f"(between '{b.input.name}' and '{b.output.name}')")
        past = next(t for t in graph.inputs if t.name == past_name(b.index, "key"))
        if not any(n is m for n in past.outputs for m in b.nodes):
            raise NotADecoderGraph(f"decoder block {b.index} does not read {past.name}")
    logits = outputs[LOGITS]
    if not logits.inputs or not any(logits.inputs[0] is n for n in head):
        raise NotADecoderGraph("no head found: logits do not depend on the last residual stream value")
    how = "topology"
    scoped = [n for n in blocks[0].nodes if "layers.0/" in (n.name or "")]
    if scoped:
        how += " (node-name scopes agree)" if all(f"layers.{b.index}/" in (b.output.inputs[0].name or "") for b in blocks) else ""
    return DecoderStructure(graph, contract, embedding, blocks, blocks[-1].output, prologue, head, how)


def discover_model(model) -> DecoderStructure:
    """Convenience: structure of an ``onnx.ModelProto``."""
    contract = StepContract.from_model(model)
    return discover(gs.import_onnx(model), contract)
