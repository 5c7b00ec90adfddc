"""The twin-kind registry (compiler/river/twins.py): a kind registered through the registry alone
runs in every layout (nested, chained, segments) and in the torch reference, and they all agree."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from test_river_pass import step_feeds, torch_args

from river.compiler.ort_session import make_session
from river.compiler.river import twins
from river.compiler.river.chained import chained_river_graph
from river.compiler.river.manifest import DISABLED, EXIT_LAYER, FORCED_EXIT, THRESHOLDS, RiverInfo
from river.compiler.river.nested import river_graph
from river.compiler.river.segments import SegmentIndex, write_segments
from river.compiler.river.spec import RiverSpec
from river.errors import RiverError
from river.export import contract as C
from river.runtime.torch_reference import TorchRiver

GATES = (0, 2)
TOY = "toy-kv-mlp"


class KvMlpTwin(twins.TwinKind):
    """A toy kind: no attention; the layer's K/V projection of the current stream (written to the
    cache) and the MLP on the stream."""

    name = TOY
    river_names = {TOY: "fp32"}

    def build(self, b, block, stream, h_exit, mapping, tag):
        mapping[id(block.input)] = stream
        nodes = b.clone(block.kv_nodes(b.outputs), mapping, tag)
        mapping[id(block.mid)] = stream
        nodes += b.clone(block.mlp_nodes(), mapping, tag)
        return nodes, mapping[id(block.output)]

    def torch(self, layer, h, h_exit, rope, mask, past_k, past_v):
        k, v = layer.self_attn.new_kv(layer.input_layernorm(h), *rope)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)


if TOY not in twins.river_names():
    twins.register(KvMlpTwin())


def test_registry_refuses_a_taken_name():
    with pytest.raises(RiverError, match="already registered"):
        twins.register(KvMlpTwin())

    class Shadow(twins.TwinKind):
        name = "shadow"
        river_names = {"int8": "int8"}  # a --river name of the full kind

    with pytest.raises(RiverError, match="int8"):
        twins.register(Shadow())
    assert "shadow" not in twins.river_names()
    assert twins.resolve(TOY) == (TOY, "fp32")


def _patterns(num_gates):
    """Forced exit at each gate, then no exit: (thresholds, exit_layer)."""
    out = []
    for k in range(num_gates):
        thr = np.full(num_gates, DISABLED, np.float32)
        thr[k] = FORCED_EXIT
        out.append((thr, GATES[k] + 1))
    return out + [(np.full(num_gates, DISABLED, np.float32), 4)]


def _named(session, feeds):
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _segments_by_hand(index: SegmentIndex, sessions: dict, feeds: dict, thr: np.ndarray) -> dict:
    """Chain the contract-form segments with plain ONNX Runtime sessions: the route of one step."""
    values = {**feeds, THRESHOLDS: thr}
    batch = feeds[C.INPUT_IDS].shape[0]

    def run(seg):
        values.update(_named(sessions[seg.name], {n: values[n] for n in seg.inputs}))

    for k in range(len(index.gates)):
        run(index.backbone(k))
        if bool(values[f"gate{k}.exit"]):
            run(index.river(k))
            return values | {EXIT_LAYER: np.full(batch, index.exit_layer(k), np.int64)}
    run(index.backbone(len(index.gates)))
    return values | {EXIT_LAYER: np.full(batch, index.exit_layer(None), np.int64)}


def test_toy_kind_in_every_layout_and_the_torch_reference(tiny, tiny_onnx, tmp_path):
    proto = onnx.load(str(tiny_onnx))
    spec = RiverSpec.from_name(TOY, GATES)
    assert (spec.kind, spec.precision) == (TOY, "fp32")
    nested_model = river_graph(proto, spec)
    chained_model = chained_river_graph(proto, spec)
    for model, layout in ((nested_model, "nested"), (chained_model, "chained")):
        onnx.checker.check_model(model, full_check=True)
        assert RiverInfo.from_model(model) == RiverInfo(GATES, TOY, "fp32", 64, "ort", layout)
    nested, chained = make_session(nested_model), make_session(chained_model)
    index = SegmentIndex.load(write_segments(proto, spec, tmp_path / "segments", shared_kv=False))
    assert index.kind == TOY
    sessions = {s.name: make_session(onnx.load(str(index.path(s)))) for s in index.segments}
    reference = TorchRiver(tiny.model, GATES, TOY, "fp32")
    plain = make_session(proto)

    for seq, past in ((1, 6), (3, 4)):
        feeds = step_feeds(tiny.config, batch=2, seq=seq, past=past, seed=seq)
        ids, past_t = torch_args(feeds, tiny.config)
        original = _named(plain, feeds)
        for thr, exit_layer in _patterns(len(GATES)):
            ref = _named(nested, {**feeds, THRESHOLDS: thr})
            assert ref[EXIT_LAYER].tolist() == [exit_layer] * 2
            names = [n for n in ref if n != EXIT_LAYER]
            for name in names:  # forced exits write every layer's present: no hole, finite
                assert np.all(np.isfinite(ref[name]))
                if name.startswith("present."):
                    assert ref[name].shape[2] == past + seq
            if exit_layer == 4:  # gates disabled: the original graph's outputs
                assert max(np.abs(ref[n] - original[n]).max() for n in names) <= 1e-5
            segs = _segments_by_hand(index, sessions, feeds, thr)
            logits, presents, exits = reference.step(*ids, past_t, thr)
            torch_out = {C.LOGITS: logits.numpy(), EXIT_LAYER: exits.numpy(),
                         **{C.present_name(l, k): presents[2 * l + (k == "value")].numpy()
                            for l in range(tiny.config.num_layers) for k in ("key", "value")}}
            for got in (_named(chained, {**feeds, THRESHOLDS: thr}), segs, torch_out):
                assert np.array_equal(got[EXIT_LAYER], ref[EXIT_LAYER])
                assert max(np.abs(got[n] - ref[n]).max() for n in names) <= 1e-4


def test_export_cli_takes_registered_kinds_and_twin_formats():
    from river import cli

    parser = cli.build_parser()
    args = parser.parse_args(["m.onnx", "-o", "out", "--river", TOY, "--twin-format", "dq"])
    assert (args.river, args.twin_format) == (TOY, "dq")
    assert parser.parse_args(["m.onnx", "-o", "out", "--flavour", "dq"]).twin_format == "dq"  # the old name still works
    assert parser.parse_args(["m.onnx", "-o", "out"]).twin_format == "ort"
    assert "--flavour" not in parser.format_help()
