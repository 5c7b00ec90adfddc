"""Methods (all over ONNX Runtime CPU with shared KV buffers):
  full                   the step graph, no exits (the reference)
  river:<op>             River graph, calibrated thresholds of operating point <op> (safe/balanced/fast)
  fixed@<g>              every decode token exits after layer g (a fixed exit depth)
  river-qhead:<op>,      the same with the rivers' head 8-bit (river-export --river-head int8): an
  fixed-qhead@<g>        exited token's head is a MatMulNBits, the backbone's stays fp32
  river-kv32:<op>,       the int8-head River with full-kv32 twins (--river int8-kv32): the weights a
  fixed-kv32@<g>         twin's K/V depend on stay fp32, so exited tokens leave less error in the cache
  river-recall:<point>   the int8-head River's segments at a calibrated recall point (<budget>-recall):
                         every token out at the first gate; one whose river is unsure goes back to
                         the backbone, which repairs the twin K/V before it
  river-recall-kv32:<p>  the same on the full-kv32 River's segments
  river-recall-early:<p> the same on a River with one gate, after layer 1 (EARLY_GATE): every token
                         drafted from there by int8 twins, the unsure ones recalled and repaired
  full-segmented         the same segments with every gate off (what running as segments costs)
  monotone:<op>          SkipDecode-style policy: once a token exits at a gate, later tokens exit there too
  propagate:<op>         CALM-style: skipped layers' K/V projected from the exit state (kv twins), calibrated
  uniform-int8/int4      the whole model quantized like the twins, no exits (the honest competitor)
  uniform-q41-int8       a GGUF Q4_1 model's own 4-bit weights by int8 activations (--lowering ort-int8,
                         what the twins run under River's ops, and llama.cpp's arithmetic), no exits
  draft-alone            the verify draft graph run as a model of its own: every GEMM + head as 8-bit
                         MatMulNBits (whole-model quantization, lossy)
  verify:k=<k>           lossless River: the draft graph (8-bit twins of every layer) drafts k tokens
                         over the shared KV, the backbone verifies (output = full model's)
  verify:k~4             the same with adaptive k from 4 (river-generate --mode verify's default)
  verify-river:k=<k>     the same with the River graph's own exit (first gate) as the draft
On the torch reference (runtime/bench/baselines.py; speedups against full-torch, never ORT's full):
  full-torch             our torch decoder, no exits (the speed reference of the torch methods)
  river-torch:<op>       the torch River (int8 twins), calibrated thresholds of <op>
  mask:<op>              D-LLM: exit at River's gates/thresholds, no twins; skipped layers' K/V left
                         out and masked for later tokens
  recompute:<op>         EE-LLM: exit the same way; the skipped layers' K/V recomputed by the backbone
                         at the next deeper step, batched with that step's token
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from river.compiler.river.manifest import FORCED_EXIT, SEGMENTS_DIR, RiverManifest
from river.compiler.river.recall import RECALL_OFF
from river.runtime.backend import StepBackend
from river.runtime.generate import Generator

EARLY_GATE = 1  # the early River's one gate: recall points draft from right after this layer
TORCH_BASELINES = "mask (D-LLM) and recompute (EE-LLM) run on the torch reference, measured against full-torch"

# What a method is to the report: the reference, a lossy exit policy (judged against whole-model
# quantization), whole-model quantization itself, or lossless (verify mode: output = the reference's).
REFERENCE, EXITS, QUANTIZED, LOSSLESS = "reference", "exits", "whole-model quantization", "lossless"
OTHER_RUNTIME = "full model, other runtime"  # the speed reference of methods on another runtime


@dataclass
class Method:
    """One compared method: its generator and, for River graphs, the thresholds it runs at."""

    generator: Generator
    role: str
    about: str
    backend: StepBackend | None = None  # the River backend whose thresholds this method sets
    thresholds: Sequence[float] | None = None  # None: every gate off
    speed_reference: str = "full"  # the method on the same runtime whose decode tokens/s it is divided by
    cost_family: str | None = ""  # its River graph's fixed-exit runs (fixed{family}@<g>) predict its step cost
    recall: float = RECALL_OFF  # the recall margin it runs at (compiler/river/recall.py)

    def use(self) -> Generator:
        """The generator, with this method's thresholds set (methods share River backends)."""
        if self.backend is not None:
            self.backend.set_thresholds(self.backend.gate_thresholds.disabled() if self.thresholds is None
                                        else self.thresholds)
            self.backend.set_recall(self.recall)
        return self.generator

    @property
    def lossless(self) -> bool:
        return self.role in (REFERENCE, LOSSLESS)


