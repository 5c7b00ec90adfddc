"""transformers' assisted generation with a dynamically int8-quantized copy of the model as the
draft (the closest transformers equivalent of our int8 river draft), against plain greedy generate,
in one run on the same prompts and threads.

    python benchmarks/assisted_generation.py --threads 2 --prompts 4 --tokens 48
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from river.models.registry import smollm2_gguf_path
    from river.runtime.bench.eval_data import EVAL_PROMPTS

    torch.set_num_threads(args.threads)
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    model.generation_config.eos_token_id = None
    draft = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    full_t, asst_t, same = [], [], 0
    for prompt in EVAL_PROMPTS[: args.prompts]:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
        # EOS suppressed by making it unreachable (assisted generation refuses min_new_tokens)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            t0 = time.perf_counter()
            a = model.generate(ids, **kw)
            t1 = time.perf_counter()
            b = model.generate(ids, assistant_model=draft, **kw)
            t2 = time.perf_counter()
        full_t.append(t1 - t0)
        asst_t.append(t2 - t1)
        same += bool(torch.equal(a, b))
    f, s = statistics.mean(full_t), statistics.mean(asst_t)
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__} CPU, {args.threads} threads, "
          f"{args.prompts} prompts x {args.tokens} tokens")
    print(f"plain greedy generate   {f:.2f} s/prompt")
    print(f"assisted (int8 draft)   {s:.2f} s/prompt   speedup {f / s:.2f}x   identical {same}/{args.prompts}")


if __name__ == "__main__":
    main()
