"""Recall (compiler/river/recall.py): a row whose river is unsure goes back to the backbone after the
gate it left at. The segmented runtime does it per row, the torch reference per batch; a recalled step
must be the full model's step exactly (logits and every layer's K/V), and a row's result must not
depend on its batch."""

from __future__ import annotations

import numpy as np
import pytest
from tests_helpers import poison_decode

from river.compiler.river.manifest import DISABLED, FORCED_EXIT
from river.compiler.river.recall import RECALL_OFF, check_recall, river_margin
from river.errors import RiverError
from river.export import contract as C
from river.runtime.batching.kv_pool import KVPool
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend
from river.runtime.segmented_backend import SegmentedBackend
from river.runtime.torch_backend import TorchBackend

GATES = (0, 2)
EXIT_AT_0 = [FORCED_EXIT, DISABLED]


@pytest.fixture(scope="module")
def river_folder(tiny_river_segmented):
    """The tiny River (gates ``GATES``, int8 twins) with its segments beside it."""
    return tiny_river_segmented


@pytest.fixture(scope="module")
def segmented(river_folder):
    return SegmentedBackend(river_folder.parent / "segments", threads=1)


def test_river_margin_is_the_gap_between_the_two_most_likely_tokens():
    logits = np.random.default_rng(0).normal(size=(4, 3, 50)) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.sort(p, -1)
    np.testing.assert_allclose(river_margin(logits), top[..., -1] - top[..., -2], rtol=1e-12)
    single = river_margin(logits.astype(np.float32))  # what the graphs emit: float32, ~1e-7 of rounding
    assert single.shape == (4, 3) and np.abs(single - (top[..., -1] - top[..., -2])).max() < 1e-6
    assert river_margin(np.array([[1000.0, 0.0, -1000.0]]))[0] == pytest.approx(1.0)  # no overflow
    assert river_margin(np.array([[2.0, 2.0, 0.0]]))[0] == 0.0  # a tie: as unsure as it gets


@pytest.mark.parametrize("bad", [-0.1, 1.0, "x", float("nan"), True, None])
def test_a_bad_recall_margin_is_refused_in_one_line(bad):
    with pytest.raises(RiverError, match="recall margin") as err:
        check_recall(bad)
    assert "\n" not in str(err.value)


def test_recall_is_refused_where_a_backend_cannot_send_a_row_back(river_folder, tiny_onnx):
    fused = OrtBackend(river_folder, threads=1)
    with pytest.raises(RiverError, match="segmented"):
        fused.set_recall(0.1)
    fused.set_recall(RECALL_OFF)  # off is always fine
    with pytest.raises(RiverError, match="no exit gates"):
        OrtBackend(tiny_onnx, threads=1).set_recall(0.1)


def _prefilled(backend, prompt, capacity=24):
    cache = backend.new_cache(capacity)
    backend.prefill(prompt, cache)
    cache.length = prompt.shape[1]
    return cache


def _copy(backend, cache):
    twin = backend.new_cache(cache.capacity)
    for a, b in zip(twin.buffers(), cache.buffers()):
        a[:] = b
    twin.length = cache.length
    return twin


def test_a_recalled_step_is_the_full_models_step(segmented):
    """A forced exit at gate 0 with a margin no river reaches: the step's logits and every layer's K/V
    at the new position are the full-depth step's, even where the river wrote first (poisoned)."""
    prompt = np.arange(20, 27)[None]
    cache = _prefilled(segmented, prompt)
    full_cache = _copy(segmented, cache)
    token = np.array([[31]])
    segmented.set_thresholds([DISABLED, DISABLED])
    full = segmented.decode(token, full_cache).copy()
    try:
        segmented.set_thresholds(EXIT_AT_0)
        segmented.set_recall(0.999999)
        pos = cache.length
        for buf in cache.buffers():
            buf[:, :, pos] = np.nan
        recalled = segmented.decode(token, cache).copy()
        assert segmented.last_exit_layer == segmented.contract.num_layers and segmented.last_recalled.all()
        np.testing.assert_allclose(recalled, full, atol=1e-5)
        for a, b in zip(cache.buffers(), full_cache.buffers()):
            np.testing.assert_allclose(a[:, :, :pos + 1], b[:, :, :pos + 1], atol=1e-5)
        segmented.set_recall(1e-300)  # a margin every river clears: the plain exit
        exited = segmented.decode(token, _copy(segmented, full_cache)).copy()
        assert segmented.last_exit_layer == GATES[0] + 1 and not segmented.last_recalled.any()
        assert not np.allclose(exited, full, atol=1e-5)
    finally:
        segmented.set_recall(RECALL_OFF)


