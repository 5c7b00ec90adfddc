"""Greedy verify requests in the batch scheduler: measured drafting (the default) against the fixed rule
and against never drafting, by the number of concurrent requests.

Each policy is its own scheduler over one river-export folder (same weights, same prompts); every batch
size runs each policy in turn, twice over (the first pass warms the schedulers and lets the measured
policy learn that batch size), and the second pass is reported. The tokens must be the same for every
policy (verify mode is exact whichever way a row goes): the script stops if they are not.

    python benchmarks/batch_drafting.py out/smollm2 --streams 1,2,3,4 --tokens 64
"""

from __future__ import annotations

import argparse
import time


POLICIES = {  # name -> open_scheduler options
    "measured (default)": {"draft_payoff": True},
    "fixed rule": {"draft_payoff": False},
    "never draft": {"draft_payoff": False, "verify_drafts_up_to": 0},
}


def run_batch(sched, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    """Every prompt as a greedy verify request at once; (tokens/s over the whole batch, their tokens)."""
    from river.runtime.batching.scheduler import BatchRequest
    from river.runtime.generate import GenerationConfig

    t0 = time.perf_counter()
    tickets = [sched.submit(BatchRequest(p, GenerationConfig(max_new_tokens=tokens, eos_token_ids=[]), mode="verify"))
               for p in prompts]
    sched.run_until_idle()
    results = [t.wait() for t in tickets]
    return sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0), [r.token_ids for r in results]


def main(argv=None, shared_pool: bool = True) -> None:
    """``shared_pool``: the process is ours (run as a script): one ORT thread pool for all sessions."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("river_dir", help="a river-export folder (its draft graph drafts)")
    p.add_argument("--streams", default="1,2,3,4", help="concurrent requests, comma-separated (default 1,2,3,4)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]

    from river.compiler.ort_session import use_shared_thread_pool
    from river.models.tokenizer import encode_prompt
    from river.runtime.bench.eval_data import EVAL_PROMPTS
    from river.runtime.loading import open_scheduler

    if shared_pool:
        use_shared_thread_pool(args.threads)
    scheds = {name: open_scheduler(args.river_dir, threads=args.threads, max_rows=max(streams), **options)
              for name, options in POLICIES.items()}
    tokenizer = next(iter(scheds.values())).tokenizer
    print(f"| streams | {' | '.join(f'{name} tok/s' for name in scheds)} | measured / fixed | measured / never |")
    print("|---|" + "---|" * (len(scheds) + 2))
    for n in streams:
        for rep in range(2):
            prompts = [encode_prompt(tokenizer, EVAL_PROMPTS[(rep * n + i) % len(EVAL_PROMPTS)]) for i in range(n)]
            speed, reference = {}, None
            for name, sched in scheds.items():
                speed[name], tokens = run_batch(sched, prompts, args.tokens)
                if reference is not None and tokens != reference:
                    raise SystemExit(f"{name}: the tokens differ from the measured policy's at {n} streams")
                reference = reference or tokens
        measured, fixed, never = speed.values()
        print(f"| {n} | {' | '.join(f'{s:.1f}' for s in speed.values())} | {measured / fixed:.2f}x | "
              f"{measured / never:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
