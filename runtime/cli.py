"""``river-generate``: stream a model's answer to a prompt and report decode speed."""

from __future__ import annotations

import argparse
import sys

from river.compiler import ort_ops
from river.errors import RiverError, run_command
from river.models.cache import cache_root
from river.models.registry import DEFAULT_MODEL, available_models
from river.runtime.loading import BACKENDS, LOWERINGS
from river.runtime.speculative import ADAPTIVE_K, DRAFT_K, K_MAX


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="river-generate",
        description="Generate text with a decoder over shared KV buffers. Backends: ONNX Runtime (default), the "
        "segmented River (no If nodes), TensorRT engines (GPU), and the torch reference. A model name, .gguf or "
        "HF directory is exported to ONNX once and cached (RIVER_CACHE_DIR, default ~/.cache/river-llm).",
    )
    p.add_argument("prompt", nargs="?", help="the prompt (wrapped in the model's chat template unless --raw)")
    p.add_argument("--prompts", metavar="FILE",
                   help="answer every prompt of FILE (one per line, or a JSON list) at once, batched by the "
                   "continuous-batching scheduler (each answer equals the one generated alone); prints the answers "
                   "in order and the aggregate decode speed")
    p.add_argument("--max-batch", type=int, default=8, help="--prompts: requests batched at once (default 8)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registered name ({', '.join(available_models())}), a .gguf file, a Hugging Face "
                   f"model directory, or an exported step graph model.onnx (default: {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=["auto", *BACKENDS], default="auto",
                   help="ort = ONNX Runtime on the step/River graph; segmented = the segments folder (river-export "
                   "--segmented); tensorrt = the engines folder (river-export --trt; needs a GPU); torch = the torch "
                   "reference (needs the torch weights: a model name, .gguf, HF directory or a river-export folder "
                   "made from one). auto (default): segmented for a segments folder, else ort")
    p.add_argument("--lowering", choices=LOWERINGS, default="ort",
                   help="ONNX Runtime backend: 'ort' (default) runs the graph lowered to ONNX Runtime's fused "
                   "kernels (GroupQueryAttention over the shared KV buffers) where the lowering applies, and "
                   "weights that lie on a 4-bit grid (a GGUF's Q4_1 tensors) with River's own exact kernel over "
                   "that form (when its library is built: ./setup.sh); 'ort-fp32' runs those weights as fp32 "
                   "matrices; 'ort-grid' with ONNX Runtime's MatMulNBits (logits move by up to 1e-5 of their "
                   "largest value); 'ort-int8' (lossy, not the model's output) runs them with River's kernel by "
                   "activations rounded to int8 per block of 32, as llama.cpp does; 'portable' runs the plain graph")
    p.add_argument("--tokenizer", help="tokenizer folder, for a model.onnx without tokenizer files beside it")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--max-length", type=int, help="cache capacity: prompt + new tokens (default: model context)")
    p.add_argument("--thresholds", help="River graphs: per-gate exit thresholds, comma-separated or a JSON "
                   "file (default: the graph's baked-in ones); 'off' disables every gate")
    p.add_argument("--recall", metavar="MARGIN|POINT",
                   help="exit mode, segmented River: a token whose river's top two tokens are closer than MARGIN in "
                   "probability goes back to the backbone after its gate (lossy, much closer to the full model); "
                   "or a calibrated recall point (e.g. balanced-recall: its gate thresholds and margin). Default: off")
    p.add_argument("--mode", choices=["exit", "verify"], default="exit",
                   help="exit = tokens leave at their gate (River graphs; the paper); verify = lossless: a draft "
                   "proposes --draft-k tokens over the shared KV, one backbone step verifies them (output = the "
                   "full model's; any step graph)")
    p.add_argument("--draft", choices=["graph", "river"], default="graph",
                   help="verify mode: graph = the draft graph (draft.onnx beside the model, else derived from the "
                   "step graph: every weight GEMM after --draft-exit as an 8-bit twin); river = the River graph's own "
                   "exit at --draft-gate")
    p.add_argument("--draft-exit", type=int, default=None,
                   help="verify mode, --draft graph: last backbone layer of the draft (-1 = every layer a twin; "
                   "default: the shipped draft.onnx, else -1)")
    p.add_argument("--draft-gate", type=int, default=0, help="verify mode, --draft river: index of the gate the draft exits at")
    p.add_argument("--draft-k", type=int, default=DRAFT_K,
                   help=f"verify mode: tokens drafted per round; with adaptive k, in the first round (default {DRAFT_K})")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=ADAPTIVE_K,
                   help=f"verify mode: adapt k every round, up to {K_MAX} (grow it when every draft was accepted, "
                   "shrink it when fewer than half were) and draft nothing while drafting costs more per token "
                   "than a plain backbone step (measured as it runs; the output is the same); --no-adaptive "
                   "keeps k fixed "
                   f"(default: {'adaptive' if ADAPTIVE_K else 'fixed'}, measured faster)")
    p.add_argument("--stats", action="store_true", help="print per-step statistics to stderr")
    return p


