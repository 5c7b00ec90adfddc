"""Fuzzing the inputs users hand us: mutated ONNX step graphs (structure discovery, the River rewrite)
and truncated or corrupted GGUF files and Hugging Face directories. Every case must end in success or
in a one-line RiverError: never another exception type, never a hang (each case runs under a timer)."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import onnx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from river.errors import RiverError  # noqa: E402

CASE_SECONDS = 20
# fixed seed, no shrinking (a failure is reported as drawn: shrinking a graph costs minutes)
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Hang(Exception):
    """A case ran past CASE_SECONDS."""


@contextmanager
def time_limit(seconds: float = CASE_SECONDS):
    """Raise Hang in the test after ``seconds`` (SIGALRM; the tests run in the main thread)."""
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def ok_or_one_line_error(action) -> str:
    """Run ``action``: success, or a RiverError whose message is one line. Anything else fails the test."""
    with time_limit():
        try:
            action()
        except RiverError as exc:
            message = str(exc)
            assert message and "\n" not in message, repr(message)
            return "error"
    return "ok"


# ---- ONNX step graphs: structure discovery and the River rewrite ----------------------------------

OPS = ["Add", "Mul", "MatMul", "Gather", "Identity", "Softmax", "Concat", "Reshape", "Relu", "Transpose"]


@pytest.fixture(scope="module")
def step_model(tiny_onnx) -> onnx.ModelProto:
    from river.compiler.graph_io import load_onnx

    return load_onnx(tiny_onnx)


def mutate_graph(model: onnx.ModelProto, data) -> onnx.ModelProto:
    """A copy with 1-3 of: a node deleted, an input rewired to another value, an op type changed,
    a graph input's or initializer's shape changed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(["delete", "rewire", "op", "input_shape", "initializer_shape"]), label="kind")
        if kind in ("delete", "rewire", "op") and len(g.node):
            i = data.draw(st.integers(0, len(g.node) - 1), label="node")
            node = g.node[i]
            if kind == "delete":
                del g.node[i]
            elif kind == "rewire" and len(node.input):
                values = [o for n in g.node for o in n.output] + [x.name for x in g.input] + [t.name for t in g.initializer]
                node.input[data.draw(st.integers(0, len(node.input) - 1), label="slot")] = data.draw(
                    st.sampled_from(values), label="value")
            elif kind == "op":
                node.op_type = data.draw(st.sampled_from(OPS), label="op_type")
        elif kind == "input_shape" and len(g.input):
            dims = g.input[data.draw(st.integers(0, len(g.input) - 1), label="input")].type.tensor_type.shape.dim
            if len(dims):
                dim = dims[data.draw(st.integers(0, len(dims) - 1), label="dim")]
                dim.dim_value = data.draw(st.integers(0, 7), label="size")
        elif kind == "initializer_shape" and len(g.initializer):
            t = g.initializer[data.draw(st.integers(0, len(g.initializer) - 1), label="initializer")]
            if len(t.dims):
                t.dims[data.draw(st.integers(0, len(t.dims) - 1), label="axis")] = data.draw(st.integers(1, 9), label="len")
    return m


@FUZZ
@given(data=st.data())
def test_structure_discovery_on_mutated_graphs(step_model, data):
    import onnx_graphsurgeon as gs

    from river.compiler.structure import discover
    from river.export.contract import StepContract

    mutated = mutate_graph(step_model, data)

    def discover_it():
        contract = StepContract.from_model(mutated, "fuzzed.onnx")
        discover(gs.import_onnx(mutated), contract)

    ok_or_one_line_error(discover_it)


@settings(FUZZ, max_examples=6)
@given(data=st.data())
def test_river_export_on_mutated_graphs(step_model, data, tmp_path_factory):
    from river.compiler.compile import compile_river

    work = tmp_path_factory.mktemp("fuzz-export")
    path = work / "model.onnx"
    onnx.save(mutate_graph(step_model, data), str(path))
    out = work / "out"
    if ok_or_one_line_error(lambda: compile_river(path, out, gates="0,2", river="int8", draft_exit=None, log=None)) == "error":
        assert not out.exists()  # nothing left behind


