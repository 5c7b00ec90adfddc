"""The benchmark's figures and how they are written: per-method speed and quality figures (with a
step-cost model fitted on the fixed-depth runs), ``bench.json``, ``report.md`` and two plots.

Speed: decode tokens/s = decode tokens / decode seconds, both summed over the same prompts (the
raw per-prompt pairs are kept in ``bench.json``); a speedup is the ratio of two such rates, the
method's over its speed reference's (the full model on the same runtime). Per-token step latency
percentiles are figures of their own, never divided into a speedup (a verify round emits several
tokens at once, which a per-token median misrepresents).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from river.runtime.bench.methods import EXITS, LOSSLESS, OTHER_RUNTIME, QUANTIZED, REFERENCE, Method


def fit_step_costs(results: dict, gates, L: int, families) -> dict[str, dict | None]:
    """Per River graph (``family``: its fixed-exit runs are ``fixed{family}@<g>``), the step cost of a
    token that exited after e backbone layers: t(e) = fixed + e * per_layer. per_layer is what a
    backbone layer costs more than its twin (backbone and twin costs always add up to L layers, so
    only their difference is identifiable); it is one slope for every graph (their layers and twins
    are the same), while each graph has its own intercept (its rivers' head may differ). The full
    run is the point e = L of the graph whose rivers end with the model's own head (family "")."""
    points = {f: [] for f in sorted(set(families) | {""})}  # family -> [(e, median step seconds)]
    points[""].append((L, statistics.median(results["full"]["decode_seconds"])))
    for f, pts in points.items():
        for g in gates:
            r = results.get(f"fixed{f}@{g}")
            if r and r["decode_seconds"]:
                pts.append((g + 1, statistics.median(r["decode_seconds"])))
    fitted = [f for f, pts in points.items() if pts]
    if not any(len({e for e, _ in points[f]}) >= 2 for f in fitted):  # nothing gives the slope
        return {f: None for f in points}
    rows = [([1.0 * (g == f) for g in fitted] + [float(e)], y) for f in fitted for e, y in points[f]]
    coef = np.linalg.lstsq(np.asarray([r for r, _ in rows]), np.asarray([y for _, y in rows]), rcond=None)[0]
    out = {f: None for f in points}
    for k, f in enumerate(fitted):
        out[f] = {"per_backbone_layer_over_twin_ms": coef[-1] * 1e3, "fixed_ms": coef[k] * 1e3, "points": len(points[f])}
    return out


def predicted_ms(costs: dict, e: int) -> float:
    """The fitted step cost of a token that exited after e backbone layers."""
    return costs["fixed_ms"] + e * costs["per_backbone_layer_over_twin_ms"]


def tokens_per_s(speed: list[dict]) -> float:
    """Decode tokens/s over per-prompt {"decode_tokens", "decode_seconds"} records: sum / sum."""
    return sum(x["decode_tokens"] for x in speed) / sum(x["decode_seconds"] for x in speed)


def per_pass(speed: list[dict], reference: list[dict], prompts: int) -> list[float]:
    """The speedup of each pass over the speed prompts (records in pass order, ``prompts`` a pass)
    against the reference's same pass: how much one pass's ratio moves on this machine."""
    if not prompts or len(speed) != len(reference) or len(speed) % prompts:
        return []  # records not in whole passes of the same prompts (hand-made results): no per-pass figure
    return [tokens_per_s(speed[i:i + prompts]) / tokens_per_s(reference[i:i + prompts])
            for i in range(0, len(speed), prompts)]


def summarize(results: dict, tf: dict, methods: dict[str, Method], gates, L: int, prompts: list[str]) -> dict:
    """Per method: speed (against its speed reference of the same run), quality and exit figures."""
    full_tokens = results["full"]["tokens"]
    rate = {name: tokens_per_s(r["speed"]) for name, r in results.items()}
    families = {m.cost_family for m in methods.values() if m.cost_family is not None}
    fits = fit_step_costs(results, gates, L, families)
    full_ms = statistics.median(results["full"]["decode_seconds"]) * 1e3  # a token that never exited costs this
    out = {}
    for name, r in results.items():
        ts = sorted(r["decode_seconds"])
        med = statistics.median(ts)
        p90 = ts[int(0.9 * (len(ts) - 1))]
        agree_overall, prefixes, exact = [], [], 0
        for prompt in prompts:
            a, b = r["tokens"][prompt], full_tokens[prompt]
            n = min(len(a), len(b))
            same = [a[i] == b[i] for i in range(n)]
            agree_overall += same + [False] * (max(len(a), len(b)) - n)
            prefixes.append(next((i for i, s in enumerate(same) if not s), n))
            exact += a == b
        speedup = rate[name] / rate[methods[name].speed_reference]
        theory = None
        costs = fits.get(methods[name].cost_family)
        timed = r.get("timed_exits", r["exits"])  # the exits of the timed steps: what the speed is compared with
        if costs and timed and methods[name].speed_reference == "full":
            theory = full_ms / float(np.mean([full_ms if e >= L else predicted_ms(costs, e) for e in timed]))
        hist = {}
        for e in r["exits"]:
            hist[e] = hist.get(e, 0) + 1
        nll, ref_nll = np.mean(tf[name]["nll"]), np.mean(tf["full"]["nll"])
        out[name] = {
            "role": methods[name].role, "about": methods[name].about,
            "speed_reference": methods[name].speed_reference,
            "decode_tokens": sum(x["decode_tokens"] for x in r["speed"]),
            "decode_seconds": sum(x["decode_seconds"] for x in r["speed"]),
            "decode_tokens_per_s": rate[name], "speed_per_prompt": r["speed"],
            "speedup_per_pass": per_pass(r["speed"], results[methods[name].speed_reference]["speed"], len(prompts)),
            "latency_ms_median": med * 1e3, "latency_ms_p90": p90 * 1e3,
            "speedup_vs_full": speedup, "theoretical_speedup": theory,
            "practical_over_theoretical": speedup / theory if theory else None,
            "teacher_forced_agreement": float(np.mean(tf[name]["agree"])),
            "teacher_forced_tokens": len(tf[name]["agree"]),
            "perplexity": float(np.exp(nll)), "perplexity_delta_pct": float((np.exp(nll) / np.exp(ref_nll) - 1) * 100),
            "greedy_agreement_overall": float(np.mean(agree_overall)) if agree_overall else None,
            "greedy_prefix_until_divergence_mean": float(np.mean(prefixes)) if prefixes else None,
            "greedy_exact_match": exact / len(prompts) if prompts else None,
            "humaneval_pass@1": float(np.mean(r["he"])) if r["he"] else None,
            "math_accuracy": float(np.mean(r["math"])) if r["math"] else None,
            "mean_layers_run": float(np.mean(r["exits"])) if r["exits"] else None,
            "exit_histogram": {str(k): v for k, v in sorted(hist.items())},
            "decode_steps": len(ts),
            "acceptance_rate": r["accepted"] / r["drafted"] if r.get("drafted") else None,
            "mean_accepted_per_round": r["accepted"] / r["rounds"] if r.get("rounds") else None,
        }
    if fits[""]:
        out["full"]["layer_costs"] = fits[""]
    for family, costs in fits.items():
        if family and costs:
            out["full"][f"layer_costs{family}"] = costs
    return out


def frontier_verdict(method: dict, competitors: list[dict]) -> str:
    """Plain words: does this lossy method earn its place against whole-model quantization?"""
    if method["speedup_vs_full"] <= 1.0:
        return f"slower than the full model ({method['speedup_vs_full']:.2f}x): no gain"
    dominated = [u for u in competitors if u["speedup_vs_full"] >= method["speedup_vs_full"]
                 and u["teacher_forced_agreement"] >= method["teacher_forced_agreement"]]
    if dominated:
        return "dominated by whole-model quantization (as fast or faster, and as good or better)"
    return "above the whole-model quantization frontier (no such point is both faster and better)"


def markdown(out: dict, plots: list[str]) -> str:
    s, m = out["settings"], out["methods"]

    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    def spread(r):  # several passes: the lowest and highest pass's speedup beside the whole run's
        passes = r.get("speedup_per_pass") or []
        return f" ({min(passes):.2f}-{max(passes):.2f})" if len(passes) > 1 else ""

    lines = [f"# river-bench: {s['model']}", "",
             f"{s['runtime']}, {s['threads']} threads, {s['machine']}; {s['prompts']} prompts x {s['new_tokens']} "
             f"new tokens, {s['humaneval']} HumanEval, {s['math']} math problems, calibration on {s['calibration_prompts']} "
             f"prompts (disjoint from evaluation); gates after layers {s['gates']}; {s['seconds']} s.", "",
             "| method | decode tok/s | step ms median | step ms p90 | speedup | vs | theoretical | TF agree | ppl Δ% | greedy agree | prefix | exact | HumanEval | math | layers run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in m.items():
        lines.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['latency_ms_median']:.1f} | {r['latency_ms_p90']:.1f} | "
                     f"{r['speedup_vs_full']:.2f}x{spread(r)} | {r['speed_reference']} | {f(r['theoretical_speedup'], '{:.2f}x')} | {r['teacher_forced_agreement'] * 100:.1f}% | "
                     f"{r['perplexity_delta_pct']:+.2f} | {f(r['greedy_agreement_overall'], '{:.1%}')} | {f(r['greedy_prefix_until_divergence_mean'], '{:.1f}')} | "
                     f"{f(r['greedy_exact_match'], '{:.0%}')} | {f(r['humaneval_pass@1'], '{:.0%}')} | {f(r['math_accuracy'], '{:.0%}')} | {f(r['mean_layers_run'], '{:.1f}')} |")
    lines += ["", "decode tok/s = decode tokens / decode seconds summed over the same prompts (EOS ignored, "
              f"{s['new_tokens']} tokens each); speedup = that rate / the rate of the method named under 'vs' "
              f"(the full model on the same runtime), over {s.get('passes', 1)} pass(es) of the prompts; with several, "
              "the lowest and highest pass's speedup follow it. TF agree = the share of "
              f"{m['full']['teacher_forced_tokens']} tokens (reference prose, then the full model's own continuations of the "
              "speed prompts, fed token by token) whose next-token choice equals the full model's; ppl over the prose. "
              "Step latencies are per emitted token (a verify round's "
              "time is shared among the tokens it emits)."]
    lines += ["", "## Methods", ""] + [f"- {name} ({r['role']}): {r['about']}" for name, r in m.items()]
    spec = {k: v for k, v in m.items() if v.get("acceptance_rate") is not None}
    if spec:
        lines += ["", "## Verify mode (lossless)", "", "| method | speedup | acceptance | mean accepted / round | exact match |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['speedup_vs_full']:.2f}x | {v['acceptance_rate']:.1%} | {v['mean_accepted_per_round']:.2f} | "
                  f"{f(v['greedy_exact_match'], '{:.0%}')} |" for k, v in spec.items()]
    competitors = {k: v for k, v in m.items() if v["role"] == QUANTIZED}
    lines += ["", "## Against the honest competitor", "",
              f"Each lossy exit policy against whole-model quantization ({', '.join(competitors) or 'none run'}):", ""]
    lines += [f"- {k}: {frontier_verdict(v, list(competitors.values()))}" for k, v in m.items() if v["role"] == EXITS]
    for key, costs in m.get("full", {}).items():
        if not key.startswith("layer_costs") or not costs:
            continue
        family = key[len("layer_costs"):]
        lines += ["", f"Step cost model of an exited token of the fixed{family}@ River graph (one slope fitted on every "
                  f"graph's fixed-exit runs and the full run, an intercept per graph): t(e) = {costs['fixed_ms']:.2f} ms + "
                  f"e x {costs['per_backbone_layer_over_twin_ms']:.3f} ms (e = backbone layers run; the slope is what a "
                  "backbone layer costs beyond its twin). 'theoretical' = full / mean t(e) over the exits the timed steps took "
                  "(a token that never exited costs full); "
                  "practical/theoretical below 1 is overhead beyond the fixed-depth paths."]
    lines += ["", f"Baselines: {s['baselines']}.", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


MARKERS = {REFERENCE: "x", OTHER_RUNTIME: "x", EXITS: "o", QUANTIZED: "s", LOSSLESS: "^"}


def _save(fig, path: Path) -> str:
    """Lay out, write and close a figure; returns its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def make_plots(summary: dict, out: Path) -> list[str]:
    """The speed/quality frontier and, where methods exit, the histogram of exit layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, m in summary.items():
        ax.scatter(m["speedup_vs_full"], m["teacher_forced_agreement"] * 100, marker=MARKERS[m["role"]])
        ax.annotate(name, (m["speedup_vs_full"], m["teacher_forced_agreement"] * 100), fontsize=7)
    ax.set_xlabel("decode speedup vs full model (same run)")
    ax.set_ylabel("teacher-forced next-token agreement (%)")
    ax.set_title("speed / quality frontier")
    ax.grid(alpha=0.3)
    files.append(_save(fig, out / "frontier.png"))
    with_exits = {k: v for k, v in summary.items() if v["exit_histogram"]}
    if with_exits:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(with_exits)
        for i, (name, m) in enumerate(with_exits.items()):
            xs = [int(k) for k in m["exit_histogram"]]
            total = sum(m["exit_histogram"].values())
            ax.bar([x + i * width for x in xs], [v / total for v in m["exit_histogram"].values()], width, label=name)
        ax.set_xlabel("layers run (exit layer)")
        ax.set_ylabel("share of decode steps")
        ax.legend(fontsize=6)
        files.append(_save(fig, out / "exits.png"))
    return files


def write(out: dict, folder: Path) -> Path:
    """``bench.json``, the plots and ``report.md`` into ``folder``; returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(out, indent=2))
    path = folder / "report.md"
    path.write_text(markdown(out, make_plots(out["methods"], folder)))
    return path