def main(argv: list[str] | None = None, shared_pool: bool = False) -> int:
    """``shared_pool``: the process is ours (the installed command), so every ONNX Runtime session
    shares one thread pool (verify mode alternates two sessions); callers in a bigger process keep
    per-session pools."""
    args = build_parser().parse_args(argv)
    return run_command("river-generate", lambda: _generate(args, shared_pool), cache_root(),
                       user_errors=(RiverError, ValueError), on_interrupt=lambda: print(flush=True))  # end the text's line


def _generate(args, shared_pool: bool) -> int:
    from river.compiler.ort_session import check_threads, use_shared_thread_pool
    from river.runtime.generate import GenerationConfig
    from river.runtime.loading import open_generator, open_verifier

    check_threads(args.threads)  # options first: a model name may be exported before anything runs
    if (args.prompt is None) == (args.prompts is None):
        raise RiverError("give a prompt or --prompts FILE (one of them)")
    if args.max_batch < 1:
        raise RiverError(f"--max-batch must be >= 1, not {args.max_batch}")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, stop=args.stop)
    if args.prompts is not None:
        from river.compiler.calibrate import read_prompts

        prompts = read_prompts(args.prompts, "--prompts")  # a bad file fails before any model is loaded
    if args.recall is not None and args.mode != "exit":
        raise RiverError("--recall applies to exit mode (verify mode is lossless already)")
    recall = _recall(args)  # a bad value fails before any model is loaded
    if shared_pool:
        use_shared_thread_pool(args.threads)
    if args.prompts is not None:
        return _generate_batch(args, prompts, cfg, recall)
    if args.mode == "verify":
        gen = open_verifier(args.model, threads=args.threads, tokenizer=args.tokenizer, max_length=args.max_length,
                            draft=args.draft, draft_exit=args.draft_exit, draft_gate=args.draft_gate,
                            k=args.draft_k, adaptive=args.adaptive, backend=args.backend, lowering=args.lowering)
    else:
        gen = open_generator(args.model, threads=args.threads, tokenizer=args.tokenizer,
                             max_length=args.max_length, thresholds=args.thresholds, backend=args.backend,
                             lowering=args.lowering)
        thresholds, margin = recall
        if thresholds is not None:
            gen.backend.set_thresholds(thresholds)
        gen.backend.set_recall(margin)
    note = getattr(gen.backend, "twins_note", None)
    if note:
        print(f"[river] {note}", file=sys.stderr)
    reason = getattr(gen.backend, "lowering_reason", "")
    if args.lowering != "portable" and getattr(gen.backend, "lowering", None) == "portable" and reason:
        print(f"[river] running the portable graph (the ONNX Runtime lowering does not apply: {reason})",
              file=sys.stderr)
    grid_form, on_grid = getattr(gen.backend, "grid_form", ""), getattr(gen.backend, "grid_weights", 0)
    if args.lowering in ("ort", "ort-int8") and getattr(gen.backend, "lowering", None) == "ort_fused" and on_grid \
            and grid_form == "fp32":
        print(f"[river] {on_grid} weight products of this model lie on a 4-bit grid (a GGUF's Q4_1) "
              f"and run in fp32: {ort_ops.status()[1]}; with River's ops they run exactly from that form "
              "(README: River's Q4_1 kernel)", file=sys.stderr)
    if grid_form == "river-int8" and on_grid:
        print(f"[river] --lowering ort-int8: {on_grid} weight products by activations rounded to int8 (lossy: the "
              "text is not the model's own; --lowering ort runs them exactly)", file=sys.stderr)
    result = gen.generate(args.prompt, cfg, on_token=lambda _t, piece: print(piece, end="", flush=True),
                          chat=not args.raw)
    print()
    if args.stats:
        for s in result.steps:
            exit_info = "" if s.exit_layer is None else f"  exit after layer {s.exit_layer}"
            print(f"step {s.index:4d} {s.phase:7s} token {s.token_id:6d} {s.seconds * 1e3:8.2f} ms{exit_info}",
                  file=sys.stderr)
        if result.exit_layers:
            print(f"[river] exit layers (layers run per decode step): {result.exit_histogram}", file=sys.stderr)
        if gen.backend.recall_margin:
            print(f"[river] recall margin {gen.backend.recall_margin:g}: {sum(s.recalled for s in result.steps)} "
                  "steps went back to the backbone", file=sys.stderr)
    stats = gen.stats if args.mode == "verify" else None
    if stats is not None and stats.rounds:
        print(f"[river] verify: {stats.rounds} rounds, acceptance {stats.acceptance_rate:.1%}, "
              f"mean accepted {stats.mean_accepted:.2f} per round "
              f"({'adaptive k from' if gen.adaptive else 'k ='} {gen.k})", file=sys.stderr)
    if stats is not None and stats.plain_rounds:
        print(f"[river] verify: {stats.plain_rounds} tokens without drafts (drafting cost more per token than "
              "a plain step here)", file=sys.stderr)
    n = len(result.token_ids)
    print(f"[river] {n} tokens ({result.finish_reason}); prompt {len(result.prompt_ids)} tokens in "
          f"{result.prefill_seconds * 1e3:.0f} ms; decode {result.decode_tokens_per_s:.1f} tokens/s",
          file=sys.stderr)
    return 0


