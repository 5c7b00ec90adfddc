"""Helpers shared by test modules (imported by name: tests/ is on sys.path under pytest)."""

from __future__ import annotations

import re

import numpy as np
import torch

# what the commands print before an error: "[river] ..." progress lines and river-export's tqdm bar
_PROGRESS = re.compile(r"^\[river\] |^river-export: +\d+%\|")


def assert_one_line_error(stderr: str, prog: str) -> str:
    """A CLI error as a user sees it: apart from progress lines, exactly one non-empty line, and it is
    "<prog>: error: ..." (no traceback, no usage dump). Returns the line."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip() and not _PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), f"not one error line:\n{stderr[-3000:]}"
    return lines[0]


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids, attention_mask=torch.ones_like(ids)).logits


def torch_step(model, input_ids, past=None, start=0):
    """One step of our torch model: logits and presents for ``input_ids`` [B,S] after ``past``."""
    import torch

    ids = torch.as_tensor(input_ids)
    b, s = ids.shape
    past = list(past) if past is not None else model.empty_past(b)
    total = past[0].shape[2] + s
    with torch.no_grad():
        out = model(ids, torch.ones(b, total, dtype=torch.long), torch.arange(start, start + s).repeat(b, 1), *past)
    return out[0].numpy(), [t for t in out[1:]]


def poison_decode(backend, patterns, seen: list, after=None) -> None:
    """Wrap ``backend.decode`` for the no-holes invariant: each step sets the next exit pattern,
    NaN-poisons its own position in every buffer, runs, records the exit, and asserts every layer
    holds finite K/V for every position so far; ``after(cache)`` adds checks of its own."""
    import numpy as np

    decode = backend.decode

    def poisoned(tokens, cache):
        backend.set_thresholds(patterns[len(seen) % len(patterns)])
        pos = cache.length
        for buf in cache.buffers():
            buf[:, :, pos] = np.nan
        out = decode(tokens, cache)
        seen.append(backend.last_exit_layer)
        for buf in cache.buffers():
            assert np.all(np.isfinite(buf[:, :, :pos + 1])), f"hole at position {pos} after exit {seen[-1]}"
        if after is not None:
            after(cache)
        return out

    backend.decode = poisoned


def on_grid(w: np.ndarray, rng) -> np.ndarray:
    """``w`` snapped to a Q4_1 grid: per block of 32 inputs and column, w = d * q + m, q in 0..15."""
    k, n = w.shape
    b = w.reshape(k // 32, 32, n)
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)  # GGUF keeps d and m in fp16
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((b - m[:, None]) / np.where(d > 0, d, 1)[:, None]), 0, 15)
    q[:, 0], q[:, 1] = 0, 15  # every block spans its grid (as Q4_1's min and max do)
    return (d[:, None] * q + m[:, None]).reshape(k, n).astype(np.float32)


def assert_same_generation(backends, tokenizer, patterns, prompt="rivers and seas", tokens=12) -> None:
    """Greedy generation under each exit pattern (gate thresholds) gives every backend the same tokens
    and exits."""
    from river.runtime.generate import GenerationConfig, Generator

    cfg = GenerationConfig(max_new_tokens=tokens, eos_token_ids=[])
    for thresholds in patterns:
        runs = []
        for backend in backends:
            backend.set_thresholds(thresholds)
            result = Generator(backend, tokenizer).generate(prompt, cfg)
            runs.append((result.token_ids, result.exit_layers))
        assert all(run == runs[0] for run in runs), thresholds
