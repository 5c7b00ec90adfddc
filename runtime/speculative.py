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
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from river.compiler.river_pass import DISABLED
from river.runtime.generate import GenerationConfig, GenerationResult, Generator, StepStat, _TextStream
from river.runtime.kv_cache import SharedKVCache
from river.runtime.ort_backend import OrtBackend
from river.runtime.sampling import next_token_probs


@dataclass
class VerifyStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else float("nan")


class SpeculativeGenerator(Generator):
    """Verify-mode generation with multi-token backbone steps (ONNX Runtime).

    The draft is either a draft graph (``draft``: the river's exit path as its own session, see
    ``compiler/draft_graph.py``) bound to the same KV buffers, or the River graph itself with the
    exit forced at ``draft_gate`` (an index into its gates). The backbone that verifies is
    ``backend``: a plain step graph, or a River graph run with every gate off."""

    def __init__(self, backend: OrtBackend, tokenizer, eos_token_ids: Sequence[int] = (), *,
                 draft: OrtBackend | None = None, draft_gate: int = 0,
                 k: int = 4, adaptive: bool = False, k_max: int = 8, max_length: int | None = None):
        if draft is None and backend.river is None:
            raise ValueError("verify mode needs a draft: a draft graph, or a River graph whose exit river drafts")
        if draft is not None and draft.contract.num_layers != backend.contract.num_layers:
            raise ValueError(f"the draft graph has {draft.contract.num_layers} layers, the backbone "
                             f"{backend.contract.num_layers}: they cannot share KV buffers")
        if k < 1:
            raise ValueError("draft length k must be >= 1")
        super().__init__(backend, tokenizer, eos_token_ids, max_length)
        self.draft_backend = draft
        if backend.river is not None:
            gates = backend.river["gates"]
            if draft is None and not 0 <= draft_gate < len(gates):
                raise ValueError(f"draft gate index {draft_gate} out of range: the graph has gates after layers {gates}")
            self.draft_thresholds = np.full(len(gates), DISABLED, np.float32)
            self.draft_thresholds[draft_gate] = -2.0  # cosine >= -2 always: the exit is forced at this gate
            self.full_thresholds = np.full(len(gates), DISABLED, np.float32)
        self.k, self.adaptive, self.k_max = k, adaptive, max(k_max, k)
        self.stats = VerifyStats()

    # --- one round -------------------------------------------------------------------------
    def draft(self, pending: int, cache: SharedKVCache, k: int, cfg: GenerationConfig, rng) -> tuple[list[int], list]:
        """k draft tokens from the river, and the distributions they were drawn from (None: greedy)."""
        runner = self.draft_backend
        if runner is None:
            runner = self.backend
            runner.set_thresholds(self.draft_thresholds)
        tokens, dists, tok = [], [], pending
        for _ in range(k):
            row = runner.extend(np.asarray([[tok]], np.int64), cache)[0, -1]
            cache.length += 1
            if cfg.temperature > 0:
                q = next_token_probs(row, cfg.temperature, cfg.top_p)
                tok = int(rng.choice(q.shape[0], p=q))
                dists.append(q)
            else:
                tok = int(np.argmax(row))
                dists.append(None)
            tokens.append(tok)
        return tokens, dists

    def verify(self, pending: int, drafted: list[int], dists: list, start: int, cache: SharedKVCache,
               cfg: GenerationConfig, rng) -> list[int]:
        """Backbone over [pending, *drafted] from ``start``; returns accepted tokens + the bonus token."""
        cache.truncate(start)
        if self.backend.river is not None:
            self.backend.set_thresholds(self.full_thresholds)
        rows = self.backend.extend(np.asarray([[pending, *drafted]], np.int64), cache)[0]
        out: list[int] = []
        for i, y in enumerate(drafted):
            if cfg.temperature > 0:
                p = next_token_probs(rows[i], cfg.temperature, cfg.top_p)
                q = dists[i]
                if rng.random() < min(1.0, p[y] / q[y]):
                    out.append(y)
                    continue
                residual = np.maximum(p - q, 0.0)
                total = residual.sum()
                out.append(int(rng.choice(p.shape[0], p=residual / total)) if total > 0 else int(rng.choice(p.shape[0], p=p)))
                break
            if int(np.argmax(rows[i])) == y:
                out.append(y)
                continue
            out.append(int(np.argmax(rows[i])))
            break
        else:  # every draft token accepted: the bonus comes from the last row
            row = rows[len(drafted)]
            out.append(int(rng.choice(row.shape[0], p=next_token_probs(row, cfg.temperature, cfg.top_p)))
                       if cfg.temperature > 0 else int(np.argmax(row)))
        accepted = len(out) - 1
        cache.length = start + 1 + accepted  # pending + accepted drafts hold exact K/V now
        self.stats.rounds += 1
        self.stats.drafted += len(drafted)
        self.stats.accepted += accepted
        self.stats.accepted_lengths.append(accepted)
        return out

    # --- the loop --------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], cfg: GenerationConfig | None = None,
                 on_token: Callable[[int, str], None] | None = None, chat: bool = True) -> GenerationResult:
        cfg = cfg or GenerationConfig()
        # room for the last round's drafts beyond max_new_tokens
        prompt_ids, capacity = self.prompt_and_capacity(prompt, chat, cfg.max_new_tokens + self.k_max + 1)
        self.stats = VerifyStats()
        rng = np.random.default_rng(cfg.seed)
        eos = set(cfg.eos_token_ids if cfg.eos_token_ids is not None else self.eos_token_ids)
        stream = _TextStream(self.tokenizer, cfg.stop)
        cache = self.backend.new_cache(capacity)
        t0 = time.perf_counter()
        first = self.prefill(prompt_ids, cache)
        pending = (int(rng.choice(first.shape[0], p=next_token_probs(first, cfg.temperature, cfg.top_p)))
                   if cfg.temperature > 0 else int(np.argmax(first)))
        steps = [StepStat(0, pending, time.perf_counter() - t0, "prefill")]
        tokens: list[int] = []
        k = self.k

        def emit(tok: int) -> str | None:
            if tok in eos:
                return "eos"
            tokens.append(tok)
            piece, stopped = stream.feed(tokens)
            if on_token is not None and (piece or stopped):
                on_token(tok, piece)
            if stopped:
                return "stop"
            if len(tokens) >= cfg.max_new_tokens:
                return "length"
            return None

        reason = emit(pending)
        while reason is None:
            room = capacity - cache.length - 1
            if room < 1:
                reason = "length"
                break
            kk = min(k, room, cfg.max_new_tokens - len(tokens))
            start = cache.length
            t1 = time.perf_counter()
            drafted, dists = self.draft(pending, cache, kk, cfg, rng)
            t2 = time.perf_counter()
            out = self.verify(pending, drafted, dists, start, cache, cfg, rng)
            t3 = time.perf_counter()
            self.stats.draft_seconds += t2 - t1
            self.stats.verify_seconds += t3 - t2
            per_token = (t3 - t1) / len(out)
            for tok in out:
                steps.append(StepStat(len(steps), tok, per_token, "decode"))
                reason = emit(tok)
                if reason is not None:
                    break
            pending = out[-1]
            if self.adaptive:
                k = min(k + 1, self.k_max) if len(out) - 1 == kk else max(1, k - 1) if len(out) - 1 < kk // 2 else k
        return GenerationResult(prompt_ids, tokens, stream.final(tokens, reason == "stop"), reason, steps)
