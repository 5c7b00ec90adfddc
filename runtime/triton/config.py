"""The model repository's interface and its ``config.pbtxt`` files.

Every config is built with Triton's own ``model_config`` protobuf schema (shipped by tritonclient) and
re-parsed and checked before a repository is renamed into place, so Triton refuses nothing at load time
that the writer could have caught.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from river.compiler.river.manifest import EXIT_LAYER, THRESHOLDS, RiverInfo
from river.errors import RiverError
from river.export import contract as C
from river.export.contract import StepContract

STEP_MODEL = "river_step"  # the River step graph, onnxruntime backend (stateless: KV in, presents out)
STEP_TRT_MODEL = "river_step_trt"  # the same contract, tensorrt_plan backend
GENERATE_MODEL = "river_generate"  # the decoupled Python-backend model that owns the generation loop
STEP_BACKENDS = ("onnxruntime", "tensorrt_plan")
STEP_MODEL_OF = {"onnxruntime": STEP_MODEL, "tensorrt_plan": STEP_TRT_MODEL}
RIVER_SUBDIR = "river"  # the River model files, inside the generation model's version folder
DEFAULT_MAX_TOKENS = 128

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
    ("mode", "TYPE_STRING", [1], True),  # full | exit | verify (default: exit on a River graph, else full)
    ("k", "TYPE_INT32", [1], True),  # verify mode: tokens drafted per round (default 4; adaptive: the first)
    ("adaptive", "TYPE_BOOL", [1], True),  # verify mode: k adapts every round (default true)
    ("budget", "TYPE_STRING", [1], True),  # exit mode: a calibrated operating point (safe, balanced, fast)
)
GENERATE_OUTPUTS = (
    ("text", "TYPE_STRING", [1]),  # the printable text this response adds
    ("token_ids", "TYPE_INT64", [-1]),  # the tokens this response adds (some print nothing yet)
    ("stats", "TYPE_STRING", [1]),  # final response only: JSON, see serving.request_stats
)


def model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - the test extras install it
        raise RiverError("writing a Triton repository needs tritonclient[grpc] (pip install 'tritonclient[grpc]'): "
                         f"its model_config schema validates every config.pbtxt ({exc})") from None
    return model_config_pb2


def _tensor(cls, name: str, dtype: str, dims: Sequence[int], optional: bool = False):
    t = cls(name=name, data_type=model_config_pb2().DataType.Value(dtype), dims=list(dims))
    if optional:
        t.optional = True
    return t


def step_config(name: str, contract: StepContract, river: RiverInfo | None, *, backend: str, instances: int,
                kind: str):
    """Config of the stateless step model: the contract's tensors, batch axis explicit (max_batch_size 0,
    so no dynamic batching: rows of one request share a cache length, which a batcher would not respect)."""
    pb = model_config_pb2()
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
                      for n in (C.INPUT_IDS, C.ATTENTION_MASK) + ((C.POSITION_IDS,) if contract.position_ids else ())])
    cfg.output.append(_tensor(pb.ModelOutput, C.LOGITS, "TYPE_FP32", [-1, -1, vocab]))
    for layer in range(contract.num_layers):
        for kv in ("key", "value"):
            cfg.input.append(_tensor(pb.ModelInput, C.past_name(layer, kv), "TYPE_FP32", [-1, h, -1, d]))
            cfg.output.append(_tensor(pb.ModelOutput, C.present_name(layer, kv), "TYPE_FP32", [-1, h, -1, d]))
    if river is not None:
        # optional: the graph carries defaults (an initializer of the same name)
        cfg.input.append(_tensor(pb.ModelInput, THRESHOLDS, "TYPE_FP32", [len(river.gates)], optional=True))
        cfg.output.append(_tensor(pb.ModelOutput, EXIT_LAYER, "TYPE_INT64", [-1]))
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind)))
    return cfg


def generate_config(name: str, *, instances: int, params: Mapping[str, object]):
    """Config of the generation model: decoupled (many responses per request: the token stream), CPU
    instances, and its ``parameters`` (mode, river_dir, ...) as strings, which is how Triton passes them."""
    pb = model_config_pb2()
    cfg = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.input.extend(_tensor(pb.ModelInput, n, t, d, optional=o) for n, t, d, o in GENERATE_INPUTS)
    cfg.output.extend(_tensor(pb.ModelOutput, n, t, d) for n, t, d in GENERATE_OUTPUTS)
    cfg.model_transaction_policy.decoupled = True
    cfg.instance_group.append(pb.ModelInstanceGroup(count=instances, kind=pb.ModelInstanceGroup.Kind.KIND_CPU))
    for key, value in params.items():
        cfg.parameters[key].string_value = str(value)
    return cfg


def write_config(cfg, model_dir: Path) -> Path:
    from google.protobuf import text_format

    path = model_dir / "config.pbtxt"
    path.write_text("# Written by river.runtime.triton (Triton model_config schema, protobuf text format).\n"
                    + text_format.MessageToString(cfg))
    return path


def validate_config(path: Path):
    """Parse ``path`` with Triton's schema and check what Triton would refuse at load time."""
    from google.protobuf import text_format

    pb = model_config_pb2()
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
    if cfg.HasField("dynamic_batching"):
        problems.append("dynamic batching must stay off")
    if problems:
        raise RiverError(f"{path}: " + "; ".join(problems))
    return cfg
