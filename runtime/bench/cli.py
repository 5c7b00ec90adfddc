"""``river-bench``: speed and quality of River against the full model and the known alternatives,
in one process, one run, on the same prompts, runtime and thread count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from river.errors import RiverError
from river.runtime.bench import methods


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.strip()
    p = argparse.ArgumentParser(prog="river-bench", description=doc.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc + "\n\n" + methods.__doc__)
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
    p.add_argument("--passes", type=_passes, default=1,
                   help="times the free-running prompts are timed, interleaved as in one pass (default 1); on a "
                        "noisy machine one pass's ratios move by 10%% or more, and bench.json's speedup_per_pass "
                        "shows how far")
    p.add_argument("--methods", help="comma-separated subset of methods to run; shell-style patterns match "
                                     "several ('river-recall*:*')")
    return p


def _passes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of passes, 1 or more")
    return value


def main(argv=None, shared_pool: bool = False) -> int:
    """``shared_pool``: the process is ours (the installed command): one ORT thread pool for all sessions."""
    from river.runtime.bench.run import Sizes, run

    args = build_parser().parse_args(argv)
    q = args.quick
    sizes = Sizes(prompts=args.prompts or (3 if q else 12), new_tokens=args.new_tokens or (24 if q else 64),
                  humaneval=args.humaneval if args.humaneval is not None else (3 if q else 20),
                  math=args.math if args.math is not None else (4 if q else 20),
                  calibration=args.calibration or (4 if q else 16), quick=q,
                  passes=args.passes)
    if shared_pool:  # verify mode alternates two sessions: one pool for all
        from river.compiler.ort_session import use_shared_thread_pool

        use_shared_thread_pool(args.threads)
    only = set(args.methods.split(",")) if args.methods else None
    try:
        path = run(args.model, args.out, args.threads, args.gates, sizes, only)
    except RiverError as exc:  # a bench that dies mid-way still says why
        print(f"river-bench: error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(path)
    return 0


def console() -> int:
    """The ``river-bench`` command."""
    return main(shared_pool=True)
