"""``river-bench``: speed and quality of River against the full model and the known alternatives,
in one process, one run, on the same prompts, runtime and thread count.

Methods (all over ONNX Runtime CPU with shared KV buffers):
  full                   the step graph, no exits (the reference)
  river:<op>             River graph, calibrated thresholds of operating point <op> (safe/balanced/fast)
  fixed@<g>              every decode token exits after layer g (a fixed exit depth)
  monotone:<op>          SkipDecode-style policy: once a token exits at a gate, later tokens exit there too
  propagate:<op>         CALM-style: skipped layers' K/V projected from the exit state (kv twins), calibrated
  uniform-int8/int4      the whole model quantized like the twins, no exits (the honest competitor)
  uniform-nbits8         the verify draft graph alone: every GEMM + head as 8-bit MatMulNBits (lossy)
  verify:k=<k>           lossless River: the draft graph (8-bit twins of every layer) drafts k tokens
                         over the shared KV, the backbone verifies (output = full model's)
  verify-river:k=<k>     the same with the River graph's own exit (first gate) as the draft
Not implemented here (reported as such): mask (D-LLM), recompute (EE-LLM).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from river.compiler.river_pass import DISABLED
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend
from river.runtime.sampling import softmax


# --- methods -------------------------------------------------------------------------------------
class MonotoneGenerator(Generator):
    """SkipDecode's rule over a River graph: the exit layer never increases along the sequence."""

    def generate(self, *args, **kwargs):
        self.backend.set_thresholds(self.base_thresholds)
        return super().generate(*args, **kwargs)

    def decode_one_token(self, token, cache):
        row = super().decode_one_token(token, cache)
        gates = self.backend.river["gates"]
        exit_layer = self.backend.last_exit_layer
        if exit_layer is not None and exit_layer - 1 in gates:
            forced = self.backend.thresholds.copy()
            forced[gates.index(exit_layer - 1)] = -2.0
            self.backend.set_thresholds(forced)
        return row


def teacher_forced(gen: Generator, ids: list[int], prefix: int = 8) -> np.ndarray:
    """Logits rows [len(ids)-prefix, V] predicting ids[prefix:], each step fed the reference token."""
    cache = gen.backend.new_cache(len(ids) + 1)
    rows = [gen.prefill(ids[:prefix], cache).copy()]
    for tok in ids[prefix:-1]:
        rows.append(gen.decode_one_token(tok, cache).copy())
    return np.stack(rows)


def last_number(text: str):
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(found[-1]) if found else None


# --- the benchmark -------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(prog="river-bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="model name, .gguf, HF directory (exported once)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report folder (graphs cached inside)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gates", default=None, help="gate layers (default auto)")
    p.add_argument("--quick", action="store_true", help="few prompts and tokens: every method, minutes not hours")
    p.add_argument("--prompts", type=int, help="free-running prompts (default 12, quick 3)")
    p.add_argument("--new-tokens", type=int, help="tokens per free-running prompt (default 64, quick 24)")
    p.add_argument("--humaneval", type=int, help="HumanEval problems (default 20, quick 3)")
    p.add_argument("--math", type=int, help="math word problems (default 20, quick 4)")
    p.add_argument("--calibration", type=int, help="calibration prompts (default 16, quick 4)")
    p.add_argument("--methods", help="comma-separated subset of methods to run")
    return p


def main(argv=None, shared_pool: bool = False) -> int:
    """``shared_pool``: the process is ours (the installed command): one ORT thread pool for all sessions."""
    args = build_parser().parse_args(argv)
    q = args.quick
    n_prompts = args.prompts or (3 if q else 12)
    n_tokens = args.new_tokens or (24 if q else 64)
    n_he = args.humaneval if args.humaneval is not None else (3 if q else 20)
    n_math = args.math if args.math is not None else (4 if q else 20)
    n_cal = args.calibration or (4 if q else 16)
    if shared_pool:  # verify mode alternates two sessions: one pool for all
        from river.compiler.ort_session import use_shared_thread_pool

        use_shared_thread_pool(args.threads)
    try:
        report = run(args, n_prompts, n_tokens, n_he, n_math, n_cal)
    except Exception as exc:  # a bench that dies mid-way still says why
        from river.errors import RiverError

        if isinstance(exc, RiverError):
            print(f"river-bench: error: {exc}", file=sys.stderr)
            return 2
        raise
    print(report["markdown_path"])
    return 0