# ---- GGUF files and Hugging Face directories --------------------------------------------------------

def write_tiny_gguf(loaded, path: Path) -> Path:
    """The tiny model as a llama GGUF file (f32 tensors, llama.cpp names and Q/K row order)."""
    import gguf
    import numpy as np

    cfg = loaded.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in loaded.model.state_dict().items():
        if key in names:
            name = names[key]
        else:
            _, _, idx, rest = key.split(".", 3)
            name = f"blk.{idx}.{parts[rest.removesuffix('.weight')]}.weight"
        w.add_tensor(name, np.ascontiguousarray(value.detach().float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def corrupt(data: bytes, draw) -> bytes:
    """Truncate, overwrite a run of bytes, or both."""
    blob = bytearray(data)
    if draw(st.booleans(), label="truncate"):
        blob = blob[:draw(st.integers(0, len(blob) - 1), label="keep")]
    if blob and draw(st.booleans(), label="overwrite"):
        at = draw(st.integers(0, len(blob) - 1), label="at")
        patch = draw(st.binary(min_size=1, max_size=16), label="bytes")
        blob[at:at + len(patch)] = patch
    return bytes(blob)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> bytes:
    return write_tiny_gguf(tiny, tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def test_tiny_gguf_loads(tiny, tiny_gguf, tmp_path):
    """The unmutated file loads (so the fuzz cases below start from a valid one)."""
    from river.models.gguf_loader import load_gguf_model

    (tmp_path / "t.gguf").write_bytes(tiny_gguf)
    _, cfg = load_gguf_model(tmp_path / "t.gguf")
    assert cfg.num_layers == tiny.config.num_layers


@FUZZ
@given(data=st.data())
def test_gguf_loader_on_damaged_files(tiny_gguf, data, tmp_path_factory):
    from river.models.gguf_loader import load_gguf_model

    path = tmp_path_factory.mktemp("fuzz-gguf") / "m.gguf"
    path.write_bytes(corrupt(tiny_gguf, data.draw))
    ok_or_one_line_error(lambda: load_gguf_model(path))


@pytest.fixture(scope="module")
def tiny_hf(tiny, tmp_path_factory) -> dict[str, bytes]:
    from river.models.hf_dir import save_hf_dir

    folder = save_hf_dir(tiny.model, tmp_path_factory.mktemp("hf") / "hf")
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


@FUZZ
@given(data=st.data())
def test_hf_dir_loader_on_damaged_files(tiny_hf, data, tmp_path_factory):
    from river.models.hf_dir import load_hf_dir

    folder = tmp_path_factory.mktemp("fuzz-hf")
    victim = data.draw(st.sampled_from(sorted(tiny_hf)), label="file")
    for name, blob in tiny_hf.items():
        (folder / name).write_bytes(corrupt(blob, data.draw) if name == victim else blob)
    ok_or_one_line_error(lambda: load_hf_dir(folder))


@FUZZ
@given(data=st.data())
def test_hf_dir_loader_on_mutated_config_values(tiny_hf, data, tmp_path_factory):
    """Valid JSON, wrong values: a key removed or set to another type or an out-of-range number."""
    from river.models.hf_dir import load_hf_dir

    folder = tmp_path_factory.mktemp("fuzz-hf-config")
    config = json.loads(tiny_hf["config.json"])
    key = data.draw(st.sampled_from(sorted(config)), label="key")
    value = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                                st.text(max_size=4), st.lists(st.integers(0, 2), max_size=2)), label="value")
    if data.draw(st.booleans(), label="delete"):
        del config[key]
    else:
        config[key] = value
    for name, blob in tiny_hf.items():
        (folder / name).write_bytes(blob)
    (folder / "config.json").write_text(json.dumps(config))
    ok_or_one_line_error(lambda: load_hf_dir(folder))
