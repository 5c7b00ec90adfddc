"""The backend protocol: the one interface every step backend implements (ONNX Runtime, segmented
ONNX Runtime, TensorRT, the torch reference) and the generation loops, verify mode, Triton and the
benchmark are written against. Nothing outside a backend reaches into its internals.

A backend runs steps of a decode-step graph (or a River graph) over a KV cache it allocates:

- ``new_cache(capacity, batch)``: buffers allocated once per request;
- ``prefill(ids, cache)``: the prompt over an empty cache, whole backbone (gates off);
- ``extend(ids, cache)``: S new tokens per row at ``cache.length`` (S = 1: ``decode``); the caller
  moves ``cache.length`` (verify mode keeps it where a draft was rejected);
- ``set_thresholds`` / ``thresholds`` / ``default_thresholds``: the operating point (River graphs);
- ``set_recall``: the recall margin of the operating point (``compiler/river/recall.py``), on backends
  that can send an exited row back to the backbone (``supports_recall``);
- ``last_exit_layer``: where the last step left the backbone (None for plain graphs);
- ``release(cache)``: forget any binding to that cache, so its buffers die with the request.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np

from river.compiler.river.manifest import DISABLED, FORCED_EXIT, RiverInfo, check_thresholds
from river.compiler.river.recall import RECALL_OFF, check_recall
from river.errors import CacheOverflow, RiverError
from river.export import contract as C
from river.export.contract import StepContract


class KVCache:
    """What the loops see of a cache, host or device: capacity, batch, the valid length (the same for
    every row), a room check and rollback. Subclasses hold the buffers.

    Batched serving (``runtime/batching``) gives each row its own valid length (``row_lengths``) and
    may give each row its own gate thresholds (``row_thresholds`` [B,G]). ``slack`` positions past the
    capacity take the writes of rows that sit out part of a step (a row that exited at an earlier gate
    while its neighbours run on): they are never valid, so never read."""

    capacity: int
    batch: int
    length: int = 0
    slack: int = 0
    row_thresholds: np.ndarray | None = None  # [B,G] per-row gate thresholds; None: the backend's
    row_recall: np.ndarray | None = None  # [B] per-row recall margins; None: the backend's
    history = None  # the exit history a recall repairs from (runtime/exit_history.py); None: no repairs

    @property
    def physical(self) -> int:
        """Positions each buffer holds: the capacity plus the slack."""
        return self.capacity + self.slack

    def row_lengths(self) -> np.ndarray:
        """Each row's valid length [B] (int64)."""
        return np.full(self.batch, self.length, np.int64)

    def require_room(self, new_positions: int) -> None:
        if self.length + new_positions > self.capacity:
            raise CacheOverflow(f"{new_positions} new positions do not fit: the cache holds {self.length} of {self.capacity}")

    def valid_kv(self, layer: int, kind: str) -> np.ndarray:
        """A host copy of one layer's valid K or V [B,Hkv,length,D] (checks and parity runs)."""
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Forget positions >= length (their slots are overwritten by later writes)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
        if self.history is not None:  # damage past the new end is forgotten with it
            self.history.forget_from(length)


class GateThresholds:
    """The per-gate thresholds of a River backend: the graph's defaults and the current values, in one
    float32 array that backends may bind by pointer (so it is changed in place, never replaced)."""

    def __init__(self, info: RiverInfo, defaults: Sequence[float] | None = None, initial: Sequence[float] | None = None):
        self.gates = tuple(info.gates)
        base = [DISABLED] * len(self.gates) if defaults is None else defaults
        self.defaults = np.array(check_thresholds(list(base), len(self.gates), "default thresholds"), np.float32)
        self.values = self.defaults.copy()
        if initial is not None:
            self.set(initial)

    def set(self, values: Sequence[float]) -> None:
        given = list(values) if isinstance(values, (list, tuple)) else [float(x) for x in np.asarray(values).reshape(-1)]
        self.values[:] = check_thresholds(given, len(self.gates))

    def disabled(self) -> np.ndarray:
        return np.full(len(self.gates), DISABLED, np.float32)

    def forced(self, gate_index: int) -> np.ndarray:
        """Every gate off except ``gate_index``, which always fires (verify mode's River draft)."""
        if not 0 <= gate_index < len(self.gates):
            raise RiverError(f"gate index {gate_index} out of range: the graph has gates after layers {list(self.gates)}")
        out = self.disabled()
        out[gate_index] = FORCED_EXIT
        return out

    @contextmanager
    def applied(self, values: np.ndarray):
        """Run a block with other thresholds (e.g. prefill's whole backbone), then restore."""
        saved = self.values.copy()
        self.values[:] = values
        try:
            yield
        finally:
            self.values[:] = saved


