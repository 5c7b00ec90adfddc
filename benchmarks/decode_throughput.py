"""Decode throughput of our full-depth runtime vs transformers ``generate`` and onnxruntime-genai.

One process, one run, same prompts, same thread count, same model and precision (fp32), EOS
suppressed so every engine decodes exactly ``--new-tokens`` tokens per prompt. Reports decode tokens/s
(prefill excluded) and ratios to our runtime. Not a test: run it by hand and read the table.

    python benchmarks/decode_throughput.py --model smollm2-135m --threads 2 --prompts 5 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

def bench_ours(gen, prompt_ids, n):
    from river.runtime.generate import GenerationConfig

    result = gen.generate(prompt_ids, GenerationConfig(max_new_tokens=n, eos_token_ids=[]))
    assert len(result.token_ids) == n
    return result.decode_seconds, n - 1, result.token_ids


def bench_hf(hf, prompt_ids, n):
    import torch

    ids = torch.tensor([prompt_ids])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0), n - 1, out[0, len(prompt_ids):].tolist()


def build_genai_model(loaded, out: Path, threads: int) -> Path | None:
    """onnxruntime-genai's own builder (fp32, CPU) over the same weights, via a HF directory."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("onnxruntime-genai is not installed: skipping it", file=sys.stderr)
        return None
    from river.models.hf_dir import save_hf_dir

    if not (out / "genai_config.json").is_file():
        hf_dir = out.parent / (out.name + "-hf")
        save_hf_dir(loaded.model, hf_dir, loaded.tokenizer)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "genai-cache")]
        print("building onnxruntime-genai model:", " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            print("onnxruntime-genai builder failed: skipping it", file=sys.stderr)
            return None
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    session = cfg["model"]["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = threads
    session["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def bench_genai(model, prompt_ids, n):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, min_length=len(prompt_ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([prompt_ids])
    gen.generate_next_token()  # prefill + first token
    tokens = [int(gen.get_next_tokens()[0])]
    t0 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return time.perf_counter() - t0, len(tokens) - 1, tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--work-dir", type=Path, default=Path("bench-out"))
    p.add_argument("--json", type=Path, help="write every figure and setting here")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from river.models import load_model
    from river.runtime.bench.eval_data import EVAL_PROMPTS
    from river.runtime.loading import open_generator

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    gen = open_generator(args.model, threads=args.threads)
    engines = {"river (ours, ORT fp32)": lambda ids: bench_ours(gen, ids, args.new_tokens)}
    if args.model == "smollm2-135m":
        from river.models.registry import smollm2_gguf_path

        path = smollm2_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    else:
        hf = None
    if hf is not None:
        engines["transformers generate (torch fp32)"] = lambda ids: bench_hf(hf, ids, args.new_tokens)
    genai_dir = build_genai_model(loaded, args.work_dir / f"genai-{args.model}", args.threads)
    if genai_dir is not None:
        import onnxruntime_genai as og

        genai_model = og.Model(str(genai_dir))
        engines["onnxruntime-genai (fp32)"] = lambda ids: bench_genai(genai_model, ids, args.new_tokens)

    prompts = [gen.encode(t) for t in EVAL_PROMPTS[: args.prompts]]
    for fn in engines.values():  # warm-up, untimed
        fn(prompts[0][:8])
    totals = {name: [0.0, 0] for name in engines}
    per_prompt = {name: [] for name in engines}
    first_tokens = {}
    for i, ids in enumerate(prompts):
        for name, fn in engines.items():  # interleaved: machine noise hits every engine alike
            seconds, steps, tokens = fn(ids)
            totals[name][0] += seconds
            totals[name][1] += steps
            per_prompt[name].append(steps / seconds)
            first_tokens.setdefault(name, []).append(tokens[:16])
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)

    ours = next(iter(engines))
    rate = {n: t[1] / t[0] for n, t in totals.items()}
    print(f"\nmodel {args.model}, fp32, {args.threads} threads, {len(prompts)} prompts x {args.new_tokens} "
          f"new tokens, machine {platform.machine()} {platform.processor() or ''} ({platform.node()})")
    print(f"{'engine':40s} {'decode tok/s':>12s} {'median':>8s} {'vs ours':>8s}")
    for name in engines:
        print(f"{name:40s} {rate[name]:12.1f} {statistics.median(per_prompt[name]):8.1f} {rate[name] / rate[ours]:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"work_dir": str(args.work_dir), "json": str(args.json)},
                                         "tokens_per_s": rate, "per_prompt": per_prompt, "first_tokens": first_tokens}, indent=2))


if __name__ == "__main__":
    main()
