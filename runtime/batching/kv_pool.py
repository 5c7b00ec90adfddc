"""One KV allocation for every concurrent sequence of a model instance (DESIGN 6c): a row per sequence.

The pool is a ``SharedKVCache`` of ``rows + 1`` rows (the last is scratch for swapping two rows) with
``slack`` positions past the capacity. Live rows are kept contiguous and grouped (the scheduler orders
them), so each group of a step is one contiguous view ``pool.rows(lo, hi)``: a ``KVCache`` whose buffers
are views of the pool's (no copy), with each row's own valid length and gate thresholds. Backends bind
a view like any cache. Moving a row (when another leaves) copies only its valid positions.

The capacity grows when a longer request joins and shrinks when the pool is empty: attention reads
the whole capacity of every row (masked), so a pool sized for the model's context would make every
step pay for it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from river.compiler.river.manifest import DISABLED
from river.compiler.river.recall import RECALL_OFF
from river.errors import CacheOverflow
from river.runtime.exit_history import UNDAMAGED, ExitHistory
from river.runtime.kv_cache import SharedKVCache

CAPACITY_STEP = 64  # capacities are rounded up to a multiple of this (fewer regrowths, fewer bindings)


class RowsView(SharedKVCache):
    """Rows [lo, hi) of a pool, as a cache a backend steps in place: a ``SharedKVCache`` whose buffers
    are views of the pool's and whose rows each have their own length."""

    def __init__(self, pool: "KVPool", lo: int, hi: int):
        self.pool, self.lo, self.hi = pool, lo, hi
        self.keys = [k[lo:hi] for k in pool.cache.keys]
        self.values = [v[lo:hi] for v in pool.cache.values]
        self.batch, self.capacity, self.slack = hi - lo, pool.capacity, pool.slack
        self._lengths = pool.lengths[lo:hi]
        self.row_thresholds = None if pool.thresholds is None else pool.thresholds[lo:hi]
        self.row_recall = pool.recall[lo:hi]
        self.history = None if pool.history is None else pool.history.rows(lo, hi)

    def row_lengths(self) -> np.ndarray:
        return self._lengths

    def row_view(self, i: int) -> "RowsView":
        """Row i of this view, alone (a backend runs what must not mix rows on it)."""
        return self.pool.rows(self.lo + i, self.lo + i + 1)

    @property
    def length(self) -> int:  # the protocol's single length: one-row views (contract steps, prefill)
        if self.batch != 1:
            raise ValueError("a view of several rows has a length per row (row_lengths)")
        return int(self._lengths[0])

    @length.setter
    def length(self, value: int) -> None:
        if self.batch != 1:
            raise ValueError("a view of several rows has a length per row (row_lengths)")
        self._lengths[0] = value

    def require_room(self, new_positions: int) -> None:
        # rows may run past their own room only into the slack (padding of a shorter row's step)
        if int(self._lengths.max()) + new_positions > self.physical:
            raise CacheOverflow(f"{new_positions} new positions do not fit rows of up to "
                                f"{int(self._lengths.max())} positions in a pool of {self.physical}")


