"""Recall: a token that left the backbone goes back to it when its river is unsure.

The similarity gate decides *before* the river runs, from how little a block changed the residual
stream; it cannot see whether the token's next-token choice is close. The river's own logits can: when
the river's top two tokens are close in probability, a small error in the twins flips the choice.
Measured on SmolLM2-135M (teacher-forced, every token forced to exit after layer 14 with int8 twins and
an int8 head): the river agrees with the full model on 96.3% of tokens, and sending back the 15% with
the smallest margin lifts that to 99.5%.

So after a river runs, a row whose margin ``p(top-1) - p(top-2)`` is below the recall margin is
*recalled*: the backbone continues from the layer the row left at (its residual stream is still there),
to the top, at full precision. It overwrites, in place, the K/V the river wrote for those layers, so the
cache holds what the backbone alone would have written, and the row's logits are the backbone's. A
recalled row does not exit again in that step. Margin 0 (``RECALL_OFF``) never recalls.

A recalled row also *repairs* (``runtime/exit_history.py``): the K/V earlier exits' twins wrote are
rewritten by the backbone, so the row's token and whole cache are the full model's. Recall thus turns
exit mode into drafting by the river with the unsure tokens checked by the backbone, and the earlier a
token leaves, the cheaper the tokens that stay out. A *recall point* is therefore an operating point
where every token leaves at the first gate (``recall_base``) with the margin that calibration
(``compiler/calibrate.py``) measured to keep the flips within an error budget. Measured on SmolLM2-135M
(teacher-forced over 193 tokens of prose, int8 twins and head): gate after layer 1 at margin 0.1, no
token differs from the full model's, at 1.33x its decode speed; at margin 0.05, one, at 1.58x.

This module is recall's one home: the margin, the off value, the points' names and base, and the check
of a user's value.
"""

from __future__ import annotations

import math

import numpy as np

from river.compiler.river.manifest import DISABLED, FORCED_EXIT
from river.errors import RiverError

RECALL_OFF = 0.0  # a margin below which no row falls: never recall
RECALL_SUFFIX = "-recall"  # a recall point is named after its error budget: balanced-recall


def recall_point_name(budget_name: str) -> str:
    return f"{budget_name}{RECALL_SUFFIX}"


def recall_base(num_gates: int) -> list[float]:
    """The gate thresholds of every recall point: each token leaves at the first gate."""
    return [FORCED_EXIT] + [DISABLED] * (num_gates - 1)


def river_margin(logits: np.ndarray) -> np.ndarray:
    """Per row of ``logits`` [..., V]: softmax probability of the top token minus the second's.

    It runs on every exited step while recall is on, so the top two come from two maxima, not a
    partition of the vocabulary (0.09 ms at V=49152 against 1.1 ms, a fifth of an exited SmolLM2
    step); the exp runs at the logits' own precision, summed in float64."""
    x = np.asarray(logits)
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
    top = x.argmax(-1)[..., None]
    peak = np.take_along_axis(x, top, -1)
    rest = x.copy()
    np.put_along_axis(rest, top, -np.inf, -1)
    second = rest.max(-1, keepdims=True)
    norm = np.exp(x - peak).sum(-1, dtype=np.float64)
    return (1.0 - np.exp(second[..., 0].astype(np.float64) - peak[..., 0])) / norm


def check_recall(value, what: str = "recall margin") -> float:
    """A user's recall margin as a float in [0, 1) (0: off)."""
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = math.nan
    if isinstance(value, bool) or not math.isfinite(margin) or not 0.0 <= margin < 1.0:
        raise RiverError(f"bad {what} {value!r}: a probability margin in [0, 1) (0 = never recall)")
    return margin
