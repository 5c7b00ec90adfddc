"""river-bench: the arithmetic of its figures, the baseline policies, and a --quick run end to end."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from river.compiler.river.manifest import DISABLED
from river.errors import RiverError
from river.runtime.bench import cli, report
from river.runtime.bench.eval_data import last_number
from river.runtime.bench.methods import EXITS, LOSSLESS, QUANTIZED, REFERENCE, Method, MonotoneGenerator


def fake_results(times, exits=None, tokens=None, speed=None):
    speed = speed or [{"decode_tokens": len(times), "decode_seconds": sum(times)}]
    return {"decode_seconds": times, "exits": exits or [], "tokens": tokens or {"p": [1, 2, 3, 4]}, "he": [True, False],
            "math": [True], "speed": speed}


def recomputed_speedup(method: dict, reference: dict) -> float:
    """The speedup from the raw per-prompt decode tokens and seconds of bench.json."""
    def rate(m):
        return sum(x["decode_tokens"] for x in m["speed_per_prompt"]) / sum(x["decode_seconds"] for x in m["speed_per_prompt"])
    return rate(method) / rate(reference)


def test_speedup_is_a_ratio_of_tokens_per_second_not_of_median_latencies():
    """A verify-like method: most tokens cheap (accepted drafts share a round), a few slow: its median
    step is 2x faster, but over the same tokens it is only 1.1x; the report must say 1.1x."""
    full = fake_results([0.010] * 10, speed=[{"decode_tokens": 10, "decode_seconds": 0.10}])
    fast = [0.005] * 6 + [0.0302] * 2
    other = fake_results(fast, speed=[{"decode_tokens": 8, "decode_seconds": 0.05}, {"decode_tokens": 2, "decode_seconds": 0.0409}])
    tf = {k: {"agree": [True], "nll": [1.0]} for k in ("full", "verify:k=4")}
    methods = {"full": Method(None, REFERENCE, "reference"), "verify:k=4": Method(None, LOSSLESS, "verify")}
    s = report.summarize({"full": full, "verify:k=4": other}, tf, methods, [], 10, ["p"])
    v = s["verify:k=4"]
    assert np.isclose(v["latency_ms_median"], 5.0) and np.isclose(s["full"]["latency_ms_median"], 10.0)
    assert np.isclose(v["speedup_vs_full"], (10 / 0.0909) / (10 / 0.10))  # 1.10x, not the medians' 2x
    assert np.isclose(v["speedup_vs_full"], recomputed_speedup(v, s["full"]))
    assert v["decode_tokens"] == 10 and np.isclose(v["decode_tokens_per_s"], 10 / 0.0909)


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


def test_each_river_graph_has_its_own_step_cost_model():
    """fixed@ and fixed-qhead@ runs come from two River graphs (the second with a cheaper head for exited
    tokens): each graph's methods are predicted by the fit on its own fixed-exit runs."""
    L, gates = 10, [3, 6]
    # head 5 ms in the first graph, 2 ms for exited tokens in the second: t(e) = 15 + e and 12 + e (e < L)
    results = {"full": fake_results([0.025] * 5),
               "fixed@3": fake_results([0.019] * 5, exits=[4] * 5), "fixed@6": fake_results([0.022] * 5, exits=[7] * 5),
               "fixed-qhead@3": fake_results([0.016] * 5, exits=[4] * 5),
               "fixed-qhead@6": fake_results([0.019] * 5, exits=[7] * 5),
               "river-qhead:fast": {**fake_results([0.0175] * 5, exits=[4, 7] * 2 + [4] + [10] * 5),
                                    "timed_exits": [4, 7] * 2 + [4]}}  # the timed steps exit; later untimed ones not
    tf = {k: {"agree": [True], "nll": [1.0]} for k in results}
    methods = {"full": Method(None, REFERENCE, "reference")}
    methods.update({k: Method(None, EXITS, k, cost_family="-qhead" if "qhead" in k else "") for k in results if k != "full"})
    s = report.summarize(results, tf, methods, gates, L, ["p"])
    assert np.allclose([s["full"]["layer_costs"]["fixed_ms"], s["full"]["layer_costs-qhead"]["fixed_ms"]], [15, 12])
    assert np.isclose(s["fixed-qhead@3"]["theoretical_speedup"], 25 / 16)
    expected = 25 / np.mean([12 + e for e in [4, 7, 4, 7, 4]])  # not the first graph's 25 / mean(15 + e)
    assert s["river-qhead:fast"]["mean_layers_run"] == np.mean([4, 7, 4, 7, 4] + [10] * 5)  # over every step
    assert np.isclose(s["river-qhead:fast"]["theoretical_speedup"], expected)


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
    """Thresholds at which the plain River policy exits after layer 0 on some tokens and runs all 4
    layers on later ones: the monotone policy starts alike, then never rises again, so it differs."""
    from river.compiler.compile import compile_river
    from river.runtime.generate import GenerationConfig, Generator
    from river.runtime.ort_backend import OrtBackend

    river = compile_river(tiny_onnx, tmp_path / "r", gates="0,2", river="int8", log=None)
    backend = OrtBackend(river, threads=1)
    cfg = GenerationConfig(max_new_tokens=16, eos_token_ids=[])

    def exits(gen, thresholds):
        if isinstance(gen, MonotoneGenerator):
            gen.base_thresholds = thresholds
        else:
            backend.set_thresholds(thresholds)
        return [s.exit_layer for s in gen.generate("mono", cfg).steps[1:]]

    plain, mono = Generator(backend, tiny.tokenizer), MonotoneGenerator(backend, tiny.tokenizer)
    for t in (0.0, 0.05, 0.1, -0.1, 0.15):  # gate 0 at a threshold where it fires on some tokens only
        thresholds = np.array([t, 0.7], np.float32)
        free = exits(plain, thresholds)
        if any(a < b for a, b in zip(free, free[1:])):
            break
    else:
        raise AssertionError(f"no threshold makes the plain policy's exit layer rise: {free}")
    pinned = exits(mono, thresholds)
    assert all(a >= b for a, b in zip(pinned, pinned[1:])), pinned
    assert pinned != free and min(pinned) == 1 and pinned[0] == free[0], (pinned, free)
    first = free.index(min(free))
    assert pinned[:first + 1] == free[:first + 1] and set(pinned[first:]) == {1}  # pinned from the first exit on
    assert exits(mono, np.array([DISABLED, DISABLED], np.float32)) == [4] * 15  # nothing to pin: full depth