def prepare(args, n_cal, log=sys.stderr):
    """Step graph, calibrated River graphs (int8 full twins; kv twins), uniform int8/int4 graphs."""
    from river.compiler.calibration_data import CALIBRATION_PROMPTS
    from river.compiler.compile import compile_river
    from river.compiler.graph_io import load_onnx, save_onnx_atomic
    from river.compiler.uniform_quant import uniform_quantized
    from river.export.store import exported_model_path

    step = exported_model_path(args.model)
    graphs = args.out / "graphs"
    graphs.mkdir(parents=True, exist_ok=True)
    cal = CALIBRATION_PROMPTS[:n_cal]
    paths = {"step": step}
    for name, river in (("river-int8", "int8"), ("river-kv", "kv")):
        out = graphs / f"{name}-cal{n_cal}"
        if not (out / "model.onnx").is_file():
            print(f"[bench] compiling + calibrating {name} ...", file=log, flush=True)
            compile_river(step, out, gates=args.gates, river=river, calibrate=cal, budget="balanced",
                          threads=args.threads, log=log)
        paths[name] = out / "model.onnx"
    for precision in ("int8", "int4"):
        out = graphs / f"uniform-{precision}" / "model.onnx"
        if not out.is_file():
            print(f"[bench] quantizing the whole model ({precision}) ...", file=log, flush=True)
            save_onnx_atomic(uniform_quantized(load_onnx(step), precision), out)
        paths[f"uniform-{precision}"] = out
    return paths


