"""Verify mode (lossless River) on one model: speedup over the full model, acceptance rate and mean
accepted length, for each draft gate and draft length k, in one run on the same prompts and threads.

    python benchmarks/verify_speed.py --river-dir bench-out/graphs/river-int8-cal12 --threads 2 --prompts 4 --tokens 48
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--river-dir", type=Path, required=True, help="a river-export output folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--ks", default="2,4,6")
    args = p.parse_args(argv)

    from river.runtime.eval_data import EVAL_PROMPTS
    from river.runtime.generate import GenerationConfig
    from river.runtime.loading import open_generator
    from river.runtime.speculative import SpeculativeGenerator

    manifest = args.river_dir / "river.json"
    import json

    source = Path(json.loads(manifest.read_text())["source"]["path"])
    full = open_generator(str(source), threads=args.threads)
    river = open_generator(str(args.river_dir / "model.onnx"), threads=args.threads)
    gates = river.backend.river["gates"]
    configs = {f"gate@{g} k={k}": SpeculativeGenerator(river.backend, river.tokenizer, river.eos_token_ids,
                                                       draft_gate=i, k=k)
               for i, g in enumerate(gates) for k in map(int, args.ks.split(","))}
    cfg = GenerationConfig(max_new_tokens=args.tokens)
    prompts = EVAL_PROMPTS[: args.prompts]
    times = {"full": [], **{k: [] for k in configs}}
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
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)
    base = statistics.mean(times["full"])
    print(f"\n{args.river_dir} ({json.loads(manifest.read_text())['river']} river), ORT CPU, {args.threads} threads, "
          f"{len(prompts)} prompts x {args.tokens} tokens, {platform.machine()} ({platform.node()})")
    print(f"{'config':16s} {'ms/token':>9s} {'speedup':>8s} {'accept':>7s} {'mean acc':>9s} {'identical':>9s}")
    print(f"{'full':16s} {base * 1e3:9.2f} {1.0:7.2f}x")
    for name in configs:
        t = statistics.mean(times[name])
        a, d, r = acc[name]
        print(f"{name:16s} {t * 1e3:9.2f} {base / t:7.2f}x {a / d:7.1%} {a / r:9.2f} {identical[name]}/{len(prompts)}")


if __name__ == "__main__":
    main()