def _decode_plan(backend, cache, tokens, plan, last_margin=RECALL_OFF):
    """Decode ``tokens`` one by one, each at its thresholds in ``plan``, the last one at recall margin
    ``last_margin`` (the others with recall off). Returns the last step's logits."""
    try:
        for i, (token, thresholds) in enumerate(zip(tokens, plan)):
            backend.set_thresholds(thresholds)
            backend.set_recall(last_margin if i == len(tokens) - 1 else RECALL_OFF)
            logits = backend.decode(np.array([[token]]), cache).copy()
            cache.length += 1
        return logits
    finally:
        backend.set_recall(RECALL_OFF)


def test_a_recall_repairs_the_twin_kv_in_its_past(tiny, segmented):
    """Tokens exit at gate 1, gate 0 and gate 1 (twin K/V written, and attended to), then a token exits at
    gate 1 and is recalled: the backbone reruns the damaged positions from gate 0 (the lowest any of them
    left at), so the logits and every layer's K/V of every position are the full model's, the same
    sequence decoded at full depth. The exits really left damage: the cache before the recall differs."""
    prompt, tokens = np.arange(20, 27)[None], [31, 44, 7, 12]
    exit_at_1 = [DISABLED, FORCED_EXIT]
    plan = [exit_at_1, EXIT_AT_0, exit_at_1, exit_at_1]
    full_cache = _prefilled(segmented, prompt)
    full = _decode_plan(segmented, full_cache, tokens, [[DISABLED, DISABLED]] * len(tokens))
    n = full_cache.length

    damaged = _prefilled(segmented, prompt)  # the same exits, the last step at full depth without a recall
    unrepaired = _decode_plan(segmented, damaged, tokens, plan[:-1] + [[DISABLED, DISABLED]])
    assert max(np.abs(a[:, :, :n] - b[:, :, :n]).max() for a, b in zip(damaged.buffers(), full_cache.buffers())) > 1e-3
    assert np.abs(unrepaired - full).max() > 1e-4

    cache = _prefilled(segmented, prompt)
    assert cache.history is not None
    logits = _decode_plan(segmented, cache, tokens, plan, last_margin=0.999999)
    assert segmented.last_recalled.all()
    np.testing.assert_allclose(logits, full, atol=1e-5)
    for a, b in zip(cache.buffers(), full_cache.buffers()):
        np.testing.assert_allclose(a[:, :, :n], b[:, :, :n], atol=1e-5)
    assert cache.history.damaged_from[0] == -1  # nothing left to repair