def run(args, n_prompts, n_tokens, n_he, n_math, n_cal) -> dict:
    from tqdm import tqdm

    from river.runtime.eval_data import EVAL_PROMPTS, MATH_PROBLEMS, REFERENCE_TEXT, humaneval_problems
    from river.runtime.humaneval_exec import passes
    from river.runtime.loading import open_generator
    from river.compiler.ort_session import shared_thread_pool
    from river.runtime.speculative import SpeculativeGenerator

    t_start = time.time()
    paths = prepare(args, n_cal)
    full = open_generator(str(paths["step"]), threads=args.threads)
    tok, eos = full.tokenizer, full.eos_token_ids
    calib = {name: json.loads((Path(paths[name]).parent / "river.json").read_text()) for name in ("river-int8", "river-kv")}
    ops = calib["river-int8"]["operating_points"]
    gates = calib["river-int8"]["gates"]
    L = calib["river-int8"]["num_layers"]

    river_backend = OrtBackend(paths["river-int8"], threads=args.threads)
    kv_backend = OrtBackend(paths["river-kv"], threads=args.threads)
    river = Generator(river_backend, tok, eos)
    propagate = Generator(kv_backend, tok, eos)
    monotone = MonotoneGenerator(river_backend, tok, eos)
    methods: dict[str, tuple] = {"full": (full, None, None)}
    for op, thr in ops.items():
        methods[f"river:{op}"] = (river, river_backend, thr)
    for i, g in enumerate(gates):
        methods[f"fixed@{g}"] = (river, river_backend, [(-2.0 if j == i else DISABLED) for j in range(len(gates))])
    monotone.base_thresholds = np.asarray(ops["balanced"], np.float32)
    methods["monotone:balanced"] = (monotone, river_backend, ops["balanced"])
    methods["propagate:balanced"] = (propagate, kv_backend, calib["river-kv"]["operating_points"]["balanced"])
    for precision in ("int8", "int4"):
        uniform = open_generator(str(paths[f"uniform-{precision}"]), threads=args.threads, tokenizer=str(Path(paths["step"]).parent))
        uniform.eos_token_ids = eos
        methods[f"uniform-{precision}"] = (uniform, None, None)
    from river.runtime.draft_model import verify_pair

    _, draft_path = verify_pair(paths["step"], -1)
    draft_alone = Generator(OrtBackend(draft_path, threads=args.threads), tok, eos)
    methods["uniform-nbits8"] = (draft_alone, None, None)
    draft_backend = OrtBackend(draft_path, threads=args.threads if shared_thread_pool() else 1, single_token=True)
    for k in (3, 4):
        spec = SpeculativeGenerator(full.backend, tok, eos, draft=draft_backend, k=k)
        methods[f"verify:k={k}"] = (spec, None, None)
    spec = SpeculativeGenerator(river_backend, tok, eos, draft_gate=0, k=4)
    methods["verify-river:k=4"] = (spec, river_backend, None)
    if args.methods:
        keep = set(args.methods.split(",")) | {"full"}
        methods = {k: v for k, v in methods.items() if k in keep}

    def use(name):
        gen, backend, thr = methods[name]
        if backend is not None:
            backend.set_thresholds(thr if thr is not None else [DISABLED] * len(gates))
        return gen

    results = {name: {"decode_seconds": [], "exits": [], "tokens": {}, "he": [], "math": []} for name in methods}
    cfg = GenerationConfig(max_new_tokens=n_tokens)
    prompts = EVAL_PROMPTS[:n_prompts]
    he = humaneval_problems(n_he) if n_he else []
    math = MATH_PROBLEMS[:n_math]
    total = len(methods) * (len(prompts) + len(he) + len(math) + len(REFERENCE_TEXT))
    bar = tqdm(total=total, desc="river-bench", unit="run", file=sys.stderr)
    # warm-up, untimed
    for name in methods:
        use(name).generate("warm up", GenerationConfig(max_new_tokens=4))

    def record(name, result):
        r = results[name]
        stats = getattr(methods[name][0], "stats", None)
        if stats is not None and stats.rounds:  # verify mode: acceptance of the river's drafts
            r["drafted"] = r.get("drafted", 0) + stats.drafted
            r["accepted"] = r.get("accepted", 0) + stats.accepted
            r["rounds"] = r.get("rounds", 0) + stats.rounds
        r["decode_seconds"] += [s.seconds for s in result.steps if s.phase == "decode"]
        r["exits"] += [s.exit_layer for s in result.steps if s.phase == "decode" and s.exit_layer is not None]

    for i, prompt in enumerate(prompts):  # interleaved: machine noise hits every method alike
        for name in methods:
            res = use(name).generate(prompt, cfg)
            record(name, res)
            results[name]["tokens"][prompt] = res.token_ids
            bar.update()
    he_cfg = GenerationConfig(max_new_tokens=128 if not args.quick else 64, stop=["\ndef ", "\nclass ", "\nif __name__", "\nprint("])
    for problem in he:
        for name in methods:
            res = use(name).generate(problem["prompt"], he_cfg, chat=False)
            record(name, res)
            results[name]["he"].append(passes(problem, res.text))
            bar.update()
    math_cfg = GenerationConfig(max_new_tokens=96 if not args.quick else 48)
    for question, answer in math:
        for name in methods:
            res = use(name).generate(question + " Answer with the final number.", math_cfg)
            record(name, res)
            got = last_number(res.text)
            results[name]["math"].append(got is not None and abs(got - answer) < 1e-6)
            bar.update()
    # teacher-forced agreement and perplexity on reference prose
    tf = {name: {"agree": [], "nll": []} for name in methods}
    for text in REFERENCE_TEXT:
        ids = tok(text)["input_ids"]
        ref_rows = teacher_forced(use("full"), ids)
        for name in methods:
            gen = use(name)
            rows = ref_rows if name.startswith("verify") or name == "full" else teacher_forced(gen, ids)
            targets = np.asarray(ids[8:])
            tf[name]["agree"] += list(rows.argmax(-1) == ref_rows.argmax(-1))
            logp = np.log(np.maximum(np.stack([softmax(r) for r in rows]), 1e-30))
            tf[name]["nll"] += list(-logp[np.arange(len(targets)), targets])
            bar.update()
    bar.close()

    summary = summarize(results, tf, methods, gates, L, prompts)
    meta = {"model": args.model, "runtime": f"onnxruntime {__import__('onnxruntime').__version__} CPU",
            "threads": args.threads, "machine": f"{platform.machine()} {platform.processor() or ''} ({platform.node()}), "
            f"{__import__('os').cpu_count()} cores", "python": platform.python_version(),
            "prompts": len(prompts), "new_tokens": n_tokens, "humaneval": len(he), "math": len(math),
            "calibration_prompts": n_cal, "gates": gates, "operating_points": ops,
            "calibration_fits": json.loads((Path(paths["river-int8"]).parent / "calibration.json").read_text())["fits"],
            "seconds": round(time.time() - t_start, 1), "not_implemented": ["mask (D-LLM)", "recompute (EE-LLM)"],
            "quick": bool(args.quick)}
    out = {"settings": meta, "methods": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(out, indent=2))
    plots = make_plots(summary, args.out)
    md = markdown(out, plots)
    (args.out / "report.md").write_text(md)
    print(md)
    return {"markdown_path": str(args.out / "report.md"), **out}


