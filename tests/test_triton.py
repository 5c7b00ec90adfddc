"""The Triton model repository, served by a real tritonserver (nvidia-pytriton's, Python backend only).

The server is started by a fixture on 127.0.0.1 and always stopped in its teardown. Every stream is
checked against our runtime in this process (``open_generator(...).generate``) for the same prompt,
thresholds and cache capacity: same tokens, same text, same exit layers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from river.compiler.compile import compile_river  # noqa: E402
from river.errors import RiverError  # noqa: E402
from river.runtime.generate import GenerationConfig  # noqa: E402
from river.models.tokenizer import encode_prompt  # noqa: E402
from river.runtime.batching.scheduler import BatchRequest  # noqa: E402
from river.runtime.loading import open_generator, open_scheduler  # noqa: E402
from river.runtime.triton import client as triton_client  # noqa: E402
from river.runtime.triton import config as TC  # noqa: E402
from river.runtime.triton import repository  # noqa: E402
from river.runtime.triton.client import build_inputs, stream_generate  # noqa: E402
from river.runtime.triton.repository import write_triton_repo  # noqa: E402
from river.runtime.triton.server import triton_server  # noqa: E402
from river.runtime.triton.serving import RequestError, parse_request  # noqa: E402
from river.runtime.speculative import ADAPTIVE_K  # noqa: E402

GATES = "0,2"
MIXED = [0.2, 0.65]  # on the tiny model: exits after layers 1, 3 and 4 (no exit) all occur
CAPACITY = 512  # the tiny model's context: the KV cache per request


@pytest.fixture(scope="module")
def tiny_river(tiny_onnx, tmp_path_factory) -> Path:
    return compile_river(tiny_onnx, tmp_path_factory.mktemp("triton-river") / "river", gates=GATES, log=None)


@pytest.fixture(scope="module")
def repo(tiny_river, tmp_path_factory) -> Path:
    # 4 rows and 2 queue places per instance: the overload test fills them
    return write_triton_repo(tiny_river.parent, tmp_path_factory.mktemp("triton") / "repo", threads=1, max_rows=4,
                             max_queue=2)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with triton_server(repo, keep_logs=log) as s:
        yield s
    assert s.process.poll() is not None, "the server outlived its fixture"


@pytest.fixture(scope="module")
def reference(repo):
    """Our runtime in this process, one request at a time: the ground truth every stream must equal.
    It is the scheduler the model runs (``open_scheduler`` on the repository's River folder: the
    segmented River, the draft graph), fed one request: a row's tokens must not depend on its batch."""
    scheduler = open_scheduler(str(repo / TC.GENERATE_MODEL / "1" / TC.RIVER_SUBDIR), threads=1)
    tokenizer = scheduler.tokenizer

    def run(prompt, max_tokens, thresholds=None, ignore_eos=False, mode=None, k=4, adaptive=ADAPTIVE_K, cfg=None):
        mode = mode or "exit"
        cfg = GenerationConfig(max_new_tokens=max_tokens, eos_token_ids=[] if ignore_eos else None, **(cfg or {}))
        ticket = scheduler.submit(BatchRequest(encode_prompt(tokenizer, prompt), cfg, mode=mode,
                                               thresholds=thresholds, k=k, adaptive=adaptive))
        scheduler.run_until_idle()
        return ticket.wait()

    return run


def assert_same(stream, ref):
    assert stream.token_ids == ref.token_ids
    assert stream.text == ref.text
    assert stream.stats["exit_layers"] == ref.exit_layers
    assert stream.stats["finish_reason"] == ref.finish_reason


# --- the repository ------------------------------------------------------------------------------