def test_repairs_in_a_pool_follow_moved_rows_and_equal_each_row_alone(tiny, segmented):
    """Pool rows with different exit histories (one moved to another slot on the way) are recalled in
    one batch next to a row that is not: each row's logits and K/V equal the same row decoded alone."""
    c = segmented.contract
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, tiny.config.vocab_size, (1, n)).astype(np.int64) for n in (5, 8, 6)]
    history = [list(rng.integers(1, tiny.config.vocab_size, 3)) for _ in prompts]
    plans = [[EXIT_AT_0, EXIT_AT_0, [DISABLED, FORCED_EXIT]], [[DISABLED, DISABLED]] * 3, [[DISABLED, FORCED_EXIT]] * 3]
    margins = [0.999999, RECALL_OFF, 0.999999]
    last = rng.integers(1, tiny.config.vocab_size, (3, 1)).astype(np.int64)
    alone = []
    for p, h, plan, margin, token in zip(prompts, history, plans, margins, last):
        solo = _prefilled(segmented, p, 32)
        logits = _decode_plan(segmented, solo, h + [int(token[0])], plan + [plan[-1]], last_margin=margin)
        alone.append((logits[0], [b[0, :, :solo.length].copy() for b in solo.buffers()],
                      bool(segmented.last_recalled[0])))
    assert [r for _, _, r in alone] == [True, False, True]

    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, rows=4, slack=4, gates=len(GATES), capacity=32,
                  history=segmented.new_history)
    pool.fit(32, 0)
    slots = [3, 1, 2]  # row 0 is decoded in slot 3, then moved to slot 0
    for slot, p, h, plan in zip(slots, prompts, history, plans):
        pool.reset_row(slot)
        segmented.prefill(p, pool.rows(slot, slot + 1))
        pool.lengths[slot] = p.shape[1]
        for t, thresholds in zip(h, plan):
            pool.thresholds[slot] = thresholds
            segmented.extend(np.array([[t]]), pool.rows(slot, slot + 1))
            pool.lengths[slot] += 1
    pool.move(3, 0)
    for i, (plan, margin) in enumerate(zip(plans, margins)):
        pool.thresholds[i], pool.recall[i] = plan[-1], margin
    both = np.array(segmented.extend(last, pool.rows(0, 3)))
    assert list(segmented.last_recalled) == [True, False, True]
    for i, (logits, kv, _) in enumerate(alone):
        np.testing.assert_allclose(both[i], logits, atol=1e-5)
        for a, b in zip(pool.rows(i, i + 1).buffers(), kv):
            np.testing.assert_allclose(a[0, :, :b.shape[1]], b, atol=1e-5)


def _river_margins(backend, prompt, steps):
    """The river's margin at each step of a greedy run that always exits at gate 0 (recall off)."""
    backend.set_thresholds(EXIT_AT_0)
    cache = _prefilled(backend, prompt, capacity=prompt.shape[1] + steps + 1)
    token, margins = np.array([[int(prompt[0, -1])]]), []
    for _ in range(steps):
        logits = backend.decode(token, cache)[:, -1]
        cache.length += 1
        margins.append(float(river_margin(logits)[0]))
        token = np.array([[int(np.argmax(logits[0]))]])
    return margins


def test_segmented_recall_equals_the_torch_reference_and_has_no_holes(tiny, segmented):
    """With the median margin as the recall margin some steps are recalled and some exit; tokens, exit
    layers and recalls equal the torch reference's, and no step leaves a hole in the cache."""
    reference = TorchBackend(tiny.model, segmented.river, segmented.default_thresholds)
    margin = float(np.median(_river_margins(segmented, np.arange(40, 46)[None], 12)))
    runs, recalls = [], []
    for backend in (segmented, reference):
        backend.set_thresholds(EXIT_AT_0)
        backend.set_recall(margin)
        seen = []
        poison_decode(backend, [EXIT_AT_0], seen,
                      after=lambda cache, b=backend, r=recalls: r.append((b.name, bool(b.last_recalled[0]))))
        result = Generator(backend, tiny.tokenizer).generate("unsure rivers", GenerationConfig(max_new_tokens=12))
        del backend.decode  # poison_decode's wrapper
        backend.set_recall(RECALL_OFF)
        runs.append((result.token_ids, seen))
    assert runs[0] == runs[1]
    mine = [r for name, r in recalls if name == segmented.name]
    assert mine == [r for name, r in recalls if name == reference.name]
    assert any(mine) and not all(mine), "the margin should recall some steps and not others"
    assert set(runs[0][1]) == {GATES[0] + 1, tiny.config.num_layers}


