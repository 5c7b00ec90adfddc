"""Parity harness: Polygraphy's ``Comparator`` runs the River graph in ONNX Runtime (the reference,
Polygraphy's own ``OnnxrtRunner``) and our runtime's decode step (fused ``OrtBackend``, segmented
``SegmentedBackend``, and the TensorRT engines where TensorRT can run) on the same generated steps,
and compares logits, every present and ``exit_layer``.

Why our runtime and not just the graph: the runtime runs derived graphs (the shared-KV form,
segments) through IOBinding over the shared cache; the harness proves that path computes what the
River graph computes. Inputs (``StepDataLoader``) are one decode step (S = 1) after a real prefix:
the past comes from running the River graph itself over a random prompt, and the thresholds force
an exit at each gate, at none, and use the graph's defaults, so every conditional path is exercised.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from river.compiler.graph_io import load_onnx_header
from river.compiler.river.manifest import (
    CHAINED_DIR,
    DISABLED,
    ENGINES_DIR,
    EXIT_LAYER,
    FORCED_EXIT,
    SEGMENTS_DIR,
    THRESHOLDS,
    TRT_DIR,
    RiverInfo,
)
from river.errors import ModelNotFound, RiverError
from river.export import contract as C
from river.export.contract import StepContract

@dataclass
class ParityReport:
    passed: bool
    iterations: int
    runners: list[str]
    comparisons: list[dict] = field(default_factory=list)  # {"pair", "passed", "max_abs": {output: diff}}
    exits: dict[str, list[int]] = field(default_factory=dict)  # runner -> exit layer per iteration
    skipped: dict[str, str] = field(default_factory=dict)  # runner -> why it did not run
    seconds: float = 0.0

    def max_abs(self) -> float:
        return max((max(c["max_abs"].values(), default=0.0) for c in self.comparisons), default=0.0)

    def lines(self) -> list[str]:
        """A few lines for ``river-export --check``."""
        head = (f"parity: {'PASS' if self.passed else 'FAIL'} over {self.iterations} decode steps "
                f"({', '.join(self.runners)}) in {self.seconds:.1f}s")
        out = [head]
        for c in self.comparisons:
            worst = max(c["max_abs"].items(), key=lambda kv: kv[1], default=("-", 0.0))
            out.append(f"  {c['pair']}: {'ok' if c['passed'] else 'MISMATCH'} (max |diff| {worst[1]:.2e} at {worst[0]})")
        for name, why in self.skipped.items():
            out.append(f"  skipped {name}: {why}")
        return out


def threshold_patterns(num_gates: int, defaults=None) -> list[np.ndarray]:
    """Forced exit at each gate, no exit, and the graph's defaults (when they differ from both)."""
    pats = []
    for k in range(num_gates):
        p = np.full(num_gates, DISABLED, np.float32)
        p[k] = FORCED_EXIT
        pats.append(p)
    pats.append(np.full(num_gates, DISABLED, np.float32))
    if defaults is not None and not any(np.array_equal(defaults, p) for p in pats):
        pats.append(np.asarray(defaults, np.float32))
    return pats


