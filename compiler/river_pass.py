"""Pass: rewrite a decode-step graph into a River graph (DESIGN section 4).

After each gate layer g the pass inserts a *similarity gate* (per row, s = cos(h_in_g, h_out_g) on
the last position; the batch exits when every row has s >= its threshold) and an ONNX ``If``:

- then-branch, the *exit river*: twins of layers g+1..L-1 built from the backbone's own weights,
  each writing ``present.{l}`` (the KV share), then the final norm and head;
- else-branch: the backbone continues to the next gate (nested ``If``) or to the head.

Inputs: the step graph's plus ``exit_thresholds`` [G] (a graph input with a same-named initializer as
its default). Outputs: the step graph's plus ``exit_layer`` [B] int64 (backbone layers run; L when the
token never exited). Twins reference the outer graph's weights (fp32 twins duplicate nothing;
quantized twins add one quantized copy per layer, shared by every gate's river).

River kinds (``RiverSpec``):
- ``full``: the whole layer (attention over the shared cache + MLP), at ``precision`` fp32/int8/int4;
- ``attn``: attention only (K/V written, MLP skipped);
- ``kv``: only each skipped layer's K/V projection of the exit state (CALM-style propagation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter
from onnx_graphsurgeon.ir.tensor import LazyValues
from river.compiler.graph_io import hoist_initializers
from river.compiler.quantize import BITS, FLAVOURS, quantize, quantize_channels_int8
from river.compiler.structure import Block, DecoderStructure, discover
from river.errors import RiverError
from river.export.contract import INPUT_IDS, LOGITS, StepContract, present_name

THRESHOLDS = "exit_thresholds"
EXIT_LAYER = "exit_layer"
RIVER_OPSET = 21  # block-wise DequantizeLinear (and INT4) need opset 21
DISABLED = 2.0  # cosine similarity never reaches 2: a gate with this threshold never fires
KINDS = ("full", "attn", "kv")
PRECISIONS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class RiverSpec:
    gates: tuple[int, ...]  # backbone layer indices after which a token may exit
    kind: str = "full"
    precision: str = "int8"
    block: int = 64  # quantization block along the input dimension
    thresholds: tuple[float, ...] | None = None  # default thresholds (None: every gate disabled)
    flavour: str = "ort"  # quantized twins: "ort" (MatMulNBits) or "dq" (DequantizeLinear, for TensorRT)

    @classmethod
    def from_name(cls, river: str, gates, **kw) -> "RiverSpec":
        """The CLI's ``--river`` names: int8, int4, fp32 (full twins), attn, kv."""
        table = {"int8": ("full", "int8"), "int4": ("full", "int4"), "fp32": ("full", "fp32"),
                 "attn": ("attn", "fp32"), "kv": ("kv", "fp32")}
        if river not in table:
            raise RiverError(f"unknown river kind '{river}': choose from {', '.join(table)}")
        kind, precision = table[river]
        return cls(tuple(gates), kind, kw.pop("precision", None) or precision, **kw)


def check_spec(spec: RiverSpec, num_layers: int) -> None:
    """Why a spec cannot apply to a model with ``num_layers`` layers (raises RiverError)."""
    if spec.kind not in KINDS:
        raise RiverError(f"unknown river kind '{spec.kind}' (choose from {', '.join(KINDS)})")
    if spec.flavour not in FLAVOURS:
        raise RiverError(f"unknown twin flavour '{spec.flavour}' (choose from {', '.join(FLAVOURS)})")
    if spec.precision not in PRECISIONS:
        raise RiverError(f"unknown twin precision '{spec.precision}' (choose from {', '.join(PRECISIONS)})")
    if not spec.gates:
        raise RiverError("no gates: give at least one gate layer")
    if list(spec.gates) != sorted(set(spec.gates)):
        raise RiverError(f"gate layers must be strictly increasing: {list(spec.gates)}")
    bad = [g for g in spec.gates if not 0 <= g < num_layers - 1]
    if bad:
        raise RiverError(f"gate layers {bad} out of range: a gate sits after layer 0..{num_layers - 2} "
                         f"(the model has {num_layers} layers; a gate after the last layer exits nothing)")
    if spec.thresholds is not None and len(spec.thresholds) != len(spec.gates):
        raise RiverError(f"{len(spec.thresholds)} thresholds for {len(spec.gates)} gates")


