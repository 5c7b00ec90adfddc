"""``river-export``: export a model to a decode-step ONNX graph (the River rewrite builds on it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from river.errors import RiverError
from river.models.registry import DEFAULT_MODEL, available_models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="river-export",
        description="Export a decoder to an ONNX decode-step graph with KV-cache inputs/outputs "
        "(Hugging Face Optimum's names: input_ids, attention_mask, position_ids, past_key_values.*, "
        "logits, present.*), plus its tokenizer and a river_model.json.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"registered name ({', '.join(available_models())}), a .gguf file or a Hugging Face "
                   f"model directory (default: {DEFAULT_MODEL})")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.model.endswith(".onnx"):
            raise RiverError("rewriting an existing ONNX step graph into a River graph is not implemented yet; "
                             "give a model name, .gguf file or HF directory to export one")
        from river.export.onnx_export import export_model
        from river.models.registry import load_model

        print(f"[river] loading {args.model} ...", file=sys.stderr, flush=True)
        loaded = load_model(args.model)
        print(f"[river] exporting {loaded.name} ({loaded.config.num_layers} layers) ...", file=sys.stderr, flush=True)
        path = export_model(loaded, args.output, opset=args.opset)
    except (RiverError, FileExistsError, PermissionError) as exc:
        print(f"river-export: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