def summarize(results, tf, methods, gates, L, prompts) -> dict:
    full_times = results["full"]["decode_seconds"]
    full_med = statistics.median(full_times)
    full_tokens = results["full"]["tokens"]
    # Step cost as a function of the layers run e: t(e) = fixed + e * per_layer, where per_layer is
    # what a backbone layer costs more than its twin (backbone and twin costs always add up to L
    # layers, so only their difference is identifiable), fitted on the full and fixed-depth runs.
    es, ys = [L], [full_med]
    for g in gates:
        name = f"fixed@{g}"
        if name in results and results[name]["decode_seconds"]:
            es.append(g + 1)
            ys.append(statistics.median(results[name]["decode_seconds"]))
    costs = None
    if len(set(es)) >= 2:
        per_layer, fixed = np.polyfit(np.asarray(es, float), np.asarray(ys, float), 1)
        costs = {"per_backbone_layer_over_twin_ms": per_layer * 1e3, "fixed_ms": fixed * 1e3, "points": len(es)}
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
        theory = None
        if costs and r["exits"]:
            predict = lambda e: costs["fixed_ms"] + e * costs["per_backbone_layer_over_twin_ms"]  # noqa: E731
            theory = predict(L) / float(np.mean([predict(e) for e in r["exits"]]))
        hist = {}
        for e in r["exits"]:
            hist[e] = hist.get(e, 0) + 1
        nll, ref_nll = np.mean(tf[name]["nll"]), np.mean(tf["full"]["nll"])
        out[name] = {
            "decode_tokens_per_s": len(ts) / sum(ts), "latency_ms_median": med * 1e3, "latency_ms_p90": p90 * 1e3,
            "speedup_vs_full": full_med / med, "theoretical_speedup": theory,
            "practical_over_theoretical": (full_med / med) / theory if theory else None,
            "teacher_forced_agreement": float(np.mean(tf[name]["agree"])),
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
    if costs:
        out["full"]["layer_costs"] = costs
    return out


def _save(fig, path: Path) -> str:
    """Lay out, write and close a figure; returns its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def make_plots(summary, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, m in summary.items():
        style = "o" if name.startswith("river") else "s" if name.startswith("uniform") else "^" if name.startswith("verify") else "x"
        ax.scatter(m["speedup_vs_full"], m["teacher_forced_agreement"] * 100, marker=style)
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


def frontier_verdict(method: dict, uniform: list[dict]) -> str:
    """Plain words: does this lossy method earn its place against whole-model quantization?"""
    if method["speedup_vs_full"] <= 1.0:
        return f"slower than the full model ({method['speedup_vs_full']:.2f}x): no gain"
    dominated = [u for u in uniform if u["speedup_vs_full"] >= method["speedup_vs_full"]
                 and u["teacher_forced_agreement"] >= method["teacher_forced_agreement"]]
    if dominated:
        return "dominated by uniform quantization (as fast or faster, and as good or better)"
    return "above the uniform-quantization frontier (no uniform point is both faster and better)"


def markdown(out: dict, plots: list[str]) -> str:
    s, m = out["settings"], out["methods"]

    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    lines = [f"# river-bench: {s['model']}", "",
             f"{s['runtime']}, {s['threads']} threads, {s['machine']}; {s['prompts']} prompts x {s['new_tokens']} "
             f"new tokens, {s['humaneval']} HumanEval, {s['math']} math problems, calibration on {s['calibration_prompts']} "
             f"prompts (disjoint from evaluation); gates after layers {s['gates']}; {s['seconds']} s.", "",
             "| method | tok/s | median ms | p90 ms | speedup | theoretical | TF agree | ppl Δ% | greedy agree | prefix | exact | HumanEval | math | layers run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in m.items():
        lines.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['latency_ms_median']:.1f} | {r['latency_ms_p90']:.1f} | "
                     f"{r['speedup_vs_full']:.2f}x | {f(r['theoretical_speedup'], '{:.2f}x')} | {r['teacher_forced_agreement'] * 100:.1f}% | "
                     f"{r['perplexity_delta_pct']:+.2f} | {f(r['greedy_agreement_overall'], '{:.1%}')} | {f(r['greedy_prefix_until_divergence_mean'], '{:.1f}')} | "
                     f"{f(r['greedy_exact_match'], '{:.0%}')} | {f(r['humaneval_pass@1'], '{:.0%}')} | {f(r['math_accuracy'], '{:.0%}')} | {f(r['mean_layers_run'], '{:.1f}')} |")
    spec = {k: v for k, v in m.items() if v.get("acceptance_rate") is not None}
    if spec:
        lines += ["", "## Verify mode (lossless)", "", "| method | speedup | acceptance | mean accepted / round | exact match |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['speedup_vs_full']:.2f}x | {v['acceptance_rate']:.1%} | {v['mean_accepted_per_round']:.2f} | "
                  f"{f(v['greedy_exact_match'], '{:.0%}')} |" for k, v in spec.items()]
    uni = [v for k, v in m.items() if k.startswith("uniform")]
    lossy = {k: v for k, v in m.items() if k.startswith(("river", "fixed", "monotone", "propagate"))}
    verdict = []
    for k, v in lossy.items():
        verdict.append(f"- {k}: {frontier_verdict(v, uni)}")
    lines += ["", "## Against the honest competitor", ""] + verdict
    costs = m.get("full", {}).get("layer_costs")
    if costs:
        lines += ["", f"Step cost model fitted on the full and fixed-depth runs: t(e) = {costs['fixed_ms']:.2f} ms + "
                  f"e x {costs['per_backbone_layer_over_twin_ms']:.3f} ms (e = backbone layers run; the slope is what a "
                  "backbone layer costs beyond its twin). 'theoretical' = t(L) / mean t(e) over the exits taken; "
                  "practical/theoretical below 1 is overhead beyond the fixed-depth paths."]
    lines += ["", f"Not implemented: {', '.join(s['not_implemented'])}.", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def console() -> int:
    """The ``river-bench`` command."""
    return main(shared_pool=True)


if __name__ == "__main__":
    sys.exit(console())
