"""ONNX Runtime backend: the contract graph for prefill, its shared-KV form for decode steps.

Decode steps use IOBinding: each ``past_key_values.*`` input and its ``present.*`` output are bound to
the same cache buffer, so ONNX Runtime's TensorScatter writes the new position in place. Bindings are
made once per cache; a step only updates the tiny id/mask/position arrays that are bound by pointer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from river.compiler.graph_io import derived_graph, load_onnx_header
from river.compiler.ort_session import graph_input_names, session_options
from river.compiler.river.manifest import EXIT_LAYER, THRESHOLDS, RiverInfo, legacy_twins_note
from river.compiler.lowering.greedy_head import GREEDY_LOGITS
from river.compiler.lowering.ort_fused import (ORT_LOWERING_FORMAT, cache_variant, grid_weights_of, lower_for_ort,
                                               lowering_of)
from river.compiler.lowering.shared_kv import SHARED_KV_FORMAT, WRITE_INDICES, to_shared_kv
from river.errors import RiverError
from river.export import contract as C
from river.export.contract import CAUSAL_PROP, StepContract, exported_config, kv_window
from river.runtime.backend import InPlaceSteps, StepBackend, fused_positions
from river.runtime.kv_cache import SharedKVCache
from river.runtime.loading import LOWERINGS, grid_form



class OrtBackend(InPlaceSteps, StepBackend):
    """Runs a plain step graph or a River graph. For a River graph, prefill runs with every gate
    disabled (the whole backbone, as DESIGN 4 asks) and decode steps with ``thresholds`` (default:
    the graph's baked-in ones, bound by pointer so ``set_thresholds`` needs no rebinding).

    ``lowering="ort"`` (default) runs the graph's ONNX Runtime lowering (``compiler/lowering/ort_fused``:
    fused attention over the shared buffers) where it applies and the portable shared-KV form where it
    does not (``self.lowering`` says which, ``self.lowering_reason`` why not). ``positions``: the
    model's context; the rotary tables cover twice it, so a pool's slack and padded rows stay inside
    (default: the context recorded beside the graph; none recorded, ``backend.ROTARY_POSITIONS`` positions). A
    cache beyond the tables is refused."""

    name = "ort"

    def __init__(self, model_path: str | Path, threads: int | None = None, providers=None,
                 thresholds=None, matmul_accuracy: int = 1, single_token: bool = False, lowering: str = "ort",
                 positions: int | None = None):
        self.model_path = Path(model_path)
        header = load_onnx_header(self.model_path)  # graph without weights: cheap contract check
        self.contract = StepContract.from_model(header, str(model_path))
        defaults = next((i for i in header.graph.initializer if i.name == THRESHOLDS), None)
        self._init_river(RiverInfo.from_model(header),
                         None if defaults is None else onnx.numpy_helper.to_array(defaults).astype(np.float32).tolist(),
                         thresholds)
        self.twins_note = legacy_twins_note(header)  # an old export: the user should re-run river-export
        providers = providers or ["CPUExecutionProvider"]
        so = session_options(threads, matmul_accuracy)
        # Graphs whose causal mask goes by position run every step, prefill included, in the shared-KV
        # form (one session, one copy of the weights); others run their multi-token steps (prefill,
        # verification) with the contract graph (their shared-KV form is exact for one new token a step
        # only), and sliding-window graphs run every step with it (see _needs_contract_step).
        props = {p.key: p.value for p in header.metadata_props}
        self.multi_token_steps = props.get(CAUSAL_PROP) == "position"
        self.kv_window = kv_window(self.model_path.parent)
        self.prefill_session = (None if self.multi_token_steps and self.kv_window is None else
                                ort.InferenceSession(str(self.model_path), so, providers=providers))
        if lowering not in LOWERINGS:
            raise RiverError(f"unknown lowering '{lowering}' (choose {' or '.join(LOWERINGS)})")
        self.decode_path = decode_path = self._decode_graph(lowering, positions)
        self.single_token = single_token
        if single_token:  # a draft: batch 1, one token a step; static sizes let ORT fold the shape arithmetic
            dims = next(i for i in header.graph.input if i.name == C.INPUT_IDS).type.tensor_type.shape.dim
            for d in dims:
                if d.dim_param:
                    so.add_free_dimension_override_by_name(d.dim_param, 1)
        self.decode_session = ort.InferenceSession(str(decode_path), so, providers=providers)

    def _decode_graph(self, lowering: str, positions: int | None) -> Path:
        """The in-place graph for steps: the fused lowering where it applies, else the portable one."""
        self.lowering, self.lowering_reason, self.max_positions = "portable", "", None
        self.grid_weights = 0  # products on a 4-bit grid (run in self.grid_form, ort_fused.GRID_FORMS)
        self.grid_form = "fp32"
        self.context = positions or exported_config(self.model_path.parent).get("max_position_embeddings")
        if lowering != "portable" and self.kv_window is None:
            # twice the context: positions past a row's room (a pool's slack, padding) stay in the tables
            positions, grid = fused_positions(self.context), grid_form(lowering)
            path = derived_graph("ort_lowered", self.model_path, ORT_LOWERING_FORMAT,
                                 lambda m: lower_for_ort(m, positions, grid=grid), variant=cache_variant(positions, grid))
            lowered = load_onnx_header(path)
            self.lowering, self.lowering_reason = lowering_of(lowered)
            self.grid_weights = grid_weights_of(lowered)
            self.grid_form = grid if self.lowering != "portable" else "fp32"
            self.max_positions = positions if self.lowering != "portable" else None
            return path
        if lowering != "portable":
            self.lowering_reason = "a sliding window: every step runs the contract graph"
        return derived_graph("shared_kv", self.model_path, SHARED_KV_FORMAT, to_shared_kv)

    def new_cache(self, capacity: int, batch: int = 1):
        self._check_positions(capacity)
        return super().new_cache(capacity, batch)

    # --- prefill ------------------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        # the whole backbone (DESIGN 4), in place like a decode step where that is exact
        return self._prefill_by_extend(input_ids, cache)

    def _run_contract(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.river is not None:
            feeds[THRESHOLDS] = self.thresholds.copy()
        outputs = self.prefill_session.run(None, feeds)
        result = dict(zip([o.name for o in self.prefill_session.get_outputs()], outputs))
        if self.river is not None:
            self.last_exit_layer = int(result[EXIT_LAYER][0])
        return result

    # --- decode / extend: shared-KV graph, buffers bound in place ----------------------------
    def _bind(self, cache: SharedKVCache, s: int) -> dict:
        """IOBinding for steps of ``s`` new tokens over ``cache`` (made once per cache and s)."""
        c, b = self.contract, cache.batch
        st = {"ids": np.zeros((b, s), np.int64), "positions": np.zeros((b, s), np.int64),
              "write_at": np.zeros((b,), np.int64), "mask": np.zeros((b, cache.physical), np.int64),
              "logits": np.zeros((b, s, c.vocab_size or self._vocab()), np.float32)}
        binding = self.decode_session.io_binding()
        # OrtValues wrap the numpy arrays' memory (no copy); keep them alive in the state
        values = {
            C.INPUT_IDS: ort.OrtValue.ortvalue_from_numpy(st["ids"]),
            C.POSITION_IDS: ort.OrtValue.ortvalue_from_numpy(st["positions"]),
            WRITE_INDICES: ort.OrtValue.ortvalue_from_numpy(st["write_at"]),
            C.ATTENTION_MASK: ort.OrtValue.ortvalue_from_numpy(st["mask"]),
            C.LOGITS: ort.OrtValue.ortvalue_from_numpy(st["logits"]),
        }
        graph_inputs = graph_input_names(self.decode_session)  # the fused form reads no write index
        for name in (C.INPUT_IDS, WRITE_INDICES, C.ATTENTION_MASK) + ((C.POSITION_IDS,) if c.position_ids else ()):
            if name in graph_inputs:
                binding.bind_ortvalue_input(name, values[name])
        binding.bind_ortvalue_output(C.LOGITS, values[C.LOGITS])
        if GREEDY_LOGITS in graph_inputs:
            values[GREEDY_LOGITS] = ort.OrtValue.ortvalue_from_numpy(self.greedy_flag)
            binding.bind_ortvalue_input(GREEDY_LOGITS, values[GREEDY_LOGITS])
        if self.river is not None:
            st["exit"] = np.zeros((b,), np.int64)
            values[THRESHOLDS] = ort.OrtValue.ortvalue_from_numpy(self.thresholds)
            values[EXIT_LAYER] = ort.OrtValue.ortvalue_from_numpy(st["exit"])
            binding.bind_ortvalue_input(THRESHOLDS, values[THRESHOLDS])
            binding.bind_ortvalue_output(EXIT_LAYER, values[EXIT_LAYER])
        for layer in range(c.num_layers):
            for kind, buf in (("key", cache.keys[layer]), ("value", cache.values[layer])):
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                values[C.past_name(layer, kind)] = value
                binding.bind_ortvalue_input(C.past_name(layer, kind), value)
                binding.bind_ortvalue_output(C.present_name(layer, kind), value)
        st["binding"], st["values"] = binding, values
        return st

    def _vocab(self) -> int:
        return int(self.decode_session.get_outputs()[0].shape[-1])

    def bound_pointers(self) -> dict[str, int]:
        """Data pointers of the bound KV inputs/outputs (tests check they are the cache buffers)."""
        return {name: v.data_ptr() for st in self.bound_states() for name, v in st["values"].items()
                if name.startswith("past_key_values")}

    def extend(self, token_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        """Run S new tokens per row [B,S] at positions ``cache.length`` .. +S-1, writing only those
        positions of every layer in place; return logits [B,S,V] (a view, valid until the next call).
        The caller advances (or, after a rejected draft, keeps) ``cache.length``. Steps the shared-KV
        form would get wrong run as contract steps (exact, copies the valid past): _needs_contract_step."""
        if self._needs_contract_step(token_ids, cache):
            return self._contract_step(token_ids, cache, self._run_contract)
        if self.lowering == "ort_fused":
            self._check_positions(cache.physical)  # caches made elsewhere too (a batch scheduler's pool)
            if token_ids.shape[0] > 1 and token_ids.shape[1] > 1:
                return self._extend_by_row(token_ids, cache)
        st = self._step_state(token_ids, cache)
        self.decode_session.run_with_iobinding(st["binding"])
        if self.river is not None:
            self.last_exit_layer = int(st["exit"][0])
        return st["logits"]
