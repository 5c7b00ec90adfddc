"""river-bench: the arithmetic of its figures, the baseline policies, and a --quick run end to end."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from river.compiler.river.manifest import DISABLED, FORCED_EXIT
from river.runtime.bench import cli, report
from river.runtime.bench.eval_data import last_number
from river.runtime.bench.methods import EXITS, QUANTIZED, REFERENCE, Method, MonotoneGenerator


def fake_results(times, exits=None, tokens=None):
    return {"decode_seconds": times, "exits": exits or [], "tokens": tokens or {"p": [1, 2, 3, 4]}, "he": [True, False], "math": [True]}


def test_summary_arithmetic():
    L, gates = 10, [3, 6]
    # per-layer costs: backbone 2 ms, twin 1 ms, head 5 ms -> full 25 ms, fixed@3 = 4*2+6*1+5 = 19, fixed@6 = 7*2+3+5 = 22
    results = {
        "full": fake_results([0.025] * 5),
        "fixed@3": fake_results([0.019] * 5, exits=[4] * 5, tokens={"p": [1, 2, 9, 4]}),
        "fixed@6": fake_results([0.022] * 5, exits=[7] * 5),
    }
    tf = {"full": {"agree": [True] * 4, "nll": [1.0] * 4}, "fixed@3": {"agree": [True, False, True, True], "nll": [1.1] * 4},
          "fixed@6": {"agree": [True] * 4, "nll": [1.0] * 4}}
    methods = {"full": Method(None, REFERENCE, "reference"), "fixed@3": Method(None, EXITS, "exit after 3"),
               "fixed@6": Method(None, EXITS, "exit after 6")}
    s = report.summarize(results, tf, methods, gates, L, ["p"])
    costs = s["full"]["layer_costs"]  # t(e) = (L c_t + c_h) + e (c_b - c_t) = 15 ms + e x 1 ms
    assert np.allclose([costs["fixed_ms"], costs["per_backbone_layer_over_twin_ms"]], [15, 1], atol=1e-6)
    f3 = s["fixed@3"]
    assert np.isclose(f3["speedup_vs_full"], 25 / 19) and np.isclose(f3["theoretical_speedup"], 25 / 19)
    assert np.isclose(f3["practical_over_theoretical"], 1.0)
    assert f3["teacher_forced_agreement"] == 0.75
    assert np.isclose(f3["perplexity_delta_pct"], (np.exp(1.1) / np.exp(1.0) - 1) * 100)
    assert f3["greedy_agreement_overall"] == 0.75 and f3["greedy_prefix_until_divergence_mean"] == 2 and f3["greedy_exact_match"] == 0
    assert f3["exit_histogram"] == {"4": 5} and f3["mean_layers_run"] == 4
    assert s["full"]["humaneval_pass@1"] == 0.5 and s["full"]["math_accuracy"] == 1.0
    assert s["fixed@3"]["role"] == EXITS and s["full"]["about"] == "reference"


def test_frontier_verdict_words():
    uni = [{"speedup_vs_full": 1.8, "teacher_forced_agreement": 0.986}]
    assert "slower" in report.frontier_verdict({"speedup_vs_full": 0.9, "teacher_forced_agreement": 1.0}, uni)
    assert "dominated" in report.frontier_verdict({"speedup_vs_full": 1.3, "teacher_forced_agreement": 0.98}, uni)
    assert "above" in report.frontier_verdict({"speedup_vs_full": 1.3, "teacher_forced_agreement": 0.995}, uni)


def test_last_number():
    assert last_number("so 3 + 4 = 7.") == 7 and last_number("1,250 apples") == 1250
    assert last_number("no digits") is None


def test_command_and_module_entry_points():
    """``river-bench`` (pyproject's entry) and ``python -m river.runtime.bench`` reach the same CLI."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    entry = re.search(r'^river-bench = "(.+)"$', pyproject, re.M).group(1)
    module, func = entry.split(":")
    assert getattr(importlib.import_module(module), func) is cli.console
    proc = subprocess.run([sys.executable, "-m", "river.runtime.bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: river-bench")
    assert all(m in proc.stdout for m in ("--quick", "fixed@<g>", "draft-alone", "verify-river:k=<k>"))


def test_monotone_policy_never_raises_the_exit_layer(tiny, tiny_onnx, tmp_path):
    from river.compiler.compile import compile_river
    from river.runtime.generate import GenerationConfig
    from river.runtime.ort_backend import OrtBackend

    river = compile_river(tiny_onnx, tmp_path / "r", gates="0,2", river="int8", log=None)
    backend = OrtBackend(river, threads=1)
    gen = MonotoneGenerator(backend, tiny.tokenizer)
    # gate 1 (after layer 2) may fire, gate 0 never: the first exit at layer 3 must pin all later tokens
    gen.base_thresholds = np.array([DISABLED, FORCED_EXIT], np.float32)
    exits = [s.exit_layer for s in gen.generate("mono", GenerationConfig(max_new_tokens=10)).steps[1:]]
    assert exits == [3] * 9
    gen.base_thresholds = np.array([DISABLED, DISABLED], np.float32)
    exits = [s.exit_layer for s in gen.generate("mono", GenerationConfig(max_new_tokens=6)).steps[1:]]
    assert exits == [4] * 5
    assert all(a >= b for a, b in zip(exits, exits[1:]))


def test_quick_bench_runs_every_method(tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["--model", "tiny-random", "--quick", "--out", str(out), "--threads", "1",
                       "--humaneval", "1", "--math", "2", "--prompts", "2", "--new-tokens", "12"]) == 0
    data = json.loads((out / "bench.json").read_text())
    expected = {"full", "river:safe", "river:balanced", "river:fast", "fixed@1", "fixed@2", "monotone:balanced",
                "propagate:balanced", "uniform-int8", "uniform-int4", "draft-alone", "verify:k=3", "verify:k=4",
                "verify-river:k=4"}
    assert set(data["methods"]) == expected
    for name in ("verify:k=3", "verify:k=4", "verify-river:k=4", "full"):  # lossless methods
        assert data["methods"][name]["greedy_exact_match"] == 1.0
    assert data["settings"]["threads"] == 1 and "machine" in data["settings"]
    assert data["methods"]["draft-alone"]["role"] == QUANTIZED  # the draft graph, named for what it is
    md = (out / "report.md").read_text()
    assert md.startswith("# river-bench") and "- draft-alone (whole-model quantization): the verify draft graph" in md
    assert (out / "frontier.png").stat().st_size > 1000 and (out / "exits.png").is_file()
