"""What every River layout starts from: the step graph's structure, a builder that clones backbone
nodes into twins (quantizing their weight MatMuls) under fresh names, and the common finish
(export, hoisting, default thresholds, metadata, output types)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from river.compiler.graph_io import complete_types, hoist_initializers, lift_opset, stamp
from river.compiler.lowering.patterns import MS_DOMAIN
from river.compiler.quantize import BITS, NBITS_ACCURACY, quantize
from river.compiler.river.manifest import EXIT_LAYER, THRESHOLDS, RiverInfo
from river.compiler.river import twins
from river.compiler.river.spec import RiverSpec, check_spec, default_thresholds
from river.compiler.structure import DecoderStructure, discover
from river.errors import RiverError
from river.export.contract import INPUT_IDS, LOGITS, StepContract

RIVER_OPSET = 21  # block-wise DequantizeLinear (and INT4) need opset 21


QUANTIZED_MARK = "@q"  # the builder's quantized copy of weight W: W@q8p, W@q8s, W@q4, W@q4_scale...


def is_quantized_weight(name: str) -> bool:
    """Names of twin weights the builder writes (``<weight>@q8``, ``@q4``, ``@q8_scale``...)."""
    return QUANTIZED_MARK in name


def quantized_source(name: str) -> str | None:
    """The backbone weight a twin weight named ``name`` was quantized from (None: not a twin weight)."""
    return name.split(QUANTIZED_MARK)[0] if is_quantized_weight(name) else None


class TwinMatMuls:
    """Quantized twins of weight MatMuls at one precision/block/format; each weight is quantized
    once, however many twins (rivers) use it.

    ort format: MatMulNBits over ONNX Runtime-packed weights at accuracy level 4 (int8 activations
    per block, see ``river.compiler.quantize``). dq format: DequantizeLinear right before the
    MatMul (the pattern TensorRT imports as weight-only quantization).
    """

    min_opset = RIVER_OPSET

    def __init__(self, precision: str, block: int = 64, twin_format: str = "ort"):
        self.precision, self.block, self.twin_format = precision, block, twin_format
        self.quantized: dict[int, tuple] = {}  # id(weight constant) -> its quantized constants

    def quantizable(self, weight: gs.Constant) -> bool:
        return self.precision != "fp32" and weight.values.ndim == 2 and weight.values.shape[0] % self.block == 0

    def __call__(self, node: gs.Node, a: gs.Tensor, weight: gs.Constant, tag: str, out: gs.Variable) -> list[gs.Node]:
        """Nodes computing ``out = a @ weight`` with the quantized weight."""
        bits, block, fmt = BITS[self.precision], self.block, self.twin_format
        key = id(weight)
        if key not in self.quantized:
            qw = quantize(weight.values, bits, block, fmt)
            if fmt == "ort":
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
        if fmt == "ort":
            return [gs.Node("MatMulNBits", f"{node.name}@{tag}", {"K": k, "N": n, "bits": bits, "block_size": block,
                                                                 "accuracy_level": NBITS_ACCURACY},
                            [a, c0, c1], [out], domain=MS_DOMAIN)]
        w = gs.Variable(f"{weight.name}@twin@{tag}", dtype=np.float32, shape=[k, n])
        return [gs.Node("DequantizeLinear", f"{weight.name}/DequantizeLinear@{tag}", {"axis": 0, "block_size": block}, [c0, c1], [w]),
                gs.Node("MatMul", f"{node.name}@{tag}", {}, [a, w], [out])]


class Builder:
    """Per-rewrite state: the structure, the twin quantizer (shared by every river) and fresh names."""

    def __init__(self, structure: DecoderStructure, spec: RiverSpec):
        self.s, self.spec = structure, spec
        self.matmuls = TwinMatMuls(spec.precision, spec.block, spec.twin_format)
        self.head_matmuls = (self.matmuls if spec.head == spec.precision
                             else TwinMatMuls(spec.head, spec.block, spec.twin_format))
        self.outputs = {t.name: t for t in structure.graph.outputs}
        ids = next(t for t in structure.graph.inputs if t.name == INPUT_IDS)
        self.batch = gs.Variable("/river/batch", dtype=np.int64, shape=[1])
        self.batch_node = gs.Node("Shape", "/river/batch/Shape", {"start": 0, "end": 1}, [ids], [self.batch])
        self.thresholds = gs.Variable(THRESHOLDS, dtype=np.float32, shape=[len(spec.gates)])

    def clone(self, nodes: list[gs.Node], mapping: dict[int, gs.Tensor], tag: str, twin: bool = True,
              matmuls: TwinMatMuls | None = None, exact: set[int] = frozenset()) -> list[gs.Node]:
        """Copies of ``nodes`` whose inputs go through ``mapping`` (id -> replacement) and whose
        outputs are fresh tensors named ``<name>@<tag>`` (added to ``mapping``). With ``twin``,
        MatMul weights become quantized by ``matmuls`` (default: the twins' precision), except in the
        nodes whose ids are in ``exact``."""
        matmuls = matmuls or self.matmuls
        clones = []
        for n in nodes:
            inputs = [mapping.get(id(t), t) for t in n.inputs]
            outputs = []
            for o in n.outputs:
                new = gs.Variable(f"{o.name}@{tag}", dtype=o.dtype, shape=o.shape)
                mapping[id(o)] = new
                outputs.append(new)
            w = inputs[1] if n.op == "MatMul" and len(inputs) == 2 else None
            if twin and id(n) not in exact and isinstance(w, gs.Constant) and matmuls.quantizable(w):
                clones += matmuls(n, inputs[0], w, tag, outputs[0])
            else:
                clones.append(gs.Node(n.op, f"{n.name}@{tag}", dict(n.attrs), inputs, outputs))
        return clones

    def head(self, stream: gs.Tensor, tag: str, river: bool = True) -> tuple[list[gs.Node], gs.Tensor]:
        """The final norm and LM head on ``stream``; returns (nodes, logits). A river's head has the
        spec's head precision; the backbone's (``river=False``) is the model's own."""
        mapping = {id(self.s.final_hidden): stream}
        nodes = self.clone(list(self.s.head), mapping, tag, twin=river, matmuls=self.head_matmuls)
        return nodes, mapping[id(self.outputs[LOGITS])]

    def head_quant_error(self) -> str | None:
        """Why the rivers' head cannot have the spec's precision (None when it can): the LM head must
        be a MatMul by a constant weight whose input width the block divides."""
        if self.spec.head == "fp32":
            return None
        weights = [n.inputs[1] for n in self.s.head if n.op == "MatMul" and len(n.inputs) == 2]
        if any(isinstance(w, gs.Constant) and self.head_matmuls.quantizable(w) for w in weights):
            return None
        return (f"cannot quantize the rivers' head to {self.spec.head}: this graph's LM head is not a MatMul by a "
                f"constant weight of input width divisible by {self.spec.block}; use --river-head fp32")

    def exit_layer(self, value, tag: str) -> tuple[gs.Node, gs.Variable]:
        """``exit_layer`` [B] from a scalar (an int, or an int64 tensor)."""
        value = value if isinstance(value, gs.Tensor) else gs.Constant(f"exit_value@{tag}", np.asarray(np.int64(value)))
        out = gs.Variable(f"{EXIT_LAYER}@{tag}", dtype=np.int64, shape=["batch_size"])
        return gs.Node("Expand", f"/river/exit_layer@{tag}", {}, [value, self.batch], [out]), out

    def branch(self, nodes: list[gs.Node], outs: list[gs.Tensor], tag: str) -> gs.Graph:
        """An ``If`` branch: subgraph outputs get names of their own (ONNX names are global)."""
        final = []
        for t in outs:
            name = f"{t.name.split('@')[0]}@out_{tag}"
            out = gs.Variable(name, dtype=t.dtype, shape=t.shape)
            nodes.append(gs.Node("Identity", f"/river/{name}/Identity", {}, [t], [out]))
            final.append(out)
        return gs.Graph(nodes=nodes, outputs=final, name=tag)

    def finish(self, source: onnx.ModelProto, nodes: list[gs.Node], outputs: list[tuple[str, gs.Tensor]],
               layout: str) -> onnx.ModelProto:
        """The River graph: prologue + ``nodes``, the contract's inputs plus ``exit_thresholds`` (its
        defaults as a same-named initializer), ``outputs`` under their final names, River metadata."""
        graph = self.s.graph
        for old in graph.outputs:  # the backbone's original output tensors now live inside branches
            old.name = f"{old.name}@backbone"
        for name, t in outputs:
            t.name = name
            t.dtype = t.dtype or (np.int64 if name == EXIT_LAYER else np.float32)
        graph.nodes = list(self.s.prologue) + [self.batch_node] + nodes
        graph.inputs.append(self.thresholds)
        graph.outputs = [t for _, t in outputs]
        graph.cleanup().toposort()
        result = hoist_initializers(gs.export_onnx(graph, do_type_check=False), keep_local=is_quantized_weight)
        result.graph.initializer.append(onnx.numpy_helper.from_array(default_thresholds(self.spec), THRESHOLDS))
        stamp(result, source, RiverInfo.of(self.spec, layout).to_props())
        complete_types(result, contract_types(source))
        return result


def contract_types(source: onnx.ModelProto):
    """type_of(name) for ``complete_types``: a tensor named ``<contract name>@...`` takes the contract's type."""
    known = {v.name: v.type for v in list(source.graph.input) + list(source.graph.output)}
    known[EXIT_LAYER] = onnx.helper.make_tensor_type_proto(onnx.TensorProto.INT64, ["batch_size"])
    return lambda name: known.get(name.split("@")[0])


@dataclass
class Prepared:
    builder: Builder
    model: onnx.ModelProto  # the step graph at the River opset (what metadata and types come from)


def prepare(model: onnx.ModelProto, spec: RiverSpec) -> Prepared:
    """The shared start of every River layout: check the spec, lift the opset, find the structure."""
    contract = StepContract.from_model(model)
    check_spec(spec, contract.num_layers)
    model = lift_opset(model, RIVER_OPSET)
    structure = discover(gs.import_onnx(model), contract)
    twins.check_blocks(spec.kind, structure.blocks[spec.gates[0] + 1:])
    builder = Builder(structure, spec)
    reason = builder.head_quant_error()
    if reason:
        raise RiverError(reason)
    return Prepared(builder, model)
