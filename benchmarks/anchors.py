"""Anchors: our runtime against the engines users run instead, in one process, on the same machine.

Every engine decodes the same prompts (our tokenizer's ids, chat template applied), interleaved per
prompt (machine noise hits every engine alike), greedy, EOS ignored, exactly ``--tokens`` new tokens
each, after one untimed warm-up. Engines:

- ours: full depth (fp32 arithmetic, ONNX Runtime; a GGUF's Q4_1 weights run with River's exact kernel
  when its ops are built, and as fp32 matrices in a second row), verify mode (draft graph; output = the full model's) with
  its default adaptive k and with k=4 fixed, and, with ``--river DIR`` (a river-export folder), each of its operating points;
- onnxruntime-genai (0.11.4), fp32 and int4 (accuracy level 4), its own builder run on a Hugging
  Face copy of the model's weights (``models/hf_dir.save_hf_dir``);
- llama.cpp through llama-cpp-python (0.3.36) on the GGUF itself, its native quantization.

Per engine: decode tok/s (decode tokens / decode seconds summed over the prompts; decode = every
token after the first, whose time is prefill), its ratio to ours full fp32, and greedy agreement with
ours full fp32 (mean prefix until the first divergence, and overall token agreement). An engine that
is not installed (or does not apply to the model) is skipped with a line saying so; none of them is
a dependency of the project (llama-cpp-python builds from source: ~17 minutes on 2 cores).

    python benchmarks/anchors.py --model smollm2-135m --threads 2 --prompts 6 --tokens 64 \\
        [--river out/river] [--json anchors.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REFERENCE = "ours full (fp32)"


@dataclass
class Engine:
    """``run(prompt_ids, n) -> (decode_seconds, tokens)``: n greedy tokens, EOS ignored."""

    name: str
    run: Callable[[list[int], int], tuple[float, list[int]]]
    about: str
    seconds: float = 0.0
    decode_tokens: int = 0
    tokens: list[list[int]] = field(default_factory=list)

    def record(self, seconds: float, tokens: list[int], n: int) -> None:
        if len(tokens) != n:
            raise RuntimeError(f"{self.name} generated {len(tokens)} tokens, not {n}")
        self.seconds += seconds
        self.decode_tokens += n - 1
        self.tokens.append(tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.seconds


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Greedy agreement over prompts: mean prefix until the first divergence, overall token agreement."""
    prefixes, same, total = [], 0, 0
    for a, b in zip(ours, theirs):
        n = min(len(a), len(b))
        prefixes.append(next((i for i in range(n) if a[i] != b[i]), n))
        same += sum(a[i] == b[i] for i in range(n))
        total += max(len(a), len(b))
    return {"prefix_mean": sum(prefixes) / len(prefixes), "overall": same / total, "identical": all(
        p == max(len(a), len(b)) for p, a, b in zip(prefixes, ours, theirs))}


# --- ours ------------------------------------------------------------------------------------------
def generator_runner(gen, thresholds=None, recall=None):
    """Our generate(): decode seconds = its wall time less its prefill step. ``thresholds`` and
    ``recall`` (a margin): set on the backend before each run (engines may share one backend)."""
    from river.runtime.generate import GenerationConfig

    def run(ids, n):
        if thresholds is not None:
            gen.backend.set_thresholds(thresholds)
        if recall is not None:
            gen.backend.set_recall(recall)
        t0 = time.perf_counter()
        res = gen.generate(ids, GenerationConfig(max_new_tokens=n, eos_token_ids=[]))
        return time.perf_counter() - t0 - res.prefill_seconds, res.token_ids
    return run


