"""Verify mode (lossless River) on one model: speedup over the full model, acceptance rate and mean
accepted length per draft and draft length k, in one run, interleaved per prompt, same threads.

Drafts: draft graphs with 8-bit twins after layer E (``--draft-exits``, -1 = every layer a twin),
and, with ``--river-dir``, the River graph's own exit at each of its gates. ``k~K`` rows: adaptive k
starting at K. ``draft@E alone`` rows: the draft graph as a (lossy) model of its own.

    python benchmarks/verify_speed.py --model smollm2-135m --threads 2 --prompts 6 --tokens 48 --ks 3,4,6
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="registered name or plain step graph (model.onnx)")
    p.add_argument("--river-dir", type=Path, help="a river-export output folder: also draft with its gates")
    p.add_argument("--draft-exits", default="-1", help="draft graphs: comma-separated last backbone layers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--ks", default="3,4,6")
    p.add_argument("--adaptive", action="store_true", help="also adaptive k (from each k) for the draft graphs")
    args = p.parse_args(argv)

    from river.compiler.ort_session import use_shared_thread_pool

    use_shared_thread_pool(args.threads)  # before any session: draft and backbone share one pool
    from river.runtime.bench.eval_data import EVAL_PROMPTS
    from river.runtime.generate import GenerationConfig, Generator
    from river.runtime.loading import open_generator
    from river.runtime.ort_backend import OrtBackend
    from river.runtime.speculative import SpeculativeGenerator
    from river.runtime.verify_graphs import verify_pair

    full = open_generator(args.model, threads=args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    configs = {}
    alone = {}  # each draft graph run as a model of its own (lossy): its speed and agreement
    for e in (int(x) for x in args.draft_exits.split(",") if x):
        _, draft_path = verify_pair(full.backend.model_path, e)
        alone[f"draft@{e} alone"] = Generator(OrtBackend(draft_path, threads=args.threads), full.tokenizer,
                                              full.eos_token_ids)
        draft = OrtBackend(draft_path, threads=args.threads, single_token=True)
        for k in ks:
            configs[f"draft@{e} k={k}"] = SpeculativeGenerator(full.backend, full.tokenizer, full.eos_token_ids,
                                                               draft=draft, k=k)
            if args.adaptive:
                configs[f"draft@{e} k~{k}"] = SpeculativeGenerator(full.backend, full.tokenizer, full.eos_token_ids,
                                                                   draft=draft, k=k, adaptive=True)
    if args.river_dir is not None:
        river = open_generator(str(args.river_dir / "model.onnx"), threads=args.threads)
        for i, g in enumerate(river.backend.river.gates):
            for k in ks:
                configs[f"river@{g} k={k}"] = SpeculativeGenerator(river.backend, river.tokenizer, river.eos_token_ids,
                                                                   draft_gate=i, k=k)
    cfg = GenerationConfig(max_new_tokens=args.tokens)
    prompts = EVAL_PROMPTS[: args.prompts]
    times = {"full": [], **{k: [] for k in configs}, **{k: [] for k in alone}}
    prefix = {k: [] for k in alone}
    acc = {k: [0, 0, 0] for k in configs}
    identical = {k: 0 for k in configs}
    for i, prompt in enumerate(prompts):
        ref = full.generate(prompt, cfg)
        times["full"].append(ref.decode_seconds / max(len(ref.token_ids) - 1, 1))
        for name, gen in configs.items():
            r = gen.generate(prompt, cfg)
            times[name].append(sum(s.seconds for s in r.steps if s.phase == "decode") / max(len(r.token_ids) - 1, 1))
            acc[name][0] += gen.stats.accepted
            acc[name][1] += gen.stats.drafted
            acc[name][2] += gen.stats.rounds
            identical[name] += r.token_ids == ref.token_ids
        for name, gen in alone.items():
            r = gen.generate(prompt, cfg)
            times[name].append(r.decode_seconds / max(len(r.token_ids) - 1, 1))
            same = next((j for j, (a, b) in enumerate(zip(r.token_ids, ref.token_ids)) if a != b),
                        min(len(r.token_ids), len(ref.token_ids)))
            prefix[name].append(same / max(len(ref.token_ids), 1))
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)
    base = statistics.mean(times["full"])
    print(f"\n{args.model}, ORT CPU, {args.threads} threads (shared pool), {len(prompts)} prompts x {args.tokens} tokens, "
          f"{platform.machine()} ({platform.node()})")
    print(f"{'config':18s} {'ms/token':>9s} {'speedup':>8s} {'accept':>7s} {'mean acc':>9s} {'identical':>9s}")
    print(f"{'full':18s} {base * 1e3:9.2f} {1.0:7.2f}x")
    rows = {}
    for name in configs:
        t = statistics.mean(times[name])
        a, d, r = acc[name]
        rows[name] = {"ms_per_token": t * 1e3, "speedup": base / t, "acceptance": a / d, "mean_accepted": a / r,
                      "identical": identical[name], "prompts": len(prompts)}
        print(f"{name:18s} {t * 1e3:9.2f} {base / t:7.2f}x {a / d:7.1%} {a / r:9.2f} {identical[name]}/{len(prompts)}")
    for name in alone:
        t = statistics.mean(times[name])
        rows[name] = {"ms_per_token": t * 1e3, "speedup": base / t, "greedy_prefix_agreement": statistics.mean(prefix[name])}
        print(f"{name:18s} {t * 1e3:9.2f} {base / t:7.2f}x  (lossy: greedy output matches the full model's for "
              f"{statistics.mean(prefix[name]):.0%} of its tokens before diverging)")
    print(json.dumps({"full_ms_per_token": base * 1e3, "configs": rows}))


if __name__ == "__main__":
    main()
