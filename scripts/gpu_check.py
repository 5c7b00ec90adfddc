#!/usr/bin/env python
"""GPU check: does River save time on this machine, path by path?

Per decode step it times every conditional path (forced exit at each gate, and no exit) against the
model without exits, in one run, on the same prompt, and prints ratios (DESIGN 9: speed is always a
ratio measured in one run). Sections, each run where it can:

1. TensorRT (needs ``tensorrt``/``tensorrt_rtx`` and a CUDA GPU): builds the plain step engine, the
   fused (chained) River engine and the segment engines (contract form + static-capacity shared-KV
   form), runs them through ``TrtBackend`` and times each path. Fused vs segmented per path tells
   whether TensorRT's conditionals run lazily (a lazy fused exit costs what the segmented one does).
   Where TensorRT is installed without a GPU (TensorRT-RTX here) it still builds and reports times.
2. Torch reference: ``TorchRiver`` on ``--device`` vs the full model (twins are dequantized fp32
   weights in torch, so ``full`` twins cost what the layers cost; ``attn``/``kv`` twins show the skip).
3. ONNX Runtime on the CPU: fused River graph vs segmented, per path.

Smoke test on a CPU machine: ``python scripts/gpu_check.py --device cpu --model tiny-random``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from river.compiler.river.manifest import DISABLED, FORCED_EXIT



def log(msg: str) -> None:
    print(msg, flush=True)


def patterns(num_gates: int) -> list[tuple[str, list[float]]]:
    out = []
    for k in range(num_gates):
        p = [DISABLED] * num_gates
        p[k] = FORCED_EXIT
        out.append((f"exit@gate{k}", p))
    out.append(("no-exit", [DISABLED] * num_gates))
    return out


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times) if times else float("nan")


def print_table(title: str, rows: list[tuple[str, float]], base: float, base_name: str) -> list[dict]:
    log(f"\n== {title}")
    log(f"   {'path':28s} {'ms/step':>9s} {'vs ' + base_name:>16s}")
    out = []
    for name, ms in rows:
        ratio = ms / base if base and not np.isnan(base) else float("nan")
        log(f"   {name:28s} {ms:9.3f} {ratio:16.3f}")
        out.append({"path": name, "ms_per_step": ms, "ratio": ratio})
    return out


# --- torch reference ----------------------------------------------------------------------------

def torch_section(loaded, gates, kinds, device: str, steps: int, prompt_len: int, twin_format: str) -> dict:
    import torch

    from river.runtime.torch_reference import TorchRiver

    model = loaded.model.to(device).eval()
    cfg = loaded.config
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)

    def prefix():
        past = [t.to(device) for t in model.empty_past(1)]
        with torch.no_grad():
            out = model(ids, torch.ones(1, prompt_len, dtype=torch.long, device=device),
                        torch.arange(prompt_len, device=device)[None], *past)
        return list(out[1:]), int(out[0][0, -1].argmax())

    def run(step_fn) -> float:
        past, token = prefix()
        times = []
        for i in range(steps):
            pos = prompt_len + i
            tok = torch.tensor([[token]], device=device)
            mask = torch.ones(1, pos + 1, dtype=torch.long, device=device)
            posids = torch.tensor([[pos]], device=device)
            sync()
            t0 = time.perf_counter()
            logits, past = step_fn(tok, mask, posids, past)
            sync()
            times.append(time.perf_counter() - t0)
            token = int(logits[0, -1].argmax())
        return median_ms(times[1:] or times)

    def full(tok, mask, posids, past):
        with torch.no_grad():
            out = model(tok, mask, posids, *past)
        return out[0], list(out[1:])

    base = run(full)
    result = {"device": device, "full_ms": base, "kinds": {}}
    for kind in kinds:
        from river.compiler.river.spec import RiverSpec

        spec = RiverSpec.from_name(kind, gates)
        river = TorchRiver(model, gates, spec.kind, spec.precision, twin_format=twin_format)
        rows = []
        for name, thr in patterns(len(gates)):
            thr_t = np.asarray(thr, np.float32)

            def step(tok, mask, posids, past, thr_t=thr_t, river=river):
                logits, presents, _ = river.step(tok, mask, posids, past, thr_t)
                return logits, list(presents)

            rows.append((name, run(step)))
        result["kinds"][kind] = print_table(f"torch reference on {device}: River ({kind} twins) vs full model",
                                            [("full model", base)] + rows, base, "full")
    return result


# --- ONNX Runtime (CPU) ---------------------------------------------------------------------------

def ort_section(river_onnx: Path, segments: Path, step_onnx: Path, gates, steps: int, prompt: list[int], threads) -> dict:
    from river.runtime.ort_backend import OrtBackend
    from river.runtime.segmented_backend import SegmentedBackend

    def run(backend, thr) -> float:
        if thr is not None:
            backend.set_thresholds(thr)
        cache = backend.new_cache(len(prompt) + steps + 1)
        logits = backend.prefill(np.asarray([prompt], np.int64), cache)
        cache.length = len(prompt)
        token = int(logits[0, -1].argmax())
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = backend.decode(np.asarray([[token]], np.int64), cache)
            times.append(time.perf_counter() - t0)
            cache.length += 1
            token = int(logits[0, -1].argmax())
        return median_ms(times[1:] or times)

    plain = OrtBackend(step_onnx, threads=threads)
    base = run(plain, None)
    fused, seg = OrtBackend(river_onnx, threads=threads), SegmentedBackend(segments, threads=threads)
    rows = [("plain step graph", base)]
    for name, thr in patterns(len(gates)):
        rows.append((f"fused {name}", run(fused, thr)))
        rows.append((f"segmented {name}", run(seg, thr)))
    return {"rows": print_table("ONNX Runtime (CPU): fused River graph vs segmented, per path", rows, base, "plain")}


# --- TensorRT -------------------------------------------------------------------------------------

def trt_section(step_onnx: Path, spec, work: Path, gates, steps: int, prompt: list[int], capacity: int,
                build: bool) -> dict:
    from river.compiler.tensorrt import package as trt_package
    from river.runtime.parity import trt_can_run

    if trt_package.trt is None:
        log(f"\n== TensorRT: not installed ({trt_package.INSTALL_HINT})")
        return {"skipped": "TensorRT is not installed"}
    if not build:
        log("\n== TensorRT: engine build skipped (--no-trt-build)")
        return {"skipped": "--no-trt-build"}
    from river.compiler.tensorrt.engines import build_river_engines, write_trt_forms

    log(f"\n== TensorRT ({trt_package.TRT_PACKAGE} {trt_package.trt.__version__}): building engines")
    t0 = time.perf_counter()
    shutil.rmtree(work / "trt", ignore_errors=True)  # our own work folder: rebuild from scratch
    forms = write_trt_forms(step_onnx, spec, work / "trt")
    report = build_river_engines(work / "trt" / "engines", step_onnx=step_onnx, fused_onnx=forms["fused"],
                                 segments_dir=forms["segments"], capacity=capacity,
                                 max_seq=max(len(prompt), 1), max_past=capacity)
    for b in report.builds:
        log(f"   built {b.name:14s} {b.form:10s} {b.seconds:7.1f}s {b.plan_bytes / 1e6:8.1f} MB conditionals={b.conditionals}")
    result = {"build_seconds": {f: report.seconds(f) for f in ("step", "fused", "segment", "segment.kv")},
              "total_build_seconds": time.perf_counter() - t0}
    why = trt_can_run()
    if why is not None:
        log(f"   engines not run: {why}")
        result["run_skipped"] = why
        return result
    from river.runtime.trt_backend import TrtBackend

    def run(backend, thr) -> float:
        import torch

        if thr is not None:
            backend.set_thresholds(thr)
        cache = backend.new_cache(min(capacity, len(prompt) + steps + 1))
        logits = backend.prefill(np.asarray([prompt], np.int64), cache)
        cache.length = len(prompt)
        token = int(logits[0, -1].argmax())
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = backend.decode(np.asarray([[token]], np.int64), cache)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cache.length += 1
            token = int(logits[0, -1].argmax())
        return median_ms(times[1:] or times)

    engines = work / "trt" / "engines"
    base = run(TrtBackend(engines, "fused", engine="step"), None)
    fused, seg = TrtBackend(engines, "fused"), TrtBackend(engines, "segmented")
    rows = [("plain step engine", base)]
    for name, thr in patterns(len(gates)):
        rows.append((f"fused {name}", run(fused, thr)))
        rows.append((f"segmented {name}", run(seg, thr)))
    result["rows"] = print_table("TensorRT: fused (conditionals) vs segmented, per path", rows, base, "plain")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda", help="torch device for the reference section (cuda, cpu)")
    p.add_argument("--river", default="int8", help="twin kind for the ONNX/TensorRT sections (int8, int4, fp32, attn, kv)")
    p.add_argument("--torch-kinds", default=None, help="comma list of twin kinds for the torch section "
                   "(default: --river plus attn and kv)")
    p.add_argument("--gates", default="auto")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per path")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--capacity", type=int, default=512, help="static cache length of the in-place TensorRT engines")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-trt-build", action="store_true", help="skip building TensorRT engines")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime section")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = p.parse_args(argv)

    import torch

    from river.compiler.compile import compile_river, parse_gates
    from river.compiler.river.spec import RiverSpec
    from river.compiler.river.segments import write_segments
    from river.compiler.lowering.tensorrt import check_twins_for_trt
    from river.export import export_model
    from river.models import load_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("no CUDA device: use --device cpu")
        return 2
    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = f"{ort.__version__} {ort.get_available_providers()}"
    except Exception as exc:  # noqa: BLE001 - any failure to import torch means no GPU path
        env["onnxruntime"] = f"unavailable: {exc}"
    from river.compiler.tensorrt import package as trt_package

    env["tensorrt"] = f"{trt_package.TRT_PACKAGE} {trt_package.trt.__version__}" if trt_package.trt is not None else "not installed"
    log("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))

    work = args.out or Path(tempfile.mkdtemp(prefix="river-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    gates = parse_gates(args.gates, loaded.config.num_layers)
    log(f"model {loaded.name}: {loaded.config.num_layers} layers, gates after layers {list(gates)}, "
        f"river {args.river}; work folder {work}")
    prompt = list(np.random.default_rng(0).integers(0, loaded.config.vocab_size, args.prompt_len))
    results: dict = {"environment": env, "model": loaded.name, "gates": list(gates), "river": args.river}

    step = work / "step" / "model.onnx"
    if not step.is_file():
        export_model(loaded, work / "step")
    river_dir = work / "river"
    if not (river_dir / "model.onnx").is_file():
        compile_river(step, river_dir, gates=list(gates), river=args.river, log=None)
    spec = RiverSpec.from_name(args.river, gates)
    if not (river_dir / "segments").is_dir():
        write_segments(step, spec, river_dir / "segments")
    log(f"step graph, River graph and segments ready in {time.perf_counter() - t0:.1f}s")

    try:
        check_twins_for_trt(spec.precision, spec.block)
        results["tensorrt"] = trt_section(step, spec, work, gates, args.steps, prompt, args.capacity, not args.no_trt_build)
    except Exception as exc:  # noqa: BLE001 - report and go on: the other sections still say something
        log(f"\n== TensorRT section failed: {exc}")
        results["tensorrt"] = {"error": str(exc)}

    kinds = args.torch_kinds.split(",") if args.torch_kinds else list(dict.fromkeys([args.river, "attn", "kv"]))
    results["torch"] = torch_section(loaded, gates, kinds, args.device, args.steps, args.prompt_len, spec.twin_format)
    if not args.no_ort:
        results["onnxruntime"] = ort_section(river_dir / "model.onnx", river_dir / "segments", step, gates,
                                             args.steps, prompt, args.threads)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    log(f"\ndone in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
