"""River graphs in the generation loop: no KV holes whatever the exits (invariant 2), CLI, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from river import cli as export_cli
from river.compiler.compile import compile_river
from river.compiler.river.manifest import DISABLED
from river.runtime import cli as generate_cli
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend
from tests_helpers import assert_one_line_error, poison_decode, torch_step

GATES = "0,2"


@pytest.fixture(scope="module")
def tiny_river(tiny_onnx, tmp_path_factory):
    return compile_river(tiny_onnx, tmp_path_factory.mktemp("river") / "int8", gates=GATES, river="int8", log=None)


def test_no_kv_holes_under_any_exit_sequence(tiny, tiny_river):
    """Before each decode step the new slot is poisoned with NaN in every layer; after it, every
    layer must hold finite K/V for every position: the river wrote what the skipped layers skip."""
    backend = OrtBackend(tiny_river, threads=1)
    patterns = [[-2, DISABLED], [DISABLED, -2], [DISABLED, DISABLED], [-2, -2], [DISABLED, -2], [-2, DISABLED]]
    seen = []
    poison_decode(backend, patterns, seen)
    result = Generator(backend, tiny.tokenizer).generate("holes?", GenerationConfig(max_new_tokens=13))
    assert seen == [1, 3, 4, 1, 3, 1] * 2
    assert [s.exit_layer for s in result.steps[1:]] == seen


def test_disabled_river_generation_equals_plain_graph(tiny, tiny_onnx, tiny_river):
    plain = Generator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer).generate("same", GenerationConfig(max_new_tokens=16))
    river = Generator(OrtBackend(tiny_river, threads=1), tiny.tokenizer).generate("same", GenerationConfig(max_new_tokens=16))
    assert river.token_ids == plain.token_ids
    assert all(s.exit_layer == 4 for s in river.steps[1:])


def test_fp32_twins_with_forced_exits_equal_the_full_model(tiny, tiny_onnx, tmp_path):
    """fp32 twins are the backbone's own layers: exiting anywhere must not change a single token."""
    path = compile_river(tiny_onnx, tmp_path / "fp32", gates=GATES, river="fp32", thresholds=[-2, -2], log=None)
    plain = Generator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer).generate("exit", GenerationConfig(max_new_tokens=16))
    river = Generator(OrtBackend(path, threads=1), tiny.tokenizer).generate("exit", GenerationConfig(max_new_tokens=16))
    assert all(s.exit_layer == 1 for s in river.steps[1:])
    assert river.token_ids == plain.token_ids


