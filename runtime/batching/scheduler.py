"""Continuous batching (DESIGN 6c): many requests share every step of one model instance.

Requests join and leave between steps. Each live request owns a row of one ``KVPool``; rows sit at
their own positions (each row's valid length, positions and mask), so a step advances every running
row at once. A step of the scheduler (``step()``):

1. leave: finished and cancelled rows free their row at once (the rows behind move up);
2. join: queued requests take free rows (admission: ``max_rows`` rows, ``max_queue`` waiting, beyond
   that ``submit`` refuses with ``SchedulerFull``);
3. prefill: one chunk (``prefill_chunk`` tokens) of each joining prompt in one step, whole backbone,
   at most ``prefill_budget`` tokens a step, so joining prompts never stall the running streams for
   long; a prompt that starts like
   a live row's (a shared system prompt) copies those positions' K/V instead (``_share_prefix``);
4. verify rows (mode "verify"): k draft steps for all of them, then one backbone step over each row's
   [pending, drafts]; per-row acceptance and rollback of the row's valid length (``accept_drafts``);
5. decode rows (modes "full" and "exit"): one step for all of them; each row exits at its own gate
   with its own thresholds (backends with ``per_row_exits``; "full" rows have every gate off).

Drafting pays only while the batch is small: a batched full-depth step costs little more than a
one-row step, a verify round several steps (and it stalls every other row, prompts being prefilled
too). So greedy verify rows either draft or join the full rows' step at full depth (their output is
the full model's either way), whichever emits the batch's tokens cheaper: one ``DraftPayoff`` per
number of decoding rows measures both (seconds per token of the step's decoding, all rows), starting
with drafting up to ``verify_drafts_up_to`` rows and with full depth beyond; with
``draft_payoff=False`` that rule alone decides (counting live rows, prompts being prefilled too).
Beside exit rows alone greedy verify rows always draft (at full depth the backbone would run to the
last layer for the exit rows); sampled verify rows always draft, so that their draws never depend
on the batch.

Rows are ordered [verify (sampled, then greedy) | full | exit | prefilling] so each group, and the
greedy verify rows with the full rows, is one contiguous view of the pool (a backend without per-row
exits runs each exit row alone). A row's tokens do not depend on its neighbours: the same steps run
for it alone or in a batch, and its sampling draws come from its own seeded generator in the same
order.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from river.compiler.river.manifest import DISABLED, check_thresholds
from river.compiler.river.recall import RECALL_OFF, check_recall
from river.errors import CacheOverflow, RiverError
from river.runtime.backend import StepBackend
from river.runtime.batching.kv_pool import KVPool, RowsView
from river.runtime.generate import Emitter, GenerationConfig, GenerationResult, StepStat
from river.runtime.sampling import is_greedy, sample
from river.runtime.speculative import ADAPTIVE_K, DRAFT_K, EXPLORE_TOKENS, K_MAX, DraftPayoff, accept_drafts, next_k

MODES = ("full", "exit", "verify")  # what a request may ask for (the Triton model and river-loadtest use these)
_GROUP = {"verify": 0, "full": 1, "exit": 2}  # where a decoding row sits in the pool (3: still prefilling)
# Greedy verify rows start out drafting while at most this many rows decode, and decoding at full
# depth in the full rows' step beyond it; then each batch size's DraftPayoff decides (with
# draft_payoff=False, this rule alone, over the live rows). Measured on SmolLM2 (2-core CPU, 8-bit
# draft graph, adaptive k): a batch of verify rows drafting against the same batch at full depth gave
# 1.51x (1 row), 1.11x (2), 0.81x (3), 0.70x (4), 0.60x (8) of the full-depth tokens/s
VERIFY_DRAFTS_UP_TO = 2


class SchedulerFull(RiverError):
    """Every row is busy and the queue is full: the client should retry later."""


class RequestCancelled(RiverError):
    """The request was cancelled before it finished."""


@dataclass
class BatchRequest:
    """One generation request: prompt token ids and how to generate."""

    prompt_ids: Sequence[int]
    cfg: GenerationConfig = field(default_factory=GenerationConfig)
    mode: str = "full"  # full: every layer; exit: River exits at `thresholds`; verify: lossless drafts
    thresholds: Sequence[float] | None = None  # mode "exit" (None: the model's calibrated ones)
    k: int = DRAFT_K  # mode "verify": tokens drafted per round (with ``adaptive``, in the first round)
    adaptive: bool = ADAPTIVE_K  # mode "verify": the row's k adapts every round (speculative.next_k)
    recall: float = RECALL_OFF  # mode "exit": the recall margin (compiler/river/recall.py; segmented River)
    cancelled: Callable[[], bool] | None = None  # polled between steps (e.g. the client went away)


@dataclass
class RowStats:
    """What a request's final response reports beyond its tokens."""

    verify_rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    full_depth_tokens: int = 0  # verify mode: tokens decoded at full depth (a big batch: drafting does not pay)
    recalled_tokens: int = 0  # exit mode: tokens whose river was unsure, decoded by the backbone (recall)
    queued_seconds: float = 0.0
    first_token_seconds: float | None = None  # submit -> first token
    shared_prefix: int = 0  # prompt tokens whose K/V were copied from another request's row


