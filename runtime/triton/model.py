"""River-LLM generation model for Triton's Python backend (decoupled: it streams).

``write_triton_repo`` copies this file into the repository as ``river_generate/1/model.py``; the River
model files are in ``1/river`` beside it. It owns the generation loop: tokenize, prefill, River decode
steps over KV buffers held per request, one response per printable token, a final response with the
request's exit statistics.

Mode "ort" (default): our runtime in-process, through the continuous-batching scheduler
(``runtime/batching``): every live request has a row of one KV pool per instance, and each step
advances all of them at once (rows exit at their own gates; verify-mode rows draft and verify in the
same steps). Requests join and leave between steps; a full instance refuses new ones (UNAVAILABLE).
Custom metrics (tokens/s, batch occupancy, queue depth, exit histogram, verify acceptance) go to
Triton's metrics endpoint.
Mode "bls": each step is a BLS request to the step model (onnxruntime or tensorrt_plan backend), which
is stateless, so the request's KV buffers travel with every step. Requests then run inside execute,
one at a time per instance (scale with instance_group count).

``triton_python_backend_utils`` exists only inside Triton's Python backend; tests put a stand-in into
``sys.modules`` before importing this module.
"""

import json
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from river.compiler.river.manifest import EXIT_LAYER, THRESHOLDS
from river.compiler.river.recall import RECALL_OFF
from river.errors import CacheOverflow, RiverError
from river.export import contract as C
from river.runtime.backend import StepBackend
from river.runtime.triton.config import DEFAULT_MAX_TOKENS, GENERATE_INPUTS, GENERATE_MODEL, RIVER_SUBDIR
from river.runtime.triton.serving import (
    CacheLedger,
    RequestBackend,
    RequestCancelled,
    RequestError,
    parse_request,
    request_stats,
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


class SchedulerMetrics:
    """The scheduler's figures as Triton custom metrics (Prometheus, on the metrics port), refreshed
    by a thread every ``period`` seconds: counters grow by their deltas, gauges are set."""

    COUNTERS = (("tokens", "river_generated_tokens_total", "tokens generated"),
                ("completed", "river_requests_completed_total", "requests completed"),
                ("cancelled", "river_requests_cancelled_total", "requests cancelled"),
                ("failed", "river_requests_failed_total", "requests failed"),
                ("rejected", "river_requests_rejected_total", "requests refused: instance full"),
                ("drafted", "river_verify_drafted_tokens_total", "verify mode: tokens drafted"),
                ("accepted", "river_verify_accepted_tokens_total", "verify mode: drafted tokens accepted"),
                ("verify_at_full_depth", "river_verify_full_depth_tokens_total",
                 "verify mode: greedy tokens decoded at full depth (a big batch, where drafting does not pay)"),
                ("recalled", "river_recalled_tokens_total",
                 "exit mode: tokens whose river was unsure, sent back to the backbone (recall points)"))
    GAUGES = (("tokens_per_s", "river_tokens_per_second", "tokens generated per second (last 10 s)"),
              ("rows", "river_batch_rows", "requests in the batch"),
              ("occupancy", "river_batch_occupancy", "rows in use / rows of the KV pool"),
              ("queue_depth", "river_queue_depth", "requests waiting for a row"),
              ("acceptance", "river_verify_acceptance", "verify mode: accepted / drafted tokens"))

    def __init__(self, scheduler, model_name: str, period: float = 0.5):
        labels = {"model": model_name}
        self.scheduler, self.period, self.labels = scheduler, period, labels
        C, G = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.families = []  # metric families must outlive their metrics

        def family(name, description, kind):
            f = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self.families.append(f)
            return f

        self.counters = {key: family(name, desc, C).Metric(labels=labels) for key, name, desc in self.COUNTERS}
        self.gauges = {key: family(name, desc, G).Metric(labels=labels) for key, name, desc in self.GAUGES}
        self.exit_family = family("river_exit_tokens_total", "decode tokens per exit layer", C)
        self.exits: dict[int, object] = {}
        self.seen: dict[str, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="river-metrics", daemon=True)
        self.thread.start()

    def refresh(self) -> None:
        m = self.scheduler.metrics()
        for key, metric in self.counters.items():
            delta = m[key] - self.seen.get(key, 0)
            if delta > 0:
                metric.increment(delta)
                self.seen[key] = m[key]
        for key, metric in self.gauges.items():
            metric.set(float(m[key] or 0.0))
        for layer, count in m["exit_histogram"].items():
            if layer not in self.exits:
                self.exits[layer] = self.exit_family.Metric(labels={**self.labels, "layer": str(layer)})
            delta = count - self.seen.get(f"exit{layer}", 0)
            if delta > 0:
                self.exits[layer].increment(delta)
                self.seen[f"exit{layer}"] = count

    def _loop(self) -> None:
        while not self.stopped.wait(self.period):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - metrics must never take the model down
                pb_utils.Logger.log_error(f"river: metrics: {traceback.format_exc()}")

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


class TritonPythonModel:
    def initialize(self, args):
        from river.compiler.ort_session import use_shared_thread_pool
        from river.runtime.loading import open_generator, open_scheduler

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.mode = params.get("mode", "ort")
        self.name = args.get("model_name", GENERATE_MODEL)
        self.default_max_tokens = int(params.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        threads = int(params["threads"]) if params.get("threads") else None
        max_length = int(params["max_length"]) if params.get("max_length") else None
        river_dir = version_dir / params.get("river_dir", RIVER_SUBDIR)
        self.encode_lock = threading.Lock()  # fast tokenizers are not safe to encode from several threads
        self.metrics = None
        if self.mode == "bls":
            # The in-process generator gives the tokenizer, EOS ids, context length and gate defaults; its
            # backend runs no step. Requests run inside execute, one at a time per instance.
            self.gen = open_generator(str(river_dir / "model.onnx"), threads=threads, max_length=max_length)
            self.backend, self.tokenizer = self.gen.backend, self.gen.tokenizer
            self.step_model = params.get("step_model")
            self.ledger = CacheLedger()
            self.scheduler = None
        else:
            use_shared_thread_pool(threads)  # this stub process is ours: its sessions share one pool
            rows = int(params.get("max_rows", 8))
            payoff = params.get("draft_payoff", "true").lower()
            if payoff not in ("true", "false"):
                raise RiverError(f"parameter draft_payoff must be true or false, not '{payoff}'")
            self.scheduler = open_scheduler(str(river_dir), threads=threads, max_length=max_length, max_rows=rows,
                                            max_queue=int(params.get("max_queue", 4 * rows)),
                                            prefill_chunk=int(params.get("prefill_chunk", 16)),
                                            prefill_budget=int(params["prefill_budget"]) if params.get("prefill_budget") else None,
                                            verify_drafts_up_to=int(params["verify_drafts_up_to"])
                                            if params.get("verify_drafts_up_to") else None,
                                            draft_payoff=payoff == "true")
            self.backend, self.tokenizer = self.scheduler.decoder, self.scheduler.tokenizer
            self.scheduler.start()
            if hasattr(pb_utils, "MetricFamily"):
                self.metrics = SchedulerMetrics(self.scheduler, self.name)
        gates = list(self.backend.river.gates) if self.backend.river else []
        self.gates = len(gates)
        self.default_mode = "exit" if gates else "full"
        detail = "" if self.scheduler is None else (
            f", {self.scheduler.max_rows} rows, {'per-row' if self.backend.per_row_exits else 'batch-wide'} exits, "
            f"verify draft {'graph' if self.scheduler.draft is not None else 'river'}, "
            f"KV pool up to {self.scheduler.max_length} positions")
        pb_utils.Logger.log_info(f"river: {self.name} ready: mode {self.mode}, {self.backend.contract.num_layers} "
                                 f"layers, gates {gates}{detail}")

    # --- requests -----------------------------------------------------------------------------------
    def _values(self, request):
        values = {}
        for name, *_ in GENERATE_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            values[name] = None if tensor is None else np.array(tensor.as_numpy(), copy=True)
        return values

    @staticmethod
    def _final_error(sender, message: str, code=None) -> None:
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _tokens_response(token_ids, piece: str, stats: dict | None = None):
        tensors = [pb_utils.Tensor("text", np.array([piece.encode("utf-8")], dtype=np.object_)),
                   pb_utils.Tensor("token_ids", np.asarray(token_ids, np.int64))]
        if stats is not None:
            tensors.append(pb_utils.Tensor("stats", np.array([json.dumps(stats).encode("utf-8")], dtype=np.object_)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            rid = request.request_id() or f"{id(request):x}"
            try:  # copy the inputs now: their memory is released when execute returns
                spec = parse_request(self._values(request), self.gates, self.default_max_tokens, self.default_mode)
            except RequestError as exc:
                self._final_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            if self.scheduler is None:
                self._run_bls(rid, spec, sender)
            else:
                self._submit(rid, spec, sender)

    # --- the scheduler (default) ------------------------------------------------------------------------
    def _submit(self, rid, spec, sender):
        from river.models.tokenizer import encode_prompt
        from river.runtime.batching.scheduler import BatchRequest, SchedulerFull

        t0 = time.perf_counter()
        try:
            with self.encode_lock:
                prompt_ids = encode_prompt(self.tokenizer, spec.prompt, spec.chat)
            thresholds, recall = spec.thresholds, RECALL_OFF
            if spec.budget is not None:
                thresholds, recall = self.scheduler.budget_point(spec.budget)
            batch_request = BatchRequest(prompt_ids, spec.cfg, mode=spec.mode, thresholds=thresholds, k=spec.k,
                                         adaptive=spec.adaptive, recall=recall, cancelled=sender.is_cancelled)
            self.scheduler.submit(batch_request, on_tokens=lambda ids, piece: sender.send(self._tokens_response(ids, piece)),
                                  on_done=lambda ticket: self._done(rid, spec, thresholds, ticket, sender, t0))
        except SchedulerFull as exc:
            self._final_error(sender, str(exc), pb_utils.TritonError.UNAVAILABLE)
        except (RiverError, CacheOverflow, ValueError) as exc:
            self._final_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)

    def _done(self, rid, spec, thresholds, ticket, sender, t0):
        """The final response of a request the scheduler has finished, failed or cancelled."""
        from river.runtime.batching.scheduler import RequestCancelled as Cancelled

        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        server = self.scheduler.metrics()
        outcome = "completed"
        try:
            if isinstance(ticket.error, Cancelled):
                outcome = "cancelled"
                sender.send(flags=final)  # no more responses, but the stream still needs its final flag
            elif ticket.error is not None:
                outcome = "failed"
                pb_utils.Logger.log_error(f"river: request {rid} failed: {ticket.error!r}")
                self._final_error(sender, f"{type(ticket.error).__name__}: {ticket.error}")
            else:
                stats = request_stats(ticket.result, self.backend.river, self.backend.contract.num_layers,
                                      thresholds if spec.mode == "exit" else None, time.perf_counter() - t0)
                st = ticket.stats
                stats.update(mode=spec.mode, request_id=rid, queued_seconds=round(st.queued_seconds, 4),
                             first_token_seconds=None if st.first_token_seconds is None else round(st.first_token_seconds, 4),
                             server=server)
                if spec.mode == "exit" and thresholds is None:
                    stats["thresholds"] = [float(t) for t in self.backend.default_thresholds]
                if spec.mode == "exit":
                    stats["recalled_tokens"] = st.recalled_tokens
                if spec.mode == "verify":
                    stats.update(k=spec.k, adaptive=spec.adaptive, verify_rounds=st.verify_rounds, drafted=st.drafted, accepted=st.accepted,
                                 full_depth_tokens=st.full_depth_tokens,
                                 acceptance=st.accepted / st.drafted if st.drafted else None)
                sender.send(self._tokens_response([], "", stats), flags=final)
        finally:
            pb_utils.Logger.log_info(
                f"river: request {rid} {outcome}; rows in use {server['rows']} of {server['max_rows']}, "
                f"queued {server['queue_depth']}, completed {server['completed']}, cancelled {server['cancelled']}")

    # --- BLS mode -------------------------------------------------------------------------------------
    def _run_bls(self, rid, spec, sender):
        """One request, run to the end in the execute thread (BLS calls are documented for it only)."""
        if spec.mode == "verify":
            self._final_error(sender, "mode 'verify' is served by the in-process scheduler, not in BLS mode",
                              pb_utils.TritonError.INVALID_ARG)
            return
        if spec.budget is not None:
            self._final_error(sender, "'budget' is served by the in-process scheduler, not in BLS mode",
                              pb_utils.TritonError.INVALID_ARG)
            return
        backend = BlsStepBackend(self.step_model, self.backend, spec.thresholds, sender.is_cancelled, self.ledger)

        def emit(token_ids, piece):
            if sender.is_cancelled():
                raise RequestCancelled()
            sender.send(self._tokens_response(token_ids, piece))

        outcome, served, error = "failed", None, None
        try:
            if spec.mode == "full" and backend.gate_thresholds is not None:
                backend.set_thresholds(backend.gate_thresholds.disabled())
            served = serve_request(backend, self.tokenizer, self.gen.eos_token_ids, self.gen.max_length,
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
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if served is not None:
                stats = {**served.stats, "mode": spec.mode, "request_id": rid}
                sender.send(self._tokens_response(served.token_ids, served.text, stats), flags=final)
            elif error is not None:
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
            else:
                sender.send(flags=final)
        finally:
            pb_utils.Logger.log_info(f"river: request {rid} {outcome}; live KV caches {self.ledger.live} "
                                     f"({self.ledger.live_bytes} bytes), caches freed {self.ledger.freed}")

    def finalize(self):
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.scheduler is not None:
            self.scheduler.stop()
