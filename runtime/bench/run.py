"""Running the compared methods: every evaluation item goes through every method in turn
(interleaved, so machine noise hits every method alike), after an untimed warm-up; answers graded,
and reference prose and the full model's own continuations scored teacher-forced against it.

Speed comes from the free-running prompts only, EOS ignored, so every method decodes the same
number of tokens of the same prompts. Per prompt and method: decode tokens (every generated token
after prefill's) and decode seconds (the generate() call's wall time less its prefill step: loop,
sampling and verify mode's partial last round included). Decode tokens/s = their sums' ratio.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from river.compiler.river.manifest import RiverManifest
from river.errors import RiverError
from river.runtime.bench import report
from river.runtime.bench.eval_data import EVAL_PROMPTS, MATH_PROBLEMS, REFERENCE_TEXT, humaneval_problems, last_number
from river.runtime.bench.methods import TORCH_BASELINES, Method, build_methods, prepare_graphs
from river.runtime.bench.sandbox import passes
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.sampling import softmax
from river.runtime.speculative import SpeculativeGenerator

HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]
TEACHER_FORCED_PREFIX = 8  # reference tokens fed before scoring starts


@dataclass
class Sizes:
    """How much of each evaluation set a run uses."""

    prompts: int
    new_tokens: int
    humaneval: int
    math: int
    calibration: int
    quick: bool = False
    passes: int = 1  # times the speed prompts are timed, one pass after the other (greedy: the same tokens)


def teacher_forced(gen: Generator, ids: list[int], prefix: int = TEACHER_FORCED_PREFIX) -> np.ndarray:
    """Logits rows [len(ids)-prefix, V] predicting ids[prefix:], each step fed the reference token."""
    cache = gen.backend.new_cache(len(ids) + 1)
    try:
        rows = [gen.prefill(ids[:prefix], cache).copy()]
        for tok in ids[prefix:-1]:
            rows.append(gen.decode_one_token(tok, cache).copy())
    finally:
        gen.backend.release(cache)
    return np.stack(rows)


def evaluate(methods: dict[str, Method], sizes: Sizes, tokenizer) -> tuple[dict, dict, list[str]]:
    """Run every method over the evaluation sets: (results, teacher-forced scores, prompts used)."""
    from tqdm import tqdm

    results = {name: {"decode_seconds": [], "exits": [], "timed_exits": [], "tokens": {}, "he": [], "math": [], "speed": []}
               for name in methods}
    cfg = GenerationConfig(max_new_tokens=sizes.new_tokens, eos_token_ids=[])  # EOS ignored: same token count
    prompts = EVAL_PROMPTS[:sizes.prompts]
    he = humaneval_problems(sizes.humaneval) if sizes.humaneval else []
    math = MATH_PROBLEMS[:sizes.math]
    total = len(methods) * ((sizes.passes + 1) * len(prompts) + len(he) + len(math) + len(REFERENCE_TEXT))
    bar = tqdm(total=total, desc="river-bench", unit="run", file=sys.stderr)
    for m in methods.values():  # warm-up, untimed
        m.use().generate("warm up", GenerationConfig(max_new_tokens=4))

    def record(name, result, timed=False):
        r = results[name]
        gen = methods[name].generator
        if isinstance(gen, SpeculativeGenerator) and gen.stats.rounds:  # verify mode: acceptance of the drafts
            stats = gen.stats
            r["drafted"] = r.get("drafted", 0) + stats.drafted
            r["accepted"] = r.get("accepted", 0) + stats.accepted
            r["rounds"] = r.get("rounds", 0) + stats.rounds
        exits = [s.exit_layer for s in result.steps if s.phase == "decode" and s.exit_layer is not None]
        r["exits"] += exits
        if timed:  # per-token step latencies of the speed prompts, and the exits their cost model predicts
            r["decode_seconds"] += [s.seconds for s in result.steps if s.phase == "decode"]
            r["timed_exits"] += exits

    for prompt in [p for _ in range(sizes.passes) for p in prompts]:
        for name, m in methods.items():
            gen = m.use()
            ids = gen.encode(prompt)
            t0 = time.perf_counter()
            res = gen.generate(ids, cfg)
            wall = time.perf_counter() - t0
            if len(res.token_ids) != sizes.new_tokens:
                raise RuntimeError(f"{name} generated {len(res.token_ids)} tokens, not {sizes.new_tokens}")
            record(name, res, timed=True)
            results[name]["speed"].append({"decode_tokens": len(res.token_ids) - 1,
                                           "decode_seconds": wall - res.prefill_seconds})
            results[name]["tokens"][prompt] = res.token_ids
            bar.update()
    he_cfg = GenerationConfig(max_new_tokens=64 if sizes.quick else 128, stop=HUMANEVAL_STOP)
    for problem in he:
        for name, m in methods.items():
            res = m.use().generate(problem["prompt"], he_cfg, chat=False)
            record(name, res)
            results[name]["he"].append(passes(problem, res.text))
            bar.update()
    math_cfg = GenerationConfig(max_new_tokens=48 if sizes.quick else 96)
    for question, answer in math:
        for name, m in methods.items():
            res = m.use().generate(question + " Answer with the final number.", math_cfg)
            record(name, res)
            got = last_number(res.text)
            results[name]["math"].append(got is not None and abs(got - answer) < 1e-6)
            bar.update()
    # teacher-forced agreement over reference prose and the full model's own continuations of the speed
    # prompts (its greedy tokens: ~600 scored tokens at the default sizes, not the prose's ~190 alone,
    # where one flipped token is half a point); perplexity over the prose only
    tf = {name: {"agree": [], "nll": []} for name in methods}
    full = methods["full"].use()  # the reference sets no thresholds: one use() serves throughout
    scored = [(tokenizer(text)["input_ids"], TEACHER_FORCED_PREFIX, True) for text in REFERENCE_TEXT]
    for prompt in prompts:
        ids = list(full.encode(prompt))
        scored.append((ids + list(results["full"]["tokens"][prompt]), len(ids), False))
    for ids, prefix, prose in scored:
        ref_rows = teacher_forced(full, ids, prefix)
        targets = np.asarray(ids[prefix:])
        for name, m in methods.items():
            rows = ref_rows if m.lossless else teacher_forced(m.use(), ids, prefix)
            tf[name]["agree"] += list(rows.argmax(-1) == ref_rows.argmax(-1))
            if prose:
                logp = np.log(np.maximum(np.stack([softmax(r) for r in rows]), 1e-30))
                tf[name]["nll"] += list(-logp[np.arange(len(targets)), targets])
            bar.update()
    bar.close()
    return results, tf, prompts


def selected(methods: dict[str, Method], only: set[str]) -> dict[str, Method]:
    """The methods ``only`` names (shell-style patterns), with ``full`` and each one's speed reference;
    a pattern that names none is refused."""
    chosen = {k for k in methods if any(fnmatch.fnmatchcase(k, pattern) for pattern in only)}
    unmatched = sorted(p for p in only if not any(fnmatch.fnmatchcase(k, p) for k in methods))
    if unmatched:
        raise RiverError(f"--methods: no method is named {', '.join(unmatched)} (see river-bench --help)")
    keep = chosen | {"full"} | {methods[k].speed_reference for k in chosen}
    return {k: v for k, v in methods.items() if k in keep}


def run(model: str, out: Path, threads: int, gates: str | None, sizes: Sizes, only: set[str] | None = None) -> Path:
    """The whole benchmark: graphs, methods, evaluation, report; returns the markdown report's path.
    ``only``: the subset of methods to run (the full model always runs: it is the reference)."""
    import onnxruntime

    t_start = time.time()
    graphs = prepare_graphs(model, out, gates, sizes.calibration, threads)
    methods = build_methods(graphs, threads)
    if only:
        methods = selected(methods, only)
    results, tf, prompts = evaluate(methods, sizes, methods["full"].generator.tokenizer)
    river_dir = graphs.river_int8.parent
    manifest = RiverManifest.load(river_dir)
    summary = report.summarize(results, tf, methods, manifest.gates, manifest.num_layers, prompts)
    settings = {
        "model": model, "runtime": f"onnxruntime {onnxruntime.__version__} CPU", "threads": threads,
        "machine": f"{platform.machine()} {platform.processor() or ''} ({platform.node()}), {os.cpu_count()} cores",
        "python": platform.python_version(), "prompts": len(prompts), "new_tokens": sizes.new_tokens,
        "passes": sizes.passes,
        "humaneval": len(results["full"]["he"]), "math": len(results["full"]["math"]),
        "calibration_prompts": sizes.calibration, "gates": manifest.gates,
        "operating_points": manifest.operating_points,
        "calibration_fits": json.loads((river_dir / "calibration.json").read_text())["fits"],
        "seconds": round(time.time() - t_start, 1), "baselines": TORCH_BASELINES, "quick": sizes.quick}
    return report.write({"settings": settings, "methods": summary}, out)
