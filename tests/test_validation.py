"""User errors are one line (exit code 2, nothing left behind), and every option is checked before the
expensive work starts (issue 13, items 7 and 8)."""

from __future__ import annotations

import errno
import io
import json
import math

import numpy as np
import pytest
from tests_helpers import assert_one_line_error

from river import cli as export_cli
from river.compiler.river.manifest import check_thresholds
from river.errors import CacheOverflow, RiverError
from river.runtime import cli as generate_cli
from river.runtime.generate import GenerationConfig


def export_error(capsys, argv) -> str:
    assert export_cli.main(argv) == 2
    return assert_one_line_error(capsys.readouterr().err, "river-export")


def generate_error(capsys, argv) -> str:
    assert generate_cli.main(argv) == 2
    return assert_one_line_error(capsys.readouterr().err, "river-generate")


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if river-export loads the graph's weights or exports a model: the options must be
    refused from the graph header (or the model's config) first."""
    from river.compiler import compile as compile_mod
    from river.export import onnx_export

    def expensive(*_a, **_k):
        raise AssertionError("expensive work started before the options were checked")

    monkeypatch.setattr(compile_mod, "load_onnx", expensive)
    monkeypatch.setattr(onnx_export, "export_model", expensive)


# --- item 7: Hugging Face config.json ---------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ("{not json", "cannot be read as JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, not '64'"),
    ({"num_attention_heads": 0}, "num_heads must be a positive integer, not 0"),
    ({"num_hidden_layers": 2.5}, "num_layers must be a positive integer"),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a positive number"),
    ({"architectures": 5, "model_type": "gpt2"}, "config.json"),
])
def test_bad_hf_config_is_one_line(tiny, tmp_path, capsys, config, message):
    from river.models.hf_dir import save_hf_dir

    hf = save_hf_dir(tiny.model, tmp_path / "hf", tiny.tokenizer)
    if isinstance(config, dict):
        config = json.dumps({**json.loads((hf / "config.json").read_text()), **config})
    (hf / "config.json").write_text(config)
    line = export_error(capsys, [str(hf), "-o", str(tmp_path / "out"), "--no-draft"])
    assert message in line and "config.json" in line
    assert not (tmp_path / "out").exists()


# --- thresholds: one checker everywhere they enter -------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ('{"gates": 5}', "are for gates 5"),
    ('{"gates": [1, 2]}', "expected a list of 2 numbers, got None"),
    ("[0.5, NaN]", "not a finite number"),
    ("[0.5, Infinity]", "not a finite number"),
    ("[true, 0.5]", "True is not a number"),
    ('["0.5", 0.5]', "is not a number"),
    ("[0.5]", "1 thresholds for 2 gates"),
])
def test_bad_thresholds_file_at_export(tiny_onnx, tmp_path, capsys, no_weights_loaded, content, message):
    f = tmp_path / "t.json"
    f.write_text(content)
    assert message in export_error(capsys, [str(tiny_onnx), "-o", str(tmp_path / "out"), "--thresholds", str(f)])
    assert not (tmp_path / "out").exists()


def test_thresholds_folder_at_export(tiny_onnx, tmp_path, capsys, no_weights_loaded):
    (tmp_path / "dir").mkdir()
    line = export_error(capsys, [str(tiny_onnx), "-o", str(tmp_path / "out"), "--thresholds", str(tmp_path / "dir")])
    assert "cannot be read" in line


def test_check_thresholds_refuses_non_finite_and_booleans():
    for bad in ([math.nan, 0.5], [math.inf, 0.5], [True, 0.5], "0.5,0.5", None, [[0.5], 0.5]):
        with pytest.raises(RiverError):
            check_thresholds(bad, 2)
    assert check_thresholds([np.float32(0.5), 2], 2) == (0.5, 2.0)


