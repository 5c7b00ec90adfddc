"""Bad input gets a clear error (no stack trace from the CLIs) and leaves nothing behind."""

from __future__ import annotations


import onnx
import pytest
from onnx import helper
from tests_helpers import assert_one_line_error

from river import cli as export_cli
from river.errors import CacheOverflow, InvalidModelFile, ModelNotFound, NotADecoderGraph
from river.models import load_model
from river.models.gguf_loader import open_gguf
from river.runtime import cli as generate_cli
from river.runtime.generate import GenerationConfig, Generator
from river.runtime.ort_backend import OrtBackend


def test_unknown_model_name():
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")


def test_unknown_model_name_cli(capsys):
    assert generate_cli.main(["--model", "no-such-model", "hi"]) == 2
    assert "unknown model 'no-such-model'" in assert_one_line_error(capsys.readouterr().err, "river-generate")


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelNotFound, match="GGUF file not found"):
        load_model(str(tmp_path / "absent.gguf"))


def test_truncated_gguf(tmp_path):
    from river.models.registry import smollm2_gguf_path

    src = smollm2_gguf_path()
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(200_000))
    with pytest.raises(InvalidModelFile, match="truncated or not a GGUF"):
        open_gguf(bad)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(InvalidModelFile):
        open_gguf(garbage)


def test_prompt_longer_than_cache(tiny, tiny_onnx, capsys):
    gen = Generator(OrtBackend(tiny_onnx, threads=1), tiny.tokenizer, max_length=16)
    with pytest.raises(CacheOverflow, match="the prompt has 40 tokens; the cache holds at most 16"):
        gen.generate(list(range(40)), GenerationConfig(max_new_tokens=4))
    assert generate_cli.main(["--model", str(tiny_onnx), "--max-length", "8", "a long prompt here"]) == 2
    assert "the cache holds at most 8" in assert_one_line_error(capsys.readouterr().err, "river-generate")


def test_non_decoder_onnx_given_to_generate(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), path)
    with pytest.raises(NotADecoderGraph, match="not a decoder step graph: missing input_ids"):
        OrtBackend(path)
    assert generate_cli.main(["--model", str(path), "hi"]) == 2
    assert "not a decoder step graph" in assert_one_line_error(capsys.readouterr().err, "river-generate")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    assert generate_cli.main(["--model", str(junk), "hi"]) == 2
    assert "cannot read" in assert_one_line_error(capsys.readouterr().err, "river-generate")
    assert generate_cli.main(["--model", str(tmp_path / "missing.onnx"), "hi"]) == 2
    assert "not found" in assert_one_line_error(capsys.readouterr().err, "river-generate")


def test_export_into_nonempty_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert export_cli.main(["tiny-random", "-o", str(out)]) == 2
    assert "not empty" in assert_one_line_error(capsys.readouterr().err, "river-export")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    from river.export import onnx_export

    def boom(*_a, **_k):
        (tmp_path / "marker").write_text("x")
        raise RuntimeError("simulated failure mid-export")

    monkeypatch.setattr(onnx_export, "export_step_graph", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        onnx_export.export_model(tiny, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]


def test_export_cli_writes_complete_folder(tmp_path, capsys):
    assert export_cli.main(["tiny-random", "-o", str(tmp_path / "t")]) == 0
    names = {p.name for p in (tmp_path / "t").iterdir()}
    assert {"model.onnx", "model.onnx.data", "river_model.json", "tokenizer.json"} <= names
    assert capsys.readouterr().out.strip().endswith("model.onnx")


def test_generate_cli_streams_and_reports_speed(tiny_onnx, capsys):
    assert generate_cli.main(["--model", str(tiny_onnx), "--max-new-tokens", "8", "--stats", "hi"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "prefill" in err
