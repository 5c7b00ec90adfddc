"""Rewrite: a River twin's quantized product whose backbone weight is a GGUF Q4_1 weight -> a product by
that weight's own 4-bit form, with int8 activations (``ai.river::Q41MatMulInt8``, by ``q41_matmul.py``).

Why: the builder's twins are ``MatMulNBits`` over a requantized copy of the backbone's weight
(``<weight>@q8p``: 8 bits at accuracy level 4, int8 activations). On a Q4_1 model the backbone itself
runs the weights' 4-bit form exactly (``q41_matmul.py``), so an 8-bit twin reads twice the bytes of the
layer it stands in for and costs about as much (SmolLM2, 2 threads: 41 against 48 us a product) - a
River that cannot save anything. Over the weight's own Q4_1 form with int8 activations (what llama.cpp
runs for its Q4_1 layers) a product is 2-4x cheaper than the exact one, and it is closer to the
backbone than the 8-bit twin: the weights are exact, only the activations are rounded (per block of
32 inputs, as at accuracy level 4).

So the lowered twin is not the portable twin's arithmetic: both approximate the backbone's layer with
int8 activations, from different weights. The backbone's path stays exact (``lower_for_ort``'s 1e-4).

This pass runs before packing: each twin ``MatMulNBits`` becomes an fp32 ``MatMul`` by its backbone
weight under a marked name (``MARK``), which the packing passes keep in the packed weight's name and
``q41_matmul.rewrite`` turns into ``Q41MatMulInt8``. ``check`` says why a twin is left as it is.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from river.compiler.lowering import q41_matmul
from river.compiler.river.builder import quantized_source

MARK = "@q41i8"  # in a weight's name: its product runs with int8 activations (a twin's)


def is_marked(name: str) -> bool:
    return MARK in name


def source_name(node: gs.Node) -> str | None:
    """The backbone weight a builder-made twin product quantized, by name (None: not such a product)."""
    if node.op != "MatMulNBits" or len(node.inputs) < 2:
        return None
    return quantized_source(node.inputs[1].name)


def check(node: gs.Node, weights: dict[str, gs.Constant], levels_of=None) -> tuple[gs.Constant | None, str]:
    """(the backbone weight ``node`` twins, "") when the rule applies, else (None, why not).
    ``weights``: the fp32 matrices of the graph by name; ``levels_of(name)``: a cached
    ``q41_matmul.levels`` of one (the costly part)."""
    name = source_name(node)
    if name is None:
        return None, "not a twin product (a MatMulNBits over a builder-quantized weight)"
    if node.attrs.get("accuracy_level") != 4:
        return None, "the twin keeps fp32 activations (accuracy level below 4): int8 ones would change it"
    weight = weights.get(name)
    if weight is None:
        return None, f"its backbone weight '{name}' is not in this graph"
    k, n = weight.values.shape
    if (node.attrs.get("K"), node.attrs.get("N")) != (k, n):
        return None, f"the twin is {node.attrs.get('K')} x {node.attrs.get('N')}, its backbone weight {k} x {n}"
    found, why = levels_of(name) if levels_of else q41_matmul.levels(weight.values)
    if found is None:
        return None, f"its backbone weight is not a Q4_1 weight ({why})"
    return weight, ""


def mark(graph: gs.Graph, elsewhere: Callable[[], dict[str, np.ndarray]] | None = None) -> int:
    """Every twin product of ``graph`` and its subgraphs that ``check`` takes, as an fp32 ``MatMul`` by
    its backbone weight under a marked name (one constant a weight, shared by every branch); returns how
    many. ``elsewhere``: the backbone's weights by name where the graph lacks them (a River segment of
    twins: its backbone is in the other segments), asked for only then."""
    graphs = [graph, *graph.subgraphs(recursive=True)]
    weights = {t.name: t for g in graphs for t in g.tensors().values()
               if isinstance(t, gs.Constant) and t.values.ndim == 2 and t.values.dtype == np.float32}
    missing = {name for g in graphs for n in g.nodes if (name := source_name(n)) is not None and name not in weights}
    if missing and elsewhere is not None:
        backbone = elsewhere()
        weights.update({name: gs.Constant(name, backbone[name]) for name in missing if name in backbone})
    levels_of = functools.cache(lambda name: q41_matmul.levels(weights[name].values))  # a weight has twins in several branches
    marked: dict[str, gs.Constant] = {}
    done = 0
    for g in graphs:
        for node in g.nodes:
            weight, _why = check(node, weights, levels_of)
            if weight is None:
                continue
            if weight.name not in marked:
                marked[weight.name] = gs.Constant(f"{weight.name}{MARK}", weight.values)
            node.op, node.domain, node.attrs = "MatMul", None, {}
            node.inputs = [node.inputs[0], marked[weight.name]]
            done += 1
        g.cleanup()
    return done