@pytest.fixture(scope="module")
def river_folder(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation") / "river"
    assert export_cli.main([str(tiny_onnx), "-o", str(out), "--no-draft", "--gates", "1,2"]) == 0
    return out


@pytest.mark.parametrize("value, message", [
    ("nan,0.5", "nan is not a finite number"),
    ("inf,0.5", "inf is not a finite number"),
    ("0.5", "1 thresholds for 2 gates"),
    ("x", "bad thresholds 'x'"),
])
def test_bad_thresholds_at_generate(river_folder, capsys, value, message):
    assert message in generate_error(capsys, ["--model", str(river_folder), f"--thresholds={value}", "hi"])


def test_bad_thresholds_file_at_generate(river_folder, tmp_path, capsys):
    f = tmp_path / "t.json"
    f.write_text("[NaN, 0.5]")
    assert "not a finite number" in generate_error(capsys, ["--model", str(river_folder), "--thresholds", str(f), "hi"])


def test_river_json_stays_standard_json(river_folder):
    def refuse(name):
        raise AssertionError(f"river.json holds {name}")

    json.loads((river_folder / "river.json").read_text(), parse_constant=refuse)


def test_triton_request_refuses_non_finite_values():
    from river.runtime.triton.serving import RequestError, parse_request

    prompt = np.array([b"hi"], dtype=object)
    with pytest.raises(RequestError, match="not a finite number"):
        parse_request({"prompt": prompt, "thresholds": np.array([np.nan, 0.5], np.float32)}, gates=2)
    with pytest.raises(RequestError, match="temperature"):
        parse_request({"prompt": prompt, "temperature": np.array([np.nan], np.float32)}, gates=2)


# --- river-export options, refused before the graph's weights are loaded ----------------------------

@pytest.mark.parametrize("args, message", [
    (["--draft-exit", "99"], "draft exit after layer 99 is out of range"),
    (["--draft-exit", "-7"], "draft exit after layer -7 is out of range"),
    (["--gates", ""], "empty gate list"),
    (["--gates", "1,5"], "gate layers [5] out of range"),
    (["--threads", "-3"], "--threads must be a positive number"),
    (["--budget", "fast"], "add --calibrate"),
    (["--metric", "kl"], "add --calibrate"),
    (["--calibrate", "PROMPTS", "--budget", "-5"], "bad budget '-5'"),
    (["--calibrate", "PROMPTS", "--budget", "nan"], "bad budget 'nan'"),
    (["--calibrate", "PROMPTS", "--budget", "lots"], "bad budget 'lots'"),
    (["--calibrate", "missing.txt"], "calibration prompts file not found"),
    (["--calibrate", "PROMPTS", "--thresholds", "T"], "either --thresholds or --calibrate"),
])
def test_export_options_checked_first(tiny_onnx, tmp_path, capsys, no_weights_loaded, args, message):
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    (tmp_path / "t.json").write_text("[0.5, 0.5]")
    args = [{"PROMPTS": str(tmp_path / "prompts.txt"), "T": str(tmp_path / "t.json"),
             "missing.txt": str(tmp_path / "missing.txt")}.get(a, a) for a in args]
    assert message in export_error(capsys, [str(tiny_onnx), "-o", str(tmp_path / "out")] + args)
    assert not (tmp_path / "out").exists()


def test_export_options_checked_before_a_model_is_exported(tmp_path, capsys, no_weights_loaded):
    """A model name: the options are checked against its config before the step graph export."""
    line = export_error(capsys, ["tiny-random", "-o", str(tmp_path / "out"), "--draft-exit", "99"])
    assert "the model has 4 layers" in line
    assert [p.name for p in tmp_path.iterdir()] == []


def test_calibration_prompts_that_cannot_be_read(tiny_onnx, tmp_path, capsys, no_weights_loaded):
    for name, data in (("p.json", b"[1, 2"), ("p.txt", b"\xff\xfe\xfa"), ("q.json", b'{"a": "b"}')):
        (tmp_path / name).write_bytes(data)
        line = export_error(capsys, [str(tiny_onnx), "-o", str(tmp_path / "out"), "--calibrate", str(tmp_path / name)])
        assert name in line


# --- a full or read-only disk during export --------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_errors_during_export_are_one_line(tiny_onnx, tmp_path, capsys, monkeypatch, code):
    import os

    from river.compiler import compile as compile_mod

    def full_disk(model, path, *a, **k):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(compile_mod, "save_onnx_atomic", full_disk)
    line = export_error(capsys, [str(tiny_onnx), "-o", str(tmp_path / "out")])
    assert line.endswith(os.strerror(code)) and "draft.onnx" in line  # the path that could not be written
    assert [p.name for p in tmp_path.iterdir()] == []


def test_disk_error_without_a_file_names_the_output(tiny_onnx, tmp_path, capsys, monkeypatch):
    from river.compiler import compile as compile_mod

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compile_mod, "save_onnx_atomic", full_disk)
    line = export_error(capsys, [str(tiny_onnx), "-o", str(tmp_path / "out")])
    assert line == f"river-export: error: cannot write {tmp_path / 'out'}: No space left on device"


def test_unwritable_cache_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("RIVER_CACHE_DIR", str(tmp_path / "file" / "cache"))  # as root, chmod cannot refuse us
    assert "file" in generate_error(capsys, ["--model", "tiny-random", "hi"])


# --- river-generate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--max-length", "1000000000"], "beyond the model's context of 512 positions"),
    (["--max-length", "0"], "max_length must be at least 1"),
    (["--threads", "-3"], "--threads must be a positive number"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--mode", "verify", "--temperature", "nan"], "temperature must be a finite number"),
])
def test_generate_options(tiny_onnx, capsys, args, message):
    assert message in generate_error(capsys, ["--model", str(tiny_onnx)] + args + ["hi"])