def test_repository_layout_and_configs_parse_with_tritons_schema(repo):
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse(path.read_text(), cfg)
        configs[cfg.name] = cfg
        assert cfg.name == path.parent.name and not cfg.HasField("dynamic_batching")
    assert set(configs) == {TC.STEP_MODEL, TC.STEP_TRT_MODEL, TC.GENERATE_MODEL}
    kind = model_config_pb2.ModelInstanceGroup.Kind
    ort, trt, gen = configs[TC.STEP_MODEL], configs[TC.STEP_TRT_MODEL], configs[TC.GENERATE_MODEL]
    assert ort.backend == "onnxruntime" and ort.instance_group[0].kind == kind.Value("KIND_CPU")
    assert trt.platform == "tensorrt_plan" and trt.instance_group[0].kind == kind.Value("KIND_GPU")
    assert gen.backend == "python" and gen.model_transaction_policy.decoupled
    for step in (ort, trt):
        dims = {t.name: list(t.dims) for t in list(step.input) + list(step.output)}
        assert dims["input_ids"] == [-1, -1] and dims["past_key_values.3.value"] == [-1, 2, -1, 16]
        assert dims["exit_thresholds"] == [2] and dims["exit_layer"] == [-1]
        assert next(t for t in step.input if t.name == "exit_thresholds").optional
    assert (repo / TC.STEP_MODEL / "1" / "model.onnx").is_file()
    assert not (repo / TC.STEP_TRT_MODEL / "1" / "model.plan").exists()
    assert "model.plan" in (repo / TC.STEP_TRT_MODEL / "README.md").read_text()
    river = repo / TC.GENERATE_MODEL / "1" / TC.RIVER_SUBDIR
    assert {"model.onnx", "model.onnx.data", "river.json", "tokenizer.json"} <= {p.name for p in river.iterdir()}
    assert "async_stream_infer" in (repo / "README.md").read_text()