def test_rows_are_recalled_each_by_itself(tiny, segmented):
    """Three rows exit at gate 0 in one batch; the recall margin falls between their rivers' margins, so
    some rows go back to the backbone and some do not. Each row's logits and K/V equal the row alone."""
    c = segmented.contract
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, tiny.config.vocab_size, (1, n)).astype(np.int64) for n in (5, 8, 6)]
    tokens = rng.integers(1, tiny.config.vocab_size, (3, 1)).astype(np.int64)
    segmented.set_thresholds(EXIT_AT_0)
    margins = []
    for p, t in zip(prompts, tokens):
        cache = _prefilled(segmented, p, 32)
        margins.append(float(river_margin(segmented.decode(t[None], cache)[:, -1])[0]))
    low, high = sorted(margins)[:2]
    assert low < high
    margin = (low + high) / 2
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, rows=3, slack=4, gates=len(GATES), capacity=32)
    pool.fit(32, 0)
    try:
        segmented.set_recall(margin)
        alone = []
        for i, (p, t) in enumerate(zip(prompts, tokens)):
            segmented.prefill(p, pool.rows(i, i + 1))
            pool.lengths[i] = p.shape[1]
            pool.thresholds[i] = EXIT_AT_0
            pool.recall[i] = margin  # a pool row's own margin (the backend's is for caches without one)
            solo = _prefilled(segmented, p, 32)
            logits = np.array(segmented.decode(t[None], solo))[0]
            alone.append((logits, [b[0, :, :solo.length + 1].copy() for b in solo.buffers()],
                          bool(segmented.last_recalled[0])))
        both = np.array(segmented.extend(tokens, pool.rows(0, 3)))
        assert list(segmented.last_recalled) == [r for _, _, r in alone]
        assert 0 < sum(segmented.last_recalled) < 3
        for i, (logits, kv, _) in enumerate(alone):
            np.testing.assert_allclose(both[i], logits, atol=1e-5)
            for a, b in zip(pool.rows(i, i + 1).buffers(), kv):
                np.testing.assert_allclose(a[0, :, :b.shape[1]], b, atol=1e-5)
    finally:
        segmented.set_recall(RECALL_OFF)


def test_a_batch_mixing_recall_later_exits_and_full_depth_equals_each_row_alone(tiny, segmented):
    """Rows exit at gate 0 and are recalled or not, exit at gate 1 and are recalled or not, or run at full
    depth, in one batch: each row's logits, route and K/V equal the row alone."""
    c = segmented.contract
    rng = np.random.default_rng(11)
    exit_at_1 = [DISABLED, FORCED_EXIT]
    plans = [(EXIT_AT_0, 0.999999), (EXIT_AT_0, RECALL_OFF), (exit_at_1, 0.999999), (exit_at_1, RECALL_OFF),
             ([DISABLED, DISABLED], 0.999999)]
    prompts = [rng.integers(1, tiny.config.vocab_size, (1, n)).astype(np.int64) for n in (5, 8, 6, 7, 4)]
    tokens = rng.integers(1, tiny.config.vocab_size, (5, 1)).astype(np.int64)
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, rows=5, slack=4, gates=len(GATES), capacity=32)
    pool.fit(32, 0)
    alone = []
    for i, ((thresholds, margin), p, t) in enumerate(zip(plans, prompts, tokens)):
        segmented.prefill(p, pool.rows(i, i + 1))
        pool.lengths[i], pool.thresholds[i], pool.recall[i] = p.shape[1], thresholds, margin
        solo = _prefilled(segmented, p, 32)
        segmented.set_thresholds(thresholds)
        segmented.set_recall(margin)
        logits = np.array(segmented.decode(t[None], solo))[0]
        alone.append((logits, [b[0, :, :solo.length + 1].copy() for b in solo.buffers()],
                      int(segmented.last_exit_layer), bool(segmented.last_recalled[0])))
    segmented.set_recall(RECALL_OFF)
    L = c.num_layers
    assert [(e, r) for _, _, e, r in alone] == [(L, True), (GATES[0] + 1, False), (L, True), (GATES[1] + 1, False),
                                                (L, False)]
    both = np.array(segmented.extend(tokens, pool.rows(0, 5)))
    assert list(segmented.last_exit_layers) == [e for _, _, e, _ in alone]
    assert list(segmented.last_recalled) == [r for _, _, _, r in alone]
    for i, (logits, kv, _, _) in enumerate(alone):
        np.testing.assert_allclose(both[i], logits, atol=1e-5)
        for a, b in zip(pool.rows(i, i + 1).buffers(), kv):
            np.testing.assert_allclose(a[0, :, :b.shape[1]], b, atol=1e-5)


