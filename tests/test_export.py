"""The exported step graph in ONNX Runtime against our torch model (prefill and decode)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from river.export import contract as C
from river.export.contract import StepContract
from river.compiler.ort_session import make_session
from tests_helpers import torch_step


def run_graph(session, contract, ids, past, start):
    b, s = ids.shape
    total = past[0].shape[2] + s
    feeds = {C.INPUT_IDS: ids, C.ATTENTION_MASK: np.ones((b, total), np.int64),
             C.POSITION_IDS: np.tile(np.arange(start, start + s, dtype=np.int64), (b, 1))}
    for layer in range(contract.num_layers):
        feeds[C.past_name(layer, "key")] = past[2 * layer]
        feeds[C.past_name(layer, "value")] = past[2 * layer + 1]
    out = session.run(None, feeds)
    return out[0], out[1:]


def check_prefill_and_decode(model, onnx_path, prompt_ids, tol=1e-4):
    """``prompt_ids``: one prompt, or a list of equally long prompts run as one batch."""
    proto = onnx.load(str(onnx_path))
    contract = StepContract.from_model(proto)
    session = make_session(proto, threads=2)
    ids = np.atleast_2d(np.asarray(prompt_ids, np.int64))
    batch = ids.shape[0]
    empty = [np.zeros((batch, contract.num_kv_heads, 0, contract.head_dim), np.float32)] * (2 * contract.num_layers)
    logits, presents = run_graph(session, contract, ids, empty, 0)
    ref_logits, ref_presents = torch_step(model, ids)
    assert np.abs(logits - ref_logits).max() <= tol
    assert max(np.abs(p - r.numpy()).max() for p, r in zip(presents, ref_presents)) <= tol
    # three decode steps, each feeding the graph's own presents back
    past, ref_past = presents, ref_presents
    pos = ids.shape[1]
    for _ in range(3):
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
        logits, past = run_graph(session, contract, nxt, past, pos)
        ref_logits, ref_past = torch_step(model, nxt, ref_past, pos)
        assert logits.shape == (batch, 1, contract.vocab_size or logits.shape[-1])
        assert np.abs(logits - ref_logits).max() <= tol
        assert max(np.abs(p - r.numpy()).max() for p, r in zip(past, ref_past)) <= tol
        assert past[0].shape[2] == pos + 1
        pos += 1


def test_tiny_graph_passes_checker_with_full_shape_inference(tiny_onnx):
    onnx.checker.check_model(str(tiny_onnx), full_check=True)
    proto = onnx.load(str(tiny_onnx))
    assert all(o.domain in ("", "ai.onnx") and o.version >= 17 for o in proto.opset_import)
    assert {n.domain for n in proto.graph.node} <= {""}, "contrib ops in the graph"
    names = [i.name for i in proto.graph.input]
    assert names[:3] == [C.INPUT_IDS, C.ATTENTION_MASK, C.POSITION_IDS]
    assert [o.name for o in proto.graph.output] == C.output_names(4)
    dims = [d.dim_param for d in proto.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"


def test_tiny_graph_matches_torch(tiny, tiny_onnx):
    check_prefill_and_decode(tiny.model, tiny_onnx, list(range(40, 52)))


def greedy_run(session, contract, ids, steps=3):
    """Prefill ``ids`` [B,S], then ``steps`` greedy decode steps: every step's logits, per row's own argmax."""
    b = ids.shape[0]
    past = [np.zeros((b, contract.num_kv_heads, 0, contract.head_dim), np.float32)] * (2 * contract.num_layers)
    logits, past = run_graph(session, contract, ids, past, 0)
    out = [logits]
    for pos in range(ids.shape[1], ids.shape[1] + steps):
        logits, past = run_graph(session, contract, logits[:, -1:].argmax(-1).astype(np.int64), past, pos)
        out.append(logits)
    return out


def test_tiny_graph_dynamic_batch(tiny, tiny_onnx):
    """Three different prompts in one batch: each row equals torch and its own batch-1 run (rows that
    differ, so a graph that mixed rows, e.g. in attention or the KV concat, would be caught)."""
    rows = [[60, 61, 62, 63, 64], [7, 200, 12, 45, 9], [250, 250, 3, 180, 77]]
    check_prefill_and_decode(tiny.model, tiny_onnx, rows)
    proto = onnx.load(str(tiny_onnx))
    contract, session = StepContract.from_model(proto), make_session(proto, threads=2)
    batched = greedy_run(session, contract, np.asarray(rows, np.int64))
    fed = [[int(step[i, -1].argmax()) for step in batched[:-1]] for i in range(3)]
    assert len({tuple(f) for f in fed}) == 3, "the decode steps fed every row the same tokens"
    for i, row in enumerate(rows):
        alone = greedy_run(session, contract, np.asarray([row], np.int64))
        for step_b, step_1 in zip(batched, alone):
            assert np.abs(step_b[i] - step_1[0]).max() <= 1e-4, f"row {i} differs from its batch-1 run"


@pytest.mark.slow
def test_smollm2_graph_matches_torch(smol, smol_onnx):
    onnx.checker.check_model(str(smol_onnx), full_check=True)
    ids = smol.tokenizer("The river carried the boat past the old mill and")["input_ids"]
    check_prefill_and_decode(smol.model, smol_onnx, ids)
