"""TensorRT backend: River engines over shared KV buffers that live in device memory.

Written against the TensorRT 10 Python API (``Runtime.deserialize_cuda_engine``, one
``IExecutionContext`` per engine, ``set_input_shape`` / ``set_tensor_address`` per step,
``execute_async_v3`` on the current torch CUDA stream). Device memory comes from torch CUDA tensors,
allocated once per cache (torch is on every GPU machine this targets). It cannot run without a GPU:
the binding plans below are pure functions, tested on the CPU; the rest is exercised by
``scripts/gpu_check.py``.

How the new position gets into the cache (DESIGN 6: a step writes only its new position):

- ``segmented`` (the default and the in-place mode): decode runs the shared-KV segment engines
  (``<segment>.kv.plan``, static capacity C). TensorRT imports each ``TensorScatter`` as a
  KVCacheUpdate layer whose cache input must be a network input and whose output must share its
  memory, so ``past_key_values.{l}`` and ``present.{l}`` are bound to the *same* device buffer
  [B,Hkv,C,D] and only position ``write_indices`` is written. The runtime reads each gate's 0-D exit
  flag (one 1-byte device-to-host copy per gate reached) and picks the next engine. Prefill runs the
  contract-form segment engines over an empty past; their presents [B,Hkv,S,D] land in scratch
  tensors and positions [0,S) are copied into the cache (once per request).
- ``fused``: one engine (the chained River graph, or the plain step graph) in the contract form,
  whose ``present = Concat(past, new)`` is a new tensor. KV buffers are ping-pong pairs of capacity
  C per layer, each read as a compact [B,Hkv,P,D] tensor: step t reads pair[t%2] as past and writes
  pair[(t+1)%2] as present. Nothing is copied outside the engine, but the engine itself rewrites the
  P cached positions every step (that is what Concat means); the fused shared-KV form cannot be
  built (the cache inside an ``If`` branch is not a network input), which is one more reason the
  segmented mode exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from river.compiler.river.manifest import EXIT_LAYER, THRESHOLDS, RiverInfo
from river.compiler.river.segments import SegmentIndex, exit_name
from river.compiler.lowering.shared_kv import WRITE_INDICES
from river.errors import CacheOverflow, RiverError
from river.export import contract as C
from river.export.contract import StepContract
from river.runtime.backend import KVCache, StepBackend, route_gates

MODES = ("segmented", "fused")


@dataclass(frozen=True)
class TensorBinding:
    """One engine I/O tensor for one step: which buffer backs it and with which shape."""

    name: str
    buffer: str  # key into the backend's buffer table
    shape: tuple[int, ...]
    is_input: bool


def _kv_layer(name: str) -> tuple[int, str] | None:
    parts = name.split(".")
    if name.startswith(("past_key_values.", "present.")) and parts[-1] in ("key", "value"):
        return int(parts[-2]), parts[-1]
    return None


def _step_binding(name: str, is_input: bool, fixed: dict, *, batch: int, seq: int, width: int,
                  what: str) -> TensorBinding:
    """A non-KV tensor of a segment engine: step inputs/logits, hidden state, exit flag, similarity."""
    if name in fixed:
        return TensorBinding(name, fixed[name][0], fixed[name][1], is_input)
    if name.startswith("hidden."):
        return TensorBinding(name, name, (batch, seq, width), is_input)
    if name.endswith(".exit"):
        return TensorBinding(name, name, (), is_input)
    if name.endswith(".similarity"):
        return TensorBinding(name, name, (batch,), is_input)
    raise RiverError(f"{what} engine tensor {name!r} has no place in the binding plan")


def decode_bindings(inputs: Sequence[str], outputs: Sequence[str], contract: StepContract, *, batch: int,
                    capacity: int, width: int, vocab: int, gates: int) -> list[TensorBinding]:
    """Bindings of a shared-KV segment engine for one decode step (S = 1) over a static cache.

    ``past_key_values.{l}.*`` and ``present.{l}.*`` name the same buffer (``cache.{kind}.{l}``): the
    in-place KVCacheUpdate contract. Every shape is fixed per cache, so the plan is made once.
    """
    kv = (batch, contract.num_kv_heads, capacity, contract.head_dim)
    fixed = {C.INPUT_IDS: ("step.input_ids", (batch, 1)), C.POSITION_IDS: ("step.position_ids", (batch, 1)),
             C.ATTENTION_MASK: ("step.attention_mask", (batch, capacity)), WRITE_INDICES: ("step.write_indices", (batch,)),
             THRESHOLDS: ("step.thresholds", (gates,)), C.LOGITS: ("logits", (batch, 1, vocab))}
    plan = []
    for names, is_input in ((inputs, True), (outputs, False)):
        for name in names:
            layer = _kv_layer(name)
            if layer is not None:
                plan.append(TensorBinding(name, f"cache.{layer[1]}.{layer[0]}", kv, is_input))
            else:
                plan.append(_step_binding(name, is_input, fixed, batch=batch, seq=1, width=width, what="decode"))
    return plan


def prefill_bindings(inputs: Sequence[str], outputs: Sequence[str], contract: StepContract, *, batch: int,
                     seq: int, width: int, vocab: int, gates: int) -> list[TensorBinding]:
    """Bindings of a contract-form segment engine for a prefill over an empty past (P = 0).

    Pasts are empty tensors (a shared 1-element dummy address); presents go to scratch
    ``scratch.{kind}.{l}`` [B,Hkv,S,D], copied into the cache afterwards.
    """
    h, d = contract.num_kv_heads, contract.head_dim
    fixed = {C.INPUT_IDS: ("step.input_ids", (batch, seq)), C.POSITION_IDS: ("step.position_ids", (batch, seq)),
             C.ATTENTION_MASK: ("step.attention_mask", (batch, seq)), THRESHOLDS: ("step.thresholds", (gates,)),
             C.LOGITS: ("logits", (batch, seq, vocab))}
    plan = []
    for names, is_input in ((inputs, True), (outputs, False)):
        for name in names:
            layer = _kv_layer(name)
            if layer is not None and is_input:
                plan.append(TensorBinding(name, "empty", (batch, h, 0, d), True))
            elif layer is not None:
                plan.append(TensorBinding(name, f"scratch.{layer[1]}.{layer[0]}", (batch, h, seq, d), False))
            else:
                plan.append(_step_binding(name, is_input, fixed, batch=batch, seq=seq, width=width, what="prefill"))
    return plan


def fused_bindings(inputs: Sequence[str], outputs: Sequence[str], contract: StepContract, *, batch: int, seq: int,
                   past: int, vocab: int, gates: int, parity: int) -> list[TensorBinding]:
    """Bindings of a contract-form fused engine (River or plain) for a step of S tokens after P.

    Ping-pong: pasts are read as compact [B,Hkv,P,D] from ``pp{parity}.{kind}.{l}``, presents
    [B,Hkv,P+S,D] are written to ``pp{1-parity}.{kind}.{l}``; the next step swaps.
    """
    h, d = contract.num_kv_heads, contract.head_dim
    fixed = {C.INPUT_IDS: ("step.input_ids", (batch, seq)), C.POSITION_IDS: ("step.position_ids", (batch, seq)),
             C.ATTENTION_MASK: ("step.attention_mask", (batch, past + seq)), THRESHOLDS: ("step.thresholds", (gates,)),
             C.LOGITS: ("logits", (batch, seq, vocab)), EXIT_LAYER: ("exit_layer", (batch,))}
    plan = []
    for names, is_input in ((inputs, True), (outputs, False)):
        for name in names:
            layer = _kv_layer(name)
            if layer is not None:
                side = parity if is_input else 1 - parity
                length = past if is_input else past + seq
                buffer = "empty" if is_input and past == 0 else f"pp{side}.{layer[1]}.{layer[0]}"
                plan.append(TensorBinding(name, buffer, (batch, h, length, d), is_input))
            elif name in fixed:
                plan.append(TensorBinding(name, fixed[name][0], fixed[name][1], is_input))
            else:
                raise RiverError(f"fused engine tensor {name!r} has no place in the binding plan")
    return plan


def check_in_place(plan: Sequence[TensorBinding]) -> list[str]:
    """Problems with an in-place plan: every present must share its past's buffer and shape."""
    by_name = {b.name: b for b in plan}
    problems = []
    for b in plan:
        layer = _kv_layer(b.name)
        if layer is None or b.is_input:
            continue
        past = by_name.get(C.past_name(*layer))
        if past is None or past.buffer != b.buffer or past.shape != b.shape:
            problems.append(f"{b.name} is not bound to its past's buffer")
    return problems