class Ticket:
    """The handle of a submitted request: cancel it, wait for it, read its result."""

    def __init__(self, rid: int, scheduler: "Scheduler"):
        self.id, self._scheduler = rid, scheduler
        self._done = threading.Event()
        self.cancelled = False
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.stats = RowStats()

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next step boundary."""
        self.cancelled = True
        self._scheduler._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """The result, or the request's error raised."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class _Row:
    """A live request: its row in the pool, its emitter, sampler state and what it waits for."""

    def __init__(self, ticket: Ticket, request: BatchRequest, emitter: Emitter, thresholds: np.ndarray | None,
                 capacity: int, on_tokens, on_done):
        self.ticket, self.request, self.emitter = ticket, request, emitter
        self.thresholds, self.capacity = thresholds, capacity  # capacity: positions this row may hold
        self.on_tokens, self.on_done = on_tokens, on_done
        self.rng = np.random.default_rng(request.cfg.seed)
        self.prefilled = 0  # prompt tokens already in the cache
        self.pending: int | None = None  # the token chosen last, not yet in the cache
        self.steps: list[StepStat] = []
        self.sent = 0  # tokens already passed to on_tokens
        self.shown = ""  # text already passed to on_tokens
        self.slot = -1
        self.submitted = time.perf_counter()
        self.k = request.k  # verify mode: tokens to draft next round

    @property
    def group(self) -> int:
        """Where the row sits in the pool: 0 verify, 1 full, 2 exit, 3 still prefilling."""
        if self.prefilled < len(self.request.prompt_ids):
            return 3
        return _GROUP[self.request.mode]

    @property
    def greedy(self) -> bool:
        """Whether its tokens are the argmax (no sampling draws: any full-depth step gives the same)."""
        return is_greedy(self.request.cfg.temperature)

    @property
    def cancelled(self) -> bool:
        probe = self.request.cancelled
        if not self.ticket.cancelled and probe is not None:
            try:
                self.ticket.cancelled = bool(probe())
            except Exception:  # noqa: BLE001 - a dead client connection counts as cancelled
                self.ticket.cancelled = True
        return self.ticket.cancelled