def _recall(args) -> tuple[list[float] | None, float]:
    """--recall: (a recall point's gate thresholds or None, the margin)."""
    from river.runtime.loading import parse_recall

    thresholds, margin = parse_recall(args.recall, args.model)
    if thresholds is not None and args.thresholds is not None:
        raise RiverError(f"--recall {args.recall} sets the gate thresholds: drop --thresholds, or give --recall a margin")
    return thresholds, margin


def _generate_batch(args, prompts: list[str], cfg, recall: tuple[list[float] | None, float]) -> int:
    """--prompts: every prompt through the scheduler at once (runtime/batching)."""
    import time

    from river.models.tokenizer import encode_prompt
    from river.runtime.batching.scheduler import BatchRequest
    from river.runtime.loading import open_scheduler, parse_thresholds

    if args.backend not in ("auto", "segmented", "ort"):
        raise RiverError("--prompts runs on ONNX Runtime (the segmented River where the folder has one)")
    sched = open_scheduler(args.model, threads=args.threads, tokenizer=args.tokenizer, max_length=args.max_length,
                           max_rows=args.max_batch, max_queue=len(prompts))
    gates = sched.decoder.river is not None
    mode = "verify" if args.mode == "verify" else ("exit" if gates else "full")
    thresholds = parse_thresholds(args.thresholds, sched.decoder) if mode == "exit" else None
    point, margin = recall
    thresholds = point or thresholds
    t0 = time.perf_counter()
    tickets = [sched.submit(BatchRequest(encode_prompt(sched.tokenizer, p, not args.raw), cfg, mode=mode,
                                         thresholds=thresholds, k=args.draft_k, adaptive=args.adaptive,
                                         recall=margin))
               for p in prompts]
    sched.run_until_idle()
    seconds = time.perf_counter() - t0
    tokens = 0
    for i, ticket in enumerate(tickets):
        result = ticket.wait()
        tokens += len(result.token_ids)
        print(f"### {i + 1}: {prompts[i]}")
        print(result.text)
        print(f"[river] {i + 1}: {len(result.token_ids)} tokens ({result.finish_reason})", file=sys.stderr)
    m = sched.metrics()
    print(f"[river] {len(prompts)} prompts, mode {mode}, batches of up to {args.max_batch}: {tokens} tokens in "
          f"{seconds:.1f} s ({tokens / seconds:.1f} tokens/s, prefill included; peak batch {m['peak_rows']})",
          file=sys.stderr)
    if mode == "verify":
        acceptance = "" if m["acceptance"] is None else f" ({m['acceptance']:.1%} accepted)"
        print(f"[river] verify: {m['drafted']} tokens drafted{acceptance}; {m['verify_at_full_depth']} tokens at full "
              "depth, where the scheduler measured drafting not to pay at that batch size", file=sys.stderr)
    return 0


def console() -> int:
    """The ``river-generate`` command."""
    return main(shared_pool=True)


if __name__ == "__main__":
    sys.exit(console())