def test_recall_arithmetic_on_known_data():
    """Six tokens exit at the first gate (two flip, at margins 0.1 and 0.05); a seventh does not exit."""
    from river.compiler.calibrate import GateData, recall_for_budget

    first = GateData(3, [0.99] * 6 + [0.1], [0, 0, 1, 0, 1, 0, 1], [0] * 7, [0] * 7,
                     [0.9, 0.8, 0.05, 0.6, 0.1, 0.3, 0.0])
    second = GateData(5, [0.0] * 7, [1] * 7, [0] * 7, [0] * 7, [0.5] * 7)
    thr = [0.9, DISABLED]
    assert recall_for_budget([first, second], thr, 0.0) == pytest.approx(0.2)  # both flips sent back
    assert recall_for_budget([first, second], thr, 1 / 6) == pytest.approx(0.075)  # one flip kept
    assert recall_for_budget([first, second], thr, 1 / 7) == pytest.approx(0.075)  # over all 7 tokens: one flip
    assert recall_for_budget([first, second], thr, 0.5) == RECALL_OFF  # the gates alone are within budget
    budgets = [0.0, 0.1, 0.2, 0.4]
    margins = [recall_for_budget([first, second], thr, b) for b in budgets]
    assert margins == sorted(margins, reverse=True)  # a tighter budget never recalls less
    sure_but_wrong = GateData(3, [0.99] * 3, [1, 0, 0], [0] * 3, [0] * 3, [0.7, 0.2, 0.2])
    everything = recall_for_budget([sure_but_wrong], [0.9], 0.0)  # the surest exit flips: recall them all
    assert 0.7 < everything < 1.0
    assert recall_for_budget([sure_but_wrong], [0.9], 1 / 3) == RECALL_OFF


def test_recall_points_search_the_grid_from_the_per_token_estimate():
    """Every recall point exits at the first gate. The end-to-end search starts where the per-token data
    points and walks the grid up while the measured flip rate is over the budget, or down while it is
    within (repairs make history cleaner than per-token data says), measuring each margin once; where
    none is within the budget the last margin stands."""
    from river.compiler.calibrate import RECALL_GRID, GateData, recall_for_budget, recall_points
    from river.compiler.river.recall import recall_base

    first = GateData(3, [0.999, 0.998, 0.997, 0.996, 0.995, 0.994], [0, 0, 1, 0, 1, 0], [0] * 6, [0] * 6,
                     [0.9, 0.8, 0.05, 0.6, 0.1, 0.3])
    calls = []

    def measure(thresholds, margin):  # the rate falls as the margin grows
        assert thresholds == recall_base(1) == [FORCED_EXIT]
        calls.append(margin)
        return max(0.01, 0.12 - margin)

    points = recall_points([first], measure, {"loose": 0.1, "close": 0.02, "tight": 0.0})
    assert calls[0] == recall_for_budget([first], [FORCED_EXIT], 0.1)
    assert len(calls) == len(set(calls))  # each margin measured once
    assert points["loose-recall"]["recall"] == 0.02 and points["loose-recall"]["flip_rate"] == pytest.approx(0.1)
    assert points["close-recall"]["recall"] == 0.1
    assert points["tight-recall"]["recall"] == RECALL_GRID[-1] and points["tight-recall"]["flip_rate"] == 0.01
    assert all(p["thresholds"] == [FORCED_EXIT] for p in points.values())

    estimate = recall_for_budget([first], [FORCED_EXIT], 0.0)  # recall both flips: a high margin
    assert estimate > 0.1
    down = recall_points([first], lambda thr, margin: 0.0, {"exact": 0.0})  # end to end, nothing flips
    assert down["exact-recall"]["recall"] == RECALL_GRID[0]  # walked all the way down


