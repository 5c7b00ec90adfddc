"""A Triton Inference Server model repository for a River graph, and the serving logic its Python model uses.

``write_triton_repo`` lays out three models (DESIGN section 6):

- ``river_step``: the River step graph for the ``onnxruntime`` backend (stateless: KV in, presents out);
- ``river_step_trt``: the same contract for the ``tensorrt_plan`` backend (the plan is optional);
- ``river_generate``: a decoupled Python-backend model that owns the generation loop and streams tokens.
  By default it runs our runtime in-process (ONNX Runtime over shared KV buffers held per request); with
  ``bls=True`` it calls a step model through Triton's BLS API instead.

Every ``config.pbtxt`` is built from and re-parsed with Triton's own ``model_config`` protobuf schema before
the repository is renamed into place. The second half of this module (request parsing, the per-request
view of a shared backend, cache accounting, streaming) is what the generated ``model.py`` imports: it
holds no Triton types, so it is tested without a server too.
"""

from __future__ import annotations

import shutil
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from river.atomic import atomic_dir
from river.errors import ModelNotFound, RiverError
from river.runtime.backend import StepBackend
from river.runtime.generate import GenerationConfig, GenerationResult, Generator
from river.runtime.kv_cache import SharedKVCache

STEP_MODEL = "river_step"
STEP_TRT_MODEL = "river_step_trt"
GENERATE_MODEL = "river_generate"
RIVER_SUBDIR = "river"  # the River model files, inside the generation model's version folder
STEP_BACKENDS = ("onnxruntime", "tensorrt_plan")
DEFAULT_MAX_TOKENS = 128
RIVER_FILES = ("model.onnx", "model.onnx.data", "river.json", "river_model.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
               "generation_config.json", "config.json")

# The generation model's request interface: (name, Triton type, dims, optional).
GENERATE_INPUTS = (
    ("prompt", "TYPE_STRING", [1], False),
    ("max_tokens", "TYPE_INT32", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("seed", "TYPE_INT64", [1], True),
    ("stop", "TYPE_STRING", [-1], True),
    ("thresholds", "TYPE_FP32", [-1], True),
    ("raw", "TYPE_BOOL", [1], True),  # true: no chat template
    ("ignore_eos", "TYPE_BOOL", [1], True),  # true: generate to max_tokens (benchmarks, tests)
)
GENERATE_OUTPUTS = (
    ("text", "TYPE_STRING", [1]),  # the printable text this response adds
    ("token_ids", "TYPE_INT64", [-1]),  # the tokens this response adds (some print nothing yet)
    ("stats", "TYPE_STRING", [1]),  # final response only: JSON, see request_stats
)


# ---------------------------------------------------------------------------------------------------
# Writing the repository
# ---------------------------------------------------------------------------------------------------

def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - the test extras install it
        raise RiverError("writing a Triton repository needs tritonclient[grpc] (pip install 'tritonclient[grpc]'): "
                         f"its model_config schema validates every config.pbtxt ({exc})") from None
    return model_config_pb2


def _tensor(cls, name: str, dtype: str, dims: Sequence[int], optional: bool | None = None):
    pb = _model_config_pb2()
    t = cls(name=name, data_type=pb.DataType.Value(dtype), dims=list(dims))
    if optional:
        t.optional = True
    return t


def step_config(name: str, contract, river: dict | None, *, backend: str, instances: int, kind: str):
    """Config of the stateless step model: the contract's tensors, batch axis explicit (max_batch_size 0,
    so no dynamic batching: rows of one request share a cache length, which a batcher would not respect)."""
    pb = _model_config_pb2()
    from river.export import contract as C

    cfg = pb.ModelConfig(name=name, max_batch_size=0)
    if backend == "onnxruntime":
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = "model.onnx"
    else:
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
    h, d = contract.num_kv_heads, contract.head_dim
    vocab = contract.vocab_size or -1
    cfg.input.extend([_tensor(pb.ModelInput, n, "TYPE_INT64", [-1, -1])
                      for n in (C.INPUT_IDS, C.ATTENTION_MASK, C.POSITION_IDS)])
    cfg.output.append(_tensor(pb.ModelOutput, C.LOGITS, "TYPE_FP32", [-1, -1, vocab]))
    for layer in range(contract.num_layers):
        for kv in ("key", "value"):
            cfg.input.append(_tensor(pb.ModelInput, C.past_name(layer, kv), "TYPE_FP32", [-1, h, -1, d]))
            cfg.output.append(_tensor(pb.ModelOutput, C.present_name(layer, kv), "TYPE_FP32", [-1, h, -1, d]))
    if river is not None:
        from river.compiler.river_pass import EXIT_LAYER, THRESHOLDS

        # optional: the graph carries defaults (an initializer of the same name)
        cfg.input.append(_tensor(pb.ModelInput, THRESHOLDS, "TYPE_FP32", [len(river["gates"])], optional=True))
        cfg.output.append(_tensor(pb.ModelOutput, EXIT_LAYER, "TYPE_INT64", [-1]))
    cfg.instance_group.append(pb.ModelInstanceGroup(
        count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind)))
    return cfg