def test_writer_refuses_bad_input_and_leaves_nothing_behind(tiny_river, tmp_path, monkeypatch):
    with pytest.raises(RiverError, match="not empty"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        write_triton_repo(tiny_river.parent, tmp_path / "full")
    with pytest.raises(RiverError, match="plan"):
        write_triton_repo(tiny_river.parent, tmp_path / "r1", step_backends=("onnxruntime",), plan_path="x.plan")
    # a config Triton would refuse is caught by the writer's own check, before the rename
    real = TC.generate_config
    monkeypatch.setattr(repository, "generate_config", lambda name, **kw: real("wrong_name", **kw))
    with pytest.raises(RiverError, match="not the folder name"):
        write_triton_repo(tiny_river.parent, tmp_path / "r2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_parse_request_refuses_bad_values():
    ok = parse_request({"prompt": np.array([b"hi"], object), "max_tokens": np.array([3], np.int32)}, 2)
    assert ok.prompt == "hi" and ok.cfg.max_new_tokens == 3 and ok.chat and ok.thresholds is None
    verify = {"prompt": np.array([b"hi"], object), "mode": np.array([b"verify"], object)}
    assert parse_request(verify, 2).adaptive is ADAPTIVE_K
    assert parse_request({**verify, "adaptive": np.array([not ADAPTIVE_K])}, 2).adaptive is (not ADAPTIVE_K)
    hi = np.array([b"hi"], object)
    for values, message in [({"prompt": np.array([b""], object)}, "empty"),
                            ({"prompt": np.array([b"\xff"], object)}, "UTF-8"),
                            ({"prompt": hi, "temperature": np.array([-1.0], np.float32)}, "temperature"),
                            ({"prompt": hi, "thresholds": np.ones(3, np.float32)}, "3 thresholds")]:
        with pytest.raises(RequestError, match=message):
            parse_request(values, 2)


# --- the real server -------------------------------------------------------------------------------

def test_stream_equals_runtime_greedy(server, reference, capsys):
    for prompt, thresholds in [("hello river", MIXED), ("Tell me about a delta", None), ("hello river", [-2.0, 2.0])]:
        responses = []
        got = stream_generate(prompt, url=server.grpc_url, max_tokens=40, thresholds=thresholds,
                              on_piece=lambda piece, ids: responses.append(ids))
        ref = reference(prompt, 40, thresholds)
        assert_same(got, ref)
        assert len(responses) > 1, "the tokens must arrive as a stream, not one response"
        assert got.stats["tokens"] == len(ref.token_ids) and got.stats["decode_tokens_per_s"] > 0
        hist = got.stats["exit_histogram"]
        assert sum(hist.values()) == len(ref.steps) - 1
        if thresholds == MIXED:
            assert len(hist) > 1, hist
        if thresholds == [-2.0, 2.0]:
            assert hist == {"1": len(ref.steps) - 1}
    # the command-line client streams the same text
    assert triton_client.main(["hello river", "--url", server.grpc_url, "--max-tokens", "40", "--thresholds",
                               ",".join(map(str, MIXED))]) == 0
    out, err = capsys.readouterr()
    assert out.rstrip("\n") == reference("hello river", 40, MIXED).text and "tokens (length)" in err


def test_concurrent_streams_have_no_crosstalk(server, reference):
    jobs = [("first river", 300, MIXED), ("a second, longer prompt about deltas", 200, None),
            ("3", 260, [-2.0, 2.0]), ("fourth stream", 120, MIXED)]
    results: dict[int, object] = {}
    errors = []
    start = threading.Barrier(len(jobs))

    def run(i, prompt, n, thresholds):
        try:
            start.wait()
            results[i] = stream_generate(prompt, url=server.grpc_url, max_tokens=n, thresholds=thresholds,
                                         ignore_eos=True)
        except Exception as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (prompt, n, thresholds) in enumerate(jobs):
        assert len(results[i].token_ids) == n
        assert_same(results[i], reference(prompt, n, thresholds, ignore_eos=True))
    assert max(r.stats["server"]["peak_rows"] for r in results.values()) >= 2, "streams were never batched"


def test_cancelled_stream_frees_its_kv_cache(server, reference):
    seen = []
    rid = f"cancel-{time.time_ns()}"
    got = stream_generate("cancel me", url=server.grpc_url, max_tokens=480, ignore_eos=True, request_id=rid,
                          on_piece=lambda piece, ids: seen.append(ids) or len(seen) < 5)
    assert got.cancelled and len(got.token_ids) < 480
    assert got.token_ids == reference("cancel me", 480, ignore_eos=True).token_ids[:len(got.token_ids)]
    deadline = time.monotonic() + 30
    while f"request {rid} cancelled" not in server.logs():
        assert time.monotonic() < deadline, "the model never saw the cancellation"
        time.sleep(0.1)
    line = next(x for x in server.logs().splitlines() if f"request {rid} cancelled" in x)
    assert "rows in use 0 of 4" in line, line  # its row was freed at once
    after = stream_generate("after", url=server.grpc_url, max_tokens=4)
    s = after.stats["server"]
    assert s["cancelled"] >= 1 and s["rows"] == 0 and s["queue_depth"] == 0


def _concurrently(jobs, run):
    """Run ``run(*job)`` for every job at once (a barrier starts them together); (results, errors) by index."""
    results, errors = {}, {}
    start = threading.Barrier(len(jobs))

    def one(i, job):
        start.wait()
        try:
            results[i] = run(*job)
        except Exception as exc:  # noqa: BLE001 - collected and checked by the caller
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results, errors


BATCH_JOBS = [  # prompt, max_tokens, request fields: every mode in one batch
    ("first river", 120, {"mode": "full"}),
    ("a second, longer prompt about deltas", 90, {"mode": "exit", "thresholds": MIXED}),
    ("3", 110, {"mode": "verify", "k": 3, "adaptive": False}),
    ("fourth stream", 100, {"mode": "verify", "k": 4, "temperature": 0.8, "seed": 11}),  # adaptive k: the default
    ("fifth", 60, {}),  # the model's default: exit at the graph's thresholds
    ("sixth, sampled", 80, {"mode": "full", "temperature": 0.7, "top_p": 0.9, "seed": 5}),
]


def test_batched_streams_in_every_mode_equal_their_single_stream(server, reference):
    """Six streams at once (four rows, two waiting for a row), modes mixed in one batch: each equals
    the same request served alone, token for token, text and exit layers included."""
    def run(prompt, n, fields):
        return stream_generate(prompt, url=server.grpc_url, max_tokens=n, ignore_eos=True, **fields)

    results, errors = _concurrently(BATCH_JOBS, run)
    assert not errors, errors
    for i, (prompt, n, fields) in enumerate(BATCH_JOBS):
        f = dict(fields)
        cfg = {key: f.pop(key) for key in ("temperature", "top_p", "seed") if key in f}
        ref = reference(prompt, n, ignore_eos=True, cfg=cfg, **f)
        assert_same(results[i], ref)
        assert results[i].stats["mode"] == (fields.get("mode") or "exit")
        if results[i].stats["mode"] == "exit":  # no recall point asked for: no token went back
            assert results[i].stats["recalled_tokens"] == 0
        if fields.get("mode") == "verify":  # a greedy row may decode at full depth while the batch is big
            st = results[i].stats
            assert st["drafted"] >= st["accepted"] and st["accepted"] + st["full_depth_tokens"] > 0
            if "temperature" in fields:  # a sampled row always drafts: its draws must not depend on the batch
                assert st["accepted"] > 0 and st["full_depth_tokens"] == 0
    server_stats = [r.stats["server"] for r in results.values()]
    assert max(s["peak_rows"] for s in server_stats) == 4, "the streams were not batched four at a time"


def test_overload_is_refused_while_admitted_streams_finish(server, reference):
    """Four rows and two queue places: of nine streams at once, three are refused with one clear line
    (UNAVAILABLE), the six admitted finish exactly as alone, and the server keeps serving."""
    jobs = [(f"overload {i}", 400) for i in range(9)]

    def run(prompt, n):
        return stream_generate(prompt, url=server.grpc_url, max_tokens=n, ignore_eos=True, mode="full")

    results, errors = _concurrently(jobs, run)
    assert len(errors) == 3 and len(results) == 6, (errors, len(results))
    for exc in errors.values():
        assert isinstance(exc, InferenceServerException) and "server is full" in str(exc), exc
        assert len(str(exc).strip().splitlines()) == 1
    for i, got in results.items():
        assert_same(got, reference(*jobs[i], ignore_eos=True, mode="full"))
    after = stream_generate("after the storm", url=server.grpc_url, max_tokens=8)
    assert after.stats["server"]["rejected"] >= 3 and after.stats["server"]["rows"] == 0


def test_two_instances_each_batch_their_own_streams(tiny_river, reference, tmp_path):
    """instance_group count 2: two Python-backend processes, each with its own scheduler and KV pool;
    Triton spreads the streams over them and every stream still equals its request alone."""
    repo = write_triton_repo(tiny_river.parent, tmp_path / "repo", threads=1, instances=2, max_rows=2, max_queue=2)
    jobs = [(f"instance stream {i}", 150) for i in range(4)]
    with triton_server(repo, keep_logs=tmp_path / "log") as s:
        results, errors = _concurrently(jobs, lambda p, n: stream_generate(p, url=s.grpc_url, max_tokens=n,
                                                                             ignore_eos=True, mode="full"))
        logs = s.logs()
    assert not errors, errors  # Triton need not spread them evenly: each instance may queue two
    for i, got in results.items():
        assert_same(got, reference(*jobs[i], ignore_eos=True, mode="full"))
    assert logs.count("river: river_generate ready") == 2, "two instances were not started"


def test_a_recall_budget_that_recalls_every_exit_serves_the_full_models_tokens(tiny_river, tmp_path):
    """A request whose budget names a recall point: every token leaves at gate 0 and its river is never
    sure enough, so each decode step is recalled and repairs the twin K/V before it. The stream is the
    full model's, token for token; the same exits without recall are not; the request's stats and the
    server's metric count every recalled step."""
    from river.compiler.river.manifest import DISABLED, FORCED_EXIT

    repo = write_triton_repo(tiny_river.parent, tmp_path / "repo", threads=1, max_rows=2)
    manifest = repo / TC.GENERATE_MODEL / "1" / TC.RIVER_SUBDIR / "river.json"
    data = json.loads(manifest.read_text())
    data["recall_points"] = {"every-recall": {"thresholds": [FORCED_EXIT, DISABLED], "recall": 0.999999}}
    manifest.write_text(json.dumps(data))
    n, prompt = 24, "recall every river"
    with triton_server(repo, keep_logs=tmp_path / "log") as s:
        recalled = stream_generate(prompt, url=s.grpc_url, max_tokens=n, ignore_eos=True, budget="every-recall")
        exited = stream_generate(prompt, url=s.grpc_url, max_tokens=n, ignore_eos=True,
                                 thresholds=[FORCED_EXIT, DISABLED])
        full = stream_generate(prompt, url=s.grpc_url, max_tokens=n, ignore_eos=True, mode="full")
        time.sleep(1.2)  # the gauges refresh every 0.5 s
        metrics = _metrics(s)
    assert recalled.token_ids == full.token_ids and recalled.text == full.text
    assert exited.token_ids != full.token_ids
    assert recalled.stats["recalled_tokens"] == n - 1  # every decode step (the first token comes from prefill)
    assert exited.stats["recalled_tokens"] == 0
    assert _metric(metrics, "river_recalled_tokens_total") == n - 1


def _metrics(server) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("river_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _metric(values: dict, name: str, **labels) -> float | None:
    for key, value in values.items():
        if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            return value
    return None


def test_killed_client_leaks_no_row_and_metrics_report_the_batch(server, tmp_path):
    """A client process killed mid-stream: its row is freed (cancelled, or at worst finished) and the
    metrics endpoint shows tokens, occupancy, queue depth, exits and verify acceptance."""
    import signal
    import subprocess

    before = _metrics(server)
    script = tmp_path / "client.py"
    script.write_text(
        "import sys\n"
        "from river.runtime.triton.client import stream_generate\n"
        f"stream_generate('killed client', url='{server.grpc_url}', max_tokens=450, ignore_eos=True,\n"
        "                on_piece=lambda text, ids: print('got', flush=True))\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("got"), "the client never streamed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 60
    while True:
        values = _metrics(server)
        if _metric(values, "river_batch_rows") == 0:
            break
        assert time.monotonic() < deadline, f"a killed client's row is still held: {values}"
        time.sleep(0.2)
    stream_generate("verify after", url=server.grpc_url, max_tokens=20, mode="verify")
    time.sleep(1.2)  # the gauges refresh every 0.5 s
    values = _metrics(server)
    assert _metric(values, "river_generated_tokens_total") > (_metric(before, "river_generated_tokens_total") or 0)
    assert _metric(values, "river_batch_occupancy") == 0 and _metric(values, "river_queue_depth") == 0
    assert 0 < _metric(values, "river_verify_acceptance") <= 1
    assert _metric(values, "river_exit_tokens_total", layer="4") > 0
    assert _metric(values, "river_requests_completed_total") > 0
    assert server.alive()


def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(server, reference):
    import tritonclient.grpc as grpcclient

    def only(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return [t]

    cases = [
        (only("max_tokens", np.array([4], np.int32), "INT32"), "prompt"),  # missing input
        (build_inputs("hi") + only("max_tokens", np.array([4.0], np.float32), "FP32"), "max_tokens"),  # dtype
        (build_inputs("x" * (CAPACITY + 10), max_tokens=4), "cache"),  # prompt past the KV cache
        (build_inputs("hi", thresholds=[0.5, 0.5, 0.5]), "3 thresholds for 2 gates"),
        (build_inputs("hi", temperature=-1.0), "temperature"),
        (build_inputs("hi", thresholds=[float("nan"), 0.5]), "not a finite number"),
        (build_inputs("hi", temperature=float("nan")), "temperature"),
        (build_inputs("hi", mode="bogus"), "unknown mode 'bogus'"),
        (build_inputs("hi", mode="full", k=3), "'k' applies to mode 'verify'"),
        (build_inputs("hi", mode="exit", adaptive=False), "'adaptive' applies to mode 'verify'"),
        (build_inputs("hi", mode="verify", k=99), "k must be between 1 and 8"),
        (build_inputs("hi", budget="safe"), "unknown budget 'safe'"),
        (build_inputs("hi", mode="verify", thresholds=MIXED), "apply to mode 'exit'"),
    ]
    for inputs, message in cases:
        with pytest.raises(InferenceServerException, match=message) as info:
            stream_generate("", url=server.grpc_url, inputs=inputs, timeout=60)
        assert len(str(info.value).strip().splitlines()) == 1, f"not one line: {info.value}"
    assert server.alive()
    assert_same(stream_generate("still serving", url=server.grpc_url, max_tokens=16, thresholds=MIXED),
                reference("still serving", 16, MIXED))


# --- the repository's pieces without a server: configs, model.py with a stand-in for Triton ------------

def test_validate_config_catches_what_triton_would_refuse(tmp_path):
    good = TC.generate_config(TC.GENERATE_MODEL, instances=1, params={"mode": "ort"})
    folder = tmp_path / TC.GENERATE_MODEL
    folder.mkdir()
    assert TC.validate_config(TC.write_config(good, folder)).parameters["mode"].string_value == "ort"
    for change, message in [(lambda c: setattr(c.model_transaction_policy, "decoupled", False), "decoupled"),
                            (lambda c: c.dynamic_batching.SetInParent(), "dynamic batching"),
                            (lambda c: c.input[0].dims.__setitem__(0, 0), "bad dims"),
                            (lambda c: c.output.append(c.output[0]), "duplicate"),
                            (lambda c: setattr(c, "backend", ""), "neither backend nor platform")]:
        cfg = model_config_pb2.ModelConfig()
        cfg.CopyFrom(good)
        change(cfg)
        with pytest.raises(RiverError, match=message):
            TC.validate_config(TC.write_config(cfg, folder))
    (folder / "config.pbtxt").write_text("name: [")
    with pytest.raises(RiverError, match="does not parse"):
        TC.validate_config(folder / "config.pbtxt")


def test_writer_copies_the_model_module_and_checks_the_bls_step_model(repo, tiny_river, tmp_path):
    copied = repo / TC.GENERATE_MODEL / "1" / "model.py"
    assert copied.read_bytes() == repository.MODEL_PY.read_bytes()
    with pytest.raises(RiverError, match="river_step_trt"):
        write_triton_repo(tiny_river.parent, tmp_path / "r", bls=True, step_backends=("onnxruntime",),
                          bls_step_model=TC.STEP_TRT_MODEL)
    with pytest.raises(RiverError, match="unknown step backends"):
        write_triton_repo(tiny_river.parent, tmp_path / "r", step_backends=("tensorflow",))
    assert not (tmp_path / "r").exists()


def test_server_module_runs_as_a_command(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "river.runtime.triton.server", str(tmp_path / "missing")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "model repository not found" in done.stderr


def fake_pb_utils(step_model_dir: Path | None = None):
    """Just enough of triton_python_backend_utils for model.py, with BLS calls answered by ONNX Runtime on
    the step model's file (what Triton's onnxruntime backend would run). Not Triton: it checks our BLS
    loop's logic (what goes out, what comes back, where it is written), not Triton's BLS plumbing.
    The session takes the runtime's options: with ORT's default MatMulNBits accuracy level (which
    Triton's onnxruntime backend would use) the int8 twins compute differently and tokens can differ."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.calls = []

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        INTERNAL, INVALID_ARG, CANCELLED = 13, 3, 1

        def __init__(self, msg, code=13):
            self.msg, self.code = msg, code

        def message(self):
            return self.msg

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self._outputs, self._error = list(output_tensors), error

        def output_tensors(self):
            return self._outputs

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        session = None

        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None, **kw):
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            if InferenceRequest.session is None:
                import onnxruntime as ort

                from river.compiler.ort_session import session_options

                InferenceRequest.session = ort.InferenceSession(
                    str(step_model_dir / "1" / "model.onnx"), session_options(threads=1),
                    providers=["CPUExecutionProvider"])
            pb.calls.append(self.model_name)
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            values = InferenceRequest.session.run(self.outputs, feeds)
            return InferenceResponse([Tensor(n, v) for n, v in zip(self.outputs, values)])

    class Logger:
        lines: list[str] = []

        @classmethod
        def log_info(cls, msg):
            cls.lines.append(msg)

        log_warn = log_error = log_verbose = log_info

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest, pb.Logger = (
        Tensor, TritonError, InferenceResponse, InferenceRequest, Logger)
    pb.PreferredMemory = lambda kind, device: (kind, device)
    pb.TRITONSERVER_MEMORY_CPU, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 0, 1
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    pb.get_output_tensor_by_name = lambda response, name: next(
        (t for t in response.output_tensors() if t.name() == name), None)
    return pb


class FakeRequest:
    def __init__(self, pb, **inputs):
        self.inputs = {k: pb.Tensor(k, v) for k, v in inputs.items()}
        self.responses, self.flags = [], []
        self.done = threading.Event()

    def request_id(self):
        return "fake"

    def get_response_sender(self):
        request = self

        class Sender:
            def send(self, response=None, flags=0):
                request.responses.append(response)
                request.flags.append(flags)
                if flags:
                    request.done.set()

            def is_cancelled(self):
                return False

        return Sender()

    def tokens(self):
        return [int(t) for r in self.responses if r is not None for t in
                next(x for x in r.output_tensors() if x.name() == "token_ids").as_numpy()]

    def stats(self):
        final = self.responses[-1]
        assert self.flags.count(1) == 1 and self.flags[-1] == 1 and not final.has_error()
        return json.loads(next(t for t in final.output_tensors() if t.name() == "stats").as_numpy()[0])


def start_model(module, repo: Path, **parameters: str):
    """initialize() as Triton calls it: the config as JSON (with these parameters set), the model's
    folder and version."""
    from google.protobuf import json_format

    cfg = model_config_pb2.ModelConfig()
    text_format.Parse((repo / TC.GENERATE_MODEL / "config.pbtxt").read_text(), cfg)
    for key, value in parameters.items():
        cfg.parameters[key].string_value = value
    model = module.TritonPythonModel()
    model.initialize({"model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True),
                      "model_name": TC.GENERATE_MODEL, "model_repository": str(repo / TC.GENERATE_MODEL),
                      "model_version": "1"})
    return model, cfg


def test_model_module_streams_in_process_requests(repo, reference, monkeypatch):
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "river.runtime.triton.model", raising=False)
    module = importlib.import_module("river.runtime.triton.model")
    model, _ = start_model(module, repo)
    try:
        assert model.mode == "ort" and model.gates == 2
        requests = [FakeRequest(pb, prompt=np.array([b"hello river"], object), max_tokens=np.array([24], np.int32),
                                thresholds=np.array(MIXED, np.float32)),
                    FakeRequest(pb, prompt=np.array([b"second"], object), max_tokens=np.array([12], np.int32))]
        bad = FakeRequest(pb, prompt=np.array([b"hi"], object), thresholds=np.ones(3, np.float32))
        assert model.execute(requests + [bad]) is None
        assert bad.done.is_set() and "3 thresholds for 2 gates" in bad.responses[-1].error().message()
        completed = []
        for request, (prompt, n, thresholds) in zip(requests, [("hello river", 24, MIXED), ("second", 12, None)]):
            assert request.done.wait(60)
            ref = reference(prompt, n, thresholds)
            assert request.tokens() == ref.token_ids
            stats = request.stats()
            assert stats["exit_layers"] == [s.exit_layer for s in ref.steps[1:]]
            completed.append(stats["server"]["completed"])
        assert max(completed) == 2
        m = model.scheduler.metrics()
        assert (m["rows"], m["completed"], m["queue_depth"]) == (0, 2, 0), "every request's row is freed"
    finally:
        model.finalize()


def test_model_parameter_draft_payoff(repo, monkeypatch):
    """``draft_payoff``: measured payoffs by default, the fixed rule alone with ``false``, and a
    one-line error for anything else."""
    pb = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "river.runtime.triton.model", raising=False)
    module = importlib.import_module("river.runtime.triton.model")
    with pytest.raises(RiverError, match="draft_payoff must be true or false, not 'maybe'"):
        start_model(module, repo, draft_payoff="maybe")
    for value, measured in (("False", False), ("true", True)):
        model, _ = start_model(module, repo, draft_payoff=value)
        try:
            assert (model.scheduler.payoffs is not None) == measured
        finally:
            model.finalize()


def test_bls_mode_loop_against_a_stand_in_for_triton(tiny_river, reference, tmp_path, monkeypatch):
    repo = write_triton_repo(tiny_river.parent, tmp_path / "repo", bls=True, threads=1)
    pb = fake_pb_utils(repo / TC.STEP_MODEL)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    # the copy in the repository, loaded as Triton's stub loads it
    spec = importlib.util.spec_from_file_location("river_generate_model", repo / TC.GENERATE_MODEL / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, gen_cfg = start_model(module, repo)
    assert gen_cfg.parameters["mode"].string_value == "bls"
    assert gen_cfg.parameters["step_model"].string_value == TC.STEP_MODEL
    try:
        request = FakeRequest(pb, prompt=np.array([b"hello river"], object), max_tokens=np.array([24], np.int32),
                              thresholds=np.array(MIXED, np.float32))
        assert model.execute([request]) is None
        ref = reference("hello river", 24, MIXED)
        assert request.tokens() == ref.token_ids
        assert request.stats()["exit_layers"] == [s.exit_layer for s in ref.steps[1:]]
        assert pb.calls and set(pb.calls) == {TC.STEP_MODEL} and len(pb.calls) == len(ref.steps)
        bad = FakeRequest(pb, prompt=np.array([("x" * (CAPACITY + 10)).encode()], object))
        model.execute([bad])
        assert bad.responses[-1].has_error() and "cache" in bad.responses[-1].error().message()
    finally:
        model.finalize()


def test_bls_step_backend_extends_by_several_tokens(tiny_river, repo, monkeypatch):
    """The BLS backend implements the whole protocol: extend by S tokens equals S decode steps."""
    pb = fake_pb_utils(repo / TC.STEP_MODEL)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "river.runtime.triton.model", raising=False)
    module = importlib.import_module("river.runtime.triton.model")
    base = open_generator(str(tiny_river), threads=1).backend
    runs = []
    for chunks in ([[4, 5, 6]], [[4], [5], [6]]):
        bls = module.BlsStepBackend(TC.STEP_MODEL, base, [2.0, 2.0])
        cache = bls.new_cache(16)
        bls.prefill(np.array([[1, 2, 3]]), cache)
        cache.length = 3
        logits = []
        for chunk in chunks:
            logits.append(bls.extend(np.array([chunk]), cache)[0])
            cache.length += len(chunk)
        assert bls.fed == [4, 5, 6] and bls.last_exit_layer == base.contract.num_layers
        runs.append((np.concatenate(logits), [k[:, :, :6].copy() for k in cache.keys]))
    np.testing.assert_allclose(runs[0][0], runs[1][0], atol=1e-4)
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(a, b, atol=1e-4)


# --- SmolLM2 -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_stream_equals_runtime_greedy(smol_river_model, tmp_path):
    river = smol_river_model
    repo = write_triton_repo(river.parent, tmp_path / "repo", max_length=256)
    prompt = "What is a river delta?"
    with triton_server(repo, ready_timeout=300) as s:
        got = stream_generate(prompt, url=s.grpc_url, max_tokens=24)
    gen = open_generator(str(river), max_length=256)
    ref = gen.generate(prompt, GenerationConfig(max_new_tokens=24))
    assert_same(got, ref)
    assert got.stats["gates"] == json.loads((river.parent / "river.json").read_text())["gates"]
