"""The ONNX Runtime lowering (compiler/lowering/ort_fused.py, fused_attention.py): lowered == portable on
logits and every layer's K/V, for plain step graphs, River graphs (attention inside nested ``If``
branches) and draft graphs; the in-place invariants on the lowered graphs (one allocation, only the new
positions written, the cache's other positions untouched); batched rows equal alone; what it declines,
it declines with a reason and runs portable."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from river.compiler.compile import compile_river
from river.compiler.graph_io import load_onnx, load_onnx_header
from river.compiler.lowering import fused_attention, packed_qkv, skip_norm
from river.compiler.lowering.ort_fused import lower_for_ort, lowering_of
from river.compiler.river.manifest import DISABLED
from river.errors import CacheOverflow
from river.runtime import cli as generate_cli
from river.runtime.batching.kv_pool import KVPool
from river.runtime.ort_backend import OrtBackend
from river.runtime.verify_graphs import verify_pair

TOL = 1e-4
LOGITS_RTOL = 1e-5  # plus 1e-5 of the logit: SmolLM2's logits reach ~20, and reordered fp32 sums differ there by ~1e-4
POISON = 1e4
# (tokens a step, rollback before it): a prefill, verification-sized steps, decode steps, a rejected draft
STEPS = [(6, 0), (3, 0), (1, 0), (1, 0), (4, 2), (1, 0), (2, 1), (1, 0)]


@pytest.fixture(scope="module")
def tiny_river(tiny_onnx, tmp_path_factory):
    return compile_river(tiny_onnx, tmp_path_factory.mktemp("river") / "int8", gates="0,2", river="int8", log=None)


def _pair(path, **kw) -> tuple[OrtBackend, OrtBackend]:
    lowered, portable = (OrtBackend(path, threads=1, lowering=lo, **kw) for lo in ("ort", "portable"))
    assert lowered.lowering == "ort_fused", lowered.lowering_reason
    assert portable.lowering == "portable"
    return lowered, portable


def _poisoned_cache(backend, capacity=32, batch=1):
    cache = backend.new_cache(capacity, batch)
    for buf in cache.buffers():
        buf[:] = POISON
    return cache


def _assert_same_steps(lowered, portable, vocab, thresholds=None, seed=0, tol=TOL, relative=None):
    """Run STEPS on both (same tokens), comparing logits, exits and the valid K/V of every layer after
    each step (within ``tol``; with ``relative``, within that norm of the difference over the portable
    one's instead: a lossy lowering); the lowered cache is poisoned and must stay so past the valid positions."""
    def close(a, b, atol, rtol, err_msg):
        if relative is None:
            np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=err_msg)
        else:
            assert np.linalg.norm(a - b) <= relative * np.linalg.norm(b), err_msg

    rng = np.random.default_rng(seed)
    caches = [_poisoned_cache(b) for b in (lowered, portable)]
    pointers = [b.ctypes.data for b in caches[0].buffers()]
    for i, (s, back) in enumerate(STEPS):
        tokens = rng.integers(1, vocab, (1, s)).astype(np.int64)
        outs = []
        for backend, cache in zip((lowered, portable), caches):
            cache.truncate(cache.length - back)
            if thresholds is not None:
                backend.set_thresholds(thresholds[i % len(thresholds)])
            outs.append(np.array(backend.extend(tokens, cache)))
            cache.length += s
        close(outs[0], outs[1], tol, LOGITS_RTOL, f"step {i}")
        assert lowered.last_exit_layer == portable.last_exit_layer
        n = caches[0].length
        for a, b in zip(caches[0].buffers(), caches[1].buffers()):
            close(a[:, :, :n], b[:, :, :n], tol, 0, f"step {i} K/V")
    high_water = max(sum(s for s, _ in STEPS[:j + 1]) - sum(b for _, b in STEPS[:j + 1]) for j in range(len(STEPS)))
    for buf in caches[0].buffers():
        assert (buf[:, :, high_water + 2:] == POISON).all(), "the lowered graph wrote past the new positions"
    assert [b.ctypes.data for b in caches[0].buffers()] == pointers  # the one allocation, bound in place


def test_plain_step_graph_lowered_equals_portable(tiny, tiny_onnx):
    lowered, portable = _pair(tiny_onnx)
    _assert_same_steps(lowered, portable, tiny.config.vocab_size)
    ops = [n.op_type for n in load_onnx_header(lowered.decode_path).graph.node]
    layers = tiny.config.num_layers
    assert ops.count("GroupQueryAttention") == layers
    assert not {"TensorScatter", "Softmax"} & set(ops)  # no portable attention left
    assert ops.count("MatMul") == 4 * layers and ops.count("Split") == layers  # packed: qkv, o, gate|up, down
    assert ops.count("If") == 1  # the head: fp32, or greedy_head's form (tests/test_greedy_head.py)
    # every norm after a residual Add (all but the first, over the embeddings) is fused with it
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers


def test_river_graph_lowered_equals_portable_under_every_exit(tiny, tiny_river):
    """Attention inside the River's nested If branches (backbone and int8 twins) is fused too."""
    lowered, portable = _pair(tiny_river)
    patterns = [[-2, DISABLED], [DISABLED, -2], [DISABLED, DISABLED], [-2, -2]]
    _assert_same_steps(lowered, portable, tiny.config.vocab_size, thresholds=patterns)


def test_river_with_quantized_head_from_the_cli(tiny, tiny_onnx, tmp_path, capsys):
    """``river-export --river-head int8``: the manifest and graph say so, every river ends with an 8-bit
    MatMulNBits head (the backbone's stays fp32), and the lowered graph equals the portable one."""
    from river.cli import main as export_main
    from river.compiler.graph_io import walk_nodes
    from river.compiler.river.manifest import RiverInfo, RiverManifest

    out = tmp_path / "qhead"
    assert export_main([str(tiny_onnx), "-o", str(out), "--gates", "0,2", "--river-head", "int8", "--no-draft"]) == 0
    assert RiverManifest.load(out).head == "int8"
    graph = load_onnx(out / "model.onnx")
    assert RiverInfo.from_model(graph).head == "int8"
    heads = [n for n in walk_nodes(graph.graph) if n.op_type == "MatMulNBits"
             and {a.name: a.i for a in n.attribute}["N"] == tiny.config.vocab_size]
    assert len(heads) == 2 and all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in heads)
    lowered, portable = _pair(out / "model.onnx")
    _assert_same_steps(lowered, portable, tiny.config.vocab_size, thresholds=[[-2, DISABLED], [DISABLED, -2],
                                                                            [DISABLED, DISABLED]])
    with pytest.raises(SystemExit) as exc:  # argparse's one-line usage error, nothing written
        export_main([str(tiny_onnx), "-o", str(tmp_path / "bad"), "--river-head", "int3"])
    assert exc.value.code == 2 and "--river-head" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_draft_graph_lowered_equals_portable(tiny, tiny_onnx):
    _, draft = verify_pair(tiny_onnx, 1)
    lowered, portable = _pair(draft)
    _assert_same_steps(lowered, portable, tiny.config.vocab_size)


def test_rows_of_a_batch_equal_alone(tiny, tiny_onnx):
    """Rows at different lengths in one step: one token each (the fused op reads each row's own length)
    and several tokens each (run row by row: ONNX Runtime's fused attention takes one row then)."""
    backend = OrtBackend(tiny_onnx, threads=1)
    c = backend.contract
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, tiny.config.vocab_size, (1, n)).astype(np.int64) for n in (5, 9)]
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, rows=2, slack=4, capacity=32)
    pool.fit(32, 0)
    for i, p in enumerate(prompts):
        row = pool.rows(i, i + 1)
        backend.extend(p, row)
        pool.lengths[i] += p.shape[1]
    for s in (1, 3, 1):
        tokens = rng.integers(1, tiny.config.vocab_size, (2, s)).astype(np.int64)
        alone = []
        for i in range(2):  # alone: a fresh cache with the row's own past
            solo = backend.new_cache(32)
            for a, b in zip(solo.buffers(), pool.rows(i, i + 1).buffers()):
                a[:] = b[:, :, :32]
            solo.length = int(pool.lengths[i])
            alone.append(np.array(backend.extend(tokens[i:i + 1], solo))[0])
        both = np.array(backend.extend(tokens, pool.rows(0, 2)))
        np.testing.assert_allclose(both, np.stack(alone), atol=TOL, rtol=0)
        pool.lengths[:2] += s


def test_declined_graphs_run_portable_and_say_why(tiny_onnx, tiny_optimum_onnx):
    lowered = lower_for_ort(load_onnx(tiny_onnx), None)  # no context: the rotary tables' length is unknown
    lowering, reason = lowering_of(lowered)
    assert lowering == "portable" and "context" in reason
    assert any(n.op_type == "TensorScatter" for n in lowered.graph.node)  # the portable shared-KV form
    optimum = OrtBackend(tiny_optimum_onnx, threads=1)  # its attention is not a pattern the rule knows
    assert optimum.lowering == "portable" and "not matched" in optimum.lowering_reason


def test_dynamo_export_lowered_equals_portable(tiny, tiny_dynamo_onnx):
    """torch.onnx.export(dynamo=True) of our model: lowered for its one-token steps (its graph does not
    say it masks by position, so its multi-token steps run the contract graph, in both forms)."""
    lowered, portable = _pair(tiny_dynamo_onnx)
    assert not lowered.multi_token_steps
    _assert_same_steps(lowered, portable, tiny.config.vocab_size)