class StepDataLoader:
    """Decode-step feeds for a River graph (an iterable of feed dicts, as Polygraphy's Comparator takes).

    For each of ``contexts`` random prompts of ``past`` tokens, the River graph (gates disabled) runs
    the prompt; its presents are the past of the step. Each context is then fed with every threshold
    pattern (``threshold_patterns``). Feeds are made once, so every runner sees the same arrays.
    """

    def __init__(self, river_onnx: str | Path, *, batch: int = 1, past: int = 8, contexts: int = 2, seed: int = 0,
                 patterns: list[np.ndarray] | None = None, threads: int | None = 1):
        import onnxruntime as ort

        from river.compiler.ort_session import session_options

        header = load_onnx_header(river_onnx)
        self.contract = StepContract.from_model(header, str(river_onnx))
        meta = RiverInfo.from_model(header)
        if meta is None:
            raise RiverError(f"{river_onnx} is not a River graph (no river.gates metadata)")
        defaults = next((t for t in header.graph.initializer if t.name == THRESHOLDS), None)
        import onnx

        defaults = None if defaults is None else onnx.numpy_helper.to_array(defaults)
        self.patterns = patterns if patterns is not None else threshold_patterns(len(meta.gates), defaults)
        vocab = self.contract.vocab_size or 32
        rng = np.random.default_rng(seed)
        sess = ort.InferenceSession(str(river_onnx), session_options(threads), providers=["CPUExecutionProvider"])
        c = self.contract
        self.feeds: list[OrderedDict] = []
        for _ in range(contexts):
            prompt = rng.integers(0, vocab, (batch, past))
            pre = C.step_feeds(c, prompt)
            pre[THRESHOLDS] = np.full(len(meta.gates), DISABLED, np.float32)
            outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, pre)))
            token = rng.integers(0, vocab, (batch, 1))
            presents = C.past_of(outs, c.num_layers)
            for thresholds in self.patterns:
                feed = OrderedDict(C.step_feeds(c, token, presents))
                feed[THRESHOLDS] = thresholds
                self.feeds.append(feed)

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def _runner_classes():
    """Polygraphy runner classes, defined lazily (polygraphy is only needed when checking parity)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class RiverOnnxrtRunner(OnnxrtRunner):
        """OnnxrtRunner that also lists inputs with defaults (``exit_thresholds``), which ONNX
        Runtime reports as overridable initializers rather than inputs."""

        def get_input_metadata_impl(self):
            meta = super().get_input_metadata_impl()
            for node in self.sess.get_overridable_initializers():
                meta.add(node.name, dtype=DataType.from_dtype(node.type, "onnxruntime"), shape=node.shape)
            return meta

    class StepBackendRunner(BaseRunner):
        """One decode step of a ``StepBackend`` (our runtime) per feed: the feed's past goes into a
        fresh shared cache, ``decode`` runs, and the cache's valid part is the presents."""

        def __init__(self, make_backend, contract: StepContract, name: str):
            super().__init__(name=name, prefix="river-runner")
            self._make, self._contract = make_backend, contract

        def activate_impl(self):
            self.backend = self._make()

        def get_input_metadata_impl(self):
            c = self._contract
            meta = TensorMetadata()
            meta.add(C.INPUT_IDS, DataType.INT64, ("batch_size", 1))
            meta.add(C.ATTENTION_MASK, DataType.INT64, ("batch_size", "total_sequence_length"))
            meta.add(C.POSITION_IDS, DataType.INT64, ("batch_size", 1))
            for layer in range(c.num_layers):
                for kind in ("key", "value"):
                    meta.add(C.past_name(layer, kind), DataType.FLOAT32,
                             ("batch_size", c.num_kv_heads, "past_sequence_length", c.head_dim))
            meta.add(THRESHOLDS, DataType.FLOAT32, (len(self.backend.thresholds),))
            return meta

        def infer_impl(self, feed_dict):
            c, backend = self._contract, self.backend
            ids = np.asarray(feed_dict[C.INPUT_IDS])
            if not np.all(np.asarray(feed_dict[C.ATTENTION_MASK]) == 1):
                raise RiverError("the step runner takes unpadded steps (attention_mask all ones)")
            batch, past = ids.shape[0], feed_dict[C.past_name(0, "key")].shape[2]
            cache = backend.new_cache(past + 1, batch)
            for layer in range(c.num_layers):
                cache.write(layer, feed_dict[C.past_name(layer, "key")], feed_dict[C.past_name(layer, "value")], at=0)
            cache.length = past
            backend.set_thresholds(feed_dict[THRESHOLDS])
            start = time.perf_counter()
            logits = backend.decode(ids, cache)
            self.inference_time = time.perf_counter() - start
            cache.length = past + 1
            out = OrderedDict()
            out[C.LOGITS] = np.array(logits)
            for layer in range(c.num_layers):
                for kind in ("key", "value"):
                    out[C.present_name(layer, kind)] = cache.valid_kv(layer, kind)
            out[EXIT_LAYER] = np.full((batch,), backend.last_exit_layer, np.int64)
            return out

        def deactivate_impl(self):
            del self.backend

    return RiverOnnxrtRunner, StepBackendRunner


def trt_can_run() -> str | None:
    """None when TensorRT can run engines here, else why not."""
    from river.compiler.tensorrt import package

    if package.trt is None:
        return "TensorRT is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return f"{package.TRT_PACKAGE} is installed but there is no CUDA GPU to run engines on"
    except Exception as exc:  # noqa: BLE001 - any failure to import torch means no GPU path
        return f"torch unavailable: {exc}"
    return None