def generate_config(name: str, *, instances: int, params: Mapping[str, str]):
    pb = _model_config_pb2()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.input.extend(_tensor(pb.ModelInput, n, t, d, optional=o) for n, t, d, o in GENERATE_INPUTS)
    cfg.output.extend(_tensor(pb.ModelOutput, n, t, d) for n, t, d in GENERATE_OUTPUTS)
    cfg.model_transaction_policy.decoupled = True  # many responses per request: the token stream
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=pb.ModelInstanceGroup.Kind.KIND_CPU))
    for key, value in params.items():
        cfg.parameters[key].string_value = str(value)
    return cfg


def write_config(cfg, model_dir: Path) -> Path:
    from google.protobuf import text_format

    path = model_dir / "config.pbtxt"
    path.write_text("# Written by river.runtime.triton_repo (Triton model_config schema, protobuf text format).\n"
                    + text_format.MessageToString(cfg))
    return path


def validate_config(path: Path):
    """Parse ``path`` with Triton's schema and check what Triton would refuse at load time."""
    from google.protobuf import text_format

    pb = _model_config_pb2()
    cfg = pb.ModelConfig()
    try:
        text_format.Parse(path.read_text(), cfg)
    except text_format.ParseError as exc:
        raise RiverError(f"{path} does not parse with Triton's model_config schema: {exc}") from None
    folder = path.parent.name
    problems = []
    if cfg.name != folder:
        problems.append(f"name '{cfg.name}' is not the folder name '{folder}'")
    if not (cfg.backend or cfg.platform):
        problems.append("neither backend nor platform is set")
    if not cfg.input or not cfg.output:
        problems.append("no inputs or no outputs")
    for t in list(cfg.input) + list(cfg.output):
        if t.data_type == pb.DataType.TYPE_INVALID or not t.dims or any(d == 0 or d < -1 for d in t.dims):
            problems.append(f"tensor '{t.name}' has no type or bad dims {list(t.dims)}")
    names = [t.name for t in cfg.input] + [t.name for t in cfg.output]
    if len(set(names)) != len(names):
        problems.append("duplicate tensor names")
    if cfg.backend == "python" and not cfg.model_transaction_policy.decoupled:
        problems.append("the generation model must be decoupled (it streams)")
    if cfg.dynamic_batching.ByteSize() or cfg.HasField("dynamic_batching"):
        problems.append("dynamic batching must stay off")
    if problems:
        raise RiverError(f"{path}: " + "; ".join(problems))
    return cfg


