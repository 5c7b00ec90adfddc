"""River-LLM generation model for Triton's Python backend (decoupled: it streams).

``write_triton_repo`` copies this file into the repository as ``river_generate/1/model.py``; the River
model files are in ``1/river`` beside it. It owns the generation loop: tokenize, prefill, River decode
steps over KV buffers held per request, one response per printable token, a final response with the
request's exit statistics.

Mode "ort" (default): our runtime in-process (ONNX Runtime, shared KV buffers written in place). One
backend per instance; concurrent requests run in worker threads and take turns step by step.
Mode "bls": each step is a BLS request to the step model (onnxruntime or tensorrt_plan backend), which
is stateless, so the request's KV buffers travel with every step. Requests then run inside execute,
one at a time per instance (scale with instance_group count).

``triton_python_backend_utils`` exists only inside Triton's Python backend; tests put a stand-in into
``sys.modules`` before importing this module.
"""

import json
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from river.compiler.river.manifest import EXIT_LAYER, THRESHOLDS
from river.errors import CacheOverflow, RiverError
from river.export import contract as C
from river.runtime.backend import StepBackend
from river.runtime.triton.config import DEFAULT_MAX_TOKENS, GENERATE_INPUTS, GENERATE_MODEL, RIVER_SUBDIR
from river.runtime.triton.serving import (
    CacheLedger,
    RequestBackend,
    RequestCancelled,
    RequestError,
    SharedBackendView,
    parse_request,
    serve_request,
)