def _polygraphy_trt_runner(plan: Path):
    """Polygraphy's own TensorRT runner on a fused engine: a second opinion on our TrtBackend."""
    from river.compiler.tensorrt import package

    if package.TRT_PACKAGE == "tensorrt-rtx":
        import polygraphy.config

        polygraphy.config.USE_TENSORRT_RTX = True  # must be set before polygraphy.backend.trt is imported
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(plan.read_bytes()), name="polygraphy-trt-fused")


def _locate(path: str | Path) -> tuple[Path, Path]:
    """(River graph, folder) from a river-export folder or a River model.onnx."""
    path = Path(path)
    onnx_path = path / "model.onnx" if path.is_dir() else path
    if not onnx_path.is_file():
        raise ModelNotFound(f"no River graph at {onnx_path}")
    return onnx_path, onnx_path.parent


def _twins(info: RiverInfo) -> str:
    """Which twin weights a River form computes with: graphs agree only when these agree."""
    quantized = info.precision != "fp32" or info.head != "fp32"
    return f"{info.kind}/{info.precision}/head-{info.head}" + (f"/{info.twin_format}/{info.block}" if quantized else "")


def check_parity(river: str | Path, *, segments: str | Path | None = None, engines: str | Path | None = None,
                 batch: int = 1, past: int = 8, contexts: int = 2, seed: int = 0, atol: float = 1e-4,
                 rtol: float = 1e-4, threads: int | None = 1, trt: bool | None = None) -> ParityReport:
    """Compare ONNX Runtime on the River graph with our runtime's decode step (see module docstring).

    ``river``: a ``river-export`` folder or its ``model.onnx``. ``segments`` / ``engines``: default to
    ``segments/`` and ``trt/engines/`` inside that folder when they exist. Each runner is compared
    with the River graph that has the same twins: ``model.onnx`` (ONNX Runtime twins) or, for the
    TensorRT forms (DequantizeLinear twins), the chained graph the fused engine was built from. The
    TensorRT forms always run in ONNX Runtime (fused chained graph, segments); the engines run where
    TensorRT can (``trt``: None = where possible, False = never). Whatever cannot run is listed in
    ``report.skipped`` with the reason.
    """
    from river.compiler.river.segments import SegmentIndex
    from river.runtime.ort_backend import OrtBackend
    from river.runtime.segmented_backend import SegmentedBackend

    t0 = time.perf_counter()
    onnx_path, folder = _locate(river)
    segments = Path(segments) if segments is not None else (folder / SEGMENTS_DIR if (folder / SEGMENTS_DIR).is_dir() else None)
    if engines is None and (folder / TRT_DIR / ENGINES_DIR).is_dir():
        engines = folder / TRT_DIR / ENGINES_DIR
    references: dict[str, Path] = {}
    groups: dict[str, list] = {}  # twins -> [(runner name, factory, "backend" | "runner")]
    skipped: dict[str, str] = {}

    def reference(path: Path) -> str:
        meta = RiverInfo.from_model(load_onnx_header(path))
        if meta is None:
            raise RiverError(f"{path} is not a River graph (no river.gates metadata)")
        twins = _twins(meta)
        references.setdefault(twins, path)
        return twins

    def segments_twins(folder_: Path) -> str:
        index = SegmentIndex.load(folder_)
        return _twins(index.info())

    nested = reference(onnx_path)
    groups.setdefault(nested, []).append(("river-ort-fused", lambda: OrtBackend(onnx_path, threads=threads), "backend"))
    if segments is not None:
        groups.setdefault(segments_twins(segments), []).append(
            ("river-ort-segmented", lambda: SegmentedBackend(segments, threads=threads), "backend"))
    else:
        skipped["river-ort-segmented"] = f"no segments folder next to {onnx_path} (write one with river.compiler.river.segments)"
    if engines is not None:  # the TensorRT forms: checked in ONNX Runtime here, in TensorRT where it runs
        from river.compiler.tensorrt.engines import EnginesReport

        report = EnginesReport.load(engines)
        fused = next((b for b in report.builds if b.form == "fused"), None)
        if fused is not None and Path(fused.onnx).is_file():
            chained = Path(fused.onnx)
            twins = reference(chained)
            groups.setdefault(twins, []).append(
                ("river-ort-chained", lambda: OrtBackend(chained, threads=threads), "backend"))
            if report.segments is not None:
                trt_segments = Path(report.segments)
                groups.setdefault(segments_twins(trt_segments), []).append(
                    ("river-ort-segmented-trt-forms", lambda: SegmentedBackend(trt_segments, threads=threads), "backend"))
            why = trt_can_run() if trt is not False else "not requested"
            if why is None:
                from river.runtime.trt_backend import TrtBackend

                groups[twins].append(("polygraphy-trt-fused", lambda: _polygraphy_trt_runner(engines / fused.plan), "runner"))
                groups[twins].append(("river-trt-fused", lambda: TrtBackend(engines, "fused"), "backend"))
                if report.segments is not None:
                    groups[twins].append(("river-trt-segmented", lambda: TrtBackend(engines, "segmented"), "backend"))
            else:
                skipped["river-trt"] = why
        else:
            skipped["river-trt"] = f"{engines} has no fused engine whose ONNX source is at hand"
    elif trt is not False:
        skipped["river-trt"] = "no engines folder (river-export --trt builds one in trt/engines)"
    names, comparisons, exits, iterations, passed = [], [], {}, 0, True
    for twins, members in groups.items():
        ref = references.get(twins)
        if ref is None:
            for name, _, _ in members:
                skipped[name] = f"no River graph with the same twins ({twins}) to compare with"
            continue
        got = _compare(ref, members, batch=batch, past=past, contexts=contexts, seed=seed, atol=atol, rtol=rtol,
                       threads=threads)
        names += [n for n in got["names"] if n not in names]
        comparisons += got["comparisons"]
        exits.update(got["exits"])
        iterations += got["iterations"]
        passed = passed and got["passed"]
    return ParityReport(passed and bool(comparisons), iterations, names, comparisons, exits, skipped,
                        time.perf_counter() - t0)


