"""The README written into a Triton model repository, and the note left where a TensorRT plan is missing."""

from __future__ import annotations

from collections.abc import Sequence

from river.compiler.river.manifest import RiverInfo
from river.export.contract import StepContract
from river.runtime.triton.config import GENERATE_MODEL, STEP_MODEL, STEP_TRT_MODEL

TRT_NOTE = """# {name}: the River step model as a TensorRT engine

No engine was given when this repository was written. Build one from the River graph with
`river.compiler.tensorrt.build` on the GPU that will serve it (engines are specific to a GPU and a
TensorRT version) and put it at `{name}/1/model.plan`. Until then, leave this model out of the server
(`--model-control-mode=explicit --load-model=...`), or Triton will fail to load it.
"""


def repo_readme(contract: StepContract, river: RiverInfo | None, step_backends: Sequence[str], has_plan: bool,
                bls: bool) -> str:
    """The repository's README: what each model is, how to start the server and how to call it."""
    gates = list(river.gates) if river else []
    models = [f"- `{GENERATE_MODEL}` (Python backend, decoupled): the generation loop; streams tokens. Mode: "
              + ("BLS calls to the step model, one request at a time per instance." if bls else
                 "ONNX Runtime in-process, continuous batching: every live request is a row of one KV pool "
                 "and each step advances all of them (rows exit at their own gates; verify-mode rows draft "
                 "and verify in the same steps).")]
    if "onnxruntime" in step_backends:
        models.append(f"- `{STEP_MODEL}` (onnxruntime backend, CPU instances): the River step graph. Our runtime "
                      "runs it with ONNX Runtime's `session.qdq_matmulnbits_accuracy_level=1` (fp32 twins); "
                      "Triton's onnxruntime backend documents no way to set that session entry, so there the "
                      "int8 twins run at ORT's default level and tokens can differ from the in-process mode.")
    if "tensorrt_plan" in step_backends:
        models.append(f"- `{STEP_TRT_MODEL}` (tensorrt_plan backend, GPU instances): "
                      + ("the engine." if has_plan
                         else f"config only; put the engine at `{STEP_TRT_MODEL}/1/model.plan`."))
    return README_TEMPLATE.format(
        models="\n".join(models), layers=contract.num_layers, gates=gates, n_gates=len(gates),
        generate=GENERATE_MODEL, step=STEP_MODEL)


README_TEMPLATE = """# River-LLM Triton model repository

Written by `river.runtime.triton.repository.write_triton_repo`. The model has {layers} layers and exit gates
after layers {gates}.

{models}

## Start the server

A full Triton container (`nvcr.io/nvidia/tritonserver:<yy.mm>-py3`) has every backend, but the
Python model still imports `river` and its dependencies (onnxruntime, transformers, numpy<2): install
River-LLM into the Python the backend stub runs (the stub's Python version must match), then

    tritonserver --model-repository=$PWD --model-control-mode=explicit --load-model={generate}

(add `--load-model={step}` for BLS mode or direct step calls). The `tritonserver` binary that
`nvidia-pytriton` ships has only the Python backend; `python -m river.runtime.triton.server REPO`
starts it on 127.0.0.1 with the environment its Python backend needs (the matching stub,
`LD_LIBRARY_PATH` with the interpreter's lib folder, the virtual environment first on `PATH` so the
stub's embedded Python finds it) and loads `{generate}` only.

## Call it (gRPC streaming; the HTTP endpoint cannot stream decoupled responses)

    python -m river.runtime.triton.client "What is a river delta?" --url 127.0.0.1:8001

or from Python:

```python
import numpy as np
import queue
import tritonclient.grpc as grpcclient

done = queue.Queue()
client = grpcclient.InferenceServerClient("127.0.0.1:8001")
client.start_stream(callback=lambda result, error: done.put((result, error)))
prompt = grpcclient.InferInput("prompt", [1], "BYTES")
prompt.set_data_from_numpy(np.array(["What is a river delta?".encode()], dtype=object))
max_tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
max_tokens.set_data_from_numpy(np.array([64], np.int32))
client.async_stream_infer("{generate}", [prompt, max_tokens], enable_empty_final_response=True)
while True:
    result, error = done.get()
    if error is not None:
        raise error
    print(result.as_numpy("text")[0].decode(), end="", flush=True)
    if result.get_response().parameters["triton_final_response"].bool_param:
        print("\\n", result.as_numpy("stats")[0].decode())
        break
client.stop_stream()
```

Inputs: `prompt` (string), optional `max_tokens` (int32), `temperature`, `top_p` (fp32), `seed`
(int64), `stop` (strings), `thresholds` (fp32 [{n_gates}], one per gate; above 1.0 disables a gate),
`raw` (bool: no chat template), `ignore_eos` (bool), `mode` (string: `full`, `exit` or `verify`;
default `exit` at the graph's thresholds), `k` (int32: verify mode's draft length; with `adaptive`, the first round's), `adaptive` (bool: verify
mode's k adapts every round, default true), `budget` (string:
exit mode at a calibrated operating point, e.g. `safe`, `balanced`, `fast`, or a recall point,
`safe-recall`, `balanced-recall`, `fast-recall`: the fast point's exits, and a token whose river is
unsure goes back to the backbone; see the project README). Each response carries
`text` (the printable text it adds) and `token_ids` (the tokens it adds); the final one adds `stats`, a
JSON object with the mode, the exit layer of every decode step, its histogram, token counts, time to
first token, verify acceptance and the instance's batch counters. A prompt that does not fit the KV
cache, or a bad value, gets an INVALID_ARG error; a full instance (every row busy and the queue full:
parameters `max_rows`, `max_queue`; `prefill_budget` bounds the prompt tokens a step prefills, trading
a joining request's delay to the running streams against burst throughput) answers UNAVAILABLE; cancelling the stream frees its row at the
next step. Greedy verify requests draft or decode at full depth (same tokens), whichever the
instance measures to emit the batch's tokens cheaper at that many decoding requests; they start out
drafting while at most `verify_drafts_up_to` requests decode (parameter, default 2) and at full depth
beyond (parameter `draft_payoff` `false`: that rule alone decides, over the live requests), and always
draft beside exit requests alone. Metrics (on Triton's metrics port): `river_generated_tokens_total`,
`river_tokens_per_second`, `river_batch_rows`, `river_batch_occupancy`, `river_queue_depth`,
`river_exit_tokens_total{{layer=...}}`, `river_verify_drafted_tokens_total`,
`river_verify_accepted_tokens_total`, `river_verify_full_depth_tokens_total`, `river_recalled_tokens_total`, `river_verify_acceptance`,
`river_requests_*_total`.
Load test: `river-loadtest --url 127.0.0.1:8001 --streams 1,4,8 --modes full,verify`.
"""