def default_gates(num_layers: int) -> tuple[int, ...]:
    """The middle band where exits pay off: gates after layers L/2 .. 3L/4, every L/10 layers or so."""
    lo, hi = num_layers // 2 - 1, (3 * num_layers) // 4 - 1
    step = max(1, num_layers // 10)
    return tuple(range(max(lo, 0), max(hi, lo) + 1, step))


class _Builder:
    """Holds the per-rewrite state: quantized weights (shared across rivers) and fresh names."""

    def __init__(self, structure: DecoderStructure, spec: RiverSpec):
        self.s, self.spec = structure, spec
        self.quantized: dict[int, tuple] = {}  # id(weight constant) -> (q, scale, block), shared by rivers
        self.outputs = {t.name: t for t in structure.graph.outputs}
        self.batch = None
        self.similarities: dict[int, gs.Variable] = {}  # gate index -> per-row similarity [B] (segments output it)

    # -- helpers -----------------------------------------------------------------------------
    def const(self, name, value) -> gs.Constant:
        return gs.Constant(name, np.asarray(value))

    def quantizable(self, weight: gs.Constant) -> bool:
        return (self.spec.precision != "fp32" and weight.values.ndim == 2
                and weight.values.shape[0] % self.spec.block == 0)

    def twin_matmul(self, node: gs.Node, a: gs.Tensor, weight: gs.Constant, tag: str, out: gs.Variable) -> list[gs.Node]:
        """The twin of a weight MatMul, inside the branch that uses it.

        ort flavour: one MatMulNBits over ONNX Runtime-packed weights. dq flavour: DequantizeLinear
        right before the MatMul (the pattern TensorRT imports as weight-only quantization).
        Quantized initializers stay local to the branch (ORT prepacks/fuses only local weights).
        """
        key = id(weight)
        bits, block = BITS[self.spec.precision], self.spec.block
        if self.spec.flavour == "ort" and bits == 8:
            return self._dynamic_int8(node, a, weight, tag, out)
        if key not in self.quantized:
            qw = quantize(weight.values, bits, block, self.spec.flavour)
            if self.spec.flavour == "ort":
                consts = (gs.Constant(f"{weight.name}@q{bits}p", qw.packed),
                          gs.Constant(f"{weight.name}@q{bits}s", qw.scales.reshape(-1)))
            elif bits == 4:  # gs cannot pack INT4 itself: hand it a packed TensorProto
                proto = onnx.helper.make_tensor(f"{weight.name}@q4", onnx.TensorProto.INT4, qw.q.shape, qw.q.flatten().tolist())
                consts = (gs.Constant(proto.name, LazyValues(proto)), gs.Constant(f"{weight.name}@q4_scale", qw.scale))
            else:
                consts = (gs.Constant(f"{weight.name}@q8", qw.q), gs.Constant(f"{weight.name}@q8_scale", qw.scale))
            self.quantized[key] = consts
        c0, c1 = self.quantized[key]
        k, n = weight.values.shape
        if self.spec.flavour == "ort":
            return [gs.Node("MatMulNBits", f"{node.name}@{tag}", {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 1},
                            [a, c0, c1], [out], domain="com.microsoft")]
        w = gs.Variable(f"{weight.name}@twin@{tag}", dtype=np.float32, shape=[k, n])
        return [gs.Node("DequantizeLinear", f"{weight.name}/DequantizeLinear@{tag}", {"axis": 0, "block_size": block}, [c0, c1], [w]),
                gs.Node("MatMul", f"{node.name}@{tag}", {}, [a, w], [out])]

    def clone(self, nodes: list[gs.Node], mapping: dict[int, gs.Tensor], tag: str, twin: bool = True) -> list[gs.Node]:
        """Copies of ``nodes`` whose inputs go through ``mapping`` (id -> replacement) and whose
        outputs are fresh tensors named ``<name>@<tag>`` (added to ``mapping``). With ``twin``,
        MatMul weights become the twin's (quantized) weights; the head keeps backbone precision."""
        clones = []
        for n in nodes:
            inputs = [mapping.get(id(t), t) for t in n.inputs]
            outputs = []
            for o in n.outputs:
                new = gs.Variable(f"{o.name}@{tag}", dtype=o.dtype, shape=o.shape)
                mapping[id(o)] = new
                outputs.append(new)
            w = inputs[1] if n.op == "MatMul" and len(inputs) == 2 else None
            if twin and isinstance(w, gs.Constant) and self.quantizable(w):
                clones += self.twin_matmul(n, inputs[0], w, tag, outputs[0])
            else:
                clones.append(gs.Node(n.op, f"{n.name}@{tag}", dict(n.attrs), inputs, outputs))
        return clones

    def exit_layer(self, value: int, tag: str) -> tuple[gs.Node, gs.Variable]:
        out = gs.Variable(f"{EXIT_LAYER}@{tag}", dtype=np.int64, shape=["batch_size"])
        node = gs.Node("Expand", f"/river/exit_layer@{tag}", {}, [self.const(f"exit_value@{tag}", np.int64(value)), self.batch], [out])
        return node, out

    def identity(self, t: gs.Tensor, name: str) -> tuple[gs.Node, gs.Variable]:
        out = gs.Variable(name, dtype=t.dtype, shape=t.shape)
        return gs.Node("Identity", f"/river/{name}/Identity", {}, [t], [out]), out

    def _dynamic_int8(self, node, a, weight, tag, out) -> list[gs.Node]:
        """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul: ORT fuses it to DynamicQuantizeMatMul."""
        key = id(weight)
        if key not in self.quantized:
            qw = quantize_channels_int8(weight.values)
            # stored as uint8 with zero point 128: ORT's u8s8 x86 kernel saturates int16 pair sums
            # (255*127*2 > 32767) and gave wrong products; u8u8 is exact
            self.quantized[key] = (gs.Constant(f"{weight.name}@q8c", (qw.q.astype(np.int16) + 128).astype(np.uint8)),
                                   gs.Constant(f"{weight.name}@q8c_scale", qw.scale),
                                   gs.Constant(f"{weight.name}@q8c_zp", np.full(qw.q.shape[1], 128, np.uint8)))
        wq, wscale, wzp = self.quantized[key]
        v = lambda name, dtype=np.float32: gs.Variable(f"{node.name}@{tag}/{name}", dtype=dtype)  # noqa: E731
        aq, ascale, azp, acc, accf, scale = v("a_q", np.uint8), v("a_scale"), v("a_zp", np.uint8), v("acc", np.int32), v("acc_f"), v("scale")
        n = f"{node.name}@{tag}"
        return [
            gs.Node("DynamicQuantizeLinear", f"{n}/DynamicQuantizeLinear", {}, [a], [aq, ascale, azp]),
            gs.Node("MatMulInteger", f"{n}/MatMulInteger", {}, [aq, wq, azp, wzp], [acc]),
            gs.Node("Cast", f"{n}/Cast", {"to": onnx.TensorProto.FLOAT}, [acc], [accf]),
            gs.Node("Mul", f"{n}/scale", {}, [ascale, wscale], [scale]),
            gs.Node("Mul", f"{n}/Mul", {}, [accf, scale], [out]),
        ]

    # -- the gate -----------------------------------------------------------------------------
    def gate(self, gi: int, block: Block, thresholds: gs.Variable) -> tuple[list[gs.Node], gs.Variable]:
        """Per-row cosine similarity of the block's input and output (last position) vs. threshold."""
        t = f"gate{gi}"
        v = lambda name, dtype=np.float32, shape=None: gs.Variable(f"/river/{t}/{name}", dtype=dtype, shape=shape)  # noqa: E731
        last = self.const(f"/river/{t}/last", np.int64(-1))
        axes = self.const(f"/river/{t}/axes", np.array([-1], np.int64))
        a, b = v("h_in"), v("h_out")
        ab, aa, bb = v("ab"), v("aa"), v("bb")
        dot, na2, nb2, norm2, norm, sim = v("dot"), v("na2"), v("nb2"), v("norm2"), v("norm"), v("similarity")
        thr, fire, firef, allf, cond = v("threshold"), v("fire", np.bool_), v("fire_f"), v("all"), v("exit", np.bool_, [])
        nodes = [
            gs.Node("Gather", f"/river/{t}/in_last", {"axis": 1}, [block.input, last], [a]),
            gs.Node("Gather", f"/river/{t}/out_last", {"axis": 1}, [block.output, last], [b]),
            gs.Node("Mul", f"/river/{t}/mul_ab", {}, [a, b], [ab]),
            gs.Node("Mul", f"/river/{t}/mul_aa", {}, [a, a], [aa]),
            gs.Node("Mul", f"/river/{t}/mul_bb", {}, [b, b], [bb]),
            gs.Node("ReduceSum", f"/river/{t}/dot", {"keepdims": 0}, [ab, axes], [dot]),
            gs.Node("ReduceSum", f"/river/{t}/na2", {"keepdims": 0}, [aa, axes], [na2]),
            gs.Node("ReduceSum", f"/river/{t}/nb2", {"keepdims": 0}, [bb, axes], [nb2]),
            gs.Node("Mul", f"/river/{t}/norm2", {}, [na2, nb2], [norm2]),
            gs.Node("Sqrt", f"/river/{t}/norm", {}, [norm2], [norm]),
            gs.Node("Max", f"/river/{t}/norm_eps", {}, [norm, self.const(f"/river/{t}/eps", np.float32(1e-12))], [v("norm_eps")]),
        ]
        nodes.append(gs.Node("Div", f"/river/{t}/cos", {}, [dot, nodes[-1].outputs[0]], [sim]))
        self.similarities[gi] = sim
        nodes += [
            gs.Node("Gather", f"/river/{t}/threshold", {"axis": 0}, [thresholds, self.const(f"/river/{t}/index", np.int64(gi))], [thr]),
            gs.Node("GreaterOrEqual", f"/river/{t}/fire", {}, [sim, thr], [fire]),
            gs.Node("Cast", f"/river/{t}/fire_f", {"to": onnx.TensorProto.FLOAT}, [fire], [firef]),
            gs.Node("ReduceMin", f"/river/{t}/all_rows", {"keepdims": 0}, [firef], [allf]),
            gs.Node("Cast", f"/river/{t}/exit", {"to": onnx.TensorProto.BOOL}, [allf], [cond]),
        ]
        return nodes, cond

    # -- the river -------------------------------------------------------------------------
    def river(self, gi: int, g: int) -> tuple[list[gs.Node], list[gs.Tensor]]:
        """Twins of layers g+1..L-1 from the exit state, then final norm and head."""
        tag = f"river{gi}"
        blocks, L = self.s.blocks, self.s.num_layers
        h_exit = blocks[g].output
        mapping: dict[int, gs.Tensor] = {}
        nodes: list[gs.Node] = []
        stream = h_exit
        for l in range(g + 1, L):
            b = blocks[l]
            if self.spec.kind == "kv":
                mapping[id(b.input)] = h_exit
                nodes += self.clone(b.kv_nodes(self.outputs), mapping, tag)
                continue
            mapping[id(b.input)] = stream
            if self.spec.kind == "attn":
                mlp = {id(n) for n in b.mlp_nodes()}
                nodes += self.clone([n for n in b.nodes if id(n) not in mlp], mapping, tag)
                stream = mapping[id(b.mid)]
                mapping[id(b.output)] = stream
            else:
                nodes += self.clone(b.nodes, mapping, tag)
                stream = mapping[id(b.output)]
        mapping[id(self.s.final_hidden)] = stream
        nodes += self.clone(self.s.head, mapping, tag, twin=False)
        outs = [mapping[id(self.outputs[LOGITS])]]
        outs += [mapping[id(self.outputs[present_name(l, k)])] for l in range(g + 1, L) for k in ("key", "value")]
        node, exit_out = self.exit_layer(g + 1, tag)
        nodes.append(node)
        return nodes, outs + [exit_out]

    # -- the nested backbone -----------------------------------------------------------------
    def tail(self, gi: int, start: int, thresholds) -> tuple[list[gs.Node], list[gs.Tensor]]:
        """Nodes from layer ``start`` on; outputs: logits, presents of layers >= start, exit_layer."""
        blocks, L, gates = self.s.blocks, self.s.num_layers, self.spec.gates
        if gi == len(gates):
            nodes = [n for b in blocks[start:] for n in b.nodes] + list(self.s.head)
            node, exit_out = self.exit_layer(L, "backbone")
            outs = [self.outputs[LOGITS]]
            outs += [self.outputs[present_name(l, k)] for l in range(start, L) for k in ("key", "value")]
            return nodes + [node], outs + [exit_out]
        g = gates[gi]
        nodes = [n for b in blocks[start:g + 1] for n in b.nodes]
        gate_nodes, cond = self.gate(gi, blocks[g], thresholds)
        nodes += gate_nodes
        then_nodes, then_outs = self.river(gi, g)
        else_nodes, else_outs = self.tail(gi + 1, g + 1, thresholds)
        # subgraph outputs get their own names (ONNX names are global); the If outputs carry the
        # names the enclosing scope expects
        then_graph = self._branch(then_nodes, then_outs, f"river{gi}")
        else_graph = self._branch(else_nodes, else_outs, f"backbone{gi}")
        names = [LOGITS] + [present_name(l, k) for l in range(g + 1, L) for k in ("key", "value")] + [EXIT_LAYER]
        if_outs = [gs.Variable(f"{n}@if{gi}", dtype=t.dtype, shape=None) for n, t in zip(names, then_outs)]
        nodes.append(gs.Node("If", f"/river/gate{gi}/If", {"then_branch": then_graph, "else_branch": else_graph},
                             [cond], if_outs))
        outs = [if_outs[0]]
        outs += [self.outputs[present_name(l, k)] for l in range(start, g + 1) for k in ("key", "value")]
        outs += if_outs[1:-1] + [if_outs[-1]]
        return nodes, outs

    def _branch(self, nodes, outs, tag) -> gs.Graph:
        final = []
        for t in outs:
            node, out = self.identity(t, f"{t.name.split('@')[0]}@out_{tag}")
            nodes.append(node)
            final.append(out)
        return gs.Graph(nodes=nodes, outputs=final, name=tag)


def is_quantized_weight(name: str) -> bool:
    """Names of twin weights written by this pass (``<weight>@q8``, ``@q4``, ``@q8_scale``...)."""
    return "@q" in name


def default_thresholds(spec: RiverSpec) -> np.ndarray:
    return np.array(spec.thresholds if spec.thresholds is not None else [DISABLED] * len(spec.gates), np.float32)


def prepare(model: onnx.ModelProto, spec: RiverSpec):
    """The shared start of every River layout (nested, chained, segmented): check the spec, lift the
    opset, find the structure; returns (builder, thresholds input, batch Shape node, converted model)."""
    contract = StepContract.from_model(model)
    check_spec(spec, contract.num_layers)
    if _default_opset(model) < RIVER_OPSET:
        model = version_converter.convert_version(model, RIVER_OPSET)
    graph = gs.import_onnx(model)
    structure = discover(graph, contract)
    b = _Builder(structure, spec)
    thresholds = gs.Variable(THRESHOLDS, dtype=np.float32, shape=[len(spec.gates)])
    ids = next(t for t in graph.inputs if t.name == INPUT_IDS)
    b.batch = gs.Variable("/river/batch", dtype=np.int64, shape=[1])
    batch_node = gs.Node("Shape", "/river/batch/Shape", {"start": 0, "end": 1}, [ids], [b.batch])
    return b, thresholds, batch_node, model


def river_graph(model: onnx.ModelProto, spec: RiverSpec) -> onnx.ModelProto:
    """The River graph of a contract step graph (see module docstring)."""
    b, thresholds, batch_node, model = prepare(model, spec)
    graph, structure, contract = b.s.graph, b.s, b.s.contract
    defaults = default_thresholds(spec)

    tail_nodes, outs = b.tail(0, 0, thresholds)
    # final names: logits, present.*, exit_layer (the outermost If's outputs or the backbone's own)
    L = contract.num_layers
    final_names = [LOGITS] + [present_name(l, k) for l in range(L) for k in ("key", "value")] + [EXIT_LAYER]
    for old in graph.outputs:  # the backbone's original output tensors now live inside branches
        old.name = f"{old.name}@backbone"
    for t, name in zip(outs, final_names):
        t.name = name
    graph.nodes = list(structure.prologue) + [batch_node] + tail_nodes
    graph.inputs.append(thresholds)
    graph.outputs = outs
    for t in graph.outputs:
        if t.dtype is None:
            t.dtype = np.int64 if t.name == EXIT_LAYER else np.float32
    graph.cleanup().toposort()
    result = hoist_initializers(gs.export_onnx(graph, do_type_check=False), keep_local=is_quantized_weight)
    # the thresholds input gets its defaults as a same-named initializer
    result.graph.initializer.append(onnx.numpy_helper.from_array(defaults, THRESHOLDS))
    _copy_metadata(model, result, spec)
    _complete_types(result, model)
    return result


def _complete_types(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """gs leaves shapes unset on new tensors; ONNX wants every graph output typed with a shape.

    Outputs (main graph and branches) take the type of the source output they stand for; value_info
    entries without a shape are dropped (shape inference recomputes them).
    """
    known = {o.name: o.type for o in source.graph.output}
    exit_type = onnx.helper.make_tensor_type_proto(onnx.TensorProto.INT64, ["batch_size"])

    def fix(graph: onnx.GraphProto) -> None:
        keep = [vi for vi in graph.value_info if vi.type.tensor_type.HasField("shape")]
        del graph.value_info[:]
        graph.value_info.extend(keep)
        for out in graph.output:
            if out.type.tensor_type.HasField("shape"):
                continue
            base = out.name.split("@")[0]
            out.type.CopyFrom(exit_type if base == EXIT_LAYER else known[base])
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    fix(attr.g)

    fix(model.graph)


def _copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, spec: RiverSpec) -> None:
    """The River graph describes itself (gates, kind, precision) so any client can drive it."""
    dst.ir_version = max(dst.ir_version, src.ir_version)
    dst.producer_name = "river-llm"
    props = {p.key: p.value for p in src.metadata_props}
    props |= {"river.gates": ",".join(map(str, spec.gates)), "river.kind": spec.kind,
             "river.precision": spec.precision, "river.block": str(spec.block), "river.flavour": spec.flavour}
    if any(n.domain == "com.microsoft" for n in _walk_nodes(dst.graph)):
        dst.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.helper.set_model_props(dst, props)


def river_metadata(model: onnx.ModelProto) -> dict | None:
    """Gates/kind/precision of a River graph, None for a plain step graph."""
    props = {p.key: p.value for p in model.metadata_props}
    if "river.gates" not in props:
        return None
    return {"gates": [int(g) for g in props["river.gates"].split(",")], "kind": props["river.kind"],
            "precision": props["river.precision"], "block": int(props.get("river.block", 64)),
            "flavour": props.get("river.flavour", "dq")}


def _walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
