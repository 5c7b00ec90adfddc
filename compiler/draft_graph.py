"""Pass: the draft graph for verify mode - the river's exit path as a straight-line step graph
(a use of the whole-graph quantization pass, ``weight_quant``).

Layers up to ``exit_after`` are the backbone's own nodes; every weight MatMul after it (and, with
``head``, the LM head) becomes a twin: ONNX Runtime's ``MatMulNBits`` over block-wise weights with
accuracy level 4 (activations quantized to int8 per block of the input dimension, integer dot
products). Every layer still reads and writes its K/V, so the draft runs over the same shared KV
buffers as the backbone. ``exit_after = -1`` makes every layer a twin (the all-twin draft).

Why a graph of its own rather than the River graph with the exit forced: no ``If`` and no gate
subgraphs on the draft's path, every weight is the graph's own (ONNX Runtime prepacks only those),
and the draft's head can be quantized without touching what the lossy River graph computes. The
backbone verifies every drafted token, so the draft may be as approximate as it likes: only speed
depends on its quality, never the output.

Why 8-bit MatMulNBits at accuracy level 4: on x86 CPUs it is ONNX Runtime's fast integer path
(1.7x an fp32 GEMV for a 576x1536 weight, 3.2x for the 576x49152 head) with per-block activation
scales, which lose far less than the dynamic per-tensor int8 of ``DynamicQuantizeLinear``. Weights
are quantized asymmetrically (uint8 zero points), so a weight block that came from a 4-bit grid
with an offset (llama.cpp Q4_1) sits on the 8-bit grid up to a shift below 1/34 of its step.
"""

from __future__ import annotations

import json

import onnx
import onnx_graphsurgeon as gs

from river.compiler.lowering.patterns import MS_DOMAIN
from river.compiler.quantize import NBITS_ACCURACY, ort_block_quant
from river.compiler.river.manifest import set_props
from river.compiler.weight_quant import quantize_weights
from river.export.contract import StepContract

DRAFT_FORMAT = 2  # the version of this pass's output: bump it when the output changes (cached graphs)
# Blocks of 64 inputs where the input dimension allows (else 32, 16): SmolLM2's verify mode ran 3-5%
# faster than with 32 (fewer scales per product) at the same acceptance; 128 or 256 (padded) were slower.
DRAFT_BLOCK, MIN_BLOCK = 64, 16

DRAFT_PROP = "river.draft"
DRAFT_FILE = "draft.onnx"  # its name beside a River graph (river-export writes it)
DRAFT_BITS = (4, 8)


def check(model: onnx.ModelProto, exit_after: int) -> str | None:
    """Why no draft graph can be made at ``exit_after`` (None when it can)."""
    reason = exit_range_error(exit_after, StepContract.from_model(model).num_layers)
    if reason:
        return reason
    if any(n.op_type == "If" for n in model.graph.node):
        return "this is already a River graph: make the draft from the plain step graph it came from"
    return None


def exit_range_error(exit_after: int, layers: int) -> str | None:
    """Why ``exit_after`` is no draft exit for a model of ``layers`` layers (None when it is one):
    river-export checks it from the graph header, before any graph is built."""
    if isinstance(exit_after, bool) or not isinstance(exit_after, int) or not -1 <= exit_after < layers - 1:
        return (f"draft exit after layer {exit_after} is out of range: use -1 (every layer a twin) up to "
                f"{layers - 2} (the model has {layers} layers)")
    return None


class DraftMatMuls:
    """The draft's twins: MatMulNBits over asymmetric block-quantized weights (a tied weight is
    packed once), at the given accuracy level."""

    min_opset = None

    def __init__(self, bits: int, block: int, accuracy_level: int):
        self.bits, self.block, self.accuracy_level = bits, block, accuracy_level
        self.done: dict[int, tuple] = {}  # id(weight) -> its quantized constants

    def block_for(self, k: int) -> int | None:
        """The block for an input dimension ``k``: the largest of ``block``, ``block / 2``, ... down to
        ``MIN_BLOCK`` that divides it (None: none does)."""
        block = self.block
        while block >= MIN_BLOCK and k % block:
            block //= 2
        return block if block >= MIN_BLOCK else None

    def quantizable(self, weight: gs.Constant) -> bool:
        return weight.values.ndim == 2 and self.block_for(weight.values.shape[0]) is not None

    def __call__(self, node: gs.Node, a: gs.Tensor, weight: gs.Constant, tag: str, out: gs.Tensor) -> list[gs.Node]:
        bits, block = self.bits, self.block_for(weight.values.shape[0])
        if id(weight) not in self.done:
            packed, scales, zps = ort_block_quant(weight.values, bits, block, symmetric=False)
            self.done[id(weight)] = (gs.Constant(f"{weight.name}@d{bits}p", packed),
                                     gs.Constant(f"{weight.name}@d{bits}s", scales.reshape(-1)),
                                     gs.Constant(f"{weight.name}@d{bits}z", zps))
        k, n = weight.values.shape
        return [gs.Node("MatMulNBits", f"{node.name}@{tag}",
                        {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": self.accuracy_level},
                        [a, *self.done[id(weight)]], [out], domain=MS_DOMAIN)]


def draft_graph(model: onnx.ModelProto, exit_after: int = -1, bits: int = 8, block: int = DRAFT_BLOCK,
                head: bool = True, accuracy_level: int = NBITS_ACCURACY) -> onnx.ModelProto:
    """The draft graph of a contract step graph (see module docstring)."""
    reason = check(model, exit_after)
    if reason:
        raise ValueError(reason)
    if bits not in DRAFT_BITS:
        raise ValueError(f"draft twins have 4 or 8 bits, not {bits}")
    info = {"exit_after": exit_after, "bits": bits, "block": block, "head": head, "accuracy_level": accuracy_level}
    result, twins = quantize_weights(model, DraftMatMuls(bits, block, accuracy_level), after_layer=exit_after,
                                     head=head, ungroup=True, tag="draft")
    if not twins:
        raise ValueError("no weight MatMul after the draft exit could be quantized (weights must be 2-D initializers "
                         f"whose input dimension is a multiple of {MIN_BLOCK})")
    set_props(result, {DRAFT_PROP: json.dumps(info | {"twins": twins})})
    return result


def draft_metadata(model: onnx.ModelProto) -> dict | None:
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[DRAFT_PROP]) if DRAFT_PROP in props else None
