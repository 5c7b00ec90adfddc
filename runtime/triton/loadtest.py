"""``river-loadtest``: many concurrent streams against the River Triton model: throughput, latency, and
whether serving requests together changes their answers.

Each run starts N client threads together (a barrier); every thread has its own gRPC client and stream and
sends its requests one after another. Request i (over all threads, thread i % N) uses mode modes[i % M],
prompt (i // M) % P and max_tokens mix[(i // M) % T], so with several modes each prompt is served in each
mode. By default a baseline first serves the same requests one at a time on one stream.

Definitions:
  tok/s          generated tokens (all requests) / wall time from the first send to the last final response
  TTFT           first token-carrying response - send (includes time queued at the server)
  per-token      for each token-carrying response after the first: the gap since the previous one divided by
                 the tokens it carries, counted once per token (a verify round's tokens share its gap)
  x seq          tok/s over the sequential baseline's tok/s (p99 x seq: per-token p99 over the baseline's)
  identical      requests whose token ids equal the same request's (prompt, mode, max_tokens) baseline output;
                 only meaningful for greedy decoding (temperature 0) or seeded sampling
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from river.errors import RiverError, run_command
from river.runtime.batching.scheduler import MODES
from river.runtime.triton.client import DEFAULT_URL, stream_generate
from river.runtime.triton.config import GENERATE_MODEL

PROG = "river-loadtest"
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn rain.",
    "Explain recursion to a ten-year-old in two sentences.",
    "List three uses for a paperclip.",
    "Translate 'good morning, friends' into Spanish.",
    "What is 17 times 23? Show your working.",
    "Write a Python function that reverses a string.",
    "Give me one tip for sleeping better.",
)
MAX_ERROR_MESSAGES = 5


class LoadTestError(RiverError):
    """The load test cannot run: the server is unreachable, the model not ready, every request failed."""


@dataclass(frozen=True)
class RequestSpec:
    prompt_index: int
    mode: str
    max_tokens: int

    @property
    def key(self) -> tuple[int, str, int]:
        return self.prompt_index, self.mode, self.max_tokens


@dataclass
class RequestRecord:
    """One request as the client saw it; times are ``time.perf_counter()`` seconds."""
    stream: int
    spec: RequestSpec
    sent: float
    done: float | None = None  # final response, failure or cancellation
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) per token-carrying response
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stats: dict | None = None  # the model's final statistics
    error: str | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.arrivals)

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0][0] - self.sent if self.arrivals else None

    def token_latencies(self) -> list[float]:
        """Per-token latency (module docstring): each later response's gap / its tokens, once per token."""
        out = []
        for (before, _), (t, n) in zip(self.arrivals, self.arrivals[1:]):
            out += [(t - before) / n] * n
        return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, linear between closest ranks (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


@dataclass
class ModeStats:
    requests: int
    errors: int
    tokens: int
    share: float  # of all generated tokens in the run
    tokens_per_s: float  # this mode's tokens over the run's wall time (the modes' rates add up to the run's)
    ttft_p50: float | None
    token_latency_p99: float | None
    acceptance: float | None  # verify: accepted / drafted over the mode's requests (None without those stats)


@dataclass
class Comparison:
    """A concurrent run against the sequential baseline."""
    sequential_tokens_per_s: float
    throughput_ratio: float | None
    token_latency_p99_ratio: float | None
    identical: int  # requests whose token ids equal the baseline's for the same (prompt, mode, max_tokens)
    compared: int  # requests that succeeded in both
    deterministic: bool  # greedy or seeded: only then is `identical` expected to be `compared`


@dataclass
class LoadReport:
    streams: int
    requests: list[RequestRecord]
    wall_seconds: float
    tokens: int
    tokens_per_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    token_latency_p50: float | None
    token_latency_p99: float | None
    queued_mean: float | None  # the model's queued_seconds, where its stats carry it
    modes: dict[str, ModeStats]
    errors: int
    error_messages: list[str]  # the first few distinct ones
    deterministic: bool
    baseline: Comparison | None = None

    @property
    def outputs(self) -> dict[tuple[int, str, int], list[int]]:
        """Token ids per (prompt index, mode, max_tokens): the first successful request of each."""
        out: dict = {}
        for r in self.requests:
            if r.error is None:
                out.setdefault(r.spec.key, r.token_ids)
        return out

    @property
    def mode_mix(self) -> str:
        return ",".join(self.modes)

    def to_json(self) -> dict:
        t0 = min((r.sent for r in self.requests), default=0.0)
        summary = {k: v for k, v in vars(self).items() if k not in ("requests", "modes", "baseline")}
        return {**summary, "modes": {m: vars(s) for m, s in self.modes.items()},
                "baseline": vars(self.baseline) if self.baseline else None,
                "requests": [{"stream": r.stream, "prompt_index": r.spec.prompt_index, "mode": r.spec.mode,
                              "max_tokens": r.spec.max_tokens, "sent": r.sent - t0, "ttft": r.ttft,
                              "arrivals": [[t - r.sent, n] for t, n in r.arrivals], "tokens": r.tokens,
                              "token_ids": r.token_ids, "text": r.text, "stats": r.stats, "error": r.error}
                             for r in self.requests]}


def summarize(streams: int, records: list[RequestRecord], deterministic: bool) -> LoadReport:
    """A run's report from its request records (pure: the statistics are tested on synthetic records)."""
    records = sorted(records, key=lambda r: (r.sent, r.stream))
    ends = [r.done for r in records if r.done is not None]
    wall = max(ends) - min(r.sent for r in records) if records and ends else 0.0
    tokens = sum(r.tokens for r in records)
    ok = [r for r in records if r.error is None]
    queued = [r.stats["queued_seconds"] for r in ok if r.stats and "queued_seconds" in r.stats]
    modes = {}
    for mode in sorted({r.spec.mode for r in records}, key=lambda m: (MODES.index(m) if m in MODES else 9, m)):
        mine = [r for r in records if r.spec.mode == mode]
        n = sum(r.tokens for r in mine)
        stats = [r.stats for r in mine if r.error is None and r.stats and r.stats.get("drafted")]
        drafted = sum(s["drafted"] for s in stats)
        modes[mode] = ModeStats(
            requests=len(mine), errors=sum(r.error is not None for r in mine), tokens=n,
            share=n / tokens if tokens else 0.0, tokens_per_s=n / wall if wall else 0.0,
            ttft_p50=percentile([r.ttft for r in mine if r.ttft is not None], 50),
            token_latency_p99=percentile([x for r in mine for x in r.token_latencies()], 99),
            acceptance=sum(s.get("accepted", 0) for s in stats) / drafted if drafted else None)
    ttfts = [r.ttft for r in records if r.ttft is not None]
    gaps = [x for r in records for x in r.token_latencies()]
    errors = [r.error for r in records if r.error is not None]
    return LoadReport(
        streams=streams, requests=records, wall_seconds=wall, tokens=tokens,
        tokens_per_s=tokens / wall if wall else 0.0,
        ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99),
        token_latency_p50=percentile(gaps, 50), token_latency_p99=percentile(gaps, 99),
        queued_mean=sum(queued) / len(queued) if queued else None, modes=modes, errors=len(errors),
        error_messages=list(dict.fromkeys(errors))[:MAX_ERROR_MESSAGES], deterministic=deterministic)