def _compare(reference: Path, members, *, batch, past, contexts, seed, atol, rtol, threads) -> dict:
    """One Comparator run: the reference graph in Polygraphy's ONNX Runtime runner, then ``members``."""
    import onnxruntime as ort
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    from river.compiler.ort_session import session_options

    loader = StepDataLoader(reference, batch=batch, past=past, contexts=contexts, seed=seed, threads=threads)
    RiverOnnxrtRunner, StepBackendRunner = _runner_classes()
    label = "onnxrt-river-graph" if reference.parent.name != CHAINED_DIR else "onnxrt-chained-graph"
    runners = [RiverOnnxrtRunner(lambda: ort.InferenceSession(str(reference), session_options(threads),
                                                               providers=["CPUExecutionProvider"]), name=label)]
    runners += [StepBackendRunner(make, loader.contract, name) if kind == "backend" else make()
                for name, make, kind in members]
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(runners, data_loader=loader)
        pairs = [(0, i) for i in range(1, len(runners))]
        accuracy = Comparator.compare_accuracy(results, comparisons=pairs,
                                               compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    names = [name for name, _ in results.items()]
    per_runner = dict(results.items())
    comparisons = []
    for a, b in pairs:
        diffs: dict[str, float] = {}
        for ia, ib in zip(per_runner[names[a]], per_runner[names[b]]):
            for out_name, va in ia.items():
                vb = ib[out_name]
                d = float(np.abs(np.asarray(va, np.float64) - np.asarray(vb, np.float64)).max()) if va.size else 0.0
                diffs[out_name] = max(diffs.get(out_name, 0.0), d)
        ok = diffs.get(EXIT_LAYER, 0.0) == 0.0 and all(r.percentage((names[a], names[b])) == 1.0 for r in accuracy)
        comparisons.append({"pair": f"{names[a]} vs {names[b]}", "passed": ok, "max_abs": diffs})
    exits = {name: [int(it[EXIT_LAYER][0]) for it in iters] for name, iters in per_runner.items()}
    return {"names": names, "comparisons": comparisons, "exits": exits, "iterations": len(loader),
            "passed": all(c["passed"] for c in comparisons) and bool(accuracy)}