def test_generate_options_checked_before_a_model_is_exported(tmp_path, capsys, monkeypatch):
    from river.export import store

    monkeypatch.setattr(store, "build_once", lambda *a, **k: pytest.fail("exported before checking options"))
    for args in (["--threads", "0"], ["--temperature", "nan"], ["--max-new-tokens", "0"]):
        generate_error(capsys, ["--model", "tiny-random"] + args + ["hi"])


def test_prompt_that_is_not_utf8(tiny_onnx, capsys):
    prompt = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # what sys.argv holds for these bytes
    assert "not valid UTF-8" in generate_error(capsys, ["--model", str(tiny_onnx), prompt])
    assert "not valid UTF-8" in generate_error(capsys, ["--model", str(tiny_onnx), "--raw", prompt])


def test_cache_larger_than_memory_is_refused_before_allocating():
    from river.runtime.kv_cache import SharedKVCache

    with pytest.raises(CacheOverflow, match="lower --max-length"):
        SharedKVCache(4, 1, 2, 10**12, 16)


def test_generation_config_refuses_non_finite():
    for bad in ({"temperature": math.nan}, {"temperature": math.inf}, {"top_p": math.nan}, {"temperature": -1}):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


# --- damaged cache entries are rebuilt, once ---------------------------------------------------------

def _damage_truncate(entry):
    data = entry / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _damage_empty_graph(entry):
    (entry / "model.onnx").write_bytes(b"")


def _damage_no_tokenizer(entry):
    (entry / "tokenizer.json").unlink()


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_empty_graph, _damage_no_tokenizer])
def test_damaged_export_cache_entry_is_rebuilt(tmp_path, monkeypatch, capsys, damage):
    from river.export import store

    monkeypatch.setenv("RIVER_CACHE_DIR", str(tmp_path / "cache"))
    exports = []
    real = store.export_model
    monkeypatch.setattr(store, "export_model", lambda *a, **k: exports.append(1) or real(*a, **k))
    log = io.StringIO()
    path = store.exported_model_path("tiny-random", log=log)
    sizes = {f.name: f.stat().st_size for f in path.parent.iterdir()}
    assert store.exported_model_path("tiny-random", log=log) == path and len(exports) == 1  # intact: used as it is
    damage(path.parent)
    assert store.exported_model_path("tiny-random", log=log) == path and len(exports) == 2  # rebuilt once
    assert {f.name: f.stat().st_size for f in path.parent.iterdir()} == sizes
    assert store.exported_model_path("tiny-random", log=log) == path and len(exports) == 2
    assert generate_cli.main(["--model", "tiny-random", "--max-new-tokens", "2", "hi"]) == 0


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_empty_graph])
def test_damaged_derived_graph_is_rebuilt(tiny_onnx, tmp_path, monkeypatch, damage):
    """The derive-and-cache helper (shared-KV form, draft graph) checks its entries the same way."""
    from river.compiler import graph_io
    from river.compiler.lowering.shared_kv import SHARED_KV_FORMAT, to_shared_kv

    monkeypatch.setenv("RIVER_CACHE_DIR", str(tmp_path / "cache"))
    made = []

    def make(model):
        made.append(1)
        return to_shared_kv(model)

    path = graph_io.derived_graph("shared_kv", tiny_onnx, SHARED_KV_FORMAT, make)
    sizes = {f.name: f.stat().st_size for f in path.parent.iterdir()}
    assert graph_io.derived_graph("shared_kv", tiny_onnx, SHARED_KV_FORMAT, make) == path and len(made) == 1
    damage(path.parent)
    assert graph_io.derived_graph("shared_kv", tiny_onnx, SHARED_KV_FORMAT, make) == path and len(made) == 2
    assert {f.name: f.stat().st_size for f in path.parent.iterdir()} == sizes


def test_derived_graph_drops_the_entries_other_versions_built(tiny_onnx, tmp_path, monkeypatch):
    """A pass's version bump leaves its old entries unread: building the new one removes them, and only
    them (other variants, other sources, temporaries and locks stay)."""
    from river.compiler import graph_io
    from river.compiler.lowering.shared_kv import to_shared_kv

    monkeypatch.setenv("RIVER_CACHE_DIR", str(tmp_path / "cache"))
    old = graph_io.derived_graph("shared_kv", tiny_onnx, 7, to_shared_kv)
    other_variant = graph_io.derived_graph("shared_kv", tiny_onnx, 7, to_shared_kv, variant="-p64")
    folder = old.parent.parent
    keep = [folder / "0123456789abcdef-v7", folder / f".{old.parent.name}.river-tmp-1-x", folder / f"{old.parent.name}x"]
    for k in keep:
        k.mkdir()
    new = graph_io.derived_graph("shared_kv", tiny_onnx, 8, to_shared_kv)
    assert new.is_file() and new.parent.name.endswith("-v8") and not old.parent.exists()
    assert other_variant.is_file() and all(k.is_dir() for k in keep)
    assert graph_io.derived_graph("shared_kv", tiny_onnx, 7, to_shared_kv) == old and old.is_file()  # back again
    assert not new.parent.exists()