def test_quick_bench_runs_every_method(tiny, tmp_path, monkeypatch):
    from river.runtime.bench import run as bench_run

    raw = {}  # the per-prompt results the figures are computed from

    def evaluate(*args, **kwargs):
        raw["results"], raw["tf"], raw["prompts"] = found = evaluate_orig(*args, **kwargs)
        return found

    evaluate_orig = bench_run.evaluate
    monkeypatch.setattr(bench_run, "evaluate", evaluate)
    out = tmp_path / "bench"
    assert cli.main(["--model", "tiny-random", "--quick", "--out", str(out), "--threads", "1",
                       "--humaneval", "1", "--math", "2", "--prompts", "2", "--new-tokens", "12", "--passes", "2"]) == 0
    data = json.loads((out / "bench.json").read_text())
    check_figures_from_raw_results(tiny, data, raw, out)
    expected = {"full", "river:safe", "river:balanced", "river:fast", "fixed@1", "fixed@2", "monotone:balanced",
                "propagate:balanced", "uniform-int8", "uniform-int4", "draft-alone", "verify:k=3", "verify:k=4",
                "verify:k~4", "verify-river:k=4", "full-torch", "river-torch:balanced", "mask:balanced", "recompute:balanced",
                "river-qhead:safe", "river-qhead:balanced", "river-qhead:fast", "fixed-qhead@1", "fixed-qhead@2",
                "full-segmented", "river-recall:safe-recall", "river-recall:balanced-recall", "river-recall:fast-recall",
                "river-kv32:safe", "river-kv32:balanced", "river-kv32:fast", "fixed-kv32@1", "fixed-kv32@2",
                "river-recall-kv32:safe-recall", "river-recall-kv32:balanced-recall", "river-recall-kv32:fast-recall",
                "river-recall-early:safe-recall", "river-recall-early:balanced-recall", "river-recall-early:fast-recall"}
    assert set(data["methods"]) == expected
    assert data["methods"]["full-segmented"]["greedy_exact_match"] == 1.0  # the segments, every gate off
    m = data["methods"]
    for name, r in m.items():  # every speedup is the tokens/s ratio recomputed from the raw per-prompt figures
        ref = m[r["speed_reference"]]
        assert len(r["speed_per_prompt"]) == 4 and all(x["decode_tokens"] == 11 for x in r["speed_per_prompt"])
        assert np.isclose(r["speedup_vs_full"], recomputed_speedup(r, ref), rtol=1e-9)
        for i, ratio in enumerate(r["speedup_per_pass"]):  # 2 passes of 2 prompts, each against the same pass
            one = {"speed_per_prompt": r["speed_per_prompt"][2 * i:2 * i + 2]}
            assert np.isclose(ratio, recomputed_speedup(one, {"speed_per_prompt": ref["speed_per_prompt"][2 * i:2 * i + 2]}))
        assert len(r["speedup_per_pass"]) == 2
    for name in ("mask:balanced", "recompute:balanced", "river-torch:balanced"):
        assert m[name]["speed_reference"] == "full-torch" and m[name]["role"] == EXITS
    assert m["full-torch"]["greedy_exact_match"] == 1.0  # the same model in torch
    for name in ("verify:k=3", "verify:k=4", "verify:k~4", "verify-river:k=4", "full"):  # lossless methods
        assert data["methods"][name]["greedy_exact_match"] == 1.0
    assert data["settings"]["threads"] == 1 and "machine" in data["settings"] and data["settings"]["passes"] == 2
    assert data["methods"]["draft-alone"]["role"] == QUANTIZED  # the draft graph, named for what it is
    md = (out / "report.md").read_text()
    assert md.startswith("# river-bench") and "- draft-alone (whole-model quantization): the verify draft graph" in md
    assert (out / "frontier.png").stat().st_size > 1000 and (out / "exits.png").is_file()