class MonotoneGenerator(Generator):
    """SkipDecode's rule over a River graph: the exit layer never increases along the sequence."""

    def __init__(self, backend: StepBackend, tokenizer, eos_token_ids: Sequence[int] = (),
                 base_thresholds: Sequence[float] | None = None):
        super().__init__(backend, tokenizer, eos_token_ids)
        self.base_thresholds = backend.default_thresholds if base_thresholds is None else base_thresholds

    def generate(self, *args, **kwargs):
        self.backend.set_thresholds(self.base_thresholds)
        return super().generate(*args, **kwargs)

    def decode_one_token(self, token, cache):
        row = super().decode_one_token(token, cache)
        gates = self.backend.river.gates
        exit_layer = self.backend.last_exit_layer
        if exit_layer is not None and exit_layer - 1 in gates:
            pinned = np.array(self.backend.thresholds, np.float32)
            pinned[gates.index(exit_layer - 1)] = FORCED_EXIT
            self.backend.set_thresholds(pinned)
        return row


@dataclass
class Graphs:
    """The graphs the methods run: the step graph, two calibrated River graphs, uniform int8/int4."""

    model: str  # what the torch methods load
    step: Path
    river_int8: Path  # int8 full twins
    river_kv: Path  # kv twins (propagate)
    river_qhead: Path  # int8 full twins and an int8 river head
    river_kv32: Path  # int8 full-kv32 twins and an int8 river head
    river_early: Path  # int8 twins and head, one gate after layer EARLY_GATE (recall points)
    uniform: dict[str, Path]  # precision -> graph


def prepare_graphs(model: str, out: Path, gates: str | None, n_cal: int, threads: int, log=sys.stderr) -> Graphs:
    """Export (once), compile + calibrate and quantize what the methods need, cached under ``out/graphs``."""
    from river.compiler.calibration_data import CALIBRATION_PROMPTS
    from river.compiler.compile import compile_river
    from river.compiler.graph_io import load_onnx, save_onnx_atomic
    from river.compiler.river.segments import write_segments
    from river.compiler.river.spec import RiverSpec
    from river.compiler.weight_quant import uniform_quantized
    from river.export.store import exported_model_path

    step = Path(exported_model_path(model))
    folder = out / "graphs"
    folder.mkdir(parents=True, exist_ok=True)
    river = {}
    for name, kind, head, at in (("river-int8", "int8", "fp32", gates), ("river-kv", "kv", "fp32", gates),
                                 ("river-int8-qhead", "int8", "int8", gates),
                                 ("river-kv32-qhead", "int8-kv32", "int8", gates),
                                 ("river-early-qhead", "int8", "int8", str(EARLY_GATE))):
        graph_dir = folder / f"{name}-cal{n_cal}"
        if not (graph_dir / "model.onnx").is_file():
            print(f"[bench] compiling + calibrating {name} ...", file=log, flush=True)
            compile_river(step, graph_dir, gates=at, river=kind, calibrate=CALIBRATION_PROMPTS[:n_cal],
                          budget="balanced", threads=threads, head=head, log=log)
        river[name] = graph_dir / "model.onnx"
        if head != "fp32" and not (graph_dir / SEGMENTS_DIR).is_dir():  # river-recall runs its segments
            write_segments(step, RiverSpec.from_manifest(graph_dir), graph_dir / SEGMENTS_DIR)
    uniform = {}
    for precision in ("int8", "int4"):
        path = folder / f"uniform-{precision}" / "model.onnx"
        if not path.is_file():
            print(f"[bench] quantizing the whole model ({precision}) ...", file=log, flush=True)
            save_onnx_atomic(uniform_quantized(load_onnx(step), precision), path)
        uniform[precision] = path
    return Graphs(model, step, river["river-int8"], river["river-kv"], river["river-int8-qhead"],
                  river["river-kv32-qhead"], river["river-early-qhead"], uniform)