def test_river_flip_rate_is_zero_when_every_exit_is_recalled(tiny, tiny_onnx, river_folder):
    """Teacher-forced over its own history: every token forced out at gate 0 flips some choices of the
    random model; recalling every exit gives the full model's choices exactly."""
    from river.compiler.calibrate import river_flip_rate
    from river.compiler.graph_io import load_onnx
    from river.compiler.ort_session import make_session
    from river.export.contract import StepContract

    step, river = make_session(load_onnx(tiny_onnx), 1), make_session(load_onnx(river_folder), 1)
    contract = StepContract.from_model(load_onnx(tiny_onnx))
    seqs, start = [list(range(40, 70)), list(range(100, 124))], [4, 6]
    assert river_flip_rate(step, river, contract, seqs, start, EXIT_AT_0, 0.999999) == 0.0
    assert river_flip_rate(step, river, contract, seqs, start, [DISABLED, DISABLED], RECALL_OFF) == 0.0
    assert river_flip_rate(step, river, contract, seqs, start, EXIT_AT_0, RECALL_OFF) > 0.0


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from river import cli as export_cli

    tmp = tmp_path_factory.mktemp("recall-cli")
    (tmp / "prompts.txt").write_text("The river runs to the sea\nOnce upon a time\ndef add(a, b):\n")
    out = tmp / "out"
    assert export_cli.main(["tiny-random", "-o", str(out), "--gates", "0,2", "--calibrate", str(tmp / "prompts.txt"),
                            "--segmented"]) == 0
    return out


def test_calibration_records_recall_points(calibrated):
    import json

    from river.compiler.calibrate import BUDGETS
    from river.compiler.river.recall import recall_base, recall_point_name

    manifest = json.loads((calibrated / "river.json").read_text())
    calibration = json.loads((calibrated / "calibration.json").read_text())
    points = manifest["recall_points"]
    assert {recall_point_name(n) for n in BUDGETS} <= set(points)
    for name, point in points.items():
        assert point["thresholds"] == recall_base(len(manifest["gates"]))
        assert point["recall"] == calibration["recall_points"][name]["recall"]
        check_recall(point["recall"])
        measured = calibration["recall_points"][name]  # end to end
        assert measured["within_budget"] == (measured["flip_rate"] <= measured["budget"])
        assert measured["within_budget"] or point["recall"] == 0.5
    curve = calibration["recall_curve"]["flip_rate"]  # every margin measured, with its rate
    assert all(f"{p['recall']:g}" in curve for p in calibration["recall_points"].values())
    margins = np.concatenate([calibration["samples"][g]["margin"] for g in calibration["samples"]])
    assert len(margins) and np.all((margins >= 0) & (margins <= 1))


def test_recall_through_the_cli(calibrated, tmp_path, capsys):
    """--recall with a margin no river reaches sends every exit back: the full model's text; a recall
    point sets its thresholds and margin; bad uses are one-line errors."""
    import json

    from tests_helpers import assert_one_line_error

    from river.runtime import cli as generate_cli

    forced = tmp_path / "t.json"
    forced.write_text(json.dumps({"gates": [0, 2], "thresholds": EXIT_AT_0}))
    base = ["--model", str(calibrated), "--raw", "--max-new-tokens", "8", "--stats"]

    def run(*extra):
        assert generate_cli.main(base + list(extra) + ["hello river"]) == 0
        captured = capsys.readouterr()
        return captured.out, captured.err

    full, _ = run("--thresholds", "off")
    _, err = run("--thresholds", str(forced))
    assert "{1: 7}" in err and "went back" not in err  # every step exits at gate 0
    recalled, err = run("--thresholds", str(forced), "--recall", "0.999999")
    assert recalled == full and "7 steps went back to the backbone" in err and "{4: 7}" in err
    point = json.loads((calibrated / "river.json").read_text())["recall_points"]["fast-recall"]
    _, err = run("--recall", "fast-recall")
    assert (f"recall margin {point['recall']:g}:" in err) == (point["recall"] != RECALL_OFF)
    for extra, message in ((["--recall", "1.5"], "recall margin"),
                           (["--recall", "nope"], "fast-recall"),
                           (["--recall", "fast-recall", "--thresholds", "off"], "drop --thresholds"),
                           (["--recall", "0.1", "--mode", "verify"], "exit mode"),
                           (["--recall", "0.1", "--backend", "ort"], "segmented")):
        assert generate_cli.main(base + extra + ["hi"]) == 2
        assert message in assert_one_line_error(capsys.readouterr().err, "river-generate")


