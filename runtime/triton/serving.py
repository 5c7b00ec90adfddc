"""What the generation model does with a request, with no Triton types (tested without a server):
parse it (``parse_request``), describe its result (``request_stats``), and, in BLS mode, run it on a
backend of its own (``RequestBackend``: cancellation between steps, KV caches counted in a
``CacheLedger``, the fed tokens recorded). In the default mode requests go to the batch scheduler.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from river.compiler.river.manifest import RiverInfo, check_thresholds
from river.errors import RiverError
from river.runtime.backend import KVCache, StepBackend
from river.runtime.batching.scheduler import MODES
from river.runtime.generate import GenerationConfig, GenerationResult, Generator
from river.runtime.speculative import ADAPTIVE_K, DRAFT_K
from river.runtime.triton.config import DEFAULT_MAX_TOKENS


class RequestError(RiverError, ValueError):
    """A request the model refuses (bad value, prompt past the cache): an INVALID_ARG error to the client."""


class RequestCancelled(Exception):
    """Raised inside the loop when the client has cancelled: unwinds generate() and drops the cache."""


@dataclass
class RequestSpec:
    prompt: str
    cfg: GenerationConfig
    thresholds: list[float] | None = None
    chat: bool = True
    mode: str = "full"  # full | exit | verify (runtime/batching/scheduler.py)
    k: int = DRAFT_K  # verify mode: draft length (adaptive: the first round's)
    adaptive: bool = ADAPTIVE_K  # verify mode: k adapts every round
    budget: str | None = None  # exit mode: a named operating point instead of thresholds


def _scalar(values: Mapping[str, np.ndarray | None], name: str):
    v = values.get(name)
    if v is None:
        return None
    flat = np.asarray(v).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"input '{name}' must hold one value, got {flat.size}")
    return flat[0]


def _text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not valid UTF-8") from None
    return str(value)


def parse_request(values: Mapping[str, np.ndarray | None], gates: int,
                  default_max_tokens: int = DEFAULT_MAX_TOKENS, default_mode: str = "exit") -> RequestSpec:
    """The generation request in ``values`` (input name -> array, None when absent) for a model with
    ``gates`` exit gates (0: a plain step graph). Without a ``mode`` a River graph exits at its own
    thresholds (``default_mode``), a plain graph runs in full."""
    prompt = _scalar(values, "prompt")
    if prompt is None:
        raise RequestError("input 'prompt' is missing")
    prompt = _text(prompt, "prompt")
    if not prompt:
        raise RequestError("the prompt is empty")
    max_tokens = _scalar(values, "max_tokens")
    temperature = _scalar(values, "temperature")
    top_p = _scalar(values, "top_p")
    seed = _scalar(values, "seed")
    stop = [] if values.get("stop") is None else [_text(s, "stop") for s in np.asarray(values["stop"]).reshape(-1)]
    ignore_eos = _scalar(values, "ignore_eos")
    raw = _scalar(values, "raw")
    try:
        cfg = GenerationConfig(
            max_new_tokens=default_max_tokens if max_tokens is None else int(max_tokens),
            temperature=0.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            seed=None if seed is None else int(seed),
            stop=[s for s in stop if s],
            eos_token_ids=[] if ignore_eos is not None and bool(ignore_eos) else None,
        )
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    thresholds = None
    if values.get("thresholds") is not None:
        if not gates:
            raise RequestError("'thresholds' applies to River graphs; this model has no exit gates")
        try:
            thresholds = list(check_thresholds([float(x) for x in np.asarray(values["thresholds"]).reshape(-1)], gates))
        except RiverError as exc:
            raise RequestError(str(exc)) from None
    mode = _scalar(values, "mode")
    mode = None if mode is None else _text(mode, "mode")
    budget = _scalar(values, "budget")
    budget = None if budget is None else _text(budget, "budget")
    if mode is None:
        mode = "exit" if gates and (thresholds is not None or budget is not None or default_mode == "exit") else "full"
    if mode not in MODES:
        raise RequestError(f"unknown mode '{mode}' (choose {', '.join(MODES)})")
    if (thresholds is not None or budget is not None) and mode != "exit":
        raise RequestError(f"'thresholds' and 'budget' apply to mode 'exit', not '{mode}'")
    if thresholds is not None and budget is not None:
        raise RequestError("give 'thresholds' or 'budget', not both")
    if mode == "exit" and not gates:
        raise RequestError("mode 'exit' needs a River graph with exit gates; this model has none")
    k = _scalar(values, "k")
    if k is not None and mode != "verify":
        raise RequestError(f"'k' applies to mode 'verify', not '{mode}'")
    k = DRAFT_K if k is None else int(k)
    if k < 1:
        raise RequestError(f"k must be >= 1, not {k}")
    adaptive = _scalar(values, "adaptive")
    if adaptive is not None and mode != "verify":
        raise RequestError(f"'adaptive' applies to mode 'verify', not '{mode}'")
    adaptive = ADAPTIVE_K if adaptive is None else bool(adaptive)
    return RequestSpec(prompt, cfg, thresholds, chat=not (raw is not None and bool(raw)), mode=mode, k=k,
                       adaptive=adaptive, budget=budget)


class CacheLedger:
    """Counts KV caches alive in this process through weak references, so a stats line can show that a
    cancelled or failed request's buffers were really released, not merely forgotten."""

    def __init__(self):
        self._lock = threading.Lock()
        self.live = 0
        self.live_bytes = 0
        self.freed = 0

    def track(self, cache: KVCache) -> KVCache:
        size = sum(b.nbytes for b in cache.buffers())
        with self._lock:
            self.live += 1
            self.live_bytes += size
        weakref.finalize(cache, self._freed, size)
        return cache

    def _freed(self, size: int) -> None:
        with self._lock:
            self.live -= 1
            self.live_bytes -= size
            self.freed += 1