def test_export_cli_on_onnx_writes_graph_and_manifest(tiny_onnx, tmp_path, capsys):
    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"gates": [0, 2], "thresholds": [0.9, 0.95]}))
    out = tmp_path / "out"
    assert export_cli.main([str(tiny_onnx), "-o", str(out), "--gates", GATES, "--river", "int4", "--thresholds", str(thr)]) == 0
    manifest = json.loads((out / "river.json").read_text())
    assert manifest["gates"] == [0, 2] and manifest["precision"] == "int4" and manifest["thresholds"] == [0.9, 0.95]
    assert len(manifest["source"]["sha256"]) == 64
    model = onnx.load(str(out / "model.onnx"))
    defaults = next(i for i in model.graph.initializer if i.name == "exit_thresholds")
    np.testing.assert_allclose(onnx.numpy_helper.to_array(defaults), [0.9, 0.95])
    assert (out / "tokenizer.json").is_file()
    assert generate_cli.main(["--model", str(out / "model.onnx"), "--max-new-tokens", "6", "--stats",
                              "--thresholds=-2,2", "hi"]) == 0
    assert "exit after layer 1" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--gates", "1,x"], "bad gate list '1,x'"),
    (["--gates", "3"], "out of range"),
    (["--gates", "2,1"], "strictly increasing"),
])
def test_export_cli_bad_gates(tiny_onnx, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert export_cli.main([str(tiny_onnx), "-o", str(out)] + args) == 2
    assert message in assert_one_line_error(capsys.readouterr().err, "river-export")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_export_cli_refuses_non_onnx_and_non_decoder(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf")
    assert export_cli.main([str(junk), "-o", str(tmp_path / "o1")]) == 2
    assert "cannot read" in assert_one_line_error(capsys.readouterr().err, "river-export")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    relu = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                         [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(relu, tmp_path / "relu.onnx")
    assert export_cli.main([str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "o2")]) == 2
    assert "not a decoder step graph" in assert_one_line_error(capsys.readouterr().err, "river-export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx", "relu.onnx"]


def test_export_cli_refuses_unsupported_ops(tiny_onnx, tmp_path, capsys):
    model = onnx.load(str(tiny_onnx))
    node = next(n for n in model.graph.node if n.name == "/model/layers.1/self_attn/Add_2")
    node.domain, node.op_type = "com.microsoft", "FusedAdd"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, tmp_path / "contrib.onnx", save_as_external_data=True, location="contrib.onnx.data")
    assert export_cli.main([str(tmp_path / "contrib.onnx"), "-o", str(tmp_path / "o")]) == 2
    assert "ops outside the standard ONNX domain: com.microsoft.FusedAdd (x1)" in assert_one_line_error(
        capsys.readouterr().err, "river-export")
    assert not (tmp_path / "o").exists()


def test_export_cli_unwritable_output(tiny_onnx, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert export_cli.main([str(tiny_onnx), "-o", str(blocker / "sub")]) == 2
    assert "cannot write" in assert_one_line_error(capsys.readouterr().err, "river-export")


def test_river_decode_matches_torch_after_forced_exit(tiny, tiny_river):
    """The twins' K/V written by an exit are what later full-depth steps read (the KV share)."""
    backend = OrtBackend(tiny_river, threads=1)
    cache = backend.new_cache(16)
    prompt = np.arange(30, 36)[None]
    backend.prefill(prompt, cache)
    cache.length = 6
    backend.set_thresholds([-2, DISABLED])
    backend.decode(np.array([[40]]), cache)
    cache.length = 7
    assert backend.last_exit_layer == 1
    backend.set_thresholds([DISABLED, DISABLED])
    logits = backend.decode(np.array([[41]]), cache).copy()
    assert backend.last_exit_layer == 4
    # the full model reading the same cache (including the river's K/V at position 6) agrees
    import torch

    past = [torch.from_numpy(b[:, :, :7].copy()) for b in cache.buffers()]
    ref, _ = torch_step(tiny.model, np.array([[41]]), past, start=7)
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_export_cli_writes_triton_repository(tiny_onnx, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    assert export_cli.main([str(tiny_onnx), "-o", str(tmp_path / "river"), "--gates", GATES, "--triton-repo", str(repo)]) == 0
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert {c.parent.name for c in configs} >= {"river_generate", "river_step"}
    for c in configs:
        text_format.Parse(c.read_text(), model_config_pb2.ModelConfig())
    assert (repo / "README.md").is_file()


def test_export_cli_segmented_trt_and_check(tiny_onnx, tmp_path, capsys):
    """--segmented, --trt and --check on a real export: segments run in river-generate, engines are
    built (TensorRT-RTX here), and the Polygraphy parity check passes."""
    out = tmp_path / "river"
    assert export_cli.main([str(tiny_onnx), "-o", str(out), "--gates", GATES, "--segmented", "--trt", "--check"]) == 0
    err = capsys.readouterr().err
    assert "parity: PASS" in err
    assert (out / "segments" / "segments.json").is_file() and (out / "trt").is_dir()
    assert generate_cli.main(["--model", str(out / "segments"), "--max-new-tokens", "6", "--stats",
                              "--thresholds=-2,2", "hi"]) == 0
    assert "exit after layer 1" in capsys.readouterr().err