class BlsStepBackend(RequestBackend):
    """Steps through Triton: past KV up to the cache length goes out, the new positions come back and are
    written into this request's buffers (the step model is stateless, so nothing is shared in place)."""

    def __init__(self, step_model: str, base: StepBackend, thresholds=None, cancelled=None, ledger=None):
        super().__init__(base, thresholds, cancelled, ledger)
        self.step_model = step_model
        self.outputs = [C.LOGITS] + [C.present_name(layer, kv) for layer in range(self.contract.num_layers)
                                     for kv in ("key", "value")] + ([EXIT_LAYER] if self.river else [])

    def new_cache(self, capacity, batch=1):
        return self._track(super().new_cache(capacity, batch))

    def _run(self, feeds):
        """One BLS request to the stateless step model (the contract form) with the current thresholds."""
        self._check()
        tensors = [pb_utils.Tensor(name, value) for name, value in feeds.items()]
        if self.thresholds is not None:
            tensors.append(pb_utils.Tensor(THRESHOLDS, self.thresholds.copy()))
        request = pb_utils.InferenceRequest(
            model_name=self.step_model, requested_output_names=self.outputs, inputs=tensors,
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise RiverError(f"step model '{self.step_model}': {response.error().message()}")
        out = {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs}
        if self.river is not None:
            self.last_exit_layer = int(out[EXIT_LAYER][0])
        return out

    def prefill(self, input_ids, cache):
        self._check_prefill(input_ids, cache)
        with self.full_depth():  # prefill runs the whole backbone
            return self._contract_step(input_ids, cache, self._run)

    def extend(self, token_ids, cache):
        logits = self._contract_step(token_ids, cache, self._run)
        self._record(token_ids)
        return logits


class TritonPythonModel:
    def initialize(self, args):
        from river.runtime.loading import open_generator

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.mode = params.get("mode", "ort")
        self.name = args.get("model_name", GENERATE_MODEL)
        self.default_max_tokens = int(params.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        threads = int(params["threads"]) if params.get("threads") else None
        max_length = int(params["max_length"]) if params.get("max_length") else None
        # The in-process generator also gives the tokenizer, EOS ids, context length and gate defaults
        # in BLS mode, where its backend runs no step.
        self.gen = open_generator(str(version_dir / params.get("river_dir", RIVER_SUBDIR) / "model.onnx"),
                                  threads=threads, max_length=max_length)
        self.backend = self.gen.backend
        gates = list(self.backend.river.gates) if self.backend.river else []
        self.gates = len(gates)
        self.step_model = params.get("step_model")
        self.lock = threading.Lock()  # one step of one request at a time on the shared backend
        self.encode_lock = threading.Lock()
        self.ledger = CacheLedger()
        self.counts = {"live_requests": 0, "peak_live_requests": 0, "completed": 0, "cancelled": 0, "failed": 0}
        self.counts_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrent", 8)),
                                       thread_name_prefix="river-request")
        pb_utils.Logger.log_info(
            f"river: {self.name} ready: mode {self.mode}, {self.backend.contract.num_layers} layers, "
            f"gates {gates}, KV capacity {self.gen.max_length}")

    # --- one request ------------------------------------------------------------------------------
    def _values(self, request):
        values = {}
        for name, *_ in GENERATE_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            values[name] = None if tensor is None else np.array(tensor.as_numpy(), copy=True)
        return values

    def _count(self, key, delta=1):
        with self.counts_lock:
            self.counts[key] += delta
            self.counts["peak_live_requests"] = max(self.counts["peak_live_requests"], self.counts["live_requests"])

    def _server_stats(self):
        with self.counts_lock:
            counts = dict(self.counts)
        return {**counts, "live_caches": self.ledger.live, "live_cache_bytes": self.ledger.live_bytes,
                "caches_freed": self.ledger.freed}

    def _backend(self, spec, cancelled):
        if self.mode == "bls":
            return BlsStepBackend(self.step_model, self.backend, spec.thresholds, cancelled, self.ledger)
        return SharedBackendView(self.backend, self.lock, spec.thresholds, cancelled, self.ledger)

    def _run(self, rid, spec, sender):
        backend = self._backend(spec, sender.is_cancelled)

        def emit(token_ids, piece):
            if sender.is_cancelled():
                raise RequestCancelled()
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text", np.array([piece.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("token_ids", np.asarray(token_ids, np.int64))]))

        outcome, served, error = "failed", None, None
        try:
            served = serve_request(backend, self.gen.tokenizer, self.gen.eos_token_ids, self.gen.max_length,
                                   spec, emit, self.encode_lock)
            outcome = "completed"
        except RequestCancelled:
            outcome = "cancelled"
        except (RequestError, CacheOverflow, ValueError) as exc:
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Exception as exc:  # noqa: BLE001 - keep serving: report, log, and move on
            pb_utils.Logger.log_error(f"river: request {rid} failed: {traceback.format_exc()}")
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
        finally:
            backend.release()
            del backend  # the last reference to the request's KV cache goes here
            self._count("live_requests", -1)
        self._count(outcome)
        server = self._server_stats()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if served is not None:
                stats = {**served.stats, "request_id": rid, "server": server}
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text", np.array([served.text.encode("utf-8")], dtype=np.object_)),
                    pb_utils.Tensor("token_ids", np.asarray(served.token_ids, np.int64)),
                    pb_utils.Tensor("stats", np.array([json.dumps(stats).encode("utf-8")], dtype=np.object_))]),
                    flags=final)
            elif error is not None:
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
            else:  # cancelled: no more responses, but the stream still needs its final flag
                sender.send(flags=final)
        finally:
            pb_utils.Logger.log_info(
                f"river: request {rid} {outcome}; live requests {server['live_requests']}, "
                f"live KV caches {server['live_caches']} ({server['live_cache_bytes']} bytes), "
                f"caches freed {server['caches_freed']}")

    def _guarded(self, rid, spec, sender):
        try:
            self._run(rid, spec, sender)
        except Exception:  # noqa: BLE001 - the sender may be gone (client disconnected); never kill the worker
            pb_utils.Logger.log_error(f"river: request {rid}: {traceback.format_exc()}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            rid = request.request_id() or f"{id(request):x}"
            try:  # copy the inputs now: their memory is released when execute returns
                spec = parse_request(self._values(request), self.gates, self.default_max_tokens)
            except RequestError as exc:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    str(exc), pb_utils.TritonError.INVALID_ARG)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self._count("live_requests")
            if self.mode == "bls":  # BLS calls are documented for the execute thread only
                self._guarded(rid, spec, sender)
            else:
                self.pool.submit(self._guarded, rid, spec, sender)

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=False)