def test_rules_explain_what_they_leave(tiny_onnx, tiny_river):
    """The draft's and the River's products (fp32 backbone layers, MatMulNBits twins) are all packed,
    and the first norm reads the embeddings (no residual Add to fuse): the rule's check says so."""
    _, draft = verify_pair(tiny_onnx, 1)  # layers 0-1 of the backbone, 2-3 quantized twins
    lowered = gs.import_onnx(load_onnx(OrtBackend(draft, threads=1).decode_path))
    assert {packed_qkv.check(n) for n in lowered.nodes if n.op == "GroupQueryAttention"} == {"already packed"}
    assert sum(n.op == "MatMulNBits" for n in lowered.nodes) == 2 * 4 + 1  # qkv, o, gate|up, down; the head
    river = gs.import_onnx(load_onnx(OrtBackend(tiny_river, threads=1).decode_path))
    branches = list(river.subgraphs(recursive=True))
    assert {packed_qkv.check(n) for g in branches for n in g.nodes if n.op == "GroupQueryAttention"} == {"already packed"}
    # a twin's packed product reads its branch's own constants (ONNX Runtime prepacks only those),
    # never the backbone layer's packed weights of the same scope
    nbits = [n for g in branches for n in g.nodes if n.op == "MatMulNBits" and n.name.endswith("packed_product")]
    assert len(nbits) == 2 * (3 + 1)  # qkv and gate|up of layers 1-3 (gate 0's river) and of layer 3 (gate 1's)
    for node in nbits:
        assert all(isinstance(t, gs.Constant) and "@q" in t.name for t in node.inputs[1:]), node.name
    original = gs.import_onnx(load_onnx(tiny_onnx))
    ids = {id(n) for n in original.nodes}
    norms = [skip_norm.check(n, ids) for n in original.nodes if n.op == "Mul"
             and skip_norm.match_norm(n)[0] is not None]
    assert norms.count(None) == 2 * 4 and "not a residual Add" in next(r for r in norms if r)


def test_rule_check_explains_a_non_match():
    x = gs.Variable("x", np.float32, [1, 4])
    y = gs.Variable("y", np.float32, [1, 4])
    graph = gs.Graph(nodes=[gs.Node("Softmax", "s", {"axis": -1}, [x], [y])], inputs=[x], outputs=[y])
    assert fused_attention.check(graph.nodes[0]) == "softmax input is not masked scores (Add)"
    qkv = [gs.Variable(name, np.float32, [1, 1, 4]) for name in "qkv"]
    adds = [gs.Node("Add", f"add_{t.name}", {}, [x, x], [t]) for t in qkv]
    attention = gs.Node("GroupQueryAttention", "gqa", {}, qkv, [gs.Variable("out", np.float32)], domain="com.microsoft")
    gs.Graph(nodes=[*adds, attention], inputs=[x], outputs=attention.outputs)
    assert packed_qkv.check(attention) == "'q' is not made by a MatMul or MatMulNBits"


def test_hoisting_refuses_two_initializers_of_one_name():
    """Branch initializers shared by name are kept once in the main graph: two different tensors under
    one name (a pass's naming slip, as the packed twin and backbone weights once were) are refused
    instead of one silently standing in for the other."""
    from onnx import helper, numpy_helper

    from river.compiler.graph_io import hoist_initializers

    def branch(name, value):
        return helper.make_graph([helper.make_node("Identity", ["w"], [name])], name, [],
                                 [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [2])],
                                 [numpy_helper.from_array(np.asarray(value, np.float32), "w")])

    def model(then_value, else_value):
        node = helper.make_node("If", ["c"], ["y"], then_branch=branch("a", then_value), else_branch=branch("b", else_value))
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
        return helper.make_model(graph)

    same = hoist_initializers(model([1, 2], [1, 2]))
    assert [t.name for t in same.graph.initializer] == ["w"]
    with pytest.raises(ValueError, match="'w'"):
        hoist_initializers(model([1, 2], [1, 3]))


def test_cache_beyond_the_rotary_tables_is_refused(tiny_onnx):
    backend = OrtBackend(tiny_onnx, threads=1)
    with pytest.raises(CacheOverflow, match="rotary tables"):
        backend.new_cache(backend.max_positions + 1)


def test_cli_lowerings_generate_the_same_text(tiny_onnx, capsys):
    texts = []
    for lowering in ("ort", "portable"):
        assert generate_cli.main(["hello", "--model", str(tiny_onnx), "--max-new-tokens", "12", "--threads", "1",
                                  "--lowering", lowering]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


@pytest.mark.slow
def test_smollm2_lowered_equals_portable(smol, smol_onnx):
    """The real model: every fused rule applies (30 fused attentions, packed products, fused norms) and
    the lowered graph equals the portable one within 1e-4 on logits and every layer's K/V."""
    lowered, portable = _pair(smol_onnx)
    ops = [n.op_type for n in load_onnx_header(lowered.decode_path).graph.node]
    assert ops.count("GroupQueryAttention") == smol.config.num_layers
    _assert_same_steps(lowered, portable, smol.config.vocab_size)
