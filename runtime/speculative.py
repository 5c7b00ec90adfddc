"""Lossless River (``--mode verify``): the exit river drafts tokens over the shared KV buffers and one
backbone step verifies them, so the output is exactly the full model's.

A round, with ``x`` the pending token (chosen by the backbone, not yet in the cache) at position p:

1. draft: k single-token steps of the draft - the draft graph (``compiler/draft_graph.py``: backbone
   layers up to its exit, 8-bit twins after it) or the River graph with the exit forced at a gate:
   x -> y1, y1 -> y2, ... Each writes its position's K/V into the shared buffers (exact below the
   exit, the twins' approximation above);
2. verify: roll the valid length back to p and run the backbone once over [x, y1..yk] (S = k+1, exits
   off): that overwrites positions p..p+k with exact K/V and gives the backbone's distributions;
3. accept the longest prefix the backbone agrees with (greedy: same argmax; sampling: the standard
   speculative rule, accept y with probability min(1, p(y)/q(y)), else resample from max(0, p-q)),
   then take one more token from the backbone (the bonus), and set the valid length to p + n + 1.

Positions below the valid length always hold the backbone's exact K/V; rejected positions beyond it
are never read (the attention mask stops at the valid length) and are overwritten later. No cache is
copied and there is no second cache.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from river.errors import RiverError
from river.runtime.backend import KVCache, StepBackend
from river.runtime.generate import GenerationConfig, GenerationResult, Generator, StepStat
from river.runtime.sampling import is_greedy, sample, speculative_accept

DRAFT_K = 4  # tokens drafted in a round (with adaptive k, in the first round)
K_MAX = 8  # the most adaptive k grows to
# Adaptive k is the default: on SmolLM2 (2-core CPU, draft graph) it beat fixed k from every start
# tried (k=3..6: 1.45-1.49x against 1.40-1.47x; benchmarks/verify_speed.py --adaptive); easy spans
# get long drafts, hard ones short
ADAPTIVE_K = True
# Adaptive k also drops to 0 (a plain backbone step) while drafting does not pay, and re-measures the
# arm it is not using after this many tokens (DraftPayoff), twice as many after each re-measure that
# keeps the choice, up to EXPLORE_BACKOFF times as many: each costs up to a verify round's worth of
# the dearer arm (in a batch of 6 rows, re-measuring every 64 tokens a row cost 3% of throughput)
EXPLORE_TOKENS = 64
EXPLORE_BACKOFF = 16


def next_k(k: int, drafted: int, accepted: int, k_max: int) -> int:
    """Adaptive k's rule for the next round: one more after a round whose ``drafted`` tokens were all
    accepted (up to ``k_max``), one fewer after one that kept fewer than half, else the same."""
    if accepted == drafted:
        return min(k + 1, k_max)
    return max(1, k - 1) if accepted < drafted // 2 else k


class DraftPayoff:
    """Whether drafting pays on this machine, measured while generating: the cost per emitted token of
    drafting rounds against that of plain rounds (nothing drafted: one backbone step, one token).

    Why: verify mode's output is exact either way, so only speed is at stake, and a draft that costs
    nearly a backbone step cannot pay - e.g. over the grid backbone (``--lowering ort-grid``) SmolLM2's
    8-bit draft costs 8.3 ms a token against an 11 ms plain step, and a verification of 6-9 rows
    costs 3x a step, so drafting ran at 0.83x of plain decoding.

    Each arm's cost is its seconds over its tokens in its last ``window`` rounds: one unlucky round
    (every draft rejected) must not lock drafting out. The ``first`` arm (drafting, unless told) runs
    its first ``min_rounds`` rounds unconditionally and the other is measured right after; then the
    cheaper arm runs, and the other is re-measured with one round once ``explore_tokens`` tokens went
    by without it - twice as many after each re-measure that leaves the choice as it was (up to
    ``EXPLORE_BACKOFF`` times), back to ``explore_tokens`` whenever the choice changes. Kept across
    ``generate`` calls: the costs belong to the machine and the model, not to a prompt. The batch
    scheduler keeps one per batch size (``runtime/batching``)."""

    def __init__(self, explore_tokens: int = EXPLORE_TOKENS, window: int = 16, min_rounds: int = 4,
                 first: bool = True):
        self.explore_tokens, self.min_rounds, self.first = explore_tokens, min_rounds, first
        self.period = explore_tokens  # tokens the arm not chosen waits for its next round
        self.rounds = {True: deque(maxlen=window), False: deque(maxlen=window)}  # (seconds, tokens); True: drafting
        # tokens since each arm last ran; the arm not run first is due as soon as the first has its rounds
        self.waiting = {first: 0, not first: explore_tokens}

    def cost(self, drafting: bool) -> float | None:
        """Seconds per emitted token of an arm over its window (None: not measured yet)."""
        rounds = self.rounds[drafting]
        return sum(s for s, _ in rounds) / sum(t for _, t in rounds) if rounds else None

    def drafts(self) -> bool:
        """Whether the next round should draft."""
        if len(self.rounds[self.first]) < self.min_rounds:
            return self.first
        cheaper = self.cheaper()
        return not cheaper if self.waiting[not cheaper] >= self.period else cheaper

    def cheaper(self) -> bool:
        """The arm that costs less per token (the first arm until the other is measured)."""
        return self.first if self.cost(not self.first) is None else self.cost(True) < self.cost(False)

    def record(self, drafting: bool, seconds: float, tokens: int) -> None:
        """A round of this arm took ``seconds`` and emitted ``tokens`` tokens."""
        settled, before = len(self.rounds[self.first]) >= self.min_rounds, self.cheaper()
        self.rounds[drafting].append((seconds, tokens))
        self.waiting[drafting] = 0
        self.waiting[not drafting] += tokens
        if settled and self.cheaper() != before:  # the choice changed: re-measure the other arm as at first
            self.period = self.explore_tokens
        elif settled and drafting != before:  # a re-measure that kept the choice: wait longer for the next
            self.period = min(2 * self.period, EXPLORE_BACKOFF * self.explore_tokens)


@dataclass
class VerifyStats:
    rounds: int = 0  # drafting rounds (the counts below are theirs)
    drafted: int = 0
    accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    plain_rounds: int = 0  # rounds that drafted nothing: drafting did not pay (DraftPayoff)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else float("nan")


def accept_drafts(target_rows: np.ndarray, drafted: Sequence[int], dists: Sequence, cfg: GenerationConfig,
                  rng: np.random.Generator) -> list[int]:
    """One round's kept tokens: the longest drafted prefix the backbone's rows (``target_rows[i]``: its
    logits after the i-th fed token) accept, then the backbone's own next token (the correction, or
    the bonus when every draft was accepted). Single-stream and batched verify mode both use it."""
    out: list[int] = []
    for i, y in enumerate(drafted):
        accepted, token = speculative_accept(target_rows[i], y, dists[i], cfg.temperature, cfg.top_p, rng)
        out.append(token)
        if not accepted:
            return out
    out.append(sample(target_rows[len(drafted)], cfg.temperature, cfg.top_p, rng)[0])
    return out


class SpeculativeGenerator(Generator):
    """Verify-mode generation over any backend of the protocol whose steps may carry several tokens.

    The draft is either a draft backend (``draft``: e.g. the draft graph, ``compiler/draft_graph.py``)
    bound to the same KV buffers, or the River backend itself with the exit forced at ``draft_gate``
    (an index into its gates). The backbone that verifies is ``backend``: a plain step graph, or a
    River graph run with every gate off.

    ``adaptive``: k adapts every round (``next_k``), and while drafting does not pay the rounds draft
    nothing (``DraftPayoff``; ``skip_drafting=False`` keeps every round drafting). ``clock``: the
    timer the payoff is measured with."""

    def __init__(self, backend: StepBackend, tokenizer, eos_token_ids: Sequence[int] = (), *,
                 draft: StepBackend | None = None, draft_gate: int = 0,
                 k: int = DRAFT_K, adaptive: bool = False, k_max: int = K_MAX, max_length: int | None = None,
                 skip_drafting: bool = True, clock: Callable[[], float] = time.perf_counter):
        if draft is None and backend.river is None:
            raise RiverError("verify mode needs a draft: a draft graph, or a River graph whose exit river drafts")
        if draft is not None and draft.contract.num_layers != backend.contract.num_layers:
            raise RiverError(f"the draft graph has {draft.contract.num_layers} layers, the backbone "
                             f"{backend.contract.num_layers}: they cannot share KV buffers")
        if k < 1:
            raise RiverError("draft length k must be >= 1")
        super().__init__(backend, tokenizer, eos_token_ids, max_length)
        self.draft_backend = draft
        self.draft_thresholds = None if draft is not None else backend.gate_thresholds.forced(draft_gate)
        self.k, self.adaptive, self.k_max = k, adaptive, max(k_max, k)
        self.payoff = DraftPayoff() if adaptive and skip_drafting else None
        self.clock = clock
        self.stats = VerifyStats()

    # --- one round -------------------------------------------------------------------------
    def draft(self, pending: int, cache: KVCache, k: int, cfg: GenerationConfig, rng) -> tuple[list[int], list]:
        """k draft tokens from the river, and the distributions they were drawn from (None: greedy)."""
        runner = self.draft_backend or self.backend
        tokens, dists, tok = [], [], pending
        with nullcontext() if self.draft_backend else self.backend.gate_thresholds.applied(self.draft_thresholds):
            for _ in range(k):
                row = runner.extend(np.asarray([[tok]], np.int64), cache)[0, -1]
                cache.length += 1
                tok, q = sample(row, cfg.temperature, cfg.top_p, rng)
                tokens.append(tok)
                dists.append(q)
        return tokens, dists

    def verify(self, pending: int, drafted: list[int], dists: list, start: int, cache: KVCache,
               cfg: GenerationConfig, rng) -> list[int]:
        """Backbone over [pending, *drafted] from ``start``; returns accepted tokens + the bonus token."""
        cache.truncate(start)
        with self.backend.full_depth():
            rows = self.backend.extend(np.asarray([[pending, *drafted]], np.int64), cache)[0]
        out = accept_drafts(rows, drafted, dists, cfg, rng)
        accepted = len(out) - 1
        cache.length = start + 1 + accepted  # pending + accepted drafts hold exact K/V now
        if drafted:
            self.stats.rounds += 1
            self.stats.drafted += len(drafted)
            self.stats.accepted += accepted
            self.stats.accepted_lengths.append(accepted)
        else:
            self.stats.plain_rounds += 1
        return out

    # --- the loop --------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], cfg: GenerationConfig | None = None,
                 on_token: Callable[[int, str], None] | None = None, chat: bool = True) -> GenerationResult:
        cfg = cfg or GenerationConfig()
        # room for the last round's drafts beyond max_new_tokens
        prompt_ids, capacity = self.prompt_and_capacity(prompt, chat, cfg.max_new_tokens + self.k_max + 1)
        self.stats = VerifyStats()
        rng = np.random.default_rng(cfg.seed)
        emitter = self.emitter(cfg, on_token)
        cache = self.backend.new_cache(capacity)
        try:
            with self.backend.greedy_logits(is_greedy(cfg.temperature)):  # the backbone's; drafts are cheap already
                steps = self._rounds(prompt_ids, cache, capacity, cfg, emitter, rng)
        finally:
            self.backend.release(cache)
            if self.draft_backend is not None:
                self.draft_backend.release(cache)
        return emitter.result(prompt_ids, steps)

    def _rounds(self, prompt_ids, cache: KVCache, capacity: int, cfg: GenerationConfig, emitter, rng) -> list[StepStat]:
        t0 = self.clock()
        first = self.prefill(prompt_ids, cache)
        pending, _ = sample(first, cfg.temperature, cfg.top_p, rng)
        steps = [StepStat(0, pending, self.clock() - t0, "prefill")]
        k = self.k
        reason = emitter.emit(pending)
        while reason is None:
            room = capacity - cache.length - 1
            if room < 1:
                break
            drafting = self.payoff is None or self.payoff.drafts()
            kk = min(k, room, cfg.max_new_tokens - len(emitter.tokens)) if drafting else 0
            start = cache.length
            t1 = self.clock()
            drafted, dists = self.draft(pending, cache, kk, cfg, rng)
            t2 = self.clock()
            out = self.verify(pending, drafted, dists, start, cache, cfg, rng)
            t3 = self.clock()
            if kk:
                self.stats.draft_seconds += t2 - t1
                self.stats.verify_seconds += t3 - t2
            if self.payoff is not None:
                self.payoff.record(kk > 0, t3 - t1, len(out))
            per_token = (t3 - t1) / len(out)
            for tok in out:
                steps.append(StepStat(len(steps), tok, per_token, "decode"))
                reason = emitter.emit(tok)
                if reason is not None:
                    break
            pending = out[-1]
            if self.adaptive and kk:
                k = next_k(k, kk, len(out) - 1, self.k_max)
        return steps
