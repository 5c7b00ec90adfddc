"""Calibration: thresholds from measured damage; monotone in budget; budget 0 never exits."""

from __future__ import annotations

import numpy as np
import pytest

from river.compiler.calibrate import GateData, collect, fit_predictor, report, threshold_for_budget, thresholds
from river.compiler.compile import compile_river
from river.compiler.ort_session import make_session
from river.compiler.river.manifest import DISABLED
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend


def synthetic_gate(seed=0, n=400):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.5, 1.0, n)
    flip = (rng.uniform(0, 1, n) < (1 - s) * 0.8).astype(float)  # less similar -> more damage
    return GateData(10, s.tolist(), flip.tolist(), (flip * 0.5).tolist(), ((1 - s) * 0.3 + rng.normal(0, 0.01, n)).tolist())


def test_threshold_arithmetic_on_known_data():
    d = GateData(3, [0.99, 0.98, 0.97, 0.96], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0])
    assert threshold_for_budget(d, 0.0) == DISABLED
    assert threshold_for_budget(d, 0.01) == 0.98  # two safe tokens, the third flips
    assert threshold_for_budget(d, 1 / 3) == 0.97  # mean flip of the top three = 1/3
    assert threshold_for_budget(d, 1.0) == 0.96


def test_thresholds_monotone_in_budget():
    data = [synthetic_gate(i) for i in range(3)]
    budgets = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    for metric in ("flip", "kl", "kv"):
        rows = np.array([thresholds(data, b, metric) for b in budgets])
        assert np.all(np.diff(rows, axis=0) <= 0), f"{metric}: a larger budget raised a threshold"
    assert all(t == DISABLED for t in thresholds(data, 0.0))


def test_predictor_fit_recovers_linear_relation():
    fit = fit_predictor(synthetic_gate())
    assert fit["slope"] == pytest.approx(0.3, abs=0.03) and fit["r2"] > 0.8 and fit["spearman"] > 0.8


@pytest.fixture(scope="module")
def tiny_river_int4(tiny_onnx, tmp_path_factory):
    # int4 twins on the tiny random model flip a measurable share of tokens
    return compile_river(tiny_onnx, tmp_path_factory.mktemp("cal") / "r", gates="0,2", river="int4", log=None)


def test_collect_measures_real_damage(tiny, tiny_onnx, tiny_river_int4):
    seqs = [list(range(40, 60)), list(range(100, 124))]
    data = collect(tiny_onnx, tiny_river_int4, seqs, [4, 4], make_session)
    assert [d.layer for d in data] == [0, 2]
    for d in data:
        a = d.arrays()
        assert len(a["similarity"]) == 16 + 20
        assert np.all((a["similarity"] >= -1) & (a["similarity"] <= 1))
        assert np.all(a["kv"] >= 0) and np.all(a["kl"] >= -1e-9)
    # exiting after layer 0 (3 twin layers) damages the KV more than after layer 2 (1 twin layer)
    assert np.mean(data[0].kv) > np.mean(data[1].kv)
    out = report(data)
    assert set(out["operating_points"]) == {"safe", "balanced", "fast"}


def test_budget_zero_never_fires(tiny, tiny_onnx, tiny_river_int4):
    data = collect(tiny_onnx, tiny_river_int4, [list(range(40, 60))], [4], make_session)
    zero = thresholds(data, 0.0)
    assert zero == [DISABLED, DISABLED]
    backend = OrtBackend(tiny_river_int4, thresholds=zero)
    result = Generator(backend, tiny.tokenizer).generate("never", GenerationConfig(max_new_tokens=12))
    assert all(s.exit_layer == 4 for s in result.steps[1:])


def test_calibration_and_evaluation_data_do_not_overlap():
    from river.compiler.calibration_data import CALIBRATION_PROMPTS
    from river.runtime.bench import eval_data

    def grams(text, n=8):
        words = text.lower().split()
        return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}

    calib = set().union(*(grams(p) for p in CALIBRATION_PROMPTS))
    for text in eval_data.all_evaluation_texts():
        assert text not in CALIBRATION_PROMPTS
        assert not (grams(text) & calib), f"evaluation text shares an 8-gram with calibration data: {text[:60]}"
