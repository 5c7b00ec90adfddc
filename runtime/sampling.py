"""Next-token choice, one home for plain and speculative decoding: greedy, or temperature + nucleus
(top-p) sampling with a seeded generator; and the speculative acceptance rule built on the same draws."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    p = np.exp(z)
    return p / p.sum()


def next_token_probs(logits: np.ndarray, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """The distribution sampling draws from (float64, sums to 1)."""
    probs = softmax(logits / temperature)
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]  # smallest set with mass >= top_p
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return probs


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    return int(rng.choice(probs.shape[0], p=probs))


def is_greedy(temperature: float) -> bool:
    """Greedy decoding (the argmax, no draws) is temperature 0."""
    return temperature <= 0.0


def sample(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> tuple[int, np.ndarray | None]:
    """The next token and the distribution it was drawn from (None when greedy: temperature == 0)."""
    if is_greedy(temperature):
        return int(np.argmax(logits)), None
    probs = next_token_probs(logits, temperature, top_p)
    return draw(probs, rng if rng is not None else np.random.default_rng()), probs


def speculative_accept(target_logits: np.ndarray, token: int, draft_probs: np.ndarray | None, temperature: float,
                       top_p: float, rng: np.random.Generator) -> tuple[bool, int]:
    """Verify one drafted token against the target's logits: (accepted, the token to keep).

    Greedy (``draft_probs`` None): accepted iff it is the target's argmax, else the argmax replaces it.
    Sampling: the standard rule, accept with probability min(1, p(y)/q(y)), else draw from
    max(0, p - q) renormalised, so the kept tokens follow the target's distribution exactly."""
    if draft_probs is None:
        best = int(np.argmax(target_logits))
        return best == token, best
    p = next_token_probs(target_logits, temperature, top_p)
    if rng.random() < min(1.0, p[token] / draft_probs[token]):
        return True, token
    residual = np.maximum(p - draft_probs, 0.0)
    total = residual.sum()
    return False, draw(residual / total if total > 0 else p, rng)
