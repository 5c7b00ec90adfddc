"""ONNX Runtime backend over a segmented River (``river.compiler.river.segments``): no ``If`` anywhere, the
runtime reads each gate's exit flag and picks the next segment itself.

Prefill runs the contract-form segments (whole backbone, gates disabled) and writes the prompt's
K/V into the shared cache. Decode steps run the shared-KV form through IOBinding: every segment's
``past_key_values.{l}`` input and ``present.{l}`` output are bound to the same cache buffer, so each
segment writes only its layers' new position, in place. The residual stream between segments, the
exit flags and the logits live in small buffers bound once per cache.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from river.compiler.graph_io import derived_graph, load_onnx, load_onnx_header
from river.compiler.lowering.ort_fused import ORT_LOWERING_FORMAT, cache_variant, lower_segment_for_ort, lowering_of
from river.compiler.ort_session import graph_input_names, session_options, shared_thread_pool
from river.compiler.lowering.greedy_head import GREEDY_LOGITS
from river.compiler.river.manifest import EXIT_LAYER, THRESHOLDS
from river.compiler.river.recall import RECALL_OFF, river_margin
from river.compiler.river.segments import SegmentIndex, exit_name, hidden_name, similarity_name
from river.compiler.lowering.shared_kv import WRITE_INDICES
from river.errors import RiverError
from river.export import contract as C
from river.export.contract import CAUSAL_PROP, StepContract, exported_config, kv_window
from river.runtime.backend import InPlaceSteps, StepBackend, fused_positions, route_gates
from river.runtime.exit_history import UNDAMAGED, ExitHistory
from river.runtime.kv_cache import SharedKVCache


def contract_of(index: SegmentIndex) -> StepContract:
    """The step contract the segments implement, read from their signatures (no weights loaded)."""
    first = load_onnx_header(index.path(index.backbone(0)))
    kv = next(i for i in first.graph.input if i.name == C.past_name(0, "key")).type.tensor_type
    dims = [d.dim_value for d in kv.shape.dim]
    final = load_onnx_header(index.path(index.backbone(len(index.gates))))
    logits = next(o for o in final.graph.output if o.name == C.LOGITS).type.tensor_type.shape.dim
    vocab = logits[-1].dim_value if logits and logits[-1].HasField("dim_value") else None
    return StepContract(index.num_layers, dims[1], dims[3], vocab, kv.elem_type)


# operators whose result for one row depends on the other rows of the batch (DynamicQuantizeLinear:
# one activation scale per tensor; today's MatMulNBits twins quantize each row by itself)
BATCH_WIDE_OPS = {"DynamicQuantizeLinear"}


class SegmentedBackend(InPlaceSteps, StepBackend):
    """The backend protocol with the same results as ``OrtBackend`` on the fused River graph, plus
    ``last_similarities`` (per gate reached: per-row similarity)."""

    name = "segmented"
    per_row_exits = True
    supports_recall = True

    def __init__(self, segments_dir: str | Path, threads: int | None = None, providers=None, thresholds=None,
                 matmul_accuracy: int = 1, lowering: str = "ort", positions: int | None = None):
        self.index = ix = SegmentIndex.load(segments_dir)
        self.contract = contract_of(ix)
        self._init_river(ix.info(), ix.thresholds, thresholds)
        # the segments alternate step by step: with a pool per session (no shared pool in this process)
        # their threads must not spin (SmolLM2, 2 cores: 10.5 tok/s spinning, 29-35 not, 43 with one pool)
        self._options = session_options(threads, matmul_accuracy, spinning=shared_thread_pool())
        self._providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[tuple[str, bool], ort.InferenceSession] = {}
        self.last_similarities: list[np.ndarray] = []
        first = load_onnx_header(self.index.path(self.index.backbone(0), shared_kv=True))
        self.multi_token_steps = {p.key: p.value for p in first.metadata_props}.get(CAUSAL_PROP) == "position"
        self.kv_window = kv_window(ix.folder.parent)  # the River folder holds the model's config.json
        self._lowered = self._lower(lowering, positions)
        self.rivers_per_row = any(n.op_type in BATCH_WIDE_OPS for k in range(len(ix.gates))
                                  for n in load_onnx_header(ix.path(ix.river(k))).graph.node)

    def _lower(self, lowering: str, positions: int | None) -> dict[str, Path]:
        """Each segment's in-place graph lowered for ONNX Runtime (fused attention over the shared
        buffers: ``compiler/lowering/ort_fused``), built once per segment and cached; {} when the
        segments run their shipped portable shared-KV forms (``self.lowering_reason`` says why). All or
        nothing: one segment that does not fuse keeps every segment portable."""
        from river.runtime.loading import LOWERINGS, grid_form

        self.lowering, self.lowering_reason = "portable", ""
        if lowering not in LOWERINGS:
            raise RiverError(f"unknown lowering '{lowering}' (choose {' or '.join(LOWERINGS)})")
        if lowering == "portable":
            return {}
        if self.kv_window is not None:
            self.lowering_reason = "a sliding window: every step runs the contract segments"
            return {}
        context = positions or exported_config(self.index.folder.parent).get("max_position_embeddings")
        table, grid = fused_positions(context), grid_form(lowering)
        paths = {}
        # read once, only if a segment's lowering asks (a cache miss), and let go with this call
        backbone_weights = functools.cache(self._backbone_weights)
        for seg in self.index.segments:
            path = derived_graph("ort_lowered_segment", self.index.path(seg), ORT_LOWERING_FORMAT,
                                 lambda m: lower_segment_for_ort(m, table, grid, backbone_weights),
                                 variant=cache_variant(table, grid))
            lowering_done, reason = lowering_of(load_onnx_header(path))
            if lowering_done != "ort_fused":
                self.lowering_reason = f"segment {seg.name}: {reason}"
                return {}
            paths[seg.name] = path
        self.lowering, self.max_positions = "ort_fused", table
        return paths

    def _backbone_weights(self) -> dict[str, np.ndarray]:
        """The backbone segments' fp32 matrices by name: a twin segment's lowering looks its twins'
        backbone weights up here (``q41_twins``)."""
        weights = {}
        for seg in self.index.segments:
            if seg.name.startswith("backbone"):
                for t in load_onnx(self.index.path(seg)).graph.initializer:
                    if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2:
                        weights[t.name] = onnx.numpy_helper.to_array(t)
        return weights

    def session(self, name: str, shared_kv: bool = False) -> ort.InferenceSession:
        """Sessions are made on first use: a decode-only or prefill-only user loads half of them."""
        key = (name, shared_kv)
        if key not in self._sessions:
            path = self._lowered.get(name) if shared_kv else None
            path = path or self.index.path(self.index.segment(name), shared_kv)
            self._sessions[key] = ort.InferenceSession(str(path), self._options, providers=self._providers)
        return self._sessions[key]

    def new_cache(self, capacity: int, batch: int = 1):
        self._check_positions(capacity)
        cache = super().new_cache(capacity, batch)
        cache.history = self.new_history(batch, cache.physical)
        return cache

    def new_history(self, rows: int, positions: int) -> ExitHistory | None:
        """The exit history a recall repairs from (``runtime/exit_history.py``), for a cache of ``rows``
        and ``positions``; None where a repair cannot run in place (a repair is a step of several
        tokens: graphs that mask by index or slide a window run those in the contract form)."""
        if not self.multi_token_steps or self.kv_window is not None:
            return None
        width = self._output_width("backbone0", hidden_name(self.index.gates[0]))
        return ExitHistory(rows, positions, len(self.index.gates), width)

    # --- one step in the contract form (any S and P): prefill, parity checks ---------------------
    def run_step(self, feeds: dict[str, np.ndarray], thresholds=None) -> dict[str, np.ndarray]:
        """logits, present.* (contract order) and exit_layer [B] for one contract step, chaining the
        Concat-form segments: what the fused River graph returns for the same feeds."""
        thr = np.asarray(self.thresholds if thresholds is None else thresholds, np.float32)
        values = dict(feeds)
        values[THRESHOLDS] = thr
        batch = feeds[C.INPUT_IDS].shape[0]
        self.last_similarities = []

        def backbone(k: int) -> bool:
            values.update(self._run(f"backbone{k}", values))
            self.last_similarities.append(values[similarity_name(k)])
            return bool(values[exit_name(k)])

        recalled = np.zeros(batch, bool)

        def recall(k: int) -> bool:  # a whole-batch step: back to the backbone when any row is unsure
            recalled[:] = (river_margin(values[C.LOGITS][:, -1]) < self.recall_margin).any()
            return bool(recalled[0])

        exit_gate = route_gates(len(self.index.gates), backbone, lambda gate: values.update(self._run(self._last(gate), values)),
                                recall if self.recall_margin != RECALL_OFF else None)
        self.last_recalled = recalled
        result = {C.LOGITS: values[C.LOGITS]}
        for layer in range(self.contract.num_layers):
            for kind in ("key", "value"):
                result[C.present_name(layer, kind)] = values[C.present_name(layer, kind)]
        self.last_exit_layer = self.exit_layer_of(exit_gate)
        result[EXIT_LAYER] = np.full((batch,), self.last_exit_layer, np.int64)
        return result

    def _last(self, exit_gate: int | None) -> str:
        """The segment that ends a step: the river of the gate that fired, else the last backbone segment."""
        return f"river{exit_gate}" if exit_gate is not None else f"backbone{len(self.index.gates)}"

    def _run(self, name: str, values: dict) -> dict[str, np.ndarray]:
        seg = self.index.segment(name)
        outs = self.session(name).run(None, {n: values[n] for n in seg.inputs})
        return dict(zip(seg.outputs, outs))

    # --- prefill ---------------------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        self._check_prefill(input_ids, cache)
        disabled = self.gate_thresholds.disabled()  # prefill: the whole backbone
        logits = self._contract_step(input_ids, cache, lambda feeds: self.run_step(feeds, disabled))
        if getattr(cache, "history", None) is not None:
            cache.history.damaged_from[:] = UNDAMAGED  # a fresh sequence: the full model's K/V
        return logits

    # --- decode / extend: shared-KV segments, buffers bound in place ----------------------------
    def _bind(self, cache: SharedKVCache, s: int) -> dict:
        """Buffers and IOBindings of every segment for steps of ``s`` tokens (once per cache and s).
        One OrtValue per buffer, so a cache buffer bound as past and as present is the same memory."""
        b, ix = cache.batch, self.index
        G = len(ix.gates)
        vocab = self.contract.vocab_size or self._output_width(f"backbone{G}", C.LOGITS)
        width = self._output_width("backbone0", hidden_name(ix.gates[0]))
        st = {"ids": np.zeros((b, s), np.int64), "positions": np.zeros((b, s), np.int64),
              "write_at": np.zeros((b,), np.int64), "mask": np.zeros((b, cache.physical), np.int64),
              "logits": np.zeros((b, s, vocab), np.float32),
              "exit": {k: np.zeros((), np.bool_) for k in range(G)},
              "sim": {k: np.zeros((b,), np.float32) for k in range(G)},
              "hidden": {g: np.zeros((b, s, width), np.float32) for g in ix.gates}}
        buffers: dict[str, np.ndarray] = {
            C.INPUT_IDS: st["ids"], C.POSITION_IDS: st["positions"], WRITE_INDICES: st["write_at"],
            C.ATTENTION_MASK: st["mask"], C.LOGITS: st["logits"], THRESHOLDS: self.thresholds,
            GREEDY_LOGITS: self.greedy_flag,  # the last backbone segment's head, lowered (greedy_head.py)
        }
        for k in range(G):
            buffers[exit_name(k)], buffers[similarity_name(k)] = st["exit"][k], st["sim"][k]
        for g in ix.gates:
            buffers[hidden_name(g)] = st["hidden"][g]
        for layer in range(self.contract.num_layers):
            buffers[C.past_name(layer, "key")] = buffers[C.present_name(layer, "key")] = cache.keys[layer]
            buffers[C.past_name(layer, "value")] = buffers[C.present_name(layer, "value")] = cache.values[layer]
        values = {id(a): ort.OrtValue.ortvalue_from_numpy(a) for a in buffers.values()}
        st["values"] = {name: values[id(a)] for name, a in buffers.items()}
        st["bindings"] = {}
        for seg in ix.segments:
            sess = self.session(seg.name, shared_kv=True)
            binding = sess.io_binding()
            for i in sess.get_inputs():
                binding.bind_ortvalue_input(i.name, st["values"][i.name])
            if GREEDY_LOGITS in graph_input_names(sess):
                binding.bind_ortvalue_input(GREEDY_LOGITS, st["values"][GREEDY_LOGITS])
            for o in sess.get_outputs():
                binding.bind_ortvalue_output(o.name, st["values"][o.name])
            st["bindings"][seg.name] = (sess, binding)
        return st

    def _output_width(self, segment: str, output: str) -> int:
        sess = self.session(segment, shared_kv=True)
        shape = next(o.shape for o in sess.get_outputs() if o.name == output)
        if not isinstance(shape[-1], int):
            raise RiverError(f"{segment}: {output} has no static last dimension ({shape})")
        return shape[-1]

    def bound_pointers(self) -> dict[str, int]:
        """Data pointers of the bound KV inputs/outputs (tests check they are the cache buffers)."""
        return {n: v.data_ptr() for st in self.bound_states() for n, v in st["values"].items()
                if n.startswith(("past_key_values", "present"))}

    def extend(self, token_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        """S new tokens per row [B,S] at each row's valid length, through the segments, writing only
        those positions in place; logits [B,S,V] (a view, valid until the next call). The caller
        advances the lengths. Each row exits at its own gate (its last position clears the row's
        threshold: ``cache.row_thresholds`` or the backend's): a segment runs for the whole batch, and
        the rows it is not theirs write their K/V into the cache's slack instead, so every row's cache
        holds exactly what its own route wrote. Steps the shared-KV segments would get wrong run as a
        contract step (exact, copies the valid past): _needs_contract_step."""
        if self._needs_contract_step(token_ids, cache):
            return self._contract_step(token_ids, cache, self.run_step)
        if self.lowering == "ort_fused":
            self._check_positions(cache.physical)  # caches made elsewhere too (a batch scheduler's pool)
            if token_ids.shape[0] > 1 and token_ids.shape[1] > 1:
                return self._extend_by_row(token_ids, cache)
        st = self._step_state(token_ids, cache)
        b, s, gates = cache.batch, token_ids.shape[1], len(self.index.gates)
        thresholds = self.thresholds if cache.row_thresholds is None else cache.row_thresholds
        thresholds = np.broadcast_to(np.asarray(thresholds, np.float32), (b, gates))
        recall = np.broadcast_to(np.asarray(self.recall_margin if cache.row_recall is None else cache.row_recall,
                                            np.float64), (b,))
        own_writes, own_mask, trash = st["write_at"].copy(), st["mask"].copy(), cache.physical - s
        running, exits, recalled = np.ones(b, bool), np.full(b, -1), np.zeros(b, bool)
        history = getattr(cache, "history", None)
        out, outs = st["logits"], None  # several routes: each row's logits are copied out of its route's run
        self.last_similarities = []

        def run(name: str, rows: np.ndarray) -> None:
            """Segment ``name`` over the batch; the rows it is not for write into the slack: by their write
            index (portable form) or by a mask whose valid length ends there (fused attention writes
            at the valid length); their outputs are never read."""
            if not rows.all():
                if cache.slack < s:
                    raise RiverError(f"the rows of this batch leave at different gates: the cache needs {s} "
                                     f"positions of slack for the others' writes, it has {cache.slack}")
            st["write_at"][:] = np.where(rows, own_writes, trash)  # every run: a recalled row comes back
            st["mask"][:] = np.where(rows[:, None], own_mask, 1)
            sess, binding = st["bindings"][name]
            sess.run_with_iobinding(binding)

        def finish(name: str, rows: np.ndarray) -> None:
            nonlocal outs
            run(name, rows)
            if not rows.all() or outs is not None:
                outs = st.setdefault("routed", np.zeros_like(out)) if outs is None else outs
                outs[rows] = out[rows]

        def river(k: int, rows: np.ndarray) -> None:
            """River k for the rows that exit at gate k, over the batch like a backbone segment (the
            others write into the slack). Twins that scale activations over the whole batch (the
            dynamic int8 of older exports, ``rivers_per_row``) run each row alone on its own row of
            the pool instead (a one-row view): a row's tokens must not depend on its neighbours."""
            nonlocal outs
            if b == 1 or not self.rivers_per_row or not hasattr(cache, "row_view"):
                finish(f"river{k}", rows)
                return
            gate = self.index.gates[k]
            outs = st.setdefault("routed", np.zeros_like(out)) if outs is None else outs
            for i in np.flatnonzero(rows):
                one = self._step_state(token_ids[i:i + 1], cache.row_view(int(i)))
                one["hidden"][gate][:] = st["hidden"][gate][i]
                sess, binding = one["bindings"][f"river{k}"]
                sess.run_with_iobinding(binding)
                outs[i] = one["logits"][0]

        for k in range(gates):
            run(f"backbone{k}", running)
            sim = st["sim"][k].copy()
            self.last_similarities.append(sim)
            fire = running & ~recalled & (sim >= thresholds[:, k])
            if fire.any():
                exits[fire] = k
                river(k, fire)
                running &= ~fire
                if (recall[fire] != RECALL_OFF).any():  # unsure rows go back to the backbone after gate k
                    back = fire & (river_margin((out if outs is None else outs)[:, -1]) < recall)
                    if back.any() and outs is None:  # every row took river k: keep the others' logits
                        outs = st.setdefault("routed", np.zeros_like(out))
                        outs[...] = out
                    exits[back], running[back], recalled[back] = -1, True, True
                    if history is not None:  # rows with twin K/V in their past: repaired, each alone
                        for i in np.flatnonzero(back & (history.damaged_from != UNDAMAGED)):
                            outs[i] = self._repair(cache, history, int(i), k, st, own_writes[i])
                            running[i] = False
                if not running.any():
                    break
        if running.any():
            finish(f"backbone{gates}", running)
        if history is not None:
            self._record(history, st, own_writes, exits, recalled)
        self.last_recalled = recalled
        self.last_exit_layers = np.array([self.exit_layer_of(None if e < 0 else int(e)) for e in exits])
        self.last_exit_layer = int(self.last_exit_layers[0])
        return out if outs is None else outs

    # --- recall repairs (runtime/exit_history.py) -----------------------------------------------
    def _record(self, history: ExitHistory, st: dict, at: np.ndarray, exits: np.ndarray, recalled: np.ndarray) -> None:
        """Each row's new positions into its exit history: the residual stream at every gate it passed
        and the gate it left at. A recalled row is the full model's from here back (repaired, or it
        had nothing to repair)."""
        hidden = [st["hidden"][g] for g in self.index.gates]
        for i in range(len(exits)):
            if recalled[i]:
                history.damaged_from[i] = UNDAMAGED
            else:
                history.record(i, int(at[i]), [h[i] for h in hidden], None if exits[i] < 0 else int(exits[i]))

    def _repair(self, cache, history: ExitHistory, i: int, gate: int, st: dict, t: int) -> np.ndarray:
        """Row ``i``, recalled after gate ``gate`` at position ``t``, with twin K/V in its past: the
        backbone reruns positions ``damaged_from..t`` (several tokens, one row) from the lowest gate
        any of them left at, over the exact past before them, and rewrites their K/V in place. Returns
        the step's logits [S, V]: the full model's."""
        s, start = st["ids"].shape[1], int(history.damaged_from[i])
        r = history.repair_gate(i, t, gate)
        at = self.index.gates[r]
        hidden = np.concatenate([history.hidden[i, r, start:t], st["hidden"][at][i]])
        row = cache if cache.batch == 1 else cache.row_view(i)
        length = row.length
        row.length = start  # the repair's new tokens start where the damage does
        try:
            one = self._step_state(np.zeros((1, hidden.shape[0]), np.int64), row)
            one["hidden"][at][0] = hidden
            for k in range(r + 1, len(self.index.gates) + 1):
                sess, binding = one["bindings"][f"backbone{k}"]
                sess.run_with_iobinding(binding)
            return one["logits"][0, -s:].copy()
        finally:
            row.length = length
            if row is not cache and not hasattr(cache, "pool"):
                self.release(row)  # a plain cache's row view is made anew each time
