"""``river-export``: compile a decoder into a River graph (similarity gates + exit rivers), and
optionally a Triton model repository for it.

This module sits above the pipeline (models -> export -> compiler -> runtime): it is the one place
that calls all of them, so no layer imports a later one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from river.compiler.river import twins
from river.compiler.river.manifest import SEGMENTS_DIR, TWIN_FORMATS
from river.compiler.river.spec import PRECISIONS
from river.atomic import atomic_dir, require_empty, temp_dir
from river.errors import RiverError, run_command
from river.models.registry import DEFAULT_MODEL, available_models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="river-export",
        description="Rewrite a decoder's ONNX decode-step graph into a River graph: a similarity gate after "
        "each gate layer and, behind an ONNX If, an exit river of cheap twins of the remaining layers that "
        "write the same KV cache. The River graph takes the step graph's inputs plus exit_thresholds [G] "
        "(defaults baked in) and returns its outputs plus exit_layer [B].",
        epilog="MODEL may be a step graph (model.onnx, e.g. from `optimum-cli export onnx --task "
        "text-generation-with-past`), or a registered name / .gguf file / Hugging Face directory, which is "
        "exported to a step graph first.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model.onnx, a registered name ({', '.join(available_models())}), a .gguf file or a "
                   f"Hugging Face model directory (default: {DEFAULT_MODEL})")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--gates", help="comma-separated layer indices after which tokens may exit "
                   "(default 'auto': the middle band, layers L/2-1 .. 3L/4-1)")
    p.add_argument("--river", default="int8", choices=list(twins.river_names()),
                   help="twin kind: int8/int4/fp32 = whole-layer twins at that weight precision; attn = "
                   "attention-only twins; kv = K/V projections of the exit state only (default int8); "
                   "kinds registered in river.compiler.river.twins add their own names")
    p.add_argument("--thresholds", help="JSON file: a list of per-gate similarity thresholds, or "
                   '{"gates": [...], "thresholds": [...]} (default: every gate disabled until calibrated)')
    p.add_argument("--block", type=int, default=64, choices=[32, 64, 128], help="quantization block size (default 64)")
    p.add_argument("--calibrate", metavar="PROMPTS", help="calibrate thresholds on these prompts (text file, one "
                   "per line, or a JSON list): writes calibration.json and bakes in the --budget operating point")
    p.add_argument("--budget", help="error budget for --calibrate: safe, balanced, fast, or a "
                   "number (mean damage of exited tokens on calibration data; default balanced)")
    p.add_argument("--metric", choices=["flip", "kl", "kv"],
                   help="damage measure the budget bounds: top-1 flip rate (default), KL, or relative KV error")
    p.add_argument("--twin-format", default="ort", choices=list(TWIN_FORMATS),
                   help="quantized twins as ONNX Runtime operators (MatMulNBits, int8 activations per block, default) or block "
                   "DequantizeLinear (dq, what TensorRT imports)")
    p.add_argument("--river-head", dest="head", default="fp32", choices=list(PRECISIONS),
                   help="precision of the LM head a token that exited runs (tokens that stay run the model's "
                   "own head): int8 is a MatMulNBits head about 3x faster than fp32 on CPU (default fp32)")
    p.add_argument("--flavour", dest="twin_format", choices=list(TWIN_FORMATS), help=argparse.SUPPRESS)  # before 0.2
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for calibration")
    p.add_argument("--triton-repo", type=Path, metavar="REPO",
                   help="also write a Triton Inference Server model repository for the River graph to REPO")
    p.add_argument("--max-length", type=int, help="--triton-repo: KV cache capacity per request (default: model context)")
    p.add_argument("--segmented", action="store_true",
                   help="also write the segmented form (one graph per backbone segment and per river; the runtime "
                   "chains them) to OUT/segments - the fallback where conditionals do not run lazily")
    p.add_argument("--trt", action="store_true",
                   help="also build TensorRT engines (fused chained-If graph and segments, dq twins) into OUT/trt "
                   "with tensorrt, or tensorrt-rtx where tensorrt is missing")
    p.add_argument("--check", action="store_true",
                   help="compare ONNX Runtime on the River graph with our runtime (and the segments / engines "
                   "written) through Polygraphy; exit 1 on a mismatch")
    p.add_argument("--step-only", action="store_true", help="only export the plain decode-step graph (no River rewrite)")
    p.add_argument("--draft-exit", type=int, default=-1,
                   help="verify mode's draft graph (draft.onnx): backbone layers up to this one, 8-bit twins after "
                   "it and for the head (default -1: every layer a twin)")
    p.add_argument("--no-draft", action="store_true", help="do not write draft.onnx")
    return p


def _river_options(args) -> dict:
    return dict(gates=args.gates, river=args.river, thresholds=args.thresholds, block=args.block,
                twin_format=args.twin_format, calibrate=args.calibrate, budget=args.budget, metric=args.metric,
                threads=args.threads, draft_exit=None if args.no_draft else args.draft_exit, head=args.head)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        path, failed = _export(args)
        print(path)
        return 1 if failed else 0

    return run_command("river-export", body, args.output)


def _export(args) -> tuple[Path, bool]:
    """(the graph written, whether the parity check failed). One invocation is all or nothing."""
    from river.compiler.compile import river_spec
    from river.export.onnx_export import export_model

    if args.step_only:
        if args.model.endswith(".onnx"):
            raise RiverError("--step-only exports a model; the input is already an ONNX graph")
        if args.triton_repo is not None:
            raise RiverError("--triton-repo serves a River graph; drop --step-only")
        return export_model(_load(args.model), args.output), False
    require_empty(args.output)
    if args.triton_repo is not None:
        require_empty(args.triton_repo, "repository folder")
    if args.model.endswith(".onnx"):
        return _river(args, Path(args.model))
    loaded = _load(args.model)
    river_spec(loaded.config.num_layers, **_river_options(args))  # bad options fail before the export
    with temp_dir(args.output.parent, "step") as tmp:
        step = export_model(loaded, tmp / "step")
        del loaded
        return _river(args, step, model_name=args.model)


def _load(model: str):
    from river.models.registry import load_model

    print(f"[river] loading {model} ...", file=sys.stderr, flush=True)
    loaded = load_model(model)
    print(f"[river] exporting {loaded.name} ({loaded.config.num_layers} layers) to a step graph ...",
          file=sys.stderr, flush=True)
    return loaded


def _river(args, step: Path, model_name: str | None = None) -> tuple[Path, bool]:
    """The River folder, its extras and the Triton repository, built in temporary folders: if any part
    fails (or the run is interrupted) nothing of this invocation remains. A failed --check is a result,
    not a failure: the output stays for inspection and the exit code is 1."""
    from river.compiler.compile import compile_river

    repo_written = False
    try:
        with atomic_dir(args.output) as out:
            compile_river(step, out, model_name=model_name, **_river_options(args))
            failed = _extras(args, step, out)
            if args.triton_repo is not None:
                from river.runtime.triton.repository import write_triton_repo

                print(f"[river] writing the Triton model repository {args.triton_repo} ...", file=sys.stderr, flush=True)
                print(write_triton_repo(out, args.triton_repo, max_length=args.max_length, threads=args.threads))
                repo_written = True
    except BaseException:
        if repo_written:  # the River folder could not be renamed into place after the repository was
            shutil.rmtree(args.triton_repo, ignore_errors=True)
        raise
    return args.output / "model.onnx", failed


def _extras(args, step: Path, river_dir: Path) -> bool:
    """--segmented, --trt, --check (they need the step graph, so they run before it is cleaned up).
    Returns True when the parity check failed."""
    segments = engines = None
    # the Triton model batches many requests, and rows of a batch exit at their own gates only in the
    # segmented form: a repository always carries it
    args.segmented = args.segmented or args.triton_repo is not None
    if args.segmented or args.trt:
        from river.compiler.river.spec import RiverSpec

        spec = RiverSpec.from_manifest(river_dir)
    if args.segmented:
        from river.compiler.river.segments import write_segments

        print("[river] writing the segmented form ...", file=sys.stderr, flush=True)
        segments = write_segments(step, spec, river_dir / SEGMENTS_DIR)
    if args.trt:
        from river.compiler.tensorrt.engines import compile_trt

        print("[river] building TensorRT engines ...", file=sys.stderr, flush=True)
        report = compile_trt(step, spec, river_dir, log=sys.stderr)
        engines = report.folder
    if args.check:
        from river.runtime.parity import check_parity

        report = check_parity(river_dir / "model.onnx", segments=segments, engines=engines)
        for line in report.lines():
            print(line, file=sys.stderr)
        return not report.passed
    return False


if __name__ == "__main__":
    sys.exit(main())