class KVPool:
    """KV buffers for up to ``rows`` sequences, allocated once per capacity (see the module docstring)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, rows: int, slack: int,
                 gates: int = 0, capacity: int = CAPACITY_STEP, max_capacity: int | None = None,
                 history: Callable[[int, int], ExitHistory | None] | None = None):
        if rows < 1:
            raise ValueError("a KV pool needs at least one row")
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.num_rows, self.slack, self.gates = rows, slack, gates
        self.max_capacity = max_capacity
        self.lengths = np.zeros(rows + 1, np.int64)
        self.thresholds = np.full((rows + 1, gates), DISABLED, np.float32) if gates else None
        self.recall = np.full(rows + 1, RECALL_OFF, np.float64)  # per row: its recall margin (exit rows)
        self.capacity = 0
        self.cache: SharedKVCache | None = None
        self._new_history = history  # (rows, positions) -> the exit history beside the buffers (recall repairs)
        self.history: ExitHistory | None = None
        self._views: dict[tuple[int, int], RowsView] = {}
        self.allocations = 0  # how many times buffers were allocated (tests: once per capacity)
        self._allocate(capacity)

    @staticmethod
    def rounded(positions: int) -> int:
        return -(-positions // CAPACITY_STEP) * CAPACITY_STEP

    def _allocate(self, capacity: int, keep_rows: int = 0) -> list[RowsView]:
        """New buffers of ``capacity``; the first ``keep_rows`` rows' valid positions are copied over.
        Returns the old views (their backend bindings must be released)."""
        layers, heads, dim = self.shape
        old, old_history, stale = self.cache, self.history, list(self._views.values())
        self.cache = SharedKVCache(layers, self.num_rows + 1, heads, capacity, dim, slack=self.slack)
        self.history = self._new_history(self.num_rows + 1, self.cache.physical) if self._new_history else None
        self.capacity, self._views = capacity, {}
        self.allocations += 1
        if old is not None:
            n = int(self.lengths[:keep_rows].max()) if keep_rows else 0
            for src, dst in zip(old.buffers(), self.cache.buffers()):
                dst[:keep_rows, :, :n] = src[:keep_rows, :, :n]
            if self.history is not None and old_history is not None:
                for row in range(keep_rows):
                    self.history.copy_row(row, row, n, source=old_history)
        return stale

    def fit(self, positions: int, live_rows: int) -> list[RowsView]:
        """Make room for a sequence of ``positions``: grow (or, with no live row, resize) the capacity.
        Returns the views that died (release their bindings)."""
        if self.max_capacity is not None and positions > self.max_capacity:
            raise CacheOverflow(f"a sequence of {positions} positions does not fit the pool's maximum "
                                f"of {self.max_capacity}")
        want = self.rounded(positions)
        if self.max_capacity is not None:
            want = min(want, self.max_capacity)
        if want > self.capacity or (live_rows == 0 and want != self.capacity):
            return self._allocate(want, live_rows)
        return []

    def rows(self, lo: int, hi: int) -> RowsView:
        """The view of rows [lo, hi), made once per pool allocation."""
        if not 0 <= lo < hi <= self.num_rows:
            raise ValueError(f"rows [{lo}, {hi}) are outside the pool's {self.num_rows}")
        view = self._views.get((lo, hi))
        if view is None:
            view = self._views[(lo, hi)] = RowsView(self, lo, hi)
        return view

    def reset_row(self, row: int) -> None:
        """Row ``row`` for a new sequence: empty, every gate off (prefill runs the whole backbone), no
        recall, nothing to repair."""
        self.lengths[row] = 0
        if self.thresholds is not None:
            self.thresholds[row] = DISABLED
        self.recall[row] = RECALL_OFF
        if self.history is not None:
            self.history.damaged_from[row] = UNDAMAGED

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` (its valid positions, length, thresholds, recall margin) to row ``dst``."""
        if src == dst:
            return
        n = int(self.lengths[src])
        for buf in self.cache.buffers():
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst] = self.lengths[src]
        if self.history is not None:
            self.history.copy_row(src, dst, n)
        if self.thresholds is not None:
            self.thresholds[dst] = self.thresholds[src]
        self.recall[dst] = self.recall[src]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Row ``dst``'s first ``n`` positions take row ``src``'s K/V (a shared prompt prefix)."""
        if n > min(int(self.lengths[src]), self.capacity):
            raise ValueError(f"row {src} holds {int(self.lengths[src])} positions, not {n}")
        for buf in self.cache.buffers():
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst] = n

    def permute(self, sources: list[int]) -> None:
        """Row i takes the contents row ``sources[i]`` had (a permutation of live rows, applied in
        cycles through the scratch row)."""
        scratch, done = self.num_rows, set()
        for start in range(len(sources)):
            if start in done or sources[start] == start:
                continue
            self.move(start, scratch)  # row `start` is overwritten first; its contents wait in scratch
            i = start
            while True:
                done.add(i)
                src = sources[i]
                if src == start:
                    self.move(scratch, i)
                    break
                self.move(src, i)
                i = src

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.cache.buffers())