def exit_methods(backend: StepBackend, ops: dict, tok, eos, suffix: str, what: str) -> dict[str, Method]:
    """``river{suffix}:<op>`` at each calibrated operating point and ``fixed{suffix}@<g>`` at each gate
    of one River graph (one generator: the methods set its thresholds in turn)."""
    generator = Generator(backend, tok, eos)
    methods = {f"river{suffix}:{op}": Method(generator, EXITS, f"River graph ({what}) at operating point {op}",
                                             backend, thr, cost_family=suffix) for op, thr in ops.items()}
    for i, g in enumerate(backend.river.gates):
        methods[f"fixed{suffix}@{g}"] = Method(generator, EXITS, f"every decode token exits after layer {g} ({what})",
                                               backend, backend.gate_thresholds.forced(i), cost_family=suffix)
    return methods


def build_methods(graphs: Graphs, threads: int) -> dict[str, Method]:
    """Every method, named as the report names it ("full" first: the others are measured against it)."""
    from river.compiler.ort_session import shared_thread_pool
    from river.runtime.loading import open_generator
    from river.runtime.ort_backend import OrtBackend
    from river.runtime.speculative import SpeculativeGenerator
    from river.runtime.verify_graphs import verify_pair

    full = open_generator(str(graphs.step), threads=threads)
    tok, eos = full.tokenizer, full.eos_token_ids
    river_backend = OrtBackend(graphs.river_int8, threads=threads)
    kv_backend = OrtBackend(graphs.river_kv, threads=threads)
    ops = RiverManifest.load(graphs.river_int8.parent).operating_points
    kv_balanced = RiverManifest.load(graphs.river_kv.parent).operating_points["balanced"]

    methods = {"full": Method(full, REFERENCE, "the step graph, no exits")}
    methods.update(exit_methods(river_backend, ops, tok, eos, "", "int8 twins"))
    for path, suffix, what in ((graphs.river_qhead, "-qhead", "int8 twins, int8 river head"),
                               (graphs.river_kv32, "-kv32", "int8 twins with fp32 K/V weights, int8 river head")):
        methods.update(exit_methods(OrtBackend(path, threads=threads), RiverManifest.load(path.parent).operating_points,
                                    tok, eos, suffix, what))
    monotone = MonotoneGenerator(river_backend, tok, eos, base_thresholds=np.asarray(ops["balanced"], np.float32))
    methods["monotone:balanced"] = Method(monotone, EXITS, "SkipDecode-style: the exit layer never rises",
                                          river_backend, ops["balanced"])
    methods["propagate:balanced"] = Method(Generator(kv_backend, tok, eos), EXITS,
                                           "CALM-style: kv twins project the skipped layers' K/V", kv_backend,
                                           kv_balanced, cost_family=None)
    for precision, path in graphs.uniform.items():
        uniform = open_generator(str(path), threads=threads, tokenizer=str(graphs.step.parent))
        uniform.eos_token_ids = eos
        methods[f"uniform-{precision}"] = Method(uniform, QUANTIZED, f"every weight MatMul {precision}, no exits")
    if full.backend.grid_form == "river" and full.backend.grid_weights:  # River's ops run Q4_1 weights here
        int8 = open_generator(str(graphs.step), threads=threads, lowering="ort-int8")
        methods["uniform-q41-int8"] = Method(int8, QUANTIZED, "every Q4_1 product by int8 activations over its own "
                                             "4-bit weights (--lowering ort-int8: llama.cpp's arithmetic), no exits")
    _, draft_path = verify_pair(graphs.step, -1)
    methods["draft-alone"] = Method(Generator(OrtBackend(draft_path, threads=threads), tok, eos), QUANTIZED,
                                    "the verify draft graph alone: every GEMM + head as 8-bit MatMulNBits")
    draft_backend = OrtBackend(draft_path, threads=threads if shared_thread_pool() else 1, single_token=True)
    for k in (3, 4):
        methods[f"verify:k={k}"] = Method(SpeculativeGenerator(full.backend, tok, eos, draft=draft_backend, k=k),
                                          LOSSLESS, f"the draft graph drafts {k} tokens, the full model verifies")
    methods["verify:k~4"] = Method(SpeculativeGenerator(full.backend, tok, eos, draft=draft_backend, k=4, adaptive=True),
                                   LOSSLESS, "adaptive k from 4 (river-generate's default), the full model verifies")
    methods["verify-river:k=4"] = Method(SpeculativeGenerator(river_backend, tok, eos, draft_gate=0, k=4), LOSSLESS,
                                         "the River graph's first exit drafts 4 tokens, its backbone verifies",
                                         river_backend)
    methods.update(recall_methods(graphs.river_qhead, threads, tok, eos))
    methods.update(recall_methods(graphs.river_kv32, threads, tok, eos, "-kv32"))
    methods.update(recall_methods(graphs.river_early, threads, tok, eos, "-early"))
    methods.update(torch_methods(graphs, threads, river_backend.river, ops["balanced"], tok, eos))
    return methods


