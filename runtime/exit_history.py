"""What a recall needs to make a row's cache the full model's again: the exit history beside the cache.

An exited token leaves twin K/V behind for the layers it skipped, and every later token attends to them:
a recalled token computed at full depth over that history can still differ from the full model's (its
near-ties tip). A recall therefore *repairs*: the backbone reruns every position since the row's first
exit still in its cache (``damaged_from``), from the lowest gate any of them left at, and rewrites their
K/V. That needs the residual stream of each such position at that gate, which no cache holds: this
history keeps it, per row, per gate, per position, with the gate each position left at.

Positions before ``damaged_from`` are the full model's (prefill, a repair, steps that never followed an
exit); a position's layers up to its own exit gate are the backbone's. So rerunning positions
``damaged_from..t`` from gate ``r`` (the lowest exit gate among them, or the current step's) over the
exact past gives exactly the full model's K/V and logits.
"""

from __future__ import annotations

import numpy as np

NO_EXIT = -1  # a position that ran every gate (full depth or recalled)
UNDAMAGED = -1  # damaged_from of a row whose cache is the full model's


class ExitHistory:
    """Per row: the residual stream at every gate it passed for each position, the gate each position
    left at, and the first position whose K/V may be a twin's (or depend on one)."""

    def __init__(self, rows: int, positions: int, gates: int, width: int):
        self.hidden = np.zeros((rows, gates, positions, width), np.float32)
        self.exit_gate = np.full((rows, positions), NO_EXIT, np.int8)
        self.damaged_from = np.full(rows, UNDAMAGED, np.int64)

    def rows(self, lo: int, hi: int) -> ExitHistory:
        """Rows [lo, hi) on the same arrays (a pool's view, a backend's one-row view)."""
        out = object.__new__(ExitHistory)
        out.hidden, out.exit_gate, out.damaged_from = self.hidden[lo:hi], self.exit_gate[lo:hi], self.damaged_from[lo:hi]
        return out

    def record(self, row: int, at: int, hidden: list[np.ndarray], exit_gate: int | None) -> None:
        """Positions [at, at+S) of ``row`` left at ``exit_gate`` (None: ran every gate) with the residual
        stream ``hidden[g]`` [S, width] at each gate they passed."""
        s = hidden[0].shape[0]
        passed = len(hidden) if exit_gate is None else exit_gate + 1
        for g in range(passed):
            self.hidden[row, g, at:at + s] = hidden[g]
        self.exit_gate[row, at:at + s] = NO_EXIT if exit_gate is None else exit_gate
        if exit_gate is not None and self.damaged_from[row] == UNDAMAGED:
            self.damaged_from[row] = at

    def repair_gate(self, row: int, until: int, gate: int) -> int:
        """The gate a repair of ``row`` up to position ``until`` (exclusive) starts after, for a step
        that left at ``gate``: the lowest exit among the damaged positions and ``gate``."""
        start = int(self.damaged_from[row])
        exits = self.exit_gate[row, start:until]
        left = exits[exits != NO_EXIT]
        return min(gate, int(left.min())) if left.size else gate

    def forget_from(self, length: int) -> None:
        """Positions >= ``length`` are gone (a rollback): damage that began there goes with them."""
        self.damaged_from[self.damaged_from >= length] = UNDAMAGED

    def copy_row(self, src: int, dst: int, positions: int, source: ExitHistory | None = None) -> None:
        """Row ``dst``'s first ``positions`` take row ``src``'s (of ``source``, default this history)."""
        source = self if source is None else source
        self.hidden[dst, :, :positions] = source.hidden[src, :, :positions]
        self.exit_gate[dst, :positions] = source.exit_gate[src, :positions]
        self.damaged_from[dst] = source.damaged_from[src]