@pytest.mark.slow
def test_smollm2_recall(smol, smol_segments):
    """SmolLM2, segments lowered for ONNX Runtime, every token forced out at the first gate (layer 14):
    a margin no river reaches gives the full model's greedy tokens, and a small one recalls some steps,
    each of which leaves the whole cache the full model's (repairs of several positions among them), and
    agrees with the full model teacher-forced at least as often as the plain exit."""
    from river.runtime.bench.eval_data import REFERENCE_TEXT
    from river.runtime.bench.run import teacher_forced

    folder, spec = smol_segments
    backend = SegmentedBackend(folder, threads=2)
    gates = spec.gates
    assert backend.lowering == "ort_fused", backend.lowering_reason
    gen = Generator(backend, smol.tokenizer)
    forced = [FORCED_EXIT] + [DISABLED] * (len(gates) - 1)
    cfg = GenerationConfig(max_new_tokens=16, eos_token_ids=[])
    backend.set_thresholds([DISABLED] * len(gates))
    full = gen.generate("What is a river delta?", cfg)
    backend.set_thresholds(forced)
    backend.set_recall(0.999999)
    recalled = gen.generate("What is a river delta?", cfg)
    assert recalled.token_ids == full.token_ids
    assert all(s.recalled and s.exit_layer == smol.config.num_layers for s in recalled.steps[1:])

    ids = smol.tokenizer(REFERENCE_TEXT[0])["input_ids"]
    backend.set_thresholds([DISABLED] * len(gates))
    backend.set_recall(RECALL_OFF)
    reference = teacher_forced(gen, ids).argmax(-1)
    backend.set_thresholds(forced)

    full_kv = backend.run_step(C.step_feeds(backend.contract, np.asarray([ids], np.int64)), [DISABLED] * len(gates))
    full_kv = [full_kv[n] for n in C.present_names(smol.config.num_layers)]
    repairs = []  # positions each repair rewrote

    def agreement_and_recalls(margin):
        backend.set_recall(margin)
        seen, decode = [], backend.decode

        def counted(tokens, cache):
            damaged_from = int(cache.history.damaged_from[0])
            out = decode(tokens, cache)
            seen.append(bool(backend.last_recalled[0]))
            if seen[-1]:  # a recall leaves the row's whole cache the full model's
                n = cache.length + 1
                repairs.append(n - damaged_from if damaged_from >= 0 else 1)
                for got, want in zip(cache.buffers(), full_kv):
                    assert np.abs(got[:, :, :n] - want[:, :, :n]).max() <= 1e-3 * np.abs(want).max()
            return out

        backend.decode = counted
        try:
            rows = teacher_forced(gen, ids).argmax(-1)
        finally:
            del backend.decode
        return float(np.mean(rows == reference)), float(np.mean(seen))

    plain, never = agreement_and_recalls(RECALL_OFF)
    with_recall, share = agreement_and_recalls(0.1)
    assert never == 0 and 0 < share < 1
    assert with_recall >= plain
    assert max(repairs) > 1, "no recall had twin K/V to repair"
