"""The generation loop (gpt-fast style): ``prefill``, ``decode_one_token``, ``decode_n_tokens``.

The KV cache is allocated once per request with room for prompt + max_new_tokens positions and is
written in place by the backend; the loop itself never touches the cache contents.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from river.errors import CacheOverflow
from river.models.tokenizer import encode_prompt
from river.runtime.backend import KVCache, StepBackend
from river.runtime.sampling import is_greedy, sample


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    eos_token_ids: Sequence[int] | None = None  # None: the model's own EOS ids

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN compared False: silently greedy
            raise ValueError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")


@dataclass
class StepStat:
    index: int  # 0 = the token produced by prefill
    token_id: int
    seconds: float
    phase: str  # "prefill" | "decode"
    exit_layer: int | None = None  # filled by River backends
    recalled: bool = False  # the river was unsure and the backbone ran on (compiler/river/recall.py)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    steps: list[StepStat] = field(default_factory=list)

    @property
    def prefill_seconds(self) -> float:
        return sum(s.seconds for s in self.steps if s.phase == "prefill")

    @property
    def decode_seconds(self) -> float:
        return sum(s.seconds for s in self.steps if s.phase == "decode")

    @property
    def decode_tokens_per_s(self) -> float:
        n = sum(1 for s in self.steps if s.phase == "decode")
        return n / self.decode_seconds if n and self.decode_seconds > 0 else float("nan")

    @property
    def exit_layers(self) -> list[int]:
        """The exit layer of every decode step that reported one (River backends)."""
        return [s.exit_layer for s in self.steps if s.phase == "decode" and s.exit_layer is not None]

    @property
    def exit_histogram(self) -> dict[int, int]:
        """Decode steps per exit layer, by layer."""
        exits = self.exit_layers
        return {layer: exits.count(layer) for layer in sorted(set(exits))}


class _TextStream:
    """Incremental detokenization that never emits text a stop string might still claim."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop, self.emitted = tokenizer, [s for s in stop if s], 0

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def feed(self, ids: list[int]) -> tuple[str, bool]:
        """New printable text, and whether a stop string was reached (text then ends before it)."""
        text = self.text(ids)
        hit = min((text.find(s) for s in self.stop if s in text), default=-1)
        if hit >= 0:
            return text[self.emitted:hit], True
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            safe = text.rfind("\ufffd")
        for s in self.stop:  # hold back a tail that could be the start of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        piece = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return piece, False

    def final(self, ids: list[int], stopped: bool) -> str:
        text = self.text(ids)
        if stopped:
            text = text[: min(text.find(s) for s in self.stop if s in text)]
        return text


class Emitter:
    """The one place that decides "finished" (EOS, a stop string, max_new_tokens) for a request, and
    streams the printable text of each kept token. Plain decoding and verify mode both feed it."""

    def __init__(self, tokenizer, cfg: GenerationConfig, eos: Sequence[int],
                 on_token: Callable[[int, str], None] | None):
        self.cfg, self.eos, self.on_token = cfg, set(eos), on_token
        self.stream = _TextStream(tokenizer, cfg.stop)
        self.tokens: list[int] = []
        self.reason: str | None = None

    def emit(self, token: int) -> str | None:
        """Keep ``token`` (EOS is not kept); return the finish reason once generation is over."""
        if token in self.eos:
            self.reason = "eos"
            return self.reason
        self.tokens.append(token)
        piece, stopped = self.stream.feed(self.tokens)
        if self.on_token is not None and (piece or stopped):
            self.on_token(token, piece)
        if stopped:
            self.reason = "stop"
        elif len(self.tokens) >= self.cfg.max_new_tokens:
            self.reason = "length"
        return self.reason

    def result(self, prompt_ids: list[int], steps: list[StepStat]) -> GenerationResult:
        return GenerationResult(prompt_ids, self.tokens, self.stream.final(self.tokens, self.reason == "stop"),
                                self.reason or "length", steps)


class Generator:
    def __init__(self, backend: StepBackend, tokenizer, eos_token_ids: Sequence[int] = (), max_length: int | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, not {max_length}")
        self.max_length = max_length  # the longest sequence (prompt + new tokens) the cache may hold

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of a prompt; with ``chat`` the model's chat template wraps it as a user turn."""
        return encode_prompt(self.tokenizer, prompt, chat)

    # --- the three phases ---------------------------------------------------------------------
    def prefill(self, prompt_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        logits = self.backend.prefill(np.asarray([prompt_ids], dtype=np.int64), cache)
        cache.length = len(prompt_ids)
        return logits[0, -1]

    def decode_one_token(self, token: int, cache: KVCache) -> np.ndarray:
        logits = self.backend.decode(np.asarray([[token]], dtype=np.int64), cache)
        cache.length += 1
        return logits[0, -1]

    def decode_n_tokens(self, first_logits: np.ndarray, cache: KVCache, cfg: GenerationConfig,
                        emitter: Emitter, steps: list[StepStat]) -> None:
        """Choose tokens until the emitter says generation is finished."""
        rng = np.random.default_rng(cfg.seed)
        logits = first_logits
        while True:
            token, _ = sample(logits, cfg.temperature, cfg.top_p, rng)
            if steps:
                steps[-1].token_id = token
            if emitter.emit(token) is not None:
                return
            t0 = time.perf_counter()
            logits = self.decode_one_token(token, cache)
            recalled = self.backend.last_recalled is not None and bool(self.backend.last_recalled[0])
            steps.append(StepStat(len(steps), -1, time.perf_counter() - t0, "decode", self.backend.last_exit_layer,
                                  recalled))

    def emitter(self, cfg: GenerationConfig, on_token: Callable[[int, str], None] | None) -> Emitter:
        eos = cfg.eos_token_ids if cfg.eos_token_ids is not None else self.eos_token_ids
        return Emitter(self.tokenizer, cfg, eos, on_token)

    def prompt_and_capacity(self, prompt: str | Sequence[int], chat: bool, wanted: int) -> tuple[list[int], int]:
        """Token ids of the prompt and the cache capacity for ``wanted`` more positions, bounded by
        ``max_length``; a prompt that leaves no room for one new token is refused."""
        prompt_ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        capacity = len(prompt_ids) + wanted
        if self.max_length is not None:
            if len(prompt_ids) + 1 > self.max_length:
                raise CacheOverflow(
                    f"the prompt has {len(prompt_ids)} tokens; the cache holds at most {self.max_length} positions "
                    "(prompt + at least one new token)"
                )
            capacity = min(capacity, self.max_length)
        return prompt_ids, capacity

    def generate(self, prompt: str | Sequence[int], cfg: GenerationConfig | None = None,
                 on_token: Callable[[int, str], None] | None = None, chat: bool = True) -> GenerationResult:
        cfg = cfg or GenerationConfig()
        prompt_ids, capacity = self.prompt_and_capacity(prompt, chat, cfg.max_new_tokens)
        cfg = GenerationConfig(**{**cfg.__dict__, "max_new_tokens": capacity - len(prompt_ids)})
        cache = self.backend.new_cache(capacity)
        emitter = self.emitter(cfg, on_token)
        try:
            with self.backend.greedy_logits(is_greedy(cfg.temperature)):
                t0 = time.perf_counter()
                first = self.prefill(prompt_ids, cache)
                steps = [StepStat(0, -1, time.perf_counter() - t0, "prefill")]
                self.decode_n_tokens(first, cache, cfg, emitter, steps)
        finally:
            self.backend.release(cache)
        return emitter.result(prompt_ids, steps)