def recall_methods(river: Path, threads: int, tok, eos, suffix: str = "") -> dict[str, Method]:
    """``river-recall{suffix}:<point>`` at each calibrated recall point of the River graph's segments,
    and (for the first River, without ``suffix``) ``full-segmented``, every gate off: what running as
    segments costs against ``full``, the speed reference of both."""
    from river.runtime.segmented_backend import SegmentedBackend

    manifest = RiverManifest.load(river.parent)
    points = manifest.recall_points
    if not points:
        print(f"[bench] {river.parent} has no recall points (compiled before they existed): river-recall "
              "methods skipped; a fresh --out folder recompiles it", file=sys.stderr)
        return {}
    backend = SegmentedBackend(river.parent / SEGMENTS_DIR, threads=threads)
    generator = Generator(backend, tok, eos)
    methods = {} if suffix else {"full-segmented": Method(generator, OTHER_RUNTIME, "the River's segments, every gate off",
                                                          backend, None, cost_family=None)}
    for name, point in points.items():
        methods[f"river-recall{suffix}:{name}"] = Method(
            generator, EXITS, f"segments{suffix} at recall point {name}: every token out at gate "
            f"{manifest.gates[0]}, recall margin {point['recall']:.3g}",
            backend, point["thresholds"], cost_family=None, recall=point["recall"])
    return methods


def torch_methods(graphs: Graphs, threads: int, river, balanced, tok, eos) -> dict[str, Method]:
    """full-torch, the torch River and the two KV-absence baselines at the balanced operating point."""
    import torch

    from river.models import load_model
    from river.runtime.bench.baselines import ExitWithoutTwinsBackend
    from river.runtime.torch_backend import TorchBackend

    torch.set_num_threads(threads)
    model = load_model(graphs.model).model
    ref = "full-torch"
    methods = {ref: Method(Generator(TorchBackend(model), tok, eos), OTHER_RUNTIME,
                           "our torch decoder, no exits (speed reference of the torch methods)")}
    river_torch = TorchBackend(model, river, thresholds=balanced)
    methods["river-torch:balanced"] = Method(Generator(river_torch, tok, eos), EXITS,
                                             "the torch River (int8 twins) at operating point balanced", river_torch,
                                             balanced, ref)
    words = {"mask": "D-LLM: no twins, the skipped layers' K/V left out and masked for later tokens (torch)",
             "recompute": "EE-LLM: no twins, the skipped layers' K/V recomputed at the next deeper step (torch)"}
    for policy, about in words.items():
        backend = ExitWithoutTwinsBackend(model, river, policy, balanced)
        methods[f"{policy}:balanced"] = Method(Generator(backend, tok, eos), EXITS, about, backend, balanced, ref)
    return methods
