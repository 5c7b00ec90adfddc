"""river-loadtest without a server: its statistics on synthetic records, its argument errors, and run_load
over a fake streaming function (concurrency, rejections, mixed modes, the baseline comparison)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from tests_helpers import assert_one_line_error

from river.runtime.triton import loadtest
from river.runtime.triton.client import StreamResult
from river.runtime.triton.loadtest import (RequestRecord, RequestSpec, baseline_plan, compare, percentile,
                                           plan_requests, run_load, summarize)


def record(mode="full", prompt=0, max_tokens=4, sent=0.0, arrivals=(), ids=None, stats=None, error=None, stream=0):
    arrivals = list(arrivals)
    n = sum(k for _, k in arrivals)
    return RequestRecord(stream=stream, spec=RequestSpec(prompt, mode, max_tokens), sent=sent,
                         done=arrivals[-1][0] if arrivals else sent + 0.01, arrivals=arrivals,
                         token_ids=list(range(n)) if ids is None else ids, stats=stats, error=error)


# ---- statistics ----

def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 99) == pytest.approx(4.96)
    assert percentile([1, 2, 3, 4, 5], 0) == 1 and percentile([1, 2, 3, 4, 5], 100) == 5


def test_token_latency_splits_a_gap_over_the_tokens_it_brought():
    r = record(sent=0.9, arrivals=[(1.0, 1), (1.1, 1), (1.4, 3)])  # a verify round's 3 tokens together
    assert r.ttft == pytest.approx(0.1)
    assert r.tokens == 5
    assert r.token_latencies() == pytest.approx([0.1, 0.1, 0.1, 0.1])  # first response's token: TTFT, not here
    assert record().ttft is None and record().token_latencies() == []


def test_summarize_aggregates_modes_acceptance_and_errors():
    records = [
        record("full", 0, sent=0.0, arrivals=[(0.5, 1), (1.0, 1), (1.5, 1), (2.0, 1)],
               stats={"tokens": 4, "queued_seconds": 0.2}),
        record("verify", 0, sent=0.0, arrivals=[(0.25, 2), (1.0, 4), (4.0, 6)],  # 12 tokens, ends last
               stats={"tokens": 12, "drafted": 12, "accepted": 9, "queued_seconds": 0.4}),
        record("verify", 1, sent=0.5, stats={"drafted": 4, "accepted": 1}, error="server full: 4 of 4 slots busy"),
        record("verify", 2, sent=0.6, error="server full: 4 of 4 slots busy"),
    ]
    r = summarize(2, records, deterministic=True)
    assert r.wall_seconds == pytest.approx(4.0) and r.tokens == 16
    assert r.tokens_per_s == pytest.approx(4.0)
    assert r.errors == 2 and r.error_messages == ["server full: 4 of 4 slots busy"]  # distinct messages
    assert r.ttft_p50 == pytest.approx(0.375)
    # per-token: full 0.5 x3; verify 0.75/4 x4, 3.0/6 x6
    assert r.token_latency_p50 == pytest.approx(0.5)
    assert r.token_latency_p99 == pytest.approx(0.5)
    assert r.queued_mean == pytest.approx(0.3)
    assert list(r.modes) == ["full", "verify"]
    full, verify = r.modes["full"], r.modes["verify"]
    assert (full.requests, full.errors, full.tokens, full.share) == (1, 0, 4, 0.25)
    assert (verify.requests, verify.errors, verify.tokens) == (3, 2, 12)
    assert full.tokens_per_s + verify.tokens_per_s == pytest.approx(r.tokens_per_s)
    assert verify.acceptance == pytest.approx(9 / 12)  # the failed request's stats do not count
    assert full.acceptance is None
    assert set(r.outputs) == {(0, "full", 4), (0, "verify", 4)}
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["requests"][2]["error"].startswith("server full") and doc["modes"]["verify"]["tokens"] == 12


def test_compare_counts_identical_outputs_and_ratios():
    base = summarize(1, [record("full", p, sent=p, arrivals=[(p + 0.5, 1), (p + 0.6, 1)], ids=[p, p + 1])
                         for p in range(3)], deterministic=True)
    conc = summarize(3, [
        record("full", 0, arrivals=[(0.5, 1), (0.55, 1)], ids=[0, 1]),  # identical
        record("full", 1, arrivals=[(0.5, 1), (0.6, 1)], ids=[1, 99]),  # diverged
        record("full", 2, error="server full"),  # failed: not compared
        record("full", 5, arrivals=[(0.4, 1), (0.65, 1)], ids=[5, 6]),  # no baseline output: not compared
    ], deterministic=True)
    c = compare(conc, base)
    assert (c.identical, c.compared) == (1, 2)
    assert c.deterministic
    assert c.sequential_tokens_per_s == pytest.approx(6 / 2.6)
    assert c.throughput_ratio == pytest.approx(conc.tokens_per_s / base.tokens_per_s)
    assert c.token_latency_p99_ratio == pytest.approx(conc.token_latency_p99 / 0.1)
    sampled = summarize(1, base.requests, deterministic=False)
    assert not compare(conc, sampled).deterministic


def test_plan_cycles_modes_per_prompt_and_larger_runs_extend_smaller_ones():
    plan = plan_requests(2, 3, n_prompts=2, max_tokens=[16, 32, 64], modes=["full", "verify"])
    order = [plan[i % 2][i // 2] for i in range(6)]
    assert [(s.prompt_index, s.mode, s.max_tokens) for s in order] == [
        (0, "full", 16), (0, "verify", 16), (1, "full", 32), (1, "verify", 32), (0, "full", 64), (0, "verify", 64)]
    small, large = plan_requests(2, 1, 8, 32, ["full"]), plan_requests(4, 1, 8, 32, ["full"])
    assert [s[0] for s in small] == [s[0] for s in large[:2]]
    assert baseline_plan([small, large]) == [[s[0] for s in large]]


# ---- run_load over a fake stream ----

class FakeServer:
    """A thread-safe stand-in for stream_generate: deterministic tokens per prompt, verify mode in rounds of k,
    a rejection for one prompt, and (optionally) different tokens when requests overlap."""

    def __init__(self, reject: str | None = None, diverge_when_busy: bool = False):
        self.reject, self.diverge_when_busy = reject, diverge_when_busy
        self.lock, self.active, self.peak, self.calls = threading.Lock(), 0, 0, []

    def __call__(self, prompt, *, on_piece, max_tokens, mode, k, budget, temperature, seed, ignore_eos):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.calls.append(dict(prompt=prompt, mode=mode, k=k, budget=budget, max_tokens=max_tokens))
        try:
            time.sleep(0.05)  # overlap with the other streams
            with self.lock:
                busy = self.active > 1
            if prompt == self.reject:
                raise RuntimeError("server full: 2 of 2 slots busy\nsecond line")
            base = sum(map(ord, prompt)) % 1000
            ids = [base + i + (500 if busy and self.diverge_when_busy else 0) for i in range(max_tokens)]
            step = (k or 1) if mode == "verify" else 1
            out = StreamResult()
            for i in range(0, max_tokens, step):
                time.sleep(0.001)
                piece = ids[i:i + step]
                out.token_ids += piece
                out.text += "".join(f"<{t}>" for t in piece)
                on_piece(out.text, piece)
            on_piece("", [])  # the final response carries no tokens
            out.stats = {"tokens": max_tokens, "finish_reason": "length", "queued_seconds": 0.0}
            if mode == "verify":
                rounds = -(-max_tokens // step)
                out.stats.update(drafted=rounds * step, accepted=max_tokens - rounds)
            return out
        finally:
            with self.lock:
                self.active -= 1


PROMPTS = ["alpha", "beta", "gamma", "delta"]


def test_run_load_streams_concurrently_and_counts_a_rejection():
    fake = FakeServer(reject="beta")
    r = run_load("unused:1", "m", streams=4, requests_per_stream=2, prompts=PROMPTS, max_tokens=[4, 8],
                 modes=["full", "verify"], k=2, budget="fast", stream_fn=fake)
    assert fake.peak == 4  # the barrier started every stream together
    assert len(r.requests) == 8 and r.streams == 4
    for stream in range(4):  # each stream sends its requests one after another
        mine = [q for q in r.requests if q.stream == stream]
        assert len(mine) == 2 and mine[1].sent >= mine[0].done
    assert r.errors == 2 and r.error_messages == ["server full: 2 of 2 slots busy"]  # prompt "beta", both modes
    assert {c["k"] for c in fake.calls if c["mode"] == "verify"} == {2}
    assert {c["k"] for c in fake.calls if c["mode"] == "full"} == {None}
    assert {c["budget"] for c in fake.calls} == {None}  # budget is for exit requests only
    ok = [q for q in r.requests if q.error is None]
    assert r.tokens == sum(q.spec.max_tokens for q in ok) == sum(len(q.token_ids) for q in ok)
    verify = [q for q in ok if q.spec.mode == "verify"]
    assert verify and all(n == 2 for q in verify for _, n in q.arrivals)  # rounds of k tokens, one timestamp
    assert r.modes["verify"].acceptance == pytest.approx(0.5)
    assert r.modes["full"].errors == r.modes["verify"].errors == 1
    assert set(r.outputs) == {(p, m, n) for p, n in ((0, 4), (2, 4), (3, 8)) for m in ("full", "verify")}
    assert r.ttft_p50 > 0.05 and r.token_latency_p99 > 0 and r.tokens_per_s > 0


def test_streams_start_together_even_when_threads_start_slowly(monkeypatch):
    start = threading.Thread.start

    def slow_start(self):
        start(self)
        time.sleep(0.04)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    r = run_load("unused:1", "m", streams=4, prompts=PROMPTS, max_tokens=2, stream_fn=FakeServer())
    first_sends = [q.sent for q in r.requests]
    assert len(first_sends) == 4 and max(first_sends) - min(first_sends) < 0.03  # staggered starts: 0.12 s


def test_baseline_detects_outputs_that_change_under_load():
    for diverge in (False, True):
        fake = FakeServer(diverge_when_busy=diverge)
        plan = plan_requests(3, 1, len(PROMPTS), 6, ["full", "exit"])
        base = run_load("unused:1", "m", 1, prompts=PROMPTS, plan=baseline_plan([plan]), stream_fn=fake)
        assert fake.peak == 1 and base.streams == 1 and len(base.requests) == 3
        conc = run_load("unused:1", "m", 3, prompts=PROMPTS, max_tokens=6, modes=["full", "exit"], stream_fn=fake)
        c = compare(conc, base)
        assert c.compared == 3 and c.identical == (0 if diverge else 3)


# ---- command line ----

def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        loadtest.main(list(args))
    assert exc.value.code == 2
    return assert_one_line_error(capsys.readouterr().err, "river-loadtest")


@pytest.mark.parametrize("args, says", [
    (["--streams", "0"], "--streams"),
    (["--streams", "1,x"], "positive integers"),
    (["--max-tokens", "-3"], "--max-tokens"),
    (["--max-tokens-mix", "16,,32"], "--max-tokens-mix"),
    (["--modes", "full,fast"], "modes out of full, exit, verify"),
    (["--modes", "verify", "--k", "0"], "--k"),
    (["--k", "4"], "add verify to --modes"),
    (["--budget", "safe", "--modes", "verify"], "add exit to --modes"),
    (["--temperature", "nan"], "--temperature"),
    (["--url", "http://127.0.0.1:8001"], "host:port"),
    (["--seed", "x"], "--seed"),
    (["--no-such-flag"], "unrecognized"),
    (["--json", "/no/such/folder/out.json"], "does not exist"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, args, says):
    assert says in run_cli(capsys, *args)


def test_prompts_file_errors(capsys, tmp_path):
    assert "cannot read prompts file" in run_cli(capsys, "--prompts", str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "holds no prompts" in run_cli(capsys, "--prompts", str(tmp_path / "blank.txt"))


def test_unreachable_server_is_one_line_and_exit_2(capsys):
    pytest.importorskip("tritonclient.grpc")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert loadtest.main(["--url", f"127.0.0.1:{port}", "--streams", "1"]) == 2
    assert "cannot reach a Triton server" in assert_one_line_error(capsys.readouterr().err, "river-loadtest")


def test_cli_prints_a_row_per_streams_value_and_writes_json(capsys, tmp_path, monkeypatch):
    fake = FakeServer()
    monkeypatch.setattr(loadtest, "check_server", lambda url, model: None)
    monkeypatch.setattr(loadtest, "_grpc_stream", lambda url, model, timeout: (fake, lambda: None))
    (tmp_path / "prompts.txt").write_text("alpha\n\nbeta\ngamma\n")
    out = tmp_path / "report.json"
    assert loadtest.main(["--streams", "1,3", "--modes", "full,verify", "--k", "2", "--max-tokens-mix", "4,6",
                          "--prompts", str(tmp_path / "prompts.txt"), "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sequential:") and "streams" in lines[1]
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["3"])]
    assert [row[:2] for row in rows] == [["1", "full"], ["3", "full,verify"]]  # the modes each run served
    assert rows[1][8] == "3/3"  # identical outputs: the fake answers the same under load
    doc = json.loads(out.read_text())
    assert doc["config"]["prompts"] == ["alpha", "beta", "gamma"]
    assert [run["streams"] for run in doc["runs"]] == [1, 3] and doc["sequential"]["streams"] == 1
    assert doc["runs"][1]["baseline"]["identical"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_cli_fails_in_one_line_when_every_request_fails(capsys, monkeypatch):
    def reject(prompt, **_):
        raise RuntimeError("server full")
    monkeypatch.setattr(loadtest, "check_server", lambda url, model: None)
    monkeypatch.setattr(loadtest, "_grpc_stream", lambda url, model, timeout: (reject, lambda: None))
    assert loadtest.main(["--streams", "2", "--no-baseline"]) == 2
    assert "every request failed" in assert_one_line_error(capsys.readouterr().err, "river-loadtest")