# --- device side -----------------------------------------------------------------------------------

def _require_gpu():
    """torch with CUDA and a TensorRT module that can run engines, or a RiverError saying what is missing."""
    from river.compiler.tensorrt.package import TRT_PACKAGE, require_trt

    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a dependency
        raise RiverError(f"the TensorRT backend needs torch for device buffers: {exc}") from exc
    if not torch.cuda.is_available():
        raise RiverError("the TensorRT backend needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "engines can still be built here (river.compiler.tensorrt.engines)")
    trt = require_trt()
    return torch, trt, TRT_PACKAGE


class DeviceKVCache(KVCache):
    """Shared KV buffers in device memory, allocated once per request.

    ``layout`` "static": one [B,Hkv,C,D] tensor per layer and kind (segmented, in place).
    ``layout`` "pingpong": two flat buffers of B*Hkv*C*D per layer and kind, read as compact
    [B,Hkv,P,D] (fused); ``parity`` says which one holds the current cache.
    """

    def __init__(self, contract: StepContract, batch: int, capacity: int, layout: str = "static", device="cuda"):
        import torch

        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.contract, self.batch, self.capacity, self.layout = contract, batch, capacity, layout
        self.buffers_length = capacity  # the physical length (capacity may later be lowered to the logical room)
        self.length = 0
        self.parity = 0
        shape = (batch, contract.num_kv_heads, capacity, contract.head_dim)
        n = int(np.prod(shape))
        self.buffers: dict[str, torch.Tensor] = {}
        for layer in range(contract.num_layers):
            for kind in ("key", "value"):
                if layout == "static":
                    self.buffers[f"cache.{kind}.{layer}"] = torch.zeros(shape, dtype=torch.float32, device=device)
                else:
                    for side in (0, 1):
                        self.buffers[f"pp{side}.{kind}.{layer}"] = torch.zeros(n, dtype=torch.float32, device=device)

    @property
    def num_layers(self) -> int:
        return self.contract.num_layers

    def truncate(self, length: int) -> None:
        if self.layout != "static":
            raise RiverError("the fused (ping-pong) cache cannot be truncated in place: its layout depends on the length")
        super().truncate(length)

    def write(self, layer: int, key, value, at: int) -> None:
        """Write K/V [B,Hkv,S,D] (numpy or torch) at positions [at, at+S): for tests and parity runs."""
        import torch

        key, value = (torch.as_tensor(np.asarray(x) if not hasattr(x, "device") else x) for x in (key, value))
        s = key.shape[2]
        if at + s > self.buffers_length:
            raise CacheOverflow(f"writing positions {at}..{at + s - 1} past the cache capacity {self.buffers_length}")
        for kind, t in (("key", key), ("value", value)):
            if self.layout == "static":
                self.buffers[f"cache.{kind}.{layer}"][:, :, at:at + s].copy_(t)
            elif at == 0:  # compact layout: only a whole prefix can be written
                b, h, _, d = t.shape
                self.buffers[f"pp{self.parity}.{kind}.{layer}"][: b * h * s * d].view(b, h, s, d).copy_(t)
            else:
                raise RiverError("the fused (ping-pong) cache takes writes at position 0 only")

    def valid_kv(self, layer: int, kind: str) -> np.ndarray:
        return self.kv(layer, kind).detach().cpu().numpy()

    def kv(self, layer: int, kind: str):
        """The valid part of one layer's cache as a [B,Hkv,length,D] device tensor."""
        b, h, d = self.batch, self.contract.num_kv_heads, self.contract.head_dim
        if self.layout == "static":
            return self.buffers[f"cache.{kind}.{layer}"][:, :, :self.length]
        flat = self.buffers[f"pp{self.parity}.{kind}.{layer}"]
        return flat[: b * h * self.length * d].view(b, h, self.length, d)


class _Engine:
    """One deserialized engine and its execution context."""

    def __init__(self, trt, runtime, plan_path: Path):
        self.path = plan_path
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RiverError(f"TensorRT could not deserialize {plan_path} (built by another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]

    def run(self, plan: Sequence[TensorBinding], tensors: dict, stream_handle: int) -> None:
        for b in plan:
            t = tensors[b.name]
            if b.is_input and not self.context.set_input_shape(b.name, b.shape):
                raise RiverError(f"{self.path.name}: shape {b.shape} for {b.name} is outside the engine's profile")
            if not self.context.set_tensor_address(b.name, t.data_ptr()):
                raise RiverError(f"{self.path.name}: cannot bind {b.name}")
        if not self.context.execute_async_v3(stream_handle):
            raise RiverError(f"{self.path.name}: execute_async_v3 failed")


class TrtBackend(StepBackend):
    """The backend protocol over TensorRT engines built by ``river.compiler.tensorrt.engines``.

    ``mode`` "segmented" needs the segment engines and their ``.kv`` (static capacity) twins;
    "fused" needs ``fused.plan`` (or ``step.plan`` with ``engine="step"``: the no-exit baseline).
    Per cache, the small step buffers (ids, positions, mask, write index, residual stream between
    segments, exit flags, logits) are allocated once; a decode step fills them and rebinds addresses.
    """

    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, mode: str = "segmented", thresholds=None, engine: str = "fused"):
        from river.compiler.tensorrt.engines import EnginesReport

        if mode not in MODES:
            raise RiverError(f"unknown TensorRT backend mode {mode!r}: choose from {', '.join(MODES)}")
        self.torch, self.trt, self.trt_package = _require_gpu()
        self.mode, self.report = mode, EnginesReport.load(engine_dir)
        self.folder = Path(engine_dir)
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        if mode == "segmented":
            if self.report.segments is None:
                raise RiverError(f"{engine_dir} has no segment engines: build them with segments_dir=...")
            from river.runtime.segmented_backend import contract_of

            self.index = SegmentIndex.load(self.report.segments)
            self.contract = contract_of(self.index)
            kv = [b for b in self.report.builds if b.form == "segment.kv"]
            if not kv:
                raise RiverError(f"{engine_dir} has no shared-KV segment engines: build them with capacity=C")
            self.engine_capacity = kv[0].capacity
            ix = self.index
            self.engines = {b.name: _Engine(self.trt, self.runtime, self.folder / b.plan)
                            for b in self.report.builds if b.form in ("segment", "segment.kv")}
            self._init_river(ix.info(), ix.thresholds, thresholds)
        else:
            from river.compiler.graph_io import load_onnx_header

            build = self.report.build(engine)
            header = load_onnx_header(build.onnx)
            self.contract = StepContract.from_model(header, build.onnx)
            self._init_river(RiverInfo.from_model(header), None, thresholds)
            self.engines = {"fused": _Engine(self.trt, self.runtime, self.folder / build.plan)}
        self.gates = list(self.river.gates) if self.river else []
        # the device copy of the thresholds; GateThresholds stays the host truth, copied before each step
        self.device_thresholds = self.torch.tensor(self.thresholds if self.river else np.zeros(0, np.float32),
                                                   device="cuda")
        self.vocab = self.contract.vocab_size or int(self._shape(C.LOGITS)[-1])
        hidden = [n for e in self.engines.values() for n in e.outputs if n.startswith("hidden.")]
        self.width = int(self._shape(hidden[0])[-1]) if hidden else 0
        self._table_owner: DeviceKVCache | None = None
        self._current: dict = {}

    def _shape(self, name: str):
        for e in self.engines.values():
            if name in e.outputs or name in e.inputs:
                return tuple(e.engine.get_tensor_shape(name))
        raise RiverError(f"no engine has a tensor named {name}")

    # --- the StepBackend interface ---------------------------------------------------------------
    def new_cache(self, capacity: int, batch: int = 1) -> DeviceKVCache:
        if self.mode == "segmented":
            if capacity > self.engine_capacity:
                raise CacheOverflow(f"the decode engines were built for a cache of {self.engine_capacity} positions, "
                                    f"{capacity} requested: rebuild them with a larger capacity")
            cache = DeviceKVCache(self.contract, batch, self.engine_capacity, "static")
            cache.capacity = capacity  # logical room; the buffers keep the engines' static length
            return cache
        return DeviceKVCache(self.contract, batch, capacity, "pingpong")

    def _sync_thresholds(self) -> None:
        if self.river is not None:
            self.device_thresholds.copy_(self.torch.as_tensor(self.thresholds))

    def prefill(self, input_ids: np.ndarray, cache: DeviceKVCache) -> np.ndarray:
        self._check_prefill(input_ids, cache)
        b, s = input_ids.shape
        torch = self.torch
        table = self._table(cache)
        tensors = dict(table)
        tensors["step.input_ids"] = torch.as_tensor(input_ids.astype(np.int64)).cuda()
        tensors["step.position_ids"] = torch.arange(s, device="cuda").repeat(b, 1)
        tensors["step.thresholds"] = torch.as_tensor(self.gate_thresholds.disabled() if self.river
                                                     else np.zeros(0, np.float32)).cuda()  # prefill: the whole backbone
        del tensors["logits"], tensors["step.attention_mask"]  # prefill shapes differ from decode's
        if self.mode == "fused":
            tensors["step.attention_mask"] = table["ones"]
            self._run_fused(tensors, cache, b, s, past=0)
            cache.parity = 1 - cache.parity
        else:
            tensors["step.attention_mask"] = torch.ones((b, s), dtype=torch.int64, device="cuda")
            for k in range(len(self.gates) + 1):
                self._run_segment(f"backbone{k}", tensors, prefill=True, batch=b, seq=s)
            for layer in range(self.contract.num_layers):  # positions [0, S): the only copy into the cache
                for kind in ("key", "value"):
                    cache.buffers[f"cache.{kind}.{layer}"][:, :, :s].copy_(tensors[f"scratch.{kind}.{layer}"])
            table["step.attention_mask"][:, :s] = 1
            self.last_exit_layer = self.contract.num_layers
        return tensors["logits"].cpu().numpy()

    def extend(self, token_ids: np.ndarray, cache: DeviceKVCache) -> np.ndarray:
        """S new tokens per row; the engines take one token a step, so S > 1 runs S steps (exact: our
        graphs mask causally by position)."""
        if token_ids.shape[1] == 1:
            return self._decode_one(token_ids, cache)
        start, rows = cache.length, []
        try:
            for i in range(token_ids.shape[1]):
                rows.append(self._decode_one(token_ids[:, i:i + 1], cache))
                cache.length += 1
        finally:
            cache.length = start  # the caller moves the length, as for every backend
        return np.concatenate(rows, axis=1)

    def _decode_one(self, token_ids: np.ndarray, cache: DeviceKVCache) -> np.ndarray:
        cache.require_room(1)
        self._sync_thresholds()
        b, pos = token_ids.shape[0], cache.length
        table = self._table(cache)
        table["step.input_ids"].copy_(self.torch.as_tensor(token_ids.astype(np.int64)))
        table["step.position_ids"].fill_(pos)
        if self.mode == "fused":
            tensors = dict(table)
            tensors["step.attention_mask"] = table["ones"]
            self._run_fused(tensors, cache, b, 1, past=pos)
            cache.parity = 1 - cache.parity
            return tensors["logits"].cpu().numpy()
        table["step.write_indices"].fill_(pos)
        mask = table["step.attention_mask"]  # valid = [0, pos]; also right after a truncate (rollback)
        mask[:, :pos + 1] = 1
        mask[:, pos + 1:] = 0

        def backbone(k: int) -> bool:
            self._run_segment(f"backbone{k}.kv", table, prefill=False, batch=b, seq=1)
            return bool(table[exit_name(k)].item())  # syncs the stream; one byte to the host per gate reached

        def finish(exit_gate: int | None) -> None:
            last = f"river{exit_gate}.kv" if exit_gate is not None else f"backbone{len(self.gates)}.kv"
            self._run_segment(last, table, prefill=False, batch=b, seq=1)

        self.last_exit_layer = self.exit_layer_of(route_gates(len(self.gates), backbone, finish))
        return table["logits"].cpu().numpy()

    def release(self, cache: DeviceKVCache | None = None) -> None:
        if cache is None or cache is self._table_owner:
            self._table_owner, self._current = None, {}

    # --- internals -------------------------------------------------------------------------------
    def _table(self, cache: DeviceKVCache) -> dict:
        """The per-cache buffer table: the cache itself plus the decode step's small buffers."""
        if self._table_owner is not cache:  # identity, not id(): a new cache may reuse a freed one's id
            torch, b = self.torch, cache.batch
            table = dict(cache.buffers)
            table["step.input_ids"] = torch.zeros((b, 1), dtype=torch.int64, device="cuda")
            table["step.position_ids"] = torch.zeros((b, 1), dtype=torch.int64, device="cuda")
            table["step.write_indices"] = torch.zeros((b,), dtype=torch.int64, device="cuda")
            table["step.attention_mask"] = torch.zeros((b, cache.buffers_length), dtype=torch.int64, device="cuda")
            table["ones"] = torch.ones(b * cache.buffers_length, dtype=torch.int64, device="cuda")
            table["step.thresholds"] = self.device_thresholds
            table["logits"] = torch.zeros((b, 1, self.vocab), dtype=torch.float32, device="cuda")
            table["empty"] = torch.zeros(1, device="cuda")
            self._table_owner, self._current = cache, table  # one live request per backend
        return self._current

    def _bind(self, tensors: dict, plan: Sequence[TensorBinding]) -> dict:
        """The device tensor behind every binding (allocating per-call scratch the table lacks)."""
        torch = self.torch
        out = {}
        for bnd in plan:
            if bnd.buffer not in tensors:
                dtype = torch.bool if bnd.name.endswith(".exit") else torch.float32
                tensors[bnd.buffer] = torch.empty(bnd.shape, dtype=dtype, device="cuda")
            t = tensors[bnd.buffer]
            numel = int(np.prod(bnd.shape)) if bnd.shape else 1
            if bnd.buffer == "empty" or tuple(t.shape) == tuple(bnd.shape):
                out[bnd.name] = t
            elif t.dim() == 1 and t.numel() >= numel:  # flat ping-pong / ones buffers: a compact prefix
                out[bnd.name] = t[:numel].view(bnd.shape)
            else:
                raise RiverError(f"buffer {bnd.buffer} {tuple(t.shape)} cannot back {bnd.name} {bnd.shape}")
        return out

    def _run_segment(self, name: str, tensors: dict, *, prefill: bool, batch: int, seq: int) -> None:
        engine = self.engines[name]
        common = {"batch": batch, "width": self.width, "vocab": self.vocab, "gates": len(self.gates)}
        if prefill:
            plan = prefill_bindings(engine.inputs, engine.outputs, self.contract, seq=seq, **common)
        else:
            plan = decode_bindings(engine.inputs, engine.outputs, self.contract, capacity=self.engine_capacity, **common)
        engine.run(plan, self._bind(tensors, plan), self.torch.cuda.current_stream().cuda_stream)

    def _run_fused(self, tensors: dict, cache: DeviceKVCache, batch: int, seq: int, past: int) -> None:
        engine = self.engines["fused"]
        plan = fused_bindings(engine.inputs, engine.outputs, self.contract, batch=batch, seq=seq, past=past,
                              vocab=self.vocab, gates=len(self.gates), parity=cache.parity)
        if EXIT_LAYER in engine.outputs:
            tensors["exit_layer"] = self.torch.zeros((batch,), dtype=self.torch.int64, device="cuda")
        engine.run(plan, self._bind(tensors, plan), self.torch.cuda.current_stream().cuda_stream)
        self.last_exit_layer = int(tensors["exit_layer"][0].item()) if EXIT_LAYER in engine.outputs else None


__all__ = [
    "MODES",
    "DeviceKVCache",
    "TensorBinding",
    "TrtBackend",
    "check_in_place",
    "decode_bindings",
    "fused_bindings",
    "prefill_bindings",
]