class Scheduler:
    """Continuous batching over one instance's backends (see the module docstring).

    ``decoder`` runs modes full and exit (a River backend with ``per_row_exits`` for exit mode, e.g.
    the segmented backend; a plain step graph for full mode only). ``backbone`` verifies verify-mode
    drafts and prefills their prompts (default: ``decoder`` with every gate off); ``draft`` drafts
    them (default: ``decoder`` with its exit forced at gate ``draft_gate``). All three must share the
    step contract: they step the same pool.
    """

    def __init__(self, decoder: StepBackend, tokenizer, eos_token_ids: Sequence[int] = (), *,
                 backbone: StepBackend | None = None, draft: StepBackend | None = None, draft_gate: int = 0,
                 max_rows: int = 8, max_queue: int = 64, max_length: int | None = None,
                 prefill_chunk: int = 16, k_max: int = K_MAX, budgets: dict[str, Sequence[float]] | None = None,
                 recall_points: dict[str, dict] | None = None,
                 min_shared_prefix: int = 4, prefill_budget: int | None = None,
                 verify_drafts_up_to: int = VERIFY_DRAFTS_UP_TO, draft_payoff: bool = True,
                 clock: Callable[[], float] = time.perf_counter):
        if max_rows < 1 or max_queue < 0 or prefill_chunk < 1 or k_max < 1 or (prefill_budget or 1) < 1:
            raise RiverError("max_rows, prefill_chunk, k_max and prefill_budget must be >= 1, max_queue >= 0")
        for other in (backbone, draft):
            if other is not None and other.contract.num_layers != decoder.contract.num_layers:
                raise RiverError("the backbone, draft and decoder must have the same layers to share a KV pool")
        self.decoder, self.tokenizer, self.eos = decoder, tokenizer, tuple(eos_token_ids)
        self.backbone = backbone or decoder
        self.draft, self.draft_gate = draft, draft_gate
        self.max_rows, self.max_queue, self.max_length = max_rows, max_queue, max_length
        self.prefill_chunk, self.k_max = prefill_chunk, k_max
        self.min_shared_prefix = min_shared_prefix  # shorter common prefixes are recomputed (not worth a copy)
        # prompt tokens one step may prefill over all joining rows: a step's prefill delays every running
        # stream's next token, so this bounds the per-token latency a joining request causes
        self.prefill_budget = 2 * prefill_chunk if prefill_budget is None else prefill_budget
        self.budgets = dict(budgets or {})
        self.recall_points = dict(recall_points or {})
        self.verify_drafts_up_to = verify_drafts_up_to  # module docstring: when drafting pays
        # decoding rows -> whether drafting pays at that batch size, measured (None: the rule above alone)
        self.payoffs: dict[int, DraftPayoff] | None = {} if draft_payoff else None
        self.clock = clock  # what payoffs are measured with (tests give a fake one)
        gates = len(decoder.river.gates) if decoder.river is not None else 0
        c = decoder.contract
        self.pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, max_rows, max(prefill_chunk, k_max + 1),
                           gates, max_capacity=max_length, history=decoder.new_history)
        self.gates = gates
        self._queue: deque[_Row] = deque()
        self._rows: list[_Row] = []  # live rows, in pool order
        self._lock = threading.Condition()
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self.counters = {"submitted": 0, "completed": 0, "cancelled": 0, "failed": 0, "rejected": 0,
                         "tokens": 0, "steps": 0, "drafted": 0, "accepted": 0, "verify_at_full_depth": 0,
                         "recalled": 0, "prefix_tokens_shared": 0}
        self.exit_histogram: dict[int, int] = {}
        self.peak_rows = 0  # the most requests ever batched together
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps: tokens/s

    # --- requests ---------------------------------------------------------------------------------
    def check(self, request: BatchRequest) -> tuple[np.ndarray | None, int]:
        """Refuse a request this scheduler cannot serve (one-line reason); return its row thresholds
        and the positions its row needs."""
        if request.mode not in MODES:
            raise RiverError(f"unknown mode '{request.mode}' (choose {', '.join(MODES)})")
        n = len(request.prompt_ids)
        if n == 0:
            raise RiverError("the prompt is empty")
        thresholds = np.full(self.gates, DISABLED, np.float32) if self.gates else None
        if request.mode == "exit":
            if not self.gates:
                raise RiverError("mode 'exit' needs a River graph with exit gates; this model has none")
            given = request.thresholds if request.thresholds is not None else self.decoder.default_thresholds
            thresholds = np.array(check_thresholds([float(t) for t in given], self.gates), np.float32)
        elif request.thresholds is not None:
            raise RiverError(f"thresholds apply to mode 'exit', not '{request.mode}'")
        if check_recall(request.recall) != RECALL_OFF:
            if request.mode != "exit":
                raise RiverError(f"recall applies to mode 'exit', not '{request.mode}'")
            if not (self.decoder.supports_recall and self.decoder.per_row_exits):  # a pool row's own margin
                raise RiverError(f"recall needs the segmented River (river-export --segmented), not the "
                                 f"{self.decoder.name} backend")
            if self.decoder.kv_window is not None:  # its steps run in the contract form, one margin a batch
                raise RiverError("recall does not reach a sliding-window model's batched steps yet")
        if request.mode == "verify":
            if not 1 <= request.k <= self.k_max:
                raise RiverError(f"k must be between 1 and {self.k_max}, not {request.k}")
            if self.draft is None and not self.gates:
                raise RiverError("mode 'verify' needs a draft: a draft graph, or a River graph whose exit river drafts")
        need = n + request.cfg.max_new_tokens
        if self.max_length is not None:
            if n + 1 > self.max_length:
                raise CacheOverflow(f"the prompt has {n} tokens; the cache holds at most {self.max_length} "
                                    "positions (prompt + at least one new token)")
            need = min(need, self.max_length)
        return thresholds, need

    def budget_point(self, name: str) -> tuple[list[float], float]:
        """(thresholds, recall margin) of a named operating point: calibration.json's budgets (recall
        off) and recall points (``<budget>-recall``)."""
        if name in self.budgets:
            return list(self.budgets[name]), RECALL_OFF
        if name in self.recall_points:
            point = self.recall_points[name]
            return list(point["thresholds"]), float(point["recall"])
        known = ", ".join(sorted(self.budgets) + sorted(self.recall_points)) or "none: the model was not calibrated"
        raise RiverError(f"unknown budget '{name}' (calibrated budgets: {known})")

    def submit(self, request: BatchRequest, on_tokens: Callable[[list[int], str], None] | None = None,
               on_done: Callable[[Ticket], None] | None = None) -> Ticket:
        """Queue a request. ``on_tokens(new_token_ids, text)`` streams (called from the stepping
        thread); ``on_done(ticket)`` runs once it has finished, failed or been cancelled."""
        thresholds, need = self.check(request)
        with self._lock:
            if len(self._rows) + len(self._queue) >= self.max_rows + self.max_queue:
                self.counters["rejected"] += 1
                raise SchedulerFull(f"the server is full: {len(self._rows)} requests running and "
                                    f"{len(self._queue)} queued (max {self.max_rows} + {self.max_queue}); retry later")
            ticket = Ticket(self._next_id, self)
            self._next_id += 1
            cfg = request.cfg
            if need < len(request.prompt_ids) + cfg.max_new_tokens:  # bounded by max_length
                cfg = GenerationConfig(**{**cfg.__dict__, "max_new_tokens": need - len(request.prompt_ids)})
            emitter = Emitter(self.tokenizer, cfg, cfg.eos_token_ids if cfg.eos_token_ids is not None else self.eos,
                              None)
            row_need = need
            if request.mode == "verify":  # room for the last round's drafts past the last token
                row_need = need + request.k + 1 if self.max_length is None else min(need + request.k + 1, self.max_length)
            self._queue.append(_Row(ticket, request, emitter, thresholds, row_need, on_tokens, on_done))
            self.counters["submitted"] += 1
            self._lock.notify_all()
        return ticket

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # --- driving ----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._rows or self._queue)

    def run_until_idle(self) -> None:
        """Step in this thread until every submitted request has finished (tests, river-generate)."""
        while self.busy:
            self.step()

    def start(self) -> None:
        """Step in a background thread (a server): it sleeps while there is nothing to do."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="river-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for row in list(self._rows) + list(self._queue):
            self._finish(row, error=RequestCancelled("the server is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.busy:
                    self._lock.wait()
                if self._stop:
                    return
            self.step()

    # --- one step -----------------------------------------------------------------------------------
    def step(self) -> None:
        """One scheduler step (module docstring)."""
        self._leave()
        self._join()
        if not self._rows:
            return
        tokens = 0
        prefilling = [r for r in self._rows if r.group == 3]
        if prefilling:
            tokens += self._guard(prefilling, self._prefill)
            self._leave()  # a prompt whose first token ends it leaves before the groups' steps
        verify = [r for r in self._rows if r.group == 0 and r.emitter.reason is None]
        decode = [r for r in self._rows if r.group in (1, 2) and r.emitter.reason is None]
        at_full = []  # greedy verify rows decoding at full depth this step (they sit just before the full rows)
        # Beside exit rows alone, full-depth rows would keep the backbone running past their exits
        # for the whole step (measured slower than drafting); beside full rows it runs anyway
        exits_only = any(r.group == 2 for r in decode) and not any(r.group == 1 for r in decode)
        choose = any(r.greedy for r in verify) and not exits_only  # greedy verify rows may go to full depth
        payoff = self._payoff(len(verify) + len(decode)) if choose else None
        if payoff is not None:
            drafting = payoff.drafts()
        else:
            drafting = not choose or len(self._rows) <= self.verify_drafts_up_to
        if not drafting:  # a verify round stalls every live row
            at_full = [r for r in verify if r.greedy]
            verify = [r for r in verify if not r.greedy]
        t0, decoded = self.clock(), 0
        if verify:
            decoded += self._guard(verify, self._verify_round)
        if decode and not self.decoder.per_row_exits:  # full rows together, each exit row alone
            calls = [at_full + [r for r in decode if r.group == 1]] + [[r] for r in decode if r.group == 2]
        else:
            calls = [at_full + decode]
        for rows in calls:
            if rows:
                decoded += self._guard(rows, self._decode_step)
        if payoff is not None and decoded:
            payoff.record(drafting, self.clock() - t0, decoded)
        tokens += decoded
        now = time.perf_counter()
        with self._lock:
            self.counters["steps"] += 1
            self.counters["tokens"] += tokens
            self._recent.append((now, tokens))
            while self._recent and now - self._recent[0][0] > 10.0:
                self._recent.popleft()

    def _payoff(self, n: int) -> DraftPayoff | None:
        """The measure of whether drafting pays in a step that decodes ``n`` rows (None: not measured,
        the fixed rule decides). Keyed by the rows decoding, not the live ones: prompts being prefilled
        take no part in the step's decoding, which is what is timed."""
        if self.payoffs is None:
            return None
        if n not in self.payoffs:  # a larger batch emits more tokens a step: explore as often in steps
            self.payoffs[n] = DraftPayoff(explore_tokens=EXPLORE_TOKENS * n, first=n <= self.verify_drafts_up_to)
        return self.payoffs[n]

    def _guard(self, rows: list[_Row], work: Callable[[list[_Row]], int]) -> int:
        """Run one group's work; a failure fails those rows, not the server."""
        try:
            return work(rows)
        except Exception as exc:  # noqa: BLE001 - one failed step must not stop the other requests
            for row in rows:
                row.emitter.reason = row.emitter.reason or "error"
                row.ticket.error = row.ticket.error or exc
            return 0

    # --- joining and leaving ----------------------------------------------------------------------------
    def _join(self) -> None:
        with self._lock:
            while self._queue and len(self._rows) < self.max_rows:
                row = self._queue.popleft()
                if row.cancelled:
                    self._finish(row, error=RequestCancelled(f"request {row.ticket.id} was cancelled"))
                    continue
                need = max([row.capacity] + [r.capacity for r in self._rows])
                try:
                    self._release(self.pool.fit(need, len(self._rows)))
                except CacheOverflow as exc:
                    self._finish(row, error=exc)
                    continue
                row.ticket.stats.queued_seconds = time.perf_counter() - row.submitted
                row.slot = len(self._rows)
                self.pool.reset_row(row.slot)
                self._rows.append(row)
                self.peak_rows = max(self.peak_rows, len(self._rows))
        self._arrange()

    def _leave(self) -> None:
        with self._lock:
            dropped = [r for r in self._queue if r.cancelled]
            for row in dropped:
                self._queue.remove(row)
        for row in dropped:
            self._finish(row, error=RequestCancelled(f"request {row.ticket.id} was cancelled"))
        gone = [r for r in self._rows if r.emitter.reason is not None or r.cancelled]
        if not gone:
            return
        self._rows = [r for r in self._rows if r not in gone]
        for row in gone:
            if row.ticket.error is not None:
                self._finish(row, error=row.ticket.error)
            elif row.ticket.cancelled and row.emitter.reason is None:
                self._finish(row, error=RequestCancelled(f"request {row.ticket.id} was cancelled"))
            else:
                self._finish(row)
        self._arrange()

    def _arrange(self) -> None:
        """Order live rows [verify | full | exit | prefilling] in the pool's first rows, greedy rows last
        within a group (so greedy verify rows border the full rows), moving as few as the permutation needs."""
        order = sorted(self._rows, key=lambda r: (r.group, r.greedy))  # stable: join order within a group
        sources = [r.slot for r in order]
        if sources != list(range(len(order))):
            full = sources + [s for s in range(self.pool.num_rows) if s not in sources]
            self.pool.permute(full)
            for i, row in enumerate(order):
                row.slot = i
        self._rows = order

    def _release(self, views: list[RowsView]) -> None:
        """Dead views (the pool was reallocated): every backend forgets its bindings to them."""
        for view in views:
            for backend in {id(b): b for b in (self.decoder, self.backbone, self.draft) if b is not None}.values():
                backend.release(view)

    def _finish(self, row: _Row, error: BaseException | None = None) -> None:
        ticket = row.ticket
        self._flush(row)
        if error is not None:
            ticket.error = error
            key = "cancelled" if isinstance(error, RequestCancelled) else "failed"
        else:
            ticket.result = row.emitter.result(list(row.request.prompt_ids), row.steps)
            key = "completed"
        with self._lock:
            self.counters[key] += 1
        ticket._done.set()
        if row.on_done is not None:
            try:
                row.on_done(ticket)
            except Exception:  # noqa: BLE001 - a client callback must not stop the scheduler
                pass

    # --- emitting -------------------------------------------------------------------------------------
    def _emit(self, row: _Row, token: int, seconds: float, phase: str, exit_layer: int | None = None) -> bool:
        """Keep one chosen token; True when the row has finished."""
        row.steps.append(StepStat(len(row.steps), token, seconds, phase, exit_layer))
        if row.ticket.stats.first_token_seconds is None:
            row.ticket.stats.first_token_seconds = time.perf_counter() - row.submitted
        if exit_layer is not None:
            self.exit_histogram[exit_layer] = self.exit_histogram.get(exit_layer, 0) + 1
        finished = row.emitter.emit(token) is not None
        self._flush(row)
        return finished

    def _flush(self, row: _Row) -> None:
        """Pass the row's newly kept tokens, and the text they release, to its stream. The emitter's
        text stream holds back an incomplete character or a possible stop-string prefix; once the row
        has finished its final text (cut before a stop string) is released."""
        em = row.emitter
        tokens = em.tokens[row.sent:]
        if em.reason is not None:
            text = em.stream.final(em.tokens, em.reason == "stop")
        else:
            text = em.stream.text(em.tokens)[:em.stream.emitted] if tokens else row.shown
        piece = text[len(row.shown):] if text.startswith(row.shown) else ""
        row.shown, row.sent = text, len(em.tokens)
        if row.on_tokens is not None and (tokens or piece):
            try:
                row.on_tokens([int(t) for t in tokens], piece)
            except Exception as exc:  # noqa: BLE001 - the client is gone: cancel the request
                row.ticket.cancelled = True
                row.ticket.error = row.ticket.error or RequestCancelled(f"the stream failed: {exc}")

    # --- the three kinds of work ---------------------------------------------------------------------
    def _prefill_backend(self, row: _Row) -> StepBackend:
        return self.backbone if row.request.mode == "verify" else self.decoder

    def _share_prefix(self, row: _Row) -> None:
        """Start a joining prompt where a live row with the same first tokens already is: copy those
        positions' K/V instead of recomputing them (requests share a chat template's system prompt).
        Exact: a position's K/V depend only on the tokens up to it, and the backends compute a row's
        prefill the same however it is chunked (``tests/test_batching.py`` checks batch == alone).
        The last prompt token is always run, for its logits."""
        backend = self._prefill_backend(row)
        best, source = row.prefilled, None
        for other in self._rows:
            if other is not row and self._prefill_backend(other) is backend:
                n = min(self._common_prefix(row, other), other.prefilled)
                if n > best:
                    best, source = n, other
        if source is not None and best >= row.prefilled + self.min_shared_prefix:
            self.pool.copy_prefix(source.slot, row.slot, best)
            with self._lock:
                self.counters["prefix_tokens_shared"] += best - row.prefilled
            row.ticket.stats.shared_prefix = best
            row.prefilled = best

    def _common_prefix(self, row: _Row, other: _Row) -> int:
        """Leading prompt tokens ``row`` could copy from ``other`` once ``other`` has computed them."""
        mine, theirs = row.request.prompt_ids, other.request.prompt_ids
        limit, n = min(len(mine) - 1, len(theirs)), 0
        while n < limit and mine[n] == theirs[n]:
            n += 1
        return n

    def _prefill(self, joining: list[_Row]) -> int:
        """One chunk (up to ``prefill_chunk`` tokens) of every joining prompt, in one step per backend,
        every gate off. A prompt first copies what it shares with a live row (``_share_prefix``); one
        that shares more with a prompt still being computed waits for it rather than recompute it (a
        burst of requests with one system prompt computes it once)."""
        for row in joining:
            self._share_prefix(row)
        ready: list[_Row] = []
        budget = self.prefill_budget
        for row in joining:
            if any(self._common_prefix(row, other) >= row.prefilled + self.min_shared_prefix
                   for other in ready if self._prefill_backend(other) is self._prefill_backend(row)):
                continue  # wait for `other` to compute the shared prefix
            tokens = min(self.prefill_chunk, len(row.request.prompt_ids) - row.prefilled)
            if ready and tokens > budget:
                break  # the step's prefill budget is spent: running streams must not stall
            ready.append(row)
            budget -= tokens
        produced = 0
        for backend in {id(b): b for b in map(self._prefill_backend, ready)}.values():
            rows = [r for r in ready if self._prefill_backend(r) is backend]
            batched = backend.multi_token_steps and backend.kv_window is None
            for group in ([rows] if batched else [[r] for r in rows]):
                produced += self._prefill_rows(backend, group, joining)
        self._arrange()
        return produced

    def _prefill_rows(self, backend: StepBackend, rows: list[_Row], joining: list[_Row]) -> int:
        """Run ``rows``' next chunks in one step over the pool rows they span; the joining rows between
        them (waiting) ride along with a dummy chunk past their valid length, which is never read."""
        lo, hi = rows[0].slot, rows[-1].slot + 1
        span = sorted((r for r in joining if lo <= r.slot < hi), key=lambda r: r.slot)
        chunks = {id(r): list(r.request.prompt_ids[r.prefilled:r.prefilled + self.prefill_chunk]) for r in rows}
        s = max(len(c) for c in chunks.values())
        ids = np.asarray([(chunks.get(id(r)) or [r.request.prompt_ids[r.prefilled]]) for r in span], dtype=object)
        ids = np.asarray([list(c) + [c[-1]] * (s - len(c)) for c in ids], np.int64)
        view = self.pool.rows(lo, hi)
        t0 = time.perf_counter()
        with backend.full_depth():
            logits = backend.extend(ids, view)
        seconds = time.perf_counter() - t0
        produced = 0
        for i, row in enumerate(span):
            chunk = chunks.get(id(row))
            if chunk is None:
                continue
            row.prefilled += len(chunk)
            self.pool.lengths[row.slot] = row.prefilled
            if row.prefilled < len(row.request.prompt_ids):
                continue
            cfg = row.request.cfg
            row.pending, _ = sample(logits[i, len(chunk) - 1], cfg.temperature, cfg.top_p, row.rng)
            if self.pool.thresholds is not None and row.thresholds is not None:
                self.pool.thresholds[row.slot] = row.thresholds
                self.pool.recall[row.slot] = row.request.recall
            self._emit(row, row.pending, seconds, "prefill")
            produced += 1
        return produced

    def _decode_step(self, rows: list[_Row]) -> int:
        """One token for every full/exit row (and greedy verify row at full depth), each at its own
        position and gate."""
        lo, hi = rows[0].slot, rows[-1].slot + 1
        view = self.pool.rows(lo, hi)
        ids = np.asarray([[r.pending] for r in rows], np.int64)
        t0 = time.perf_counter()
        with self._gates_for(self.decoder, view), self.decoder.greedy_logits(all(r.greedy for r in rows)):
            logits = np.array(self.decoder.extend(ids, view)[:, -1])
        seconds = time.perf_counter() - t0
        exits = self._exit_layers(self.decoder, len(rows))
        recalled = self.decoder.last_recalled
        recalled = recalled if recalled is not None and len(recalled) == len(rows) else np.zeros(len(rows), bool)
        view.row_lengths()[:] += 1
        for i, row in enumerate(rows):
            cfg = row.request.cfg
            row.pending, _ = sample(logits[i], cfg.temperature, cfg.top_p, row.rng)
            at_full = row.group == 0  # a verify row at full depth: counted, and no exit layer (as in its rounds)
            if at_full:
                row.ticket.stats.full_depth_tokens += 1
                with self._lock:
                    self.counters["verify_at_full_depth"] += 1
            elif recalled[i]:
                row.ticket.stats.recalled_tokens += 1
                with self._lock:
                    self.counters["recalled"] += 1
            self._emit(row, row.pending, seconds, "decode", None if at_full else exits[i])
        return len(rows)

    def _verify_round(self, rows: list[_Row]) -> int:
        """Draft k tokens for every verify row, verify them in one backbone step, keep what it accepts."""
        lo, hi = rows[0].slot, rows[-1].slot + 1
        view = self.pool.rows(lo, hi)
        lengths = view.row_lengths()
        start = lengths.copy()
        ks = []
        for row in rows:
            room = row.capacity - int(self.pool.lengths[row.slot]) - 1
            ks.append(max(0, min(row.k, room, row.request.cfg.max_new_tokens - len(row.emitter.tokens))))
        for row, k in zip(rows, ks):
            if k < 1:
                row.emitter.reason = row.emitter.reason or "length"
        kmax = max(ks)
        if kmax < 1:
            return 0
        t0 = time.perf_counter()
        drafted = [[] for _ in rows]
        dists = [[] for _ in rows]
        fed = np.asarray([[r.pending] for r in rows], np.int64)
        draft = self.draft or self.decoder
        forced = None if self.draft is not None else self.decoder.gate_thresholds.forced(self.draft_gate)
        for j in range(kmax):
            with self._gates_for(draft, view, forced):
                logits = np.array(draft.extend(fed, view)[:, -1])
            lengths += 1
            for i, row in enumerate(rows):
                if j < ks[i]:
                    cfg = row.request.cfg
                    tok, q = sample(logits[i], cfg.temperature, cfg.top_p, row.rng)
                    drafted[i].append(tok)
                    dists[i].append(q)
                    fed[i, 0] = tok
        lengths[:] = start
        tokens = np.asarray([[r.pending] + d + [d[-1] if d else r.pending] * (kmax - len(d))
                             for r, d in zip(rows, drafted)], np.int64)
        with self._gates_for(self.backbone, view, disabled=True), self.backbone.greedy_logits(all(r.greedy for r in rows)):
            target = np.array(self.backbone.extend(tokens, view))
        seconds = time.perf_counter() - t0
        produced = 0
        for i, row in enumerate(rows):
            if ks[i] < 1:
                continue
            out = accept_drafts(target[i], drafted[i], dists[i], row.request.cfg, row.rng)
            accepted = len(out) - 1
            lengths[i] = start[i] + 1 + accepted
            if row.request.adaptive:  # each row its own k; the batch drafts the longest of them
                row.k = next_k(row.k, ks[i], accepted, self.k_max)
            st = row.ticket.stats
            st.verify_rounds += 1
            st.drafted += ks[i]
            st.accepted += accepted
            with self._lock:
                self.counters["drafted"] += ks[i]
                self.counters["accepted"] += accepted
            for tok in out:
                produced += 1
                if self._emit(row, tok, seconds / len(out), "decode"):
                    break
            row.pending = out[-1]
        return produced

    # --- helpers ------------------------------------------------------------------------------------
    def _gates_for(self, backend: StepBackend, view: RowsView, values: np.ndarray | None = None,
                   disabled: bool = False):
        """Thresholds for one call over ``view``: per row (the pool's rows) for backends that route
        each row, else the backend's own, which every row of the call must share."""
        if backend.gate_thresholds is None:
            return nullcontext()
        if disabled:
            values = backend.gate_thresholds.disabled()
        if values is not None:
            if backend.per_row_exits and view.row_thresholds is not None:
                return _RowThresholds(view, values)
            return backend.gate_thresholds.applied(values)
        if backend.per_row_exits or view.row_thresholds is None:
            return nullcontext()
        rows = view.row_thresholds
        if np.any(rows != rows[0]):
            raise RiverError("rows with different thresholds in one step need a backend with per-row exits")
        return backend.gate_thresholds.applied(rows[0])

    def _exit_layers(self, backend: StepBackend, n: int) -> list[int | None]:
        if backend.river is None:
            return [None] * n
        if backend.last_exit_layers is not None and len(backend.last_exit_layers) == n:
            return [int(x) for x in backend.last_exit_layers]
        return [backend.last_exit_layer] * n

    # --- metrics ---------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Counters and gauges for a metrics endpoint: tokens/s over the last 10 s, occupancy, queue,
        exit histogram, verify acceptance."""
        with self._lock:
            counters = dict(self.counters)
            recent = list(self._recent)
            queue = len(self._queue)
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        tps = sum(t for _, t in recent[1:]) / span if span > 0 else 0.0
        return {**counters, "tokens_per_s": tps, "rows": len(self._rows), "max_rows": self.max_rows, "peak_rows": self.peak_rows,
                "occupancy": len(self._rows) / self.max_rows, "queue_depth": queue,
                "exit_histogram": dict(self.exit_histogram),
                "acceptance": counters["accepted"] / counters["drafted"] if counters["drafted"] else None,
                "pool_capacity": self.pool.capacity, "pool_bytes": self.pool.nbytes}


class _RowThresholds:
    """Set every row of a view to ``values`` for one call, then restore each row's own."""

    def __init__(self, view: RowsView, values: np.ndarray):
        self.view, self.values = view, values

    def __enter__(self):
        self.saved = self.view.row_thresholds.copy()
        self.view.row_thresholds[:] = self.values

    def __exit__(self, *exc):
        self.view.row_thresholds[:] = self.saved
