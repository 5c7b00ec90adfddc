"""Continuous batching (runtime/batching): the KV pool and the scheduler, in process, on the tiny model.

The invariant behind every test: a request's tokens (and text, exit layers) in a batch equal its
tokens alone, whatever its neighbours do - join, leave, exit elsewhere, draft and verify, get
cancelled - because each row runs the same steps at its own positions over its own KV.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from river.compiler.river.recall import RECALL_OFF
from river.errors import CacheOverflow, RiverError
from river.models.tokenizer import encode_prompt
from river.runtime.batching.kv_pool import KVPool
from river.runtime.batching.scheduler import BatchRequest, RequestCancelled, SchedulerFull
from river.runtime.generate import GenerationConfig
from river.runtime.loading import open_generator, open_scheduler

MIXED = [0.2, 0.65]  # on the tiny model: exits after layers 1, 3 and 4 (no exit) all occur
PROMPTS = ["first river", "a second, longer prompt about deltas and the sea", "3", "fourth stream",
           "five " * 30]  # the last one is prefilled in several chunks


@pytest.fixture(scope="module")
def river_dir(tiny_river_segmented):
    """The tiny River (gates after layers 0 and 2) with its segments: the folder the scheduler opens."""
    return tiny_river_segmented.parent


@pytest.fixture(scope="module")
def make(river_dir):
    def scheduler(**options):
        return open_scheduler(str(river_dir), threads=1, **{"max_rows": 8, "prefill_chunk": 8, **options})
    return scheduler


def request(sched, prompt, n, mode="full", **kw):
    cfg = GenerationConfig(max_new_tokens=n, eos_token_ids=[], **kw.pop("cfg", {}))
    return BatchRequest(encode_prompt(sched.tokenizer, prompt), cfg, mode=mode, **kw)


def alone(sched, req):
    ticket = sched.submit(req)
    sched.run_until_idle()
    return ticket.wait()


def same(a, b):
    assert a.token_ids == b.token_ids
    assert a.text == b.text and a.finish_reason == b.finish_reason
    assert [s.exit_layer for s in a.steps] == [s.exit_layer for s in b.steps]


JOBS = [  # (prompt, new tokens, mode, extra request fields)
    (PROMPTS[0], 40, "full", {}),
    (PROMPTS[1], 25, "exit", {"thresholds": MIXED}),
    (PROMPTS[2], 33, "verify", {"k": 3, "adaptive": False}),  # the others adapt k (the default)
    (PROMPTS[3], 18, "exit", {"thresholds": [-2.0, 2.0]}),
    (PROMPTS[4], 30, "verify", {"k": 5}),
    (PROMPTS[0], 21, "exit", {}),  # the graph's default thresholds
    (PROMPTS[1], 35, "full", {"cfg": {"temperature": 0.9, "top_p": 0.9, "seed": 7}}),
    (PROMPTS[3], 28, "verify", {"k": 4, "cfg": {"temperature": 0.8, "seed": 3}}),
]


def test_mixed_batch_equals_each_request_alone(make):
    sched = make()
    reqs = [request(sched, p, n, mode, **dict(kw)) for p, n, mode, kw in JOBS]
    singles = [alone(sched, r) for r in reqs]
    tickets = [sched.submit(r) for r in reqs]
    sched.run_until_idle()
    for ticket, single in zip(tickets, singles):
        same(ticket.wait(), single)
    m = sched.metrics()
    assert m["peak_rows"] == len(JOBS) and m["rows"] == 0 and m["completed"] == 2 * len(JOBS)
    assert len(m["exit_histogram"]) >= 3, m["exit_histogram"]  # rows left at different gates
    assert m["prefix_tokens_shared"] > 0, "no request reused a live row's prompt prefix"
    assert 0 < m["acceptance"] <= 1
    # full mode alone is the plain generator at full depth
    gen = open_generator(str(sched_folder(sched)), threads=1)
    gen.backend.set_thresholds(gen.backend.gate_thresholds.disabled())
    ref = gen.generate(list(reqs[0].prompt_ids), reqs[0].cfg)
    assert singles[0].token_ids == ref.token_ids


def sched_folder(sched):
    return sched.decoder.index.folder.parent


def test_requests_join_and_leave_between_steps(make):
    """Continuous batching: requests arrive while others run, the pool grows for a longer one, and
    finished rows leave; every request still equals itself alone."""
    sched = make(max_rows=3)
    reqs = [request(sched, p, n, mode, **dict(kw)) for p, n, mode, kw in JOBS[:6]]
    singles = [alone(sched, r) for r in reqs]
    allocations = sched.pool.allocations
    tickets = [sched.submit(reqs[0]), sched.submit(reqs[1])]
    for _ in range(7):
        sched.step()
    tickets.append(sched.submit(request(sched, PROMPTS[4], 120, "full")))  # grows the pool mid-run
    long_alone = None
    for r in reqs[2:]:
        tickets.append(sched.submit(r))
        sched.step()
        sched.step()
    sched.run_until_idle()
    assert sched.pool.allocations > allocations, "the pool never grew"
    for i, single in enumerate(singles[:2]):
        same(tickets[i].wait(), single)
    for ticket, single in zip(tickets[3:], singles[2:]):
        same(ticket.wait(), single)
    long_alone = alone(sched, request(sched, PROMPTS[4], 120, "full"))
    same(tickets[2].wait(), long_alone)
    assert sched.metrics()["peak_rows"] == 3


def test_no_row_reads_a_hole_in_the_pool(make):
    """Poison every position of the pool before a batch: a row reading any position its own steps did
    not write (a hole left by an exit, a neighbour's slot, the slack) would change its tokens. Masked
    positions are multiplied by exactly zero, so the poison is finite."""
    sched = make()
    reqs = [request(sched, p, n, mode, **dict(kw)) for p, n, mode, kw in JOBS[:5]]
    singles = [alone(sched, r) for r in reqs]
    need = max(len(r.prompt_ids) + r.cfg.max_new_tokens + 8 for r in reqs)
    sched.pool.fit(need, 0)
    for buf in sched.pool.cache.buffers():
        buf[:] = 1e4
    tickets = [sched.submit(r) for r in reqs]
    sched.run_until_idle()
    assert sched.pool.allocations == 2 or sched.pool.capacity >= need
    for ticket, single in zip(tickets, singles):
        same(ticket.wait(), single)


def test_admission_control_refuses_a_full_scheduler_and_serves_the_admitted(make):
    sched = make(max_rows=2, max_queue=1)
    reqs = [request(sched, PROMPTS[i], 12) for i in range(4)]
    tickets = [sched.submit(r) for r in reqs[:3]]
    with pytest.raises(SchedulerFull, match="full: 0 requests running and 3 queued") as info:
        sched.submit(reqs[3])
    assert len(str(info.value).splitlines()) == 1
    sched.run_until_idle()
    for ticket, r in zip(tickets, reqs):
        same(ticket.wait(), alone(sched, r))
    assert sched.metrics()["rejected"] == 1
    sched.submit(reqs[3])  # room again
    sched.run_until_idle()


def test_cancelled_request_frees_its_row_at_once_and_neighbours_are_unaffected(make):
    sched = make()
    keep = [request(sched, PROMPTS[0], 60, "exit", thresholds=MIXED), request(sched, PROMPTS[2], 60, "verify")]
    singles = [alone(sched, r) for r in keep]
    flag = {"stop": False}
    polled = request(sched, PROMPTS[1], 200, "full", cancelled=lambda: flag["stop"])
    victim = sched.submit(request(sched, PROMPTS[3], 200, "verify"))
    others = [sched.submit(r) for r in keep]
    watched = sched.submit(polled)
    for _ in range(6):
        sched.step()
    assert sched.metrics()["rows"] == 4
    victim.cancel()
    flag["stop"] = True  # the client went away: seen by polling between steps
    sched.step()
    assert sched.metrics()["rows"] == 2, "the cancelled rows were not freed at the next step"
    with pytest.raises(RequestCancelled):
        victim.wait(0)
    with pytest.raises(RequestCancelled):
        watched.wait(0)
    sched.run_until_idle()
    for ticket, single in zip(others, singles):
        same(ticket.wait(), single)
    assert sched.metrics()["cancelled"] == 2


def test_stream_callbacks_carry_every_token_once_and_the_text(make):
    sched = make()
    got: list[tuple[list[int], str]] = []
    done = []
    req = request(sched, PROMPTS[1], 30, "verify", k=4)
    ticket = sched.submit(req, on_tokens=lambda ids, text: got.append((ids, text)), on_done=done.append)
    sched.run_until_idle()
    result = ticket.wait()
    assert [t for ids, _ in got for t in ids] == result.token_ids
    assert "".join(text for _, text in got) == result.text
    assert done == [ticket] and ticket.stats.verify_rounds > 0 and ticket.stats.first_token_seconds is not None


def test_failing_client_callback_cancels_only_its_request(make):
    sched = make()
    ok = request(sched, PROMPTS[0], 20, "full")

    def broken(ids, text):
        raise ConnectionError("client gone")

    bad = sched.submit(request(sched, PROMPTS[1], 20, "full"), on_tokens=broken)
    good = sched.submit(ok)
    sched.run_until_idle()
    with pytest.raises(RequestCancelled, match="client gone"):
        bad.wait(0)
    same(good.wait(), alone(sched, ok))


@pytest.mark.parametrize("fields, error, message", [
    ({"mode": "fast"}, RiverError, "unknown mode 'fast'"),
    ({"mode": "full", "thresholds": MIXED}, RiverError, "apply to mode 'exit'"),
    ({"mode": "exit", "thresholds": [0.5]}, RiverError, "1 thresholds for 2 gates"),
    ({"mode": "verify", "k": 0}, RiverError, "k must be between 1 and 8"),
    ({"mode": "full", "prompt_ids": []}, RiverError, "the prompt is empty"),
])
def test_bad_requests_get_one_line_errors(make, fields, error, message):
    sched = make()
    req = request(sched, PROMPTS[0], 8)
    for key, value in fields.items():
        setattr(req, key, value)
    with pytest.raises(error, match=message) as info:
        sched.submit(req)
    assert len(str(info.value).splitlines()) == 1
    assert not sched.busy


def test_prompt_past_max_length_is_refused(make):
    sched = make(max_length=48)
    with pytest.raises(CacheOverflow, match="at most 48 positions"):
        sched.submit(request(sched, PROMPTS[4], 4))
    capped = sched.submit(request(sched, PROMPTS[0], 100))  # new tokens stop at the cache's end
    sched.run_until_idle()
    result = capped.wait()
    assert len(result.prompt_ids) + len(result.token_ids) == 48 and result.finish_reason == "length"


def test_budgets_name_the_calibrated_operating_points(make, river_dir):
    sched = make()
    with pytest.raises(RiverError, match="unknown budget 'safe'.*not calibrated"):
        sched.budget_point("safe")
    sched.budgets["safe"] = [0.9, 0.95]
    sched.recall_points["safe-recall"] = {"thresholds": [0.5, 0.6], "recall": 0.25}
    assert sched.budget_point("safe") == ([0.9, 0.95], RECALL_OFF)
    assert sched.budget_point("safe-recall") == ([0.5, 0.6], 0.25)
    with pytest.raises(RiverError, match="unknown budget 'fast'.*safe, safe-recall"):
        sched.budget_point("fast")


def test_exit_rows_with_and_without_recall_equal_each_alone(make):
    """Exit rows at the same thresholds, some with a recall margin (some of their steps go back to the
    backbone) and some without, batched with a full row: each equals itself alone; recall is refused
    outside exit mode."""
    sched = make()
    forced = [-2.0, 2.0]  # every step exits at gate 0: recall decides
    reqs = [request(sched, PROMPTS[0], 20, "exit", thresholds=forced, recall=0.999999),
            request(sched, PROMPTS[1], 16, "exit", thresholds=forced),
            request(sched, PROMPTS[3], 18, "full"),
            request(sched, PROMPTS[2], 22, "exit", thresholds=forced, recall=0.999999)]
    singles = [alone(sched, r) for r in reqs]
    tickets = [sched.submit(r) for r in reqs]
    sched.run_until_idle()
    for ticket, single in zip(tickets, singles):
        same(ticket.wait(), single)
    L = sched.decoder.contract.num_layers
    assert {s.exit_layer for s in singles[0].steps[1:]} == {L}  # every exit recalled: full depth
    assert {s.exit_layer for s in singles[1].steps[1:]} == {1}
    counted = [t.stats.recalled_tokens for t in tickets]  # every decode step of the recall rows, none of the others
    assert counted == [len(singles[0].steps) - 1, 0, 0, len(singles[3].steps) - 1]
    assert sched.counters["recalled"] == 2 * sum(counted)  # the requests alone, then batched
    full = alone(sched, request(sched, PROMPTS[0], 20, "full"))
    assert singles[0].token_ids == full.token_ids
    for mode in ("full", "verify"):
        with pytest.raises(RiverError, match="recall applies to mode 'exit'"):
            sched.submit(request(sched, PROMPTS[0], 4, mode, recall=0.5))


def test_pool_permutation_and_views():
    pool = KVPool(num_layers=2, num_kv_heads=1, head_dim=2, rows=4, slack=2, gates=1, capacity=8)
    for row in range(4):
        pool.lengths[row] = row + 1
        pool.thresholds[row] = row
        for buf in pool.cache.buffers():
            buf[row, :, : row + 1] = row
    pool.permute([2, 0, 3, 1])  # row i takes what row sources[i] held
    assert list(pool.lengths[:4]) == [3, 1, 4, 2] and list(pool.thresholds[:4, 0]) == [2, 0, 3, 1]
    for i, src in enumerate([2, 0, 3, 1]):
        for buf in pool.cache.buffers():
            assert np.all(buf[i, :, : src + 1] == src)
    view = pool.rows(1, 3)
    assert view.keys[0].base is not None and np.shares_memory(view.keys[0], pool.cache.keys[0])
    assert list(view.row_lengths()) == [1, 4] and view.physical == 10
    with pytest.raises(ValueError, match="length per row"):
        view.length  # noqa: B018
    assert pool.rows(1, 3) is view, "views are made once per allocation"
    assert pool.rows(2, 3).length == 4
    with pytest.raises(CacheOverflow, match="maximum of 64"):
        KVPool(2, 1, 2, rows=1, slack=1, max_capacity=64).fit(65, 0)


def test_generate_cli_answers_a_prompts_file_batched(make, river_dir, tmp_path, capsys):
    from river.runtime.cli import main

    prompts = ["first river", "3", "fourth stream"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    assert main(["--model", str(river_dir), "--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "12",
                 "--mode", "verify", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    sched = make()
    for i, prompt in enumerate(prompts):
        single = alone(sched, BatchRequest(encode_prompt(sched.tokenizer, prompt), GenerationConfig(max_new_tokens=12),
                                           mode="verify"))
        assert f"### {i + 1}: {prompt}\n{single.text}\n" in out
    assert "3 prompts, mode verify" in err and "peak batch 3" in err
    assert re.search(r"verify: \d+ tokens drafted.*; \d+ tokens at full depth", err), err
    assert main(["--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "--prompts file not found" in capsys.readouterr().err


def test_requests_that_end_at_their_first_token_leave_the_batch_cleanly(make):
    """A request finished by its prefill (one new token) must not leave a hole in its group's rows."""
    sched = make()
    reqs = [request(sched, PROMPTS[0], 20, "full"), request(sched, PROMPTS[1], 1, "full"),
            request(sched, PROMPTS[2], 15, "exit", thresholds=MIXED), request(sched, PROMPTS[3], 1, "verify"),
            request(sched, PROMPTS[0], 12, "verify"), request(sched, PROMPTS[4], 1, "exit")]
    singles = [alone(sched, r) for r in reqs]
    tickets = [sched.submit(r) for r in reqs]
    sched.run_until_idle()
    for ticket, single in zip(tickets, singles):
        same(ticket.wait(), single)
    assert [len(t.wait().token_ids) for t in tickets] == [20, 1, 15, 1, 12, 1]


def test_verify_rows_adapt_their_own_k(make, monkeypatch):
    """Adaptive k per row: a verify row's draft length follows its own acceptance (next_k), so its
    rounds change with it while the tokens stay the full model's."""
    from river.runtime.batching import scheduler as scheduler_module

    sched = make(draft_payoff=False)  # every round drafts, whatever the timings
    fixed = alone(sched, request(sched, PROMPTS[1], 40, "verify", k=2, adaptive=False))
    seen: list[tuple[int, int]] = []  # (k, drafted) of every round
    real = scheduler_module.next_k
    monkeypatch.setattr(scheduler_module, "next_k", lambda k, d, a, m: seen.append((k, d)) or real(k, d, a, m))
    ticket = sched.submit(request(sched, PROMPTS[1], 40, "verify", k=2, adaptive=True))
    sched.run_until_idle()
    assert ticket.wait().token_ids == fixed.token_ids  # lossless either way
    assert len(seen) == ticket.stats.verify_rounds
    assert {k for k, _ in seen} != {2}, seen  # k moved away from its start
    assert all(d <= k for k, d in seen)  # a round drafts at most the row's k


def test_greedy_verify_rows_decode_at_full_depth_in_a_big_batch(make):
    """Beyond verify_drafts_up_to decoding rows, greedy verify rows join the full rows' step at full
    depth (same tokens as drafting alone), while a sampled verify row keeps drafting (its draws must
    not depend on the batch); at or below the limit every verify row drafts."""
    reqs_of = lambda sched: [request(sched, PROMPTS[0], 20, "verify", k=3), request(sched, PROMPTS[1], 24, "full"),
                             request(sched, PROMPTS[2], 22, "verify", cfg={"temperature": 0.8, "seed": 5}),
                             request(sched, PROMPTS[3], 18, "verify"), request(sched, PROMPTS[0], 16, "exit",
                                                                                thresholds=MIXED)]
    for limit, switched in ((2, True), (8, False)):
        sched = make(verify_drafts_up_to=limit, draft_payoff=False)  # the rule alone, not the timings
        reqs = reqs_of(sched)
        singles = [alone(sched, r) for r in reqs]
        assert sched.counters["verify_at_full_depth"] == 0  # one row at a time: every verify row drafts
        tickets = [sched.submit(r) for r in reqs]
        sched.run_until_idle()
        for ticket, single in zip(tickets, singles):
            same(ticket.wait(), single)
        assert (sched.counters["verify_at_full_depth"] > 0) == switched
        assert tickets[2].stats.verify_rounds > 0 and tickets[2].stats.full_depth_tokens == 0  # sampled: drafts
        at_full = tickets[0].stats.full_depth_tokens + tickets[3].stats.full_depth_tokens
        assert at_full == sched.counters["verify_at_full_depth"] and (at_full > 0) == switched
        if not switched:
            assert tickets[0].stats.verify_rounds > 0 and tickets[3].stats.verify_rounds > 0


def _timed(sched, verify_round: float, decode_step: float) -> None:
    """Give ``sched`` a fake clock that a verify round and a decode step advance by these costs."""
    now = [0.0]
    sched.clock = lambda: now[0]
    for name, cost in (("_verify_round", verify_round), ("_decode_step", decode_step)):
        real = getattr(sched, name)
        setattr(sched, name, lambda rows, real=real, cost=cost: now.__setitem__(0, now[0] + cost) or real(rows))


def test_greedy_verify_rows_draft_where_it_measures_cheaper(make):
    """With measured payoffs (the default) the timings decide, per batch size, whether greedy verify
    rows draft: a dear verify round sends a lone row to full depth after its first rounds, a cheap one
    brings three rows (beyond ``verify_drafts_up_to``, where they start at full depth) to drafting.
    The tokens are each request's own either way."""
    fixed = make(draft_payoff=False)  # each request alone, every round drafting: the tokens to match
    alone_req = request(fixed, PROMPTS[1], 40, "verify", k=3)
    trio = [request(fixed, p, 24, "verify", k=3) for p in PROMPTS[:3]]
    singles = [alone(fixed, r) for r in [alone_req, *trio]]

    dear = make(verify_drafts_up_to=2)
    _timed(dear, verify_round=1.0, decode_step=0.01)  # a round costs 100 steps: never worth its tokens
    ticket = dear.submit(alone_req)
    dear.run_until_idle()
    same(ticket.wait(), singles[0])
    assert ticket.stats.verify_rounds == 4, ticket.stats  # the first rounds measure drafting, then none
    assert ticket.stats.full_depth_tokens > 0 and dear.counters["verify_at_full_depth"] == ticket.stats.full_depth_tokens

    cheap = make(verify_drafts_up_to=2, prefill_chunk=64)  # the three prompts prefill in one step: they decode together
    _timed(cheap, verify_round=0.01, decode_step=1.0)  # a round costs a hundredth of a step
    tickets = [cheap.submit(r) for r in trio]
    cheap.run_until_idle()
    for t, single in zip(tickets, singles[1:]):
        same(t.wait(), single)
        assert t.stats.full_depth_tokens <= 4 and t.stats.verify_rounds > 1, t.stats
    assert cheap.counters["verify_at_full_depth"] > 0  # the first steps at three rows measured full depth
    assert set(cheap.payoffs) >= {3}
    assert cheap.payoffs[3].cost(True) < cheap.payoffs[3].cost(False)


def test_batch_drafting_benchmark_compares_the_policies_on_the_same_tokens(river_dir, capsys):
    """benchmarks/batch_drafting.py: a row per batch size with every policy's tokens/s and the ratios
    (it stops if a policy's tokens differ from the measured one's)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("batch_drafting", Path(__file__).parents[1] / "benchmarks" / "batch_drafting.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(river_dir), "--streams", "1,3", "--tokens", "6", "--threads", "1"], shared_pool=False)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows] == ["streams", "1", "3"]
    assert all(float(v) > 0 for r in rows[1:] for v in r[1:4]) and all(r[4].strip().endswith("x") for r in rows[1:])


def test_greedy_verify_rows_keep_drafting_beside_exit_rows_alone(make, monkeypatch):
    """In a big batch whose other decoding rows all exit early, verify rows keep drafting: at full
    depth they would make the backbone run past every exit row's gate."""
    from river.runtime.batching.scheduler import Scheduler

    sched = make(verify_drafts_up_to=2, draft_payoff=False)
    reqs = [request(sched, PROMPTS[0], 20, "verify"), request(sched, PROMPTS[1], 18, "exit", thresholds=MIXED),
            request(sched, PROMPTS[3], 16, "exit", thresholds=MIXED), request(sched, PROMPTS[2], 14, "verify")]
    singles = [alone(sched, r) for r in reqs]
    beside_exits = []  # verify_at_full_depth added by each step that began with exit rows decoding and no full row
    real_step = Scheduler.step

    def step(self):
        decoding = {r.group for r in self._rows if r.emitter.reason is None}
        before = self.counters["verify_at_full_depth"]
        real_step(self)
        if 2 in decoding and 1 not in decoding and 3 not in decoding:
            beside_exits.append(self.counters["verify_at_full_depth"] - before)

    monkeypatch.setattr(Scheduler, "step", step)
    tickets = [sched.submit(r) for r in reqs]
    sched.run_until_idle()
    for ticket, single in zip(tickets, singles):
        same(ticket.wait(), single)
    assert len(beside_exits) > 3 and not any(beside_exits), beside_exits
    assert tickets[0].stats.verify_rounds > 0 and tickets[3].stats.verify_rounds > 0
