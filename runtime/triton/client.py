"""Stream a generation from the River Triton model over gRPC (``python -m river.runtime.triton.client``).

Decoupled models answer with many responses per request, which only gRPC streaming carries; the final
response is recognised by Triton's ``triton_final_response`` parameter (requested with
``enable_empty_final_response``, so a cancelled request still ends the wait).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from river.runtime.triton.config import GENERATE_MODEL

DEFAULT_URL = "127.0.0.1:8001"


@dataclass
class StreamResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stats: dict | None = None  # the model's final statistics (None when cancelled)
    responses: int = 0
    cancelled: bool = False


def build_inputs(prompt: str, *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
                 thresholds: Sequence[float] | None = None, raw: bool = False, ignore_eos: bool = False,
                 mode: str | None = None, k: int | None = None, adaptive: bool | None = None,
                 budget: str | None = None):
    """The request's ``InferInput``s; an option left at its default is not sent (the model's default applies).
    ``mode`` ("full" | "exit" | "verify"), ``k`` (verify mode's draft length), ``adaptive`` (verify mode:
    k adapts every round; None = the model's default) and ``budget`` (exit mode's named
    operating point) are optional model inputs, so older models still accept requests that omit them."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("prompt", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES")]
    if max_tokens is not None:
        inputs.append(tensor("max_tokens", np.array([max_tokens], np.int32), "INT32"))
    if temperature is not None:
        inputs.append(tensor("temperature", np.array([temperature], np.float32), "FP32"))
    if top_p is not None:
        inputs.append(tensor("top_p", np.array([top_p], np.float32), "FP32"))
    if seed is not None:
        inputs.append(tensor("seed", np.array([seed], np.int64), "INT64"))
    if stop:
        inputs.append(tensor("stop", np.array([s.encode("utf-8") for s in stop], dtype=np.object_), "BYTES"))
    if thresholds is not None:
        inputs.append(tensor("thresholds", np.asarray(thresholds, np.float32), "FP32"))
    if raw:
        inputs.append(tensor("raw", np.array([True]), "BOOL"))
    if ignore_eos:
        inputs.append(tensor("ignore_eos", np.array([True]), "BOOL"))
    if mode is not None:
        inputs.append(tensor("mode", np.array([mode.encode("utf-8")], dtype=np.object_), "BYTES"))
    if k is not None:
        inputs.append(tensor("k", np.array([k], np.int32), "INT32"))
    if adaptive is not None:
        inputs.append(tensor("adaptive", np.array([adaptive]), "BOOL"))
    if budget is not None:
        inputs.append(tensor("budget", np.array([budget.encode("utf-8")], dtype=np.object_), "BYTES"))
    return inputs


def stream_generate(prompt: str, *, url: str = DEFAULT_URL, model: str = GENERATE_MODEL,
                    on_piece: Callable[[str, list[int]], bool | None] | None = None, timeout: float = 300.0,
                    inputs=None, request_id: str | None = None, mode: str | None = None, k: int | None = None,
                    budget: str | None = None, client=None, **options) -> StreamResult:
    """Send one request on its own gRPC stream and collect the streamed text, tokens and final stats.

    ``on_piece(text, token_ids)`` sees every response as it arrives; returning False cancels the request
    (the stream is closed with ``cancel_requests=True``, which the model sees between two steps).
    ``mode``, ``k``, ``budget`` and ``options`` are ``build_inputs``'s; ``inputs`` replaces them with prepared
    ``InferInput``s. ``client``: an open ``InferenceServerClient`` to reuse (a load test keeps one per thread, so
    a request's latency holds no connection set-up); it is left open, else one is made and closed here.
    Raises the server's ``InferenceServerException`` when the request fails.
    """
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    out = StreamResult()
    if inputs is None:
        inputs = build_inputs(prompt, mode=mode, k=k, budget=budget, **options)
    own_client = client is None
    if own_client:
        client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer(model, inputs,
                                  request_id=request_id or uuid.uuid4().hex[:12], enable_empty_final_response=True)
        while True:
            try:
                result, error = events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no response from {model} at {url} in {timeout:.0f}s") from None
            if error is not None:
                raise error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if response.outputs:
                out.responses += 1
                piece = result.as_numpy("text")
                piece = piece.reshape(-1)[0].decode("utf-8") if piece is not None else ""
                ids = result.as_numpy("token_ids")
                ids = [] if ids is None else [int(t) for t in ids.reshape(-1)]
                out.text += piece
                out.token_ids += ids
                stats = result.as_numpy("stats")
                if stats is not None:
                    out.stats = json.loads(stats.reshape(-1)[0].decode("utf-8"))
                keep = on_piece(piece, ids) if on_piece is not None else None
                if keep is False and not final:
                    client.stop_stream(cancel_requests=True)
                    out.cancelled = True
                    return out
            if final:
                return out
    finally:
        client.stop_stream(cancel_requests=True)  # the request is complete here, or to be abandoned
        if own_client:
            client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m river.runtime.triton.client",
                                description="Stream an answer from a River model served by Triton (gRPC).")
    p.add_argument("prompt")
    p.add_argument("--url", default=DEFAULT_URL, help=f"gRPC address (default {DEFAULT_URL})")
    p.add_argument("--model", default=GENERATE_MODEL)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--thresholds", help="per-gate exit thresholds, comma-separated")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--mode", choices=["full", "exit", "verify"], help="generation mode (default: the model's)")
    p.add_argument("--k", type=int, help="verify mode: tokens drafted per round (adaptive: the first round's)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="verify mode: k adapts every round (default: the model's, adaptive)")
    p.add_argument("--budget", help="exit mode: a named calibrated operating point (e.g. safe, balanced, fast)")
    args = p.parse_args(argv)
    from tritonclient.utils import InferenceServerException

    thresholds = None if args.thresholds is None else [float(x) for x in args.thresholds.split(",")]
    try:
        result = stream_generate(args.prompt, url=args.url, model=args.model,
                                 on_piece=lambda piece, _ids: print(piece, end="", flush=True),
                                 max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                 seed=args.seed, stop=args.stop, thresholds=thresholds, raw=args.raw,
                                 mode=args.mode, k=args.k, adaptive=args.adaptive, budget=args.budget)
    except (InferenceServerException, TimeoutError) as exc:
        print(f"\ntriton.client: error: {exc}", file=sys.stderr)
        return 2
    print()
    if result.stats:
        s = result.stats
        print(f"[river] {s['tokens']} tokens ({s['finish_reason']}); decode {s['decode_tokens_per_s']} tokens/s; "
              f"exit layers {s['exit_histogram']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
