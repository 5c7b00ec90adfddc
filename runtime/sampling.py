"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling with a seeded generator."""

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


def choose_token(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
                 rng: np.random.Generator | None = None) -> int:
    """Greedy when temperature == 0, else a draw from the tempered, top-p filtered distribution."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    if rng is None:
        rng = np.random.default_rng()
    probs = next_token_probs(logits, temperature, top_p)
    return int(rng.choice(probs.shape[0], p=probs))