def check_figures_from_raw_results(tiny, data: dict, raw: dict, out: Path) -> None:
    """bench.json's quality figures against the raw per-prompt results, recomputed here; "full" against
    a plain greedy Generator over the exported step graph (with math answers graded here); the
    calibration fields against the calibrated graph's own files."""
    from collections import Counter

    from river.compiler.river.manifest import RiverManifest
    from river.export.store import exported_model_path
    from river.runtime.bench.eval_data import MATH_PROBLEMS, humaneval_problems
    from river.runtime.bench.eval_data import REFERENCE_TEXT
    from river.runtime.bench.run import HUMANEVAL_STOP, TEACHER_FORCED_PREFIX, teacher_forced
    from river.runtime.generate import GenerationConfig, Generator
    from river.runtime.ort_backend import OrtBackend

    results, tf, prompts = raw["results"], raw["tf"], raw["prompts"]
    full = results["full"]["tokens"]
    for name, r in data["methods"].items():
        got = results[name]
        pairs = [(a, b) for p in prompts for a, b in zip(got["tokens"][p], full[p])]
        assert all(len(got["tokens"][p]) == len(full[p]) == 12 for p in prompts)
        assert np.isclose(r["greedy_agreement_overall"], np.mean([a == b for a, b in pairs]))
        assert r["greedy_exact_match"] == sum(got["tokens"][p] == full[p] for p in prompts) / len(prompts)
        assert r["teacher_forced_agreement"] == sum(map(bool, tf[name]["agree"])) / len(tf[name]["agree"])
        assert len(got["he"]) == 1 and r["humaneval_pass@1"] == sum(map(bool, got["he"])) / 1
        assert len(got["math"]) == 2 and r["math_accuracy"] == sum(map(bool, got["math"])) / 2
        assert r["exit_histogram"] == {str(e): c for e, c in sorted(Counter(got["exits"]).items())}
        exits = got["exits"]
        assert r["mean_layers_run"] is None if not exits else np.isclose(r["mean_layers_run"], sum(exits) / len(exits))
    assert data["methods"]["fixed@1"]["exit_histogram"] == {"2": len(results["fixed@1"]["exits"])}
    plain = Generator(OrtBackend(exported_model_path("tiny-random"), threads=1), tiny.tokenizer,
                      tiny.config.eos_token_ids)
    # teacher-forced scoring: the prose after its prefix, then each prompt's 12 tokens the full model chose
    prose = sum(len(tiny.tokenizer(t)["input_ids"]) - TEACHER_FORCED_PREFIX for t in REFERENCE_TEXT)
    for name, r in data["methods"].items():
        assert r["teacher_forced_tokens"] == len(tf[name]["agree"]) == prose + 12 * len(prompts)
        assert len(tf[name]["nll"]) == prose  # perplexity: the prose only
    uniform = Generator(OrtBackend(out / "graphs" / "uniform-int4" / "model.onnx", threads=1), tiny.tokenizer)
    agree = []
    for p in prompts:  # the continuations' part, recomputed from outside the bench
        ids = plain.encode(p) + full[p]
        rows = [teacher_forced(g, ids, len(ids) - 12) for g in (plain, uniform)]
        agree += list(rows[0].argmax(-1) == rows[1].argmax(-1))
    assert list(map(bool, tf["uniform-int4"]["agree"][prose:])) == agree
    for p in prompts:  # the reference itself, from outside the bench
        assert full[p] == plain.generate(p, GenerationConfig(max_new_tokens=12, eos_token_ids=[])).token_ids, p
    for (question, answer), graded in zip(MATH_PROBLEMS[:2], results["full"]["math"]):
        text = plain.generate(question + " Answer with the final number.", GenerationConfig(max_new_tokens=48)).text
        numbers = re.findall(r"-?[0-9]+(?:[.][0-9]+)?", text.replace(",", ""))
        assert graded == (bool(numbers) and float(numbers[-1]) == answer), text
    problem = humaneval_problems(1)[0]
    completion = plain.generate(problem["prompt"], GenerationConfig(max_new_tokens=64, stop=HUMANEVAL_STOP), chat=False)
    try:  # a program that does not even compile cannot pass
        compile(problem["prompt"] + completion.text + "\n" + problem["test"], "humaneval", "exec")
    except (SyntaxError, ValueError):
        assert results["full"]["he"] == [False]
    river_dir = next((out / "graphs").glob("river-int8-cal*"))
    settings = data["settings"]
    assert settings["calibration_fits"] == json.loads((river_dir / "calibration.json").read_text())["fits"]
    assert settings["operating_points"] == RiverManifest.load(river_dir).operating_points
    assert settings["gates"] == RiverManifest.load(river_dir).gates and settings["calibration_prompts"] == 4