class RequestBackend(StepBackend):
    """A backend that serves one request on behalf of ``base`` (the instance's backend): same contract,
    gates and default thresholds, this request's own thresholds. Before every step it checks
    ``cancelled``; its caches are counted in ``ledger``; ``fed`` records every token given to an
    extend/decode step, in order (a response carries the tokens that printed nothing yet)."""

    fed: list[int]

    def __init__(self, base: StepBackend, thresholds: Sequence[float] | None = None,
                 cancelled: Callable[[], bool] | None = None, ledger: CacheLedger | None = None):
        self.contract = base.contract
        self.multi_token_steps = base.multi_token_steps
        self._init_river(base.river, base.default_thresholds, thresholds)
        self.cancelled = cancelled or (lambda: False)
        self.ledger = ledger
        self.fed = []

    def _check(self) -> None:
        if self.cancelled():
            raise RequestCancelled()

    def _track(self, cache: KVCache) -> KVCache:
        return cache if self.ledger is None else self.ledger.track(cache)

    def _record(self, token_ids: np.ndarray) -> None:
        self.fed.extend(int(t) for t in np.asarray(token_ids).reshape(-1))


def request_stats(result: GenerationResult, river: RiverInfo | None, num_layers: int,
                  thresholds: Sequence[float] | None, seconds: float) -> dict:
    """The final response's statistics (JSON): token counts, speed, and the exit layer of every decode step."""
    decode_n = sum(1 for s in result.steps if s.phase == "decode")
    tps = result.decode_tokens_per_s
    return {
        "finish_reason": result.finish_reason,
        "prompt_tokens": len(result.prompt_ids),
        "tokens": len(result.token_ids),
        "decode_tokens": decode_n,
        "prefill_ms": round(result.prefill_seconds * 1e3, 3),
        "decode_tokens_per_s": None if np.isnan(tps) else round(tps, 2),
        "seconds": round(seconds, 4),
        "num_layers": num_layers,
        "gates": list(river.gates) if river else [],
        "thresholds": None if thresholds is None else [float(t) for t in thresholds],
        "exit_layers": result.exit_layers,
        "exit_histogram": {str(layer): n for layer, n in result.exit_histogram.items()},
    }


@dataclass
class Served:
    """What one request produced, for the final response and the log."""

    stats: dict
    text: str  # text not yet streamed
    token_ids: list[int] = field(default_factory=list)  # tokens not yet streamed


def serve_request(backend: RequestBackend, tokenizer, eos_token_ids: Sequence[int], max_length: int | None,
                  spec: RequestSpec, emit: Callable[[list[int], str], None],
                  encode_lock: threading.Lock | None = None) -> Served:
    """Run one request on ``backend`` (BLS mode: a backend of its own), streaming through ``emit``.

    The loop calls ``on_token`` only for tokens that print something; every earlier token was fed to a
    decode step, so ``backend.fed`` fills the gaps and each response carries every token it adds.
    """
    t0 = time.perf_counter()
    with encode_lock or threading.Lock():  # fast tokenizers are not safe to encode from several threads
        gen = Generator(backend, tokenizer, eos_token_ids, max_length=max_length)
        prompt_ids = gen.encode(spec.prompt, spec.chat)
    sent: list[int] = []
    pieces: list[str] = []

    def on_token(token: int, piece: str) -> None:
        new = backend.fed[len(sent):] + [int(token)]
        sent.extend(new)
        pieces.append(piece)
        emit(new, piece)

    result = gen.generate(prompt_ids, spec.cfg, on_token=on_token)
    streamed = "".join(pieces)
    rest = result.text[len(streamed):] if result.text.startswith(streamed) else ""
    thresholds = None if backend.thresholds is None else list(backend.thresholds)
    stats = request_stats(result, backend.river, backend.contract.num_layers, thresholds, time.perf_counter() - t0)
    return Served(stats, rest, [int(t) for t in result.token_ids[len(sent):]])