def compare(report: LoadReport, baseline: LoadReport) -> Comparison:
    """``report`` against the sequential ``baseline``: throughput and p99 ratios, identical outputs."""
    reference = baseline.outputs
    pairs = [(r.token_ids, reference[r.spec.key]) for r in report.requests
             if r.error is None and r.spec.key in reference]
    return Comparison(sequential_tokens_per_s=baseline.tokens_per_s,
                      throughput_ratio=ratio(report.tokens_per_s, baseline.tokens_per_s),
                      token_latency_p99_ratio=ratio(report.token_latency_p99, baseline.token_latency_p99),
                      identical=sum(a == b for a, b in pairs), compared=len(pairs),
                      deterministic=report.deterministic and baseline.deterministic)


def plan_requests(streams: int, requests_per_stream: int, n_prompts: int, max_tokens: int | Sequence[int],
                  modes: Sequence[str]) -> list[list[RequestSpec]]:
    """Per-stream request lists: request i goes to stream i % streams (module docstring for its spec), so
    the first wave is requests 0..streams-1 and a smaller run's requests are a prefix of a larger one's."""
    mix = [max_tokens] if isinstance(max_tokens, int) else list(max_tokens)
    plan: list[list[RequestSpec]] = [[] for _ in range(streams)]
    for i in range(streams * requests_per_stream):
        j = i // len(modes)
        plan[i % streams].append(RequestSpec(j % n_prompts, modes[i % len(modes)], mix[j % len(mix)]))
    return plan


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_server(url: str, model: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, when nothing serves ``model`` at ``url`` (before any thread starts)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            live = client.is_server_live(client_timeout=timeout)
            ready = live and client.is_model_ready(model, client_timeout=timeout)
        finally:
            client.close()
    except InferenceServerException as exc:
        raise LoadTestError(f"cannot reach a Triton server at {url}: {one_line(exc)}") from None
    if not ready:
        raise LoadTestError(f"model {model!r} is not ready at {url}" if live else f"server at {url} is not live")


def _grpc_stream(url: str, model: str, timeout: float):
    """A thread's own gRPC client, its channel connected now (not in the first request's TTFT)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        client.is_server_live(client_timeout=timeout)
    except BaseException:
        client.close()
        raise
    return partial(stream_generate, url=url, model=model, client=client, timeout=timeout), client.close


def run_load(url: str, model: str, streams: int, requests_per_stream: int = 1,
             prompts: Sequence[str] = DEFAULT_PROMPTS, max_tokens: int | Sequence[int] = 32,
             modes: Sequence[str] = ("full",), k: int | None = None, budget: str | None = None,
             temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = True, timeout: float = 300.0,
             stream_fn: Callable | None = None, plan: list[list[RequestSpec]] | None = None) -> LoadReport:
    """Serve ``streams`` concurrent streams of ``requests_per_stream`` requests each and report.

    ``stream_fn(prompt, *, on_piece, max_tokens, mode, k, budget, temperature, seed, ignore_eos)`` streams one
    request and returns a ``StreamResult`` (or raises: the request counts as an error); it is shared by the
    threads. Default: ``stream_generate`` on a gRPC client per thread. ``k`` goes to verify requests only,
    ``budget`` to exit requests only. ``plan`` replaces the request plan (the baseline serves one stream).
    ``ignore_eos`` (default) makes every request generate its max_tokens, so runs are comparable.
    """
    plan = plan if plan is not None else plan_requests(streams, requests_per_stream, len(prompts), max_tokens,
                                                       modes)
    closers = []
    if stream_fn is None:
        from tritonclient.utils import InferenceServerException

        check_server(url, model)
        fns = []
        try:
            for _ in plan:
                fn, close = _grpc_stream(url, model, timeout)
                fns.append(fn)
                closers.append(close)
        except InferenceServerException as exc:
            for close in closers:
                close()
            raise LoadTestError(f"cannot connect {len(plan)} clients to {url}: {one_line(exc)}") from None
    else:
        fns = [stream_fn] * len(plan)
    barrier, stop, records = threading.Barrier(len(plan)), threading.Event(), []

    def worker(stream: int, specs: list[RequestSpec], fn: Callable) -> None:
        barrier.wait()
        for spec in specs:
            if stop.is_set():
                return
            rec = RequestRecord(stream=stream, spec=spec, sent=time.perf_counter())

            def on_piece(_text, ids, rec=rec):
                if ids:
                    rec.arrivals.append((time.perf_counter(), len(ids)))
                return False if stop.is_set() else None  # interrupted: cancel the request

            try:
                result = fn(prompts[spec.prompt_index], on_piece=on_piece, max_tokens=spec.max_tokens,
                            mode=spec.mode, k=k if spec.mode == "verify" else None,
                            budget=budget if spec.mode == "exit" else None, temperature=temperature, seed=seed,
                            ignore_eos=ignore_eos)
                rec.token_ids, rec.text, rec.stats = list(result.token_ids), result.text, result.stats
                if result.cancelled:
                    rec.error = "cancelled"
            except Exception as exc:  # a rejected or failed request is a result of the load test
                rec.error = one_line(exc)
            rec.done = time.perf_counter()
            records.append(rec)

    threads = [threading.Thread(target=worker, args=(s, specs, fn), daemon=True)
               for s, (specs, fn) in enumerate(zip(plan, fns))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()  # Ctrl-C: the threads cancel their requests
        for close in closers:
            close()
    return summarize(len(plan), records, deterministic=temperature == 0 or seed is not None)


def baseline_plan(plans: Sequence[list[list[RequestSpec]]]) -> list[list[RequestSpec]]:
    """One stream serving each distinct request of ``plans`` once, in order."""
    unique = dict.fromkeys(spec for plan in plans for specs in plan for spec in specs)
    return [list(unique)]


# ---- command line ----

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def _modes(text: str) -> list[str]:
    modes = text.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected distinct modes out of {', '.join(MODES)}, got {text!r}")
    return modes


def _url(text: str) -> str:
    host, _, port = text.rpartition(":")
    if "://" in text or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port (gRPC, no scheme), got {text!r}")
    return text


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.strip()
    summary = doc.split("\n\n")[0].replace(f"``{PROG}``: ", "")
    p = _Parser(prog=PROG, description=summary[0].upper() + summary[1:], epilog=doc.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", type=_url, default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    p.add_argument("--model", default=GENERATE_MODEL, help=f"model name (default {GENERATE_MODEL})")
    p.add_argument("--streams", type=_int_list, default=[1, 4, 8], metavar="N,N,...",
                   help="concurrent streams, comma-separated: one run and table row each (default 1,4,8)")
    p.add_argument("--requests-per-stream", type=_positive(int), default=1, metavar="N",
                   help="requests each stream sends one after another (default 1)")
    p.add_argument("--max-tokens", type=_positive(int), default=32, metavar="N", help="tokens per request (default 32)")
    p.add_argument("--max-tokens-mix", type=_int_list, metavar="N,N,...",
                   help="mixed lengths, cycled over the requests (replaces --max-tokens)")
    p.add_argument("--modes", type=_modes, default=["full"], metavar="MODE,...",
                   help=f"generation modes cycled over the requests, out of {','.join(MODES)} (default full)")
    p.add_argument("--k", type=_positive(int), metavar="K",
                   help="verify mode: tokens drafted per round (default: the model's)")
    p.add_argument("--budget", metavar="NAME",
                   help="exit mode: a named calibrated operating point, e.g. safe, balanced, fast")
    p.add_argument("--temperature", type=_temperature, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--seed", type=int,
                   help="sampling seed sent with every request (seeded sampling: outputs stay comparable)")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="let requests end at EOS (default: generate max tokens, so runs do equal work)")
    p.add_argument("--prompts", type=Path, metavar="FILE",
                   help=f"prompts, one per line (default: {len(DEFAULT_PROMPTS)} built-in short chat prompts)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="first serve the same requests one at a time, to compare against (default on)")
    p.add_argument("--timeout", type=_positive(float), default=300.0, metavar="S",
                   help="seconds to wait for each response (default 300)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the full report (every request) as JSON")
    return p


def _prompts(p: argparse.ArgumentParser, path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        p.error(f"cannot read prompts file {path}: {getattr(exc, 'strerror', None) or exc}")
    if not prompts:
        p.error(f"prompts file {path} holds no prompts")
    return prompts


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


HEADER = (f"{'streams':>7} {'modes':<17} {'tok/s':>8} {'x seq':>6} {'TTFT p50 ms':>11} {'tok p50 ms':>10} "
          f"{'tok p99 ms':>10} {'p99 x seq':>9} {'identical':>9} {'errors':>6}")


def format_row(r: LoadReport) -> str:
    b = r.baseline
    same = "-" if b is None else f"{b.identical}/{b.compared}"
    return (f"{r.streams:>7} {r.mode_mix:<17} {r.tokens_per_s:>8.1f} {_x(b and b.throughput_ratio):>6} "
            f"{_ms(r.ttft_p50):>11} {_ms(r.token_latency_p50):>10} {_ms(r.token_latency_p99):>10} "
            f"{_x(b and b.token_latency_p99_ratio):>9} {same:>9} {r.errors:>6}")


def format_modes(r: LoadReport) -> str:
    parts = []
    for mode, s in r.modes.items():
        acceptance = "" if s.acceptance is None else f", acceptance {s.acceptance:.0%}"
        parts.append(f"{mode} {s.share:.0%} of tokens ({s.tokens_per_s:.1f} tok/s{acceptance})")
    return "        " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    prompts = _prompts(p, args.prompts)
    if args.k is not None and "verify" not in args.modes:
        p.error("--k applies to verify mode: add verify to --modes")
    if args.budget is not None and "exit" not in args.modes:
        p.error("--budget applies to exit mode: add exit to --modes")
    if args.json is not None and not args.json.parent.is_dir():
        p.error(f"--json: folder {args.json.parent} does not exist")
    return run_command(PROG, lambda: _run(args, prompts), args.json or Path.cwd())


def _run(args, prompts: list[str]) -> int:
    from river.atomic import write_bytes_atomic

    mix = args.max_tokens_mix or args.max_tokens
    options = dict(prompts=prompts, max_tokens=mix, modes=args.modes, k=args.k, budget=args.budget,
                   temperature=args.temperature, seed=args.seed, ignore_eos=not args.stop_at_eos,
                   timeout=args.timeout)
    plans = {n: plan_requests(n, args.requests_per_stream, len(prompts), mix, args.modes) for n in args.streams}
    check_server(args.url, args.model)  # before any output
    print(f"[river] {args.model} at {args.url}: {len(prompts)} prompts, modes {','.join(args.modes)}, "
          f"max tokens {mix}, {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}",
          file=sys.stderr, flush=True)
    baseline = None
    if args.baseline:
        plan = baseline_plan(list(plans.values()))
        print(f"[river] baseline: {len(plan[0])} request(s) one at a time", file=sys.stderr, flush=True)
        baseline = run_load(args.url, args.model, 1, plan=plan, **options)
        _require_some_success(baseline)
        print(f"sequential: {baseline.tokens_per_s:.1f} tok/s, TTFT p50 {_ms(baseline.ttft_p50)} ms, per-token "
              f"p50/p99 {_ms(baseline.token_latency_p50)}/{_ms(baseline.token_latency_p99)} ms")
    print(HEADER, flush=True)
    reports = []
    for n, plan in plans.items():
        report = run_load(args.url, args.model, n, plan=plan, **options)
        _require_some_success(report)
        if baseline is not None:
            report.baseline = compare(report, baseline)
        reports.append(report)
        print(format_row(report), flush=True)
        if len(report.modes) > 1:
            print(format_modes(report), flush=True)
        for message in report.error_messages:
            print(f"        error: {message}", flush=True)
    if baseline is not None:
        deterministic = args.temperature == 0 or args.seed is not None
        print("identical = token ids equal to the sequential run's" +
              ("" if deterministic else " (sampling without --seed: differences are expected)"))
    if args.json is not None:
        doc = {"config": {"url": args.url, "model": args.model, "prompts": prompts, "modes": args.modes,
                          "max_tokens": mix, "k": args.k, "budget": args.budget, "temperature": args.temperature,
                          "seed": args.seed, "ignore_eos": not args.stop_at_eos,
                          "requests_per_stream": args.requests_per_stream},
               "sequential": baseline.to_json() if baseline is not None else None,
               "runs": [r.to_json() for r in reports]}
        write_bytes_atomic(args.json, json.dumps(doc, indent=1).encode())
        print(f"[river] report: {args.json}", file=sys.stderr)
    return 0


def _require_some_success(report: LoadReport) -> None:
    if report.requests and report.errors == len(report.requests):
        raise LoadTestError(f"every request failed ({report.errors}), first: {report.error_messages[0]}")


def console() -> int:
    """The ``river-loadtest`` command."""
    return main()


if __name__ == "__main__":
    sys.exit(console())