def our_engines(full, model: str, threads: int, river: Path | None) -> list[Engine]:
    """``full``: our full-depth generator (the reference); verify mode and River points beside it."""
    from river.runtime.loading import open_generator, open_verifier

    portable = open_generator(model, threads=threads, backend="ort", lowering="portable")
    engines = [Engine(REFERENCE, generator_runner(full),
                      f"step graph, ONNX Runtime, shared KV buffers ({full.backend.lowering} lowering)"),
               Engine("ours full (fp32, portable graph)", generator_runner(portable),
                      "the same step graph without the ONNX Runtime lowering (river-generate --lowering portable)"),
               Engine("ours verify (adaptive k)", generator_runner(open_verifier(model, threads=threads)),
                      "river-generate --mode verify, its default: the draft graph drafts k tokens (adaptive, "
                      "from 4), the full model verifies"),
               Engine("ours verify (k=4 fixed)", generator_runner(open_verifier(model, threads=threads, k=4,
                                                                               adaptive=False)),
                      "river-generate --mode verify --no-adaptive"),
               Engine("ours full (fp32 matrices)", generator_runner(open_generator(model, threads=threads,
                                                                                  backend="ort", lowering="ort-fp32")),
                      "river-generate --lowering ort-fp32: as ours full, but a GGUF's Q4_1 weights run as fp32 "
                      "matrices instead of with River's exact Q4_1 kernel"),
               Engine("ours int8 activations (lossy)", generator_runner(open_generator(model, threads=threads,
                                                                                      backend="ort", lowering="ort-int8")),
                      "river-generate --lowering ort-int8: a GGUF's Q4_1 weights by activations rounded to int8 "
                      "per block of 32 (llama.cpp's arithmetic; River's twins run the same op)")]
    if river is not None:
        from river.compiler.river.manifest import SEGMENTS_DIR, RiverManifest

        gen = open_generator(str(river), threads=threads, backend="ort")  # the fused River graph, lowered
        manifest = RiverManifest.load(river)
        for op, thr in (manifest.operating_points or {}).items():
            engines.append(Engine(f"ours River {op}", generator_runner(gen, thr, 0.0), f"{river}, operating point {op}"))
        if (Path(river) / SEGMENTS_DIR).is_dir() and manifest.recall_points:  # recall runs on the segments
            seg = open_generator(str(river), threads=threads, backend="segmented")
            for name, point in manifest.recall_points.items():
                engines.append(Engine(f"ours River {name}", generator_runner(seg, point["thresholds"], point["recall"]),
                                      f"{river} segments, recall point {name} (margin {point['recall']:.3g})"))
        else:
            print(f"[anchors] no recall points in {river} (river-export --calibrate ... --segmented writes them)",
                  file=sys.stderr)
    return engines


