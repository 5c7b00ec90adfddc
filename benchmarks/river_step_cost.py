"""What the River graph's gates and ``If`` nesting cost, and what a fixed exit profile saves.

One process, one run, same prompts, same threads: decode ms/step of the plain step graph vs the River
graph with every gate disabled (pure overhead of gates + If) and with a forced exit at each gate.

    python benchmarks/river_step_cost.py --model smollm2-135m --river int8 --threads 2 --prompts 3 --tokens 48
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
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--river", default="int8")
    p.add_argument("--gates", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--matmul-accuracy", type=int, default=1, help="ORT MatMulNBits accuracy level for twins")
    p.add_argument("--work-dir", type=Path, default=Path("bench-out"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from river.compiler.compile import compile_river
    from river.compiler.river.manifest import DISABLED
    from river.export.store import exported_model_path
    from river.runtime.bench.eval_data import EVAL_PROMPTS
    from river.runtime.generate import GenerationConfig, Generator
    from river.runtime.loading import open_generator
    from river.runtime.ort_backend import OrtBackend

    step = exported_model_path(args.model)
    river_dir = args.work_dir / f"river-{Path(step).parent.name}-{args.river}-{args.gates or 'auto'}"
    if not (river_dir / "model.onnx").is_file():
        compile_river(step, river_dir, gates=args.gates, river=args.river)
    plain = open_generator(str(step), threads=args.threads)
    river_backend = OrtBackend(river_dir / "model.onnx", threads=args.threads, matmul_accuracy=args.matmul_accuracy)
    river = Generator(river_backend, plain.tokenizer, ())
    gates = river_backend.river.gates
    profiles = {"gates off": [DISABLED] * len(gates)}
    for i, g in enumerate(gates):
        profiles[f"exit after layer {g}"] = river_backend.gate_thresholds.forced(i)
    cfg = GenerationConfig(max_new_tokens=args.tokens, eos_token_ids=[])
    times = {"plain step graph": [], **{k: [] for k in profiles}}
    exits = {k: set() for k in profiles}
    prompts = [plain.encode(t) for t in EVAL_PROMPTS[: args.prompts]]
    plain.generate(prompts[0][:8], GenerationConfig(max_new_tokens=4, eos_token_ids=[]))  # warm-up
    river.generate(prompts[0][:8], GenerationConfig(max_new_tokens=4, eos_token_ids=[]))
    for i, ids in enumerate(prompts):
        r = plain.generate(ids, cfg)
        times["plain step graph"] += [s.seconds for s in r.steps if s.phase == "decode"]
        for name, thr in profiles.items():  # interleaved: noise hits every engine alike
            river_backend.set_thresholds(thr)
            r = river.generate(ids, cfg)
            times[name] += [s.seconds for s in r.steps if s.phase == "decode"]
            exits[name] |= {s.exit_layer for s in r.steps if s.phase == "decode"}
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)
    base = statistics.median(times["plain step graph"])
    print(f"\nmodel {args.model}, river {args.river}, gates {gates}, ORT CPU, {args.threads} threads, "
          f"{len(prompts)} prompts x {args.tokens} tokens, machine {platform.machine()} ({platform.node()})")
    print(f"{'engine':28s} {'median ms/step':>14s} {'p90':>8s} {'vs plain':>9s}  layers run")
    for name, ts in times.items():
        ts_sorted = sorted(ts)
        p90 = ts_sorted[int(0.9 * (len(ts_sorted) - 1))]
        med = statistics.median(ts)
        print(f"{name:28s} {med * 1e3:14.2f} {p90 * 1e3:8.2f} {base / med:8.2f}x  {sorted(exits.get(name, {None}))}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}}, indent=2))


if __name__ == "__main__":
    main()