def _teacher_forced_steps(backend, ids, exits_at=()):
    """Logits of each decode step over ``ids`` (prefill of 3), the exit forced at gate 0 on the steps
    listed in ``exits_at`` (indices into ids), every gate off otherwise. Returns (rows, cache)."""
    gates = backend.gate_thresholds
    cache = backend.new_cache(len(ids))
    backend.prefill(np.asarray([ids[:3]]), cache)
    cache.length = 3
    rows = {}
    for i in range(3, len(ids)):
        if gates is not None:
            gates.set(gates.forced(0) if i in exits_at else gates.disabled())
        rows[i] = backend.decode(np.asarray([[ids[i]]]), cache)[0, -1].copy()
        cache.length += 1
    return rows, cache


def test_kv_absence_baselines(tiny):
    """mask (D-LLM) and recompute (EE-LLM) on the torch reference: gates off they are the full model;
    an exited token leaves holes in the layers above its exit; mask keeps them (masked, never written),
    recompute fills them at the next full-depth step from the exited token's own exit state, which
    (the layers below the exit being exact) makes that step's logits the full model's."""
    from river.compiler.river.manifest import RiverInfo
    from river.runtime.bench.baselines import ExitWithoutTwinsBackend
    from river.runtime.torch_backend import TorchBackend

    ids = [5, 17, 42, 7, 99, 3, 64, 11]
    info = RiverInfo((0, 2), "full", "int8")
    full, _ = _teacher_forced_steps(TorchBackend(tiny.model), ids)
    backends = {p: ExitWithoutTwinsBackend(tiny.model, info, p) for p in ("mask", "recompute")}
    for b in backends.values():  # gates off: the full model
        rows, _ = _teacher_forced_steps(b, ids)
        assert all(np.allclose(rows[i], full[i], atol=1e-4) for i in rows)
    exits = (4, 5)  # two tokens exit after layer 0 (layers 1..3 skipped), then full depth from 6 on
    mask_rows, mask_cache = _teacher_forced_steps(backends["mask"], ids, exits)
    state = backends["mask"].states[id(mask_cache)]
    for l in (1, 2, 3):
        assert not state.valid[l, 4:6].any() and state.valid[l, 6:8].all()
        assert not mask_cache.keys[l][:, :, 4:6].any()  # never written
    assert state.valid[0, :8].all()
    assert not np.allclose(mask_rows[6], full[6], atol=1e-3)  # the holes change what later tokens see
    rec = backends["recompute"]
    rec.recomputed = 0
    rec_rows, rec_cache = _teacher_forced_steps(rec, ids, exits)
    assert rec.recomputed == 2 * 3  # two exited tokens x three skipped layers, once each
    assert rec.states[id(rec_cache)].filled == [8] * 4  # no holes left
    assert np.allclose(rec_rows[6], full[6], atol=1e-4) and np.allclose(rec_rows[7], full[7], atol=1e-4)
    assert not np.allclose(rec_rows[4], full[4], atol=1e-3)  # the exited token itself is early-exit output


def test_methods_are_chosen_by_name_or_pattern_with_their_speed_references():
    from river.runtime.bench.run import selected

    names = ["full", "river-qhead:safe", "river-qhead:fast", "river-recall:safe-recall",
             "river-recall-kv32:safe-recall", "full-torch", "mask:balanced"]
    methods = {n: Method(None, EXITS, n, speed_reference="full-torch" if n == "mask:balanced" else "full") for n in names}
    assert list(selected(methods, {"river-recall:*"})) == ["full", "river-recall:safe-recall"]
    assert list(selected(methods, {"river-qhead:safe", "mask:*"})) == ["full", "river-qhead:safe", "full-torch",
                                                                        "mask:balanced"]
    with pytest.raises(RiverError, match="no method is named river-qhaed:safe"):
        selected(methods, {"river-qhaed:safe", "full"})


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_passes_is_one_error_before_anything_runs(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", "tiny-random", "--out", str(tmp_path / "bench"), "--passes", bad])
    assert exc.value.code == 2 and "1 or more" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
