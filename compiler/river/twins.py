"""The twin-kind registry: each kind of twin (the cheap stand-in of a skipped layer on the exit
river) is one class that says how to build its twin of a block in ONNX *and* how the torch
reference computes it. Every layout (nested, chained, segments) and the torch reference build
twins through here, so adding a kind is one class + ``register`` (and its test).

Built-in kinds, at precision fp32/int8/int4 (the builder quantizes the twins' weight MatMuls):

- ``full``: the whole layer (attention over the shared cache + MLP);
- ``full-kv32``: the whole layer, with the weights its K/V depend on left at fp32;
- ``attn``: attention only (K/V written, MLP skipped);
- ``kv``: only the layer's K/V projection of the exit state (CALM-style propagation).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from river.compiler.structure import Block
from river.errors import RiverError
from river.export.contract import present_name


class TwinKind:
    """One kind of twin. ``river_names`` maps the ``--river`` names that select it to their precision."""

    name: str = ""
    river_names: dict[str, str] = {}
    torch_exact: tuple[str, ...] = ()  # our DecoderLayer's Linear names the torch twin keeps fp32 (as ``build`` does)

    def build(self, b, block: Block, stream: gs.Tensor, h_exit: gs.Tensor, mapping: dict, tag: str
              ) -> tuple[list[gs.Node], gs.Tensor]:
        """The twin of ``block`` in ONNX: nodes cloned by the builder ``b`` (``b.clone`` quantizes
        weight MatMuls; ``b.outputs`` are the step graph's outputs) from the current ``stream`` and
        the exit state ``h_exit``. Every tensor cloned is recorded in ``mapping`` (backbone id ->
        twin tensor), which must come to hold the block's presents. Returns (nodes, stream after)."""
        raise NotImplementedError

    def torch(self, layer, h, h_exit, rope, mask, past_k, past_v):
        """What the twin computes in torch, on a twin copy ``layer`` of our ``DecoderLayer``:
        ``rope`` = (cos, sin); returns (h, present_k, present_v)."""
        raise NotImplementedError

    def check(self, block: Block) -> str | None:
        """Why this kind cannot twin ``block`` (None: it can)."""
        return None


class FullTwin(TwinKind):
    name = "full"
    river_names = {"int8": "int8", "int4": "int4", "fp32": "fp32"}

    def build(self, b, block, stream, h_exit, mapping, tag):
        mapping[id(block.input)] = stream
        return b.clone(block.nodes, mapping, tag), mapping[id(block.output)]

    def torch(self, layer, h, h_exit, rope, mask, past_k, past_v):
        return layer(h, *rope, mask, past_k, past_v)


class ExactKvTwin(FullTwin):
    """The whole layer, quantized except for every weight its K/V depend on (the K and V projections;
    a fused QKV projection whole). A twin's K/V stay in the shared cache for every later token, so
    their error outlives the step that exited, while its MLP and output projection only touch that
    step's own token. In a Llama layer these weights are ~6%."""

    name = "full-kv32"
    river_names = {"int8-kv32": "int8", "int4-kv32": "int4"}
    torch_exact = ("k_proj", "v_proj")

    def build(self, b, block, stream, h_exit, mapping, tag):
        mapping[id(block.input)] = stream
        exact = {id(n) for n in block.kv_nodes(b.outputs)}
        return b.clone(block.nodes, mapping, tag, exact=exact), mapping[id(block.output)]


class AttnTwin(TwinKind):
    name = "attn"
    river_names = {"attn": "fp32"}

    def build(self, b, block, stream, h_exit, mapping, tag):
        mapping[id(block.input)] = stream
        mlp = {id(n) for n in block.mlp_nodes()}
        nodes = b.clone([n for n in block.nodes if id(n) not in mlp], mapping, tag)
        mapping[id(block.output)] = mapping[id(block.mid)]
        return nodes, mapping[id(block.mid)]

    def torch(self, layer, h, h_exit, rope, mask, past_k, past_v):
        attn, k, v = layer.self_attn(layer.input_layernorm(h), *rope, mask, past_k, past_v)
        return h + attn, k, v

    def check(self, block):
        if block.parallel:
            return (f"attention-only twins need the attention's own residual Add, and block {block.index} is a "
                    "parallel block (attention and MLP add into the residual together): use --river "
                    "int8, int4, fp32 or kv")
        return None


class KvTwin(TwinKind):
    name = "kv"
    river_names = {"kv": "fp32"}

    def build(self, b, block, stream, h_exit, mapping, tag):
        mapping[id(block.input)] = h_exit  # K/V of the exit state; the stream itself stays as it is
        return b.clone(block.kv_nodes(b.outputs), mapping, tag), stream

    def torch(self, layer, h, h_exit, rope, mask, past_k, past_v):
        import torch

        k, v = layer.self_attn.new_kv(layer.input_layernorm(h_exit), *rope)
        return h, torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)


_KINDS: dict[str, TwinKind] = {}


def register(kind: TwinKind) -> TwinKind:
    """Add a twin kind (and its ``--river`` names); a name already taken is refused."""
    if not kind.name:
        raise RiverError(f"twin kind {type(kind).__name__} has no name")
    clash = ({kind.name} & set(_KINDS)) | (set(kind.river_names) & set(river_names()))
    if clash:
        raise RiverError(f"twin kind name(s) {', '.join(sorted(clash))} already registered")
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> TwinKind:
    if name not in _KINDS:
        raise RiverError(f"unknown river kind '{name}' (choose from {', '.join(_KINDS)})")
    return _KINDS[name]


def river_names() -> dict[str, tuple[str, str]]:
    """Every ``--river`` name -> (kind, precision)."""
    return {river: (k.name, precision) for k in _KINDS.values() for river, precision in k.river_names.items()}


def resolve(river: str) -> tuple[str, str]:
    """(kind, precision) of a ``--river`` name."""
    names = river_names()
    if river not in names:
        raise RiverError(f"unknown river kind '{river}': choose from {', '.join(names)}")
    return names[river]


@dataclass
class Twins:
    nodes: list[gs.Node]
    stream: gs.Tensor  # the residual stream after the last twin
    presents: dict[str, gs.Tensor]  # present name -> the twin's tensor, for every layer built


def check_blocks(kind: str, blocks) -> None:
    """Refuse (RiverError) a kind that cannot twin one of ``blocks``, before anything is built."""
    twin = get(kind)
    for block in blocks:
        reason = twin.check(block)
        if reason:
            raise RiverError(reason)


def build_twins(b, kind: str, layers, stream: gs.Tensor, h_exit: gs.Tensor, tag: str) -> Twins:
    """Twins of ``layers`` (consecutive backbone layers) of kind ``kind``, from ``stream``."""
    twin, mapping, nodes = get(kind), {}, []
    for layer in layers:
        new, stream = twin.build(b, b.s.blocks[layer], stream, h_exit, mapping, tag)
        nodes += new
    presents = {present_name(l, k): mapping[id(b.outputs[present_name(l, k)])] for l in layers for k in ("key", "value")}
    return Twins(nodes, stream, presents)


for _kind in (FullTwin(), ExactKvTwin(), AttnTwin(), KvTwin()):
    register(_kind)