# --- onnxruntime-genai -----------------------------------------------------------------------------
def build_genai(loaded, work: Path, precision: str, threads: int, log=None) -> Path | None:
    """onnxruntime-genai's builder (CPU) on a HF copy of the weights; None (with a line) if it fails."""
    log = log or sys.stderr
    from river.models.hf_dir import save_hf_dir

    out = work / f"genai-{precision}"
    if not (out / "genai_config.json").is_file():
        hf_dir = work / "hf"
        if not (hf_dir / "config.json").is_file():
            save_hf_dir(loaded.model, hf_dir, loaded.tokenizer)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")]
        if precision == "int4":
            cmd += ["--extra_options", "int4_accuracy_level=4"]
        print("[anchors] building:", " ".join(cmd), file=log, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[anchors] skipping onnxruntime-genai {precision}: its builder failed:\n{proc.stderr[-2000:]}",
                  file=log)
            return None
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    session = cfg["model"]["decoder"].setdefault("session_options", {})
    session.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def genai_runner(model):
    import onnxruntime_genai as og

    def run(ids, n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens([ids])
        gen.generate_next_token()  # prefill + the first token
        tokens = [int(gen.get_next_tokens()[0])]
        t0 = time.perf_counter()
        while len(tokens) < n:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        return time.perf_counter() - t0, tokens
    return run


def genai_engines(loaded, work: Path, threads: int, log=None) -> list[Engine]:
    log = log or sys.stderr
    try:
        import onnxruntime_genai as og
    except ImportError:
        print("[anchors] skipping onnxruntime-genai (fp32, int4): not installed "
              "(pip install onnxruntime-genai==0.11.4; benchmark-only)", file=log)
        return []
    engines = []
    for precision, about in (("fp32", "its builder, fp32"), ("int4", "its builder, int4, accuracy level 4")):
        folder = build_genai(loaded, work, precision, threads, log)
        if folder is not None:
            engines.append(Engine(f"onnxruntime-genai {og.__version__} {precision}", genai_runner(og.Model(str(folder))),
                                  about))
    return engines


# --- llama.cpp -------------------------------------------------------------------------------------
def gguf_of(model: str) -> Path | None:
    """The GGUF file llama.cpp runs: the model itself, or the default model's shipped file."""
    if model.endswith(".gguf"):
        return Path(model)
    if model == "smollm2-135m":
        from river.models.registry import smollm2_gguf_path

        return smollm2_gguf_path()
    return None


def llama_cpp_runner(llm):
    def run(ids, n):
        it = llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        tokens = [int(next(it))]  # prefill + the first token
        t0 = time.perf_counter()
        while len(tokens) < n:  # generate() never stops at EOS by itself
            tokens.append(int(next(it)))
        seconds = time.perf_counter() - t0
        it.close()
        return seconds, tokens
    return run


PROBE = """import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)
it = llm.generate([1, 2, 3], top_k=1, temp=0.0)
next(it); next(it)
"""


def llama_cpp_probe(path: Path, threads: int) -> str | None:
    """Why llama.cpp cannot run here, or None: two tokens in a child process first, because a build
    made for another CPU dies of SIGILL (this VM's CPU changes between sessions), which no
    exception in this process could catch."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path), str(threads)], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    if proc.returncode == -signal.SIGILL:
        return ("its build uses an instruction this CPU lacks (illegal instruction); rebuild it for this machine: "
                "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON' pip install --force-reinstall --no-deps "
                "--no-cache-dir llama-cpp-python==0.3.36")
    return f"a two-token test run failed (exit status {proc.returncode}): {proc.stderr.strip()[-300:]}"


def llama_cpp_engines(model: str, threads: int, context: int, log=None) -> list[Engine]:
    log = log or sys.stderr
    path = gguf_of(model)
    if path is None:
        print(f"[anchors] skipping llama.cpp: it runs a GGUF file and {model} is not one", file=log)
        return []
    try:
        import llama_cpp
    except ImportError as exc:  # not installed, or installed without its dependencies (--no-deps)
        print(f"[anchors] skipping llama.cpp: llama-cpp-python does not import ({exc}): pip install "
              "llama-cpp-python==0.3.36 (builds from source, ~17 min on 2 cores; benchmark-only)", file=log)
        return []
    problem = llama_cpp_probe(path, threads)
    if problem:
        print(f"[anchors] skipping llama.cpp: {problem}", file=log)
        return []
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    return [Engine(f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", llama_cpp_runner(llm),
                   f"the GGUF as shipped ({path.name})")]


# --- the run ---------------------------------------------------------------------------------------
ENGINE_KINDS = ("ours", "genai", "llama.cpp")


def measure(engines: list[Engine], prompts: list[list[int]], n: int, log=None) -> None:
    """Warm-up, then every prompt through every engine in turn."""
    log = log or sys.stderr
    for e in engines:
        e.run(prompts[0][:8], 4)
    for i, ids in enumerate(prompts):
        for e in engines:
            e.record(*e.run(ids, n), n)
        print(f"[anchors] prompt {i + 1}/{len(prompts)} done", file=log, flush=True)


def table(engines: list[Engine]) -> list[dict]:
    ref = next(e for e in engines if e.name == REFERENCE)
    return [{"engine": e.name, "about": e.about, "decode_tokens": e.decode_tokens, "decode_seconds": e.seconds,
             "decode_tokens_per_s": e.tokens_per_s, "ratio_to_ours_full": e.tokens_per_s / ref.tokens_per_s,
             "greedy": agreement(ref.tokens, e.tokens), "tokens": e.tokens} for e in engines]


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [f"model {settings['model']}, {settings['threads']} threads, {settings['prompts']} prompts x "
             f"{settings['tokens']} new tokens (greedy, EOS ignored), {settings['machine']}", "",
             "| engine | decode tok/s | vs ours full | greedy prefix (mean) | greedy agreement | identical |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['decode_tokens_per_s']:.1f} | {r['ratio_to_ours_full']:.2f}x | "
              f"{r['greedy']['prefix_mean']:.1f} | {r['greedy']['overall']:.1%} | {'yes' if r['greedy']['identical'] else 'no'} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None, shared_pool: bool = False) -> int:
    """``shared_pool``: the process is ours (run as a script): one ORT thread pool for all sessions."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name, .gguf or HF directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--river", type=Path, help="a river-export folder: its operating points run too")
    p.add_argument("--engines", default=",".join(ENGINE_KINDS), help=f"subset of {','.join(ENGINE_KINDS)}")
    p.add_argument("--work-dir", type=Path, default=Path("bench-out/anchors"), help="built engine models cached here")
    p.add_argument("--json", type=Path, help="write every figure, setting and token here")
    args = p.parse_args(argv)
    kinds = set(args.engines.split(","))
    if not kinds <= set(ENGINE_KINDS) or "ours" not in kinds:
        p.error(f"--engines: a subset of {','.join(ENGINE_KINDS)} that includes ours (the reference)")

    if shared_pool:  # verify mode alternates two sessions
        from river.compiler.ort_session import use_shared_thread_pool

        use_shared_thread_pool(args.threads)
    from river.models import load_model
    from river.runtime.bench.eval_data import EVAL_PROMPTS
    from river.runtime.loading import open_generator

    full = open_generator(args.model, threads=args.threads)
    engines = our_engines(full, args.model, args.threads, args.river)
    if "genai" in kinds:
        engines += genai_engines(load_model(args.model), args.work_dir / Path(args.model).stem, args.threads)
    if "llama.cpp" in kinds:
        engines += llama_cpp_engines(args.model, args.threads, context=4096)
    prompts = [full.encode(text) for text in EVAL_PROMPTS[:args.prompts]]  # our tokenizer, chat template
    measure(engines, prompts, args.tokens)
    settings = {"model": args.model, "threads": args.threads, "prompts": len(prompts), "tokens": args.tokens,
                "machine": f"{platform.machine()} {platform.processor() or ''} ({platform.node()}), {os.cpu_count()} cores",
                "python": platform.python_version(), "river": str(args.river) if args.river else None}
    rows = table(engines)
    print(markdown(rows, settings))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "engines": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(shared_pool=True))