def _copy(src: Path, dst: Path) -> None:
    """Copies, not hard links: ONNX Runtime refuses external weight files (model.onnx.data) that have more
    than one link ("potential hardlink attack"), and a link would break the source folder as well."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _river_source(river_dir: str | Path) -> Path:
    path = Path(river_dir)
    folder = path.parent if path.suffix == ".onnx" else path
    if not (folder / "model.onnx").is_file():
        raise ModelNotFound(f"no model.onnx in {folder}: give a River graph folder (river-export's output)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ModelNotFound(f"no tokenizer files next to {folder / 'model.onnx'}")
    return folder


def write_triton_repo(river_dir: str | Path, repo_dir: str | Path, *,
                      step_backends: Sequence[str] = STEP_BACKENDS, plan_path: str | Path | None = None,
                      instances: int = 1, max_length: int | None = None, bls: bool = False,
                      bls_step_model: str | None = None, threads: int | None = None, max_concurrent: int = 8,
                      default_max_tokens: int = DEFAULT_MAX_TOKENS, step_instances: int = 1,
                      ort_kind: str = "KIND_CPU") -> Path:
    """Write the model repository for the River graph in ``river_dir`` to ``repo_dir``; return ``repo_dir``.

    ``instances``: Python-backend instances of the generation model (one process each, one ONNX Runtime
    backend each); ``max_length``: KV cache capacity per request (default: the model's context);
    ``threads``: ONNX Runtime intra-op threads per instance; ``max_concurrent``: streams one instance
    interleaves; ``ort_kind``: instance kind of the onnxruntime step model (TensorRT's is KIND_GPU).
    Written into a temporary sibling folder, validated, then renamed: nothing partial is
    left on failure, and an existing non-empty ``repo_dir`` is refused.
    """
    from river.compiler.graph_io import load_onnx_header
    from river.compiler.river_pass import river_metadata
    from river.export.contract import StepContract

    src = _river_source(river_dir)
    unknown = [b for b in step_backends if b not in STEP_BACKENDS]
    if unknown:
        raise RiverError(f"unknown step backends {unknown}; choose from {list(STEP_BACKENDS)}")
    if plan_path is not None and "tensorrt_plan" not in step_backends:
        raise RiverError("plan_path given but 'tensorrt_plan' is not among step_backends")
    if plan_path is not None and not Path(plan_path).is_file():
        raise ModelNotFound(f"TensorRT plan not found: {plan_path}")
    if instances < 1 or step_instances < 1 or max_concurrent < 1:
        raise RiverError("instances, step_instances and max_concurrent must be >= 1")
    if max_length is not None and max_length < 2:
        raise RiverError("max_length must leave room for a prompt and one new token (>= 2)")
    if bls:
        bls_step_model = bls_step_model or (STEP_MODEL if "onnxruntime" in step_backends else STEP_TRT_MODEL)
        if bls_step_model not in (STEP_MODEL, STEP_TRT_MODEL) or \
                {STEP_MODEL: "onnxruntime", STEP_TRT_MODEL: "tensorrt_plan"}[bls_step_model] not in step_backends:
            raise RiverError(f"bls=True needs its step model '{bls_step_model}' in the repository")
    header = load_onnx_header(src / "model.onnx")
    contract = StepContract.from_model(header, str(src / "model.onnx"))
    river = river_metadata(header)

    repo_dir = Path(repo_dir)
    if repo_dir.exists() and (not repo_dir.is_dir() or any(repo_dir.iterdir())):
        raise RiverError(f"repository folder {repo_dir} exists and is not empty")
    with atomic_dir(repo_dir) as tmp:
        configs = []
        if "onnxruntime" in step_backends:
            d = tmp / STEP_MODEL
            for name in ("model.onnx", "model.onnx.data"):
                if (src / name).is_file():
                    _copy(src / name, d / "1" / name)
            configs.append(write_config(step_config(STEP_MODEL, contract, river, backend="onnxruntime",
                                                    instances=step_instances, kind=ort_kind), d))
        if "tensorrt_plan" in step_backends:
            d = tmp / STEP_TRT_MODEL
            (d / "1").mkdir(parents=True)
            if plan_path is not None:
                _copy(Path(plan_path), d / "1" / "model.plan")
            else:
                (d / "README.md").write_text(TRT_NOTE.format(name=STEP_TRT_MODEL))
            configs.append(write_config(step_config(STEP_TRT_MODEL, contract, river, backend="tensorrt_plan",
                                                    instances=step_instances, kind="KIND_GPU"), d))
        d = tmp / GENERATE_MODEL
        for name in RIVER_FILES:
            if (src / name).is_file():
                _copy(src / name, d / "1" / RIVER_SUBDIR / name)
        (d / "1" / "model.py").write_text(MODEL_PY)
        params = {"mode": "bls" if bls else "ort", "river_dir": RIVER_SUBDIR, "max_concurrent": max_concurrent,
                  "default_max_tokens": default_max_tokens}
        if bls:
            params["step_model"] = bls_step_model
        if max_length is not None:
            params["max_length"] = max_length
        if threads is not None:
            params["threads"] = threads
        configs.append(write_config(generate_config(GENERATE_MODEL, instances=instances, params=params), d))
        (tmp / "README.md").write_text(repo_readme(contract, river, step_backends, plan_path is not None, bls))
        for path in configs:
            validate_config(path)
    return repo_dir


TRT_NOTE = """# {name}: the TensorRT flavour of the River step model

No engine was given when this repository was written. Build one from the River graph with
`river.compiler.tensorrt_build` on the GPU that will serve it (engines are specific to a GPU and a
TensorRT version) and put it at `{name}/1/model.plan`. Until then, leave this model out of the server
(`--model-control-mode=explicit --load-model=...`), or Triton will fail to load it.
"""


def repo_readme(contract, river, step_backends, has_plan: bool, bls: bool) -> str:
    gates = river["gates"] if river else []
    models = [f"- `{GENERATE_MODEL}` (Python backend, decoupled): the generation loop; streams tokens. Mode: "
              + ("BLS calls to the step model." if bls else "ONNX Runtime in-process over shared KV buffers.")]
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

Written by `river.runtime.triton_repo.write_triton_repo`. The model has {layers} layers and exit gates
after layers {gates}.

{models}

## Start the server

A full Triton container (`nvcr.io/nvidia/tritonserver:<yy.mm>-py3`) has every backend, but the
Python model still imports `river` and its dependencies (onnxruntime, transformers, numpy<2): install
River-LLM into the Python the backend stub runs (the stub's Python version must match), then

    tritonserver --model-repository=$PWD --model-control-mode=explicit --load-model={generate}

(add `--load-model={step}` for BLS mode or direct step calls). The `tritonserver` binary that
`nvidia-pytriton` ships has only the Python backend; `python -m river.runtime.triton_server REPO`
starts it on 127.0.0.1 with the environment its Python backend needs (the matching stub,
`LD_LIBRARY_PATH` with the interpreter's lib folder, the virtual environment first on `PATH` so the
stub's embedded Python finds it) and loads `{generate}` only.

## Call it (gRPC streaming; the HTTP endpoint cannot stream decoupled responses)

    python -m river.runtime.triton_client "What is a river delta?" --url 127.0.0.1:8001

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
`raw` (bool: no chat template), `ignore_eos` (bool). Each response carries `text` (the printable text
it adds) and `token_ids` (the tokens it adds); the final one adds `stats`, a JSON object with the exit
layer of every decode step, its histogram, token counts, decode tokens/s and the instance's live
request/KV-cache counters. A prompt that does not fit the KV cache, or a bad value, gets an
INVALID_ARG error; cancelling the stream stops the loop at the next step and frees its KV cache.
"""


# ---------------------------------------------------------------------------------------------------
# Serving: what the generated model.py uses (no Triton types here)
# ---------------------------------------------------------------------------------------------------

class RequestError(RiverError, ValueError):
    """A request the model refuses (bad value, prompt past the cache): an INVALID_ARG error to the client."""


class RequestCancelled(Exception):
    """Raised inside the loop when the client has cancelled: unwinds generate() and drops the cache."""


@dataclass
class RequestSpec:
    prompt: str
    cfg: GenerationConfig
    thresholds: list[float] | None = None
    chat: bool = True


def _scalar(values: Mapping[str, np.ndarray | None], name: str):
    v = values.get(name)
    if v is None:
        return None
    flat = np.asarray(v).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"input '{name}' must hold one value, got {flat.size}")
    return flat[0]


def _text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not valid UTF-8") from None
    return str(value)


def parse_request(values: Mapping[str, np.ndarray | None], gates: int | None,
                  default_max_tokens: int = DEFAULT_MAX_TOKENS) -> RequestSpec:
    """The generation request in ``values`` (input name -> array, None when absent)."""
    prompt = _scalar(values, "prompt")
    if prompt is None:
        raise RequestError("input 'prompt' is missing")
    prompt = _text(prompt, "prompt")
    if not prompt:
        raise RequestError("the prompt is empty")
    max_tokens = _scalar(values, "max_tokens")
    temperature = _scalar(values, "temperature")
    top_p = _scalar(values, "top_p")
    seed = _scalar(values, "seed")
    stop = [] if values.get("stop") is None else [_text(s, "stop") for s in np.asarray(values["stop"]).reshape(-1)]
    ignore_eos = _scalar(values, "ignore_eos")
    raw = _scalar(values, "raw")
    try:
        cfg = GenerationConfig(
            max_new_tokens=default_max_tokens if max_tokens is None else int(max_tokens),
            temperature=0.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            seed=None if seed is None else int(seed),
            stop=[s for s in stop if s],
            eos_token_ids=[] if ignore_eos is not None and bool(ignore_eos) else None,
        )
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    thresholds = None
    if values.get("thresholds") is not None:
        thresholds = [float(x) for x in np.asarray(values["thresholds"]).reshape(-1)]
        if not gates:
            raise RequestError("'thresholds' applies to River graphs; this model has no exit gates")
        if len(thresholds) != gates:
            raise RequestError(f"{len(thresholds)} thresholds for {gates} gates: give one per gate")
        if not all(np.isfinite(thresholds)):
            raise RequestError("thresholds must be finite numbers")
    return RequestSpec(prompt, cfg, thresholds, chat=not (raw is not None and bool(raw)))


class CacheLedger:
    """Counts KV caches alive in this process through weak references, so a stats line can show that a
    cancelled or failed request's buffers were really released, not merely forgotten."""

    def __init__(self):
        self._lock = threading.Lock()
        self.live = 0
        self.live_bytes = 0
        self.freed = 0

    def track(self, cache: SharedKVCache) -> SharedKVCache:
        size = sum(b.nbytes for b in cache.buffers())
        with self._lock:
            self.live += 1
            self.live_bytes += size
        weakref.finalize(cache, self._freed, size)
        return cache

    def _freed(self, size: int) -> None:
        with self._lock:
            self.live -= 1
            self.live_bytes -= size
            self.freed += 1


class SharedBackendView(StepBackend):
    """One request's view of a backend that concurrent requests share.

    ``OrtBackend`` binds one cache at a time (IOBinding) and returns logits in a bound buffer, so each
    decode step takes the lock, sets this request's thresholds, runs (rebinding when another request ran
    last), and copies out what the next step would overwrite: the logits and the exit layer. Prefill
    runs in the same shared session (in place, with the backend's thresholds switched off), so it takes
    the lock too. Between steps it checks ``cancelled``.
    """

    def __init__(self, shared: StepBackend, lock: threading.Lock, thresholds: Sequence[float] | None = None,
                 cancelled: Callable[[], bool] | None = None, ledger: CacheLedger | None = None):
        self.shared, self.lock, self.contract = shared, lock, shared.contract
        self.river = getattr(shared, "river", None)
        base = getattr(shared, "default_thresholds", None)
        self.thresholds = None if self.river is None else np.array(
            base if thresholds is None else thresholds, np.float32)
        self.cancelled = cancelled or (lambda: False)
        self.ledger = ledger
        self.last_exit_layer: int | None = None
        self.fed: list[int] = []  # every token fed to a decode step, in order
        self._caches: list[weakref.ref] = []

    def new_cache(self, capacity: int, batch: int = 1) -> SharedKVCache:
        cache = self.shared.new_cache(capacity, batch)
        if self.ledger is not None:
            self.ledger.track(cache)
        self._caches.append(weakref.ref(cache))
        return cache

    def _check(self) -> None:
        if self.cancelled():
            raise RequestCancelled()

    def prefill(self, input_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        self._check()
        with self.lock:
            return np.array(self.shared.prefill(input_ids, cache))

    def decode(self, token_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        self._check()
        with self.lock:
            if self.thresholds is not None:
                self.shared.set_thresholds(self.thresholds)
            logits = np.array(self.shared.decode(token_ids, cache))
            self.last_exit_layer = getattr(self.shared, "last_exit_layer", None)
        self.fed.extend(int(t) for t in np.asarray(token_ids).reshape(-1))
        return logits

    def release(self) -> None:
        """Drop the shared backend's binding to this request's cache, so the buffers die with the request."""
        with self.lock:
            bound = getattr(self.shared, "_bound_cache", None)
            if bound is not None and any(ref() is bound for ref in self._caches):
                self.shared.unbind()


def request_stats(result: GenerationResult, river: dict | None, num_layers: int,
                  thresholds: Sequence[float] | None, seconds: float) -> dict:
    exits = [s.exit_layer for s in result.steps if s.phase == "decode" and s.exit_layer is not None]
    decode_n = sum(1 for s in result.steps if s.phase == "decode")
    tps = result.decode_tokens_per_s
    return {
        "finish_reason": result.finish_reason,
        "prompt_tokens": len(result.prompt_ids),
        "tokens": len(result.token_ids),
        "decode_tokens": decode_n,
        "prefill_ms": round(result.prefill_seconds * 1e3, 3),
        "decode_tokens_per_s": None if np.isnan(tps) else round(tps, 2),
        "seconds": round(seconds, 4),
        "num_layers": num_layers,
        "gates": list(river["gates"]) if river else [],
        "thresholds": None if thresholds is None else [float(t) for t in thresholds],
        "exit_layers": exits,
        "exit_histogram": {str(layer): exits.count(layer) for layer in sorted(set(exits))},
    }


@dataclass
class Served:
    """What one request produced, for the final response and the log."""

    stats: dict
    text: str  # text not yet streamed
    token_ids: list[int] = field(default_factory=list)  # tokens not yet streamed


def serve_request(backend: StepBackend, tokenizer, eos_token_ids: Sequence[int], max_length: int | None,
                  spec: RequestSpec, emit: Callable[[list[int], str], None],
                  encode_lock: threading.Lock | None = None) -> Served:
    """Run one request on ``backend`` (a ``SharedBackendView`` or a BLS backend), streaming through ``emit``.

    The loop calls ``on_token`` only for tokens that print something; every earlier token was fed to a
    decode step, so ``backend.fed`` fills the gaps and each response carries every token it adds.
    """
    t0 = time.perf_counter()
    with encode_lock or threading.Lock():  # fast tokenizers are not safe to encode from several threads
        gen = Generator(backend, tokenizer, eos_token_ids, max_length=max_length)
        prompt_ids = gen.encode(spec.prompt, spec.chat)
    sent: list[int] = []
    pieces: list[str] = []
    fed = getattr(backend, "fed", None)

    def on_token(token: int, piece: str) -> None:
        new = (list(fed[len(sent):]) if fed is not None else []) + [int(token)]
        sent.extend(new)
        pieces.append(piece)
        emit(new, piece)

    result = gen.generate(prompt_ids, spec.cfg, on_token=on_token)
    streamed = "".join(pieces)
    rest = result.text[len(streamed):] if result.text.startswith(streamed) else ""
    thresholds = getattr(backend, "thresholds", None)
    stats = request_stats(result, getattr(backend, "river", None), backend.contract.num_layers,
                          None if thresholds is None else list(thresholds), time.perf_counter() - t0)
    return Served(stats, rest, [int(t) for t in result.token_ids[len(sent):]])


MODEL_PY = r'''"""River-LLM generation model for Triton's Python backend (decoupled: it streams).

Written by river.runtime.triton_repo. It owns the generation loop: tokenize, prefill, River decode
steps over KV buffers held per request, one response per printable token, a final response with the
request's exit statistics. The River model files are in ./river beside this file.

Mode "ort" (default): our runtime in-process (ONNX Runtime, shared KV buffers written in place). One
backend per instance; concurrent requests run in worker threads and take turns step by step.
Mode "bls": each step is a BLS request to the step model (onnxruntime or tensorrt_plan backend), which
is stateless, so the request's KV buffers travel with every step. Requests then run inside execute,
one at a time per instance (scale with instance_group count).
"""

import json
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from river.compiler.river_pass import DISABLED, EXIT_LAYER, THRESHOLDS
from river.errors import CacheOverflow, RiverError
from river.export import contract as C
from river.runtime.backend import StepBackend
from river.runtime.triton_repo import (CacheLedger, RequestCancelled, RequestError, SharedBackendView,
                                       parse_request, serve_request)

INPUTS = ("prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "thresholds", "raw", "ignore_eos")


class BlsStepBackend(StepBackend):
    """Steps through Triton: past KV up to the cache length goes out, the new positions come back and are
    written into this request's buffers (the step model is stateless, so nothing is shared in place)."""

    def __init__(self, step_model, contract, river, default_thresholds, thresholds=None, cancelled=None,
                 ledger=None):
        self.step_model, self.contract, self.river = step_model, contract, river
        self.thresholds = None if river is None else np.array(
            default_thresholds if thresholds is None else thresholds, np.float32)
        self.cancelled = cancelled or (lambda: False)
        self.ledger = ledger
        self.last_exit_layer = None
        self.fed = []
        self.outputs = [C.LOGITS] + [C.present_name(l, kv) for l in range(contract.num_layers)
                                     for kv in ("key", "value")] + ([EXIT_LAYER] if river else [])

    def new_cache(self, capacity, batch=1):
        cache = super().new_cache(capacity, batch)
        return self.ledger.track(cache) if self.ledger is not None else cache

    def _step(self, ids, cache, thresholds):
        if self.cancelled():
            raise RequestCancelled()
        b, s = ids.shape
        start = cache.length
        cache.require_room(s)
        tensors = [
            pb_utils.Tensor(C.INPUT_IDS, ids.astype(np.int64)),
            pb_utils.Tensor(C.ATTENTION_MASK, np.ones((b, start + s), np.int64)),
            pb_utils.Tensor(C.POSITION_IDS, np.tile(np.arange(start, start + s, dtype=np.int64), (b, 1))),
        ]
        for l in range(self.contract.num_layers):
            for kind, bufs in (("key", cache.keys), ("value", cache.values)):
                tensors.append(pb_utils.Tensor(C.past_name(l, kind), np.ascontiguousarray(bufs[l][:, :, :start])))
        if thresholds is not None:
            tensors.append(pb_utils.Tensor(THRESHOLDS, np.asarray(thresholds, np.float32)))
        request = pb_utils.InferenceRequest(
            model_name=self.step_model, requested_output_names=self.outputs, inputs=tensors,
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise RiverError(f"step model '{self.step_model}': {response.error().message()}")
        out = {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs}
        for l in range(self.contract.num_layers):
            key, value = out[C.present_name(l, "key")], out[C.present_name(l, "value")]
            cache.write(l, key[:, :, start:], value[:, :, start:], at=start)
        if self.river is not None:
            self.last_exit_layer = int(out[EXIT_LAYER][0])
        return out[C.LOGITS]

    def prefill(self, input_ids, cache):
        if cache.length:
            raise ValueError("prefill expects an empty cache")
        full = None if self.thresholds is None else np.full_like(self.thresholds, DISABLED)
        return self._step(input_ids, cache, full)  # prefill runs the whole backbone

    def decode(self, token_ids, cache):
        logits = self._step(token_ids, cache, self.thresholds)
        self.fed.extend(int(t) for t in np.asarray(token_ids).reshape(-1))
        return logits


class TritonPythonModel:
    def initialize(self, args):
        from river.runtime.loading import open_generator

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(__file__).resolve().parent
        self.mode = params.get("mode", "ort")
        self.name = args.get("model_name", "river_generate")
        self.default_max_tokens = int(params.get("default_max_tokens", 128))
        threads = int(params["threads"]) if params.get("threads") else None
        max_length = int(params["max_length"]) if params.get("max_length") else None
        # The in-process generator also gives the tokenizer, EOS ids, context length and gate defaults
        # in BLS mode, where its backend runs no step.
        self.gen = open_generator(str(here / params.get("river_dir", "river") / "model.onnx"),
                                  threads=threads, max_length=max_length)
        self.backend = self.gen.backend
        self.gates = len(self.backend.river["gates"]) if self.backend.river else 0
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
            f"gates {self.backend.river['gates'] if self.backend.river else []}, KV capacity {self.gen.max_length}")

    # --- one request ------------------------------------------------------------------------------
    def _values(self, request):
        values = {}
        for name in INPUTS:
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

    def _run(self, rid, spec, sender):
        cancelled = sender.is_cancelled
        if self.mode == "bls":
            backend = BlsStepBackend(self.step_model, self.backend.contract, self.backend.river,
                                     getattr(self.backend, "default_thresholds", None), spec.thresholds,
                                     cancelled, self.ledger)
        else:
            backend = SharedBackendView(self.backend, self.lock, spec.thresholds, cancelled, self.ledger)

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
        except Exception as exc:  # keep serving: report, log, and move on
            pb_utils.Logger.log_error(f"river: request {rid} failed: {traceback.format_exc()}")
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
        finally:
            release = getattr(backend, "release", None)
            if release is not None:
                release()
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
        except Exception:  # the sender may be gone (client disconnected); never kill the worker
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
        return None

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=False)
'''