def route_gates(num_gates: int, backbone: Callable[[int], bool], finish: Callable[[int | None], None],
                recall: Callable[[int], bool] | None = None) -> int | None:
    """The one gate router of the segmented backends: run backbone segment k (it returns whether gate
    k fired) until a gate fires or none is left, then ``finish(exit_gate)`` runs river k or the last
    backbone segment (exit_gate None). ``recall(k)``, asked after river k, True: the step goes back to
    the backbone after gate k and runs it to the top, gates ignored (``compiler/river/recall.py``).
    Returns the gate the step exited at (None: full depth, recalled or not)."""
    recalled = False
    for k in range(num_gates):
        if backbone(k) and not recalled:
            finish(k)
            if recall is None or not recall(k):
                return k
            recalled = True
    finish(None)
    return None


class StepBackend(ABC):
    """The backend protocol (module docstring). ``river`` is None for a plain step graph."""

    name: str = "backend"
    contract: StepContract
    river: RiverInfo | None = None
    gate_thresholds: GateThresholds | None = None
    last_exit_layer: int | None = None
    multi_token_steps: bool = True  # steps of S > 1 tokens run in place (else as contract steps: _needs_contract_step)
    kv_window: int | None = None  # the graph masks by a sliding window: every step runs in the contract form
    per_row_exits: bool = False  # each row of a batch exits at its own gate (else a gate fires when all rows clear it)
    last_exit_layers: np.ndarray | None = None  # per row, where the last step left the backbone (per-row backends)
    supports_recall: bool = False  # can send an exited row back to the backbone (set_recall)
    recall_margin: float = RECALL_OFF
    last_recalled: np.ndarray | None = None  # per row, whether the last step recalled it (backends with recall)

    # --- caches -----------------------------------------------------------------------------------
    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        from river.runtime.kv_cache import SharedKVCache

        c = self.contract
        return SharedKVCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim)

    def new_history(self, rows: int, positions: int):
        """The exit history its recalls repair from, for a cache of ``rows`` x ``positions`` (a batch
        pool asks for one beside its buffers); None: this backend's recalls repair nothing."""
        return None

    def release(self, cache: KVCache | None = None) -> None:
        """Forget bindings to ``cache`` (None: to any cache). Backends that bind nothing do nothing."""

    # --- steps ------------------------------------------------------------------------------------
    @abstractmethod
    def prefill(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run the prompt [B,S] over an empty cache with every gate off; write positions [0,S); return
        logits [B,S,V]. The caller sets ``cache.length``."""

    @abstractmethod
    def extend(self, token_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run S new tokens per row [B,S] at positions ``cache.length`` .. +S-1, writing only those
        positions of every layer; return logits [B,S,V] (may be a view valid until the next call).
        The caller advances (or, after a rejected draft, keeps) ``cache.length``."""

    def decode(self, token_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """One new token per row [B,1]."""
        if token_ids.shape[1] != 1:
            raise ValueError("decode runs one token per row; use extend for several")
        return self.extend(token_ids, cache)

    # --- thresholds -------------------------------------------------------------------------------
    @property
    def thresholds(self) -> np.ndarray | None:
        return None if self.gate_thresholds is None else self.gate_thresholds.values

    @property
    def default_thresholds(self) -> np.ndarray | None:
        return None if self.gate_thresholds is None else self.gate_thresholds.defaults

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Change the operating point between steps."""
        if self.gate_thresholds is None:
            raise RiverError("thresholds apply to River graphs; this model has no exit gates")
        self.gate_thresholds.set(thresholds)

    def set_recall(self, margin) -> None:
        """Change the recall margin between steps (``RECALL_OFF``: never recall)."""
        margin = check_recall(margin)
        if margin != RECALL_OFF and self.river is None:
            raise RiverError("recall applies to River graphs; this model has no exit gates")
        if margin != RECALL_OFF and not self.supports_recall:
            raise RiverError(f"recall needs a backend that can send an exited row back to the backbone: the "
                             f"segmented River (river-export --segmented) or the torch reference, not {self.name}")
        self.recall_margin = margin

    def _init_river(self, info: RiverInfo | None, defaults=None, thresholds=None) -> None:
        self.river = info
        self.gate_thresholds = None if info is None else GateThresholds(info, defaults, thresholds)

    @contextmanager
    def full_depth(self):
        """Every gate off for the block (prefill, verification); no-op for plain graphs."""
        if self.gate_thresholds is None:
            yield
            return
        with self.gate_thresholds.applied(self.gate_thresholds.disabled()):
            yield

    @contextmanager
    def greedy_logits(self, on: bool = True):
        """Within the block (when ``on``) the logits need be exact only where they can be the argmax -
        greedy decoding and greedy verification read nothing else - so a backend may run a cheaper head
        (ONNX Runtime: ``compiler/lowering/greedy_head.py``). Default: no change."""
        yield

    def exit_layer_of(self, exit_gate: int | None) -> int:
        return self.contract.num_layers if exit_gate is None else self.river.gates[exit_gate] + 1

    # --- shared by the backends' prefills ---------------------------------------------------------
    def _prefill_by_extend(self, input_ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Prefill as one multi-token step over the empty cache with every gate off (backends whose
        steps are exact for any S)."""
        self._check_prefill(input_ids, cache)
        with self.full_depth():
            logits = np.array(self.extend(input_ids.astype(np.int64), cache))
        self.last_exit_layer = None
        return logits

    @staticmethod
    def _check_prefill(input_ids: np.ndarray, cache: KVCache) -> None:
        if cache.length:
            raise ValueError("prefill expects an empty cache")
        cache.require_room(input_ids.shape[1])

    def _needs_contract_step(self, token_ids: np.ndarray, cache: KVCache) -> bool:
        """Whether this step must run in the contract form to stay exact: several tokens (a prefill, a
        verification) of a graph that masks by index, or any step of a sliding-window graph. Their
        shared-KV form derives the step's cache position from the buffer's capacity: right for the
        causal mask of one new token, wrong among several new tokens and for a window."""
        return bool((token_ids.shape[1] > 1 and not self.multi_token_steps) or self.kv_window is not None)

    def _contract_step(self, token_ids: np.ndarray, cache: KVCache, run) -> np.ndarray:
        """One step through a contract-form runner ``run(feeds) -> outputs``, for the steps
        ``_needs_contract_step`` names (exact, at the price of copying the valid past). Writes only the
        new positions back into the cache."""
        cache.require_room(token_ids.shape[1])
        p = cache.length
        past = {C.past_name(layer, kind): np.ascontiguousarray(cache.valid_kv(layer, kind))
                for layer in range(self.contract.num_layers) for kind in ("key", "value")}
        out = run(C.step_feeds(self.contract, token_ids, past))
        for layer in range(self.contract.num_layers):
            key, value = out[C.present_name(layer, "key")], out[C.present_name(layer, "value")]
            cache.write(layer, key[:, :, p:], value[:, :, p:], at=p)
        return out[C.LOGITS]


ROTARY_POSITIONS = 16384  # positions the fused rotary tables cover when the graph's context is not recorded


def fused_positions(context: int | None) -> int:
    """Positions the fused lowering's rotary tables cover: twice the model's context, so positions past
    a row's room (a pool's slack, padding) stay inside."""
    return 2 * context if context else ROTARY_POSITIONS


class InPlaceSteps:
    """Bookkeeping shared by backends that run steps of a shared-KV graph through IOBinding.

    A subclass provides ``_bind(cache, s) -> dict`` (state with "ids", "positions", "write_at",
    "mask" arrays bound by pointer; the mask spans ``cache.physical``) and sets ``multi_token_steps``.
    Bindings are kept per cache (a batch scheduler steps several row views of one pool) and per S.
    """

    KEEP_BINDINGS_UP_TO = 16  # bindings for short steps are kept; a long prompt's [B,S,V] logits are not
    KEEP_CACHES = 48  # caches (row views) whose bindings are kept, least recently used dropped first
    single_token: bool = False  # a draft session built for [1, 1] steps only

    @property
    def _bound(self) -> "OrderedDict[int, tuple[weakref.ref, dict[int, dict]]]":
        if "_bound_caches" not in self.__dict__:
            self._bound_caches = OrderedDict()
        return self._bound_caches

    @property
    def greedy_flag(self) -> np.ndarray:
        """The lowered graphs' ``greedy_logits`` input (``compiler/lowering/greedy_head.py``), a bool
        bound by pointer where a graph has it: ``greedy_logits()`` sets it for a block."""
        if "_greedy_flag" not in self.__dict__:
            self._greedy_flag = np.zeros((), np.bool_)
        return self._greedy_flag

    @contextmanager
    def greedy_logits(self, on: bool = True):
        flag = self.greedy_flag
        before = bool(flag)
        flag[...] = on
        try:
            yield
        finally:
            flag[...] = before

    def _bindings_of(self, cache) -> dict[int, dict]:
        entry = self._bound.get(id(cache))
        if entry is None or entry[0]() is not cache:  # new, or a dead cache's id reused
            entry = (weakref.ref(cache), {})
            self._bound[id(cache)] = entry
            while len(self._bound) > self.KEEP_CACHES:
                self._bound.popitem(last=False)
        self._bound.move_to_end(id(cache))
        return entry[1]

    max_positions: int | None = None  # fused graphs: positions their rotary tables cover (None: any)

    def _check_positions(self, positions: int) -> None:
        if self.max_positions is not None and positions > self.max_positions:
            raise CacheOverflow(f"a cache of {positions} positions is beyond the {self.max_positions} the fused "
                                "rotary tables cover: lower --max-length")

    def _extend_by_row(self, token_ids: np.ndarray, cache) -> np.ndarray:
        """Several new tokens for several rows, one row at a time: ONNX Runtime's fused attention runs
        several new tokens over a non-empty past for a batch of one only."""
        logits, exits, recalled = None, [], []
        for i in range(token_ids.shape[0]):
            row = self.extend(token_ids[i:i + 1], cache.row_view(i))
            if logits is None:
                logits = np.empty((token_ids.shape[0], *row.shape[1:]), row.dtype)
            logits[i] = row[0]
            exits.append(self.last_exit_layer)
            recalled.append(self.last_recalled is not None and bool(self.last_recalled[0]))
        if self.per_row_exits:  # each row's own route, as one call over the batch reports it
            self.last_exit_layers, self.last_recalled = np.array(exits), np.array(recalled)
        return logits

    def bound_states(self) -> list[dict]:
        """Every kept binding state (tests read the bound pointers from them)."""
        return [st for _, states in self._bound.values() for st in states.values()]

    def _step_state(self, token_ids: np.ndarray, cache) -> dict:
        """Check room and causality, get the binding for S new tokens, and fill its small inputs: each
        row's new tokens go at its own valid length (positions, write index and mask per row)."""
        s = token_ids.shape[1]
        if self.single_token and token_ids.shape != (1, 1):
            raise ValueError(f"this backend runs one token of one sequence a step, got {token_ids.shape}")
        cache.require_room(s)
        bindings = self._bindings_of(cache)
        st = bindings.get(s)
        if st is None:
            st = self._bind(cache, s)
            if s <= self.KEEP_BINDINGS_UP_TO:
                bindings[s] = st
        st["ids"][:] = token_ids
        lengths = cache.row_lengths()
        st["positions"][:] = lengths[:, None] + np.arange(s)
        st["write_at"][:] = lengths
        st["mask"][:] = np.arange(st["mask"].shape[1])[None, :] < (lengths + s)[:, None]
        return st

    def release(self, cache=None) -> None:
        """Forget the bindings to ``cache`` (None: to every cache), so its buffers can be freed."""
        if cache is None:
            self._bound.clear()
        else:
            self._bound.pop(id(cache), None)
