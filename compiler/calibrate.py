"""Calibration: from similarity to exit thresholds, measured on the model's own graph.

For every calibration token the original step graph (instrumented to expose the residual stream at
each gate) gives s_k = cos(h_in_k, h_out_k), the full model's next-token distribution and the
backbone's K/V. The River graph, forced to exit at gate k over the backbone's exact history, gives the
true damage of exiting there: relative error of the K/V the river writes for layers > k (the KV the
paper's similarity predicts), the KL of the next-token distribution, and whether the top-1 token flips.

Recall points (``compiler/river/recall.py``) are calibrated end to end instead: the River decodes the
calibration tokens teacher-forced over its own history at a candidate recall margin, and the lowest
margin whose flip rate over all tokens is within the budget is kept (``recall_points``).

Per gate we fit the predictor "cumulative KV error ~ a + b * (1 - s)" (reported with its R^2 and
rank correlation), and turn an error budget into a threshold: the lowest similarity t such that
tokens with s >= t have mean damage <= budget on the calibration data. Thresholds therefore never
fall as the budget shrinks, and budget 0 disables the gate.

The graphs run through a session factory the caller passes (``open_session(model) -> session`` with
ONNX Runtime's ``run``/``get_outputs``), so calibration does not choose or import a runtime.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from river.atomic import write_bytes_atomic
from river.compiler.graph_io import load_onnx, load_onnx_header
from river.compiler.river.manifest import DISABLED, EXIT_LAYER, FORCED_EXIT, THRESHOLDS, RiverInfo
from river.compiler.river.recall import RECALL_OFF, recall_base, recall_point_name, river_margin
from river.compiler.structure import discover
from river.errors import RiverError
from river.export import contract as C
from river.export.contract import StepContract

BUDGETS = {"safe": 0.005, "balanced": 0.02, "fast": 0.05}  # mean top-1 flip rate among exited tokens
METRICS = ("flip", "kl", "kv")
OpenSession = Callable[[onnx.ModelProto], object]  # a graph -> a session with run(names, feeds) and get_outputs()


@dataclass
class GateData:
    layer: int
    similarity: list[float] = field(default_factory=list)
    flip: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    kv: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)  # the river's top-2 probability margin (recall)

    def arrays(self):
        return {k: np.asarray(getattr(self, k), np.float64) for k in ("similarity", "flip", "kl", "kv", "margin")}


def instrumented_step_graph(step: onnx.ModelProto, gates: Sequence[int]) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """The step graph with each gate's residual input/output added as graph outputs."""
    contract = StepContract.from_model(step)
    graph = gs.import_onnx(step)
    structure = discover(graph, contract)
    pairs = []
    for g in gates:
        b = structure.blocks[g]
        for t in (b.input, b.output):
            if t not in graph.outputs:
                t.dtype = t.dtype or np.float32
                graph.outputs.append(t)
        pairs.append((b.input.name, b.output.name))
    return gs.export_onnx(graph, do_type_check=False), pairs


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = (a * b).sum(-1)
    return dot / np.maximum(np.sqrt((a * a).sum(-1) * (b * b).sum(-1)), 1e-12)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def collect(step_path: str | Path, river_path: str | Path, sequences: Sequence[Sequence[int]],
            start: Sequence[int], open_session: OpenSession, progress=None) -> list[GateData]:
    """Similarities and damages for every position t >= start[i] of each token sequence."""
    info = RiverInfo.from_model(load_onnx_header(river_path))
    if info is None:
        raise RiverError(f"{river_path} is not a River graph")
    gates = list(info.gates)
    step = load_onnx(step_path)
    contract = StepContract.from_model(step)
    inst, pairs = instrumented_step_graph(step, gates)
    full = open_session(inst)
    river = open_session(load_onnx(river_path))
    names = [o.name for o in full.get_outputs()]
    data = [GateData(g) for g in gates]
    L = contract.num_layers
    for seq, s0 in zip(sequences, start):
        ids = np.asarray([seq], np.int64)
        n = ids.shape[1]
        out = dict(zip(names, full.run(None, C.step_feeds(contract, ids))))
        logp_full = _log_softmax(out[C.LOGITS][0])
        for t in range(max(s0, 1), n):
            step_feeds = C.step_feeds(contract, ids[:, t:t + 1], C.past_of(out, L, t))
            for gi, (g, (hin, hout)) in enumerate(zip(gates, pairs)):
                thr = np.full(len(gates), DISABLED, np.float32)
                thr[gi] = FORCED_EXIT
                r = dict(zip([o.name for o in river.get_outputs()], river.run(None, {**step_feeds, THRESHOLDS: thr})))
                logp = _log_softmax(r[C.LOGITS][0, -1])
                num = den = 0.0
                for layer in range(g + 1, L):
                    for kind in ("key", "value"):
                        ref = out[C.present_name(layer, kind)][:, :, t]
                        num += float(((r[C.present_name(layer, kind)][:, :, t] - ref) ** 2).sum())
                        den += float((ref ** 2).sum())
                d = data[gi]
                d.similarity.append(float(_cos(out[hin][0, t], out[hout][0, t])))
                d.flip.append(float(np.argmax(logp) != np.argmax(logp_full[t])))
                d.kl.append(float((np.exp(logp_full[t]) * (logp_full[t] - logp)).sum()))
                d.kv.append(num / max(den, 1e-30))
                d.margin.append(float(river_margin(r[C.LOGITS][0, -1])))
            if progress is not None:
                progress.update()
    return data


def fit_predictor(d: GateData) -> dict:
    """Linear fit of the river's KV error on (1 - s), with R^2 and Spearman rank correlation."""
    a = d.arrays()
    x, y = 1.0 - a["similarity"], a["kv"]
    if len(x) < 3 or np.ptp(x) == 0:
        return {"slope": None, "intercept": None, "r2": None, "spearman": None, "n": int(len(x))}
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    spearman = float(np.corrcoef(rx, ry)[0, 1])
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "spearman": spearman, "n": int(len(x))}


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise RiverError(f"unknown calibration metric '{metric}' (choose from {', '.join(METRICS)})")


def threshold_for_budget(d: GateData, budget: float, metric: str = "flip") -> float:
    """Lowest similarity t such that tokens with s >= t have mean damage <= budget (DISABLED: never)."""
    check_metric(metric)
    a = d.arrays()
    if budget <= 0 or not len(a["similarity"]):
        return DISABLED
    order = np.argsort(-a["similarity"], kind="stable")
    s, dmg = a["similarity"][order], a[metric][order]
    mean = np.cumsum(dmg) / np.arange(1, len(dmg) + 1)
    ok = np.nonzero(mean <= budget)[0]
    if not len(ok):
        return DISABLED
    k = int(ok.max())
    while k + 1 < len(s) and s[k + 1] == s[k]:  # ties: a threshold admits all equal similarities
        k -= 1
        if k < 0:
            return DISABLED
    return float(s[k])


def thresholds(data: Sequence[GateData], budget: float, metric: str = "flip") -> list[float]:
    return [threshold_for_budget(d, budget, metric) for d in data]


def resolve_budget(budget: str | float) -> float:
    """A budget name or number as the mean damage allowed: a finite number >= 0 (a NaN budget
    would pick no threshold and say nothing)."""
    if budget in BUDGETS:
        return BUDGETS[budget]
    try:
        value = float(budget)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(budget, bool) or not math.isfinite(value) or value < 0:
        raise RiverError(f"bad budget {budget!r}: a number >= 0 or one of {', '.join(BUDGETS)}")
    return value


def recall_for_budget(data: Sequence[GateData], gate_thresholds: Sequence[float], budget: float) -> float:
    """The lowest recall margin (``compiler/river/recall.py``) such that, with these gate thresholds, the
    exited tokens the river keeps (margin >= it) flip the top-1 token for at most ``budget`` of all
    tokens (exact history: the end-to-end search starts here). RECALL_OFF when the thresholds alone stay within it; just above the largest margin (every
    exit recalled) when nothing else does."""
    flips, margins = [], []
    tokens = len(data[0].similarity) if data else 0
    for t in range(tokens):
        gate = next((d for d, thr in zip(data, gate_thresholds) if d.similarity[t] >= thr), None)
        if gate is not None:
            flips.append(gate.flip[t])
            margins.append(gate.margin[t])
    allowed = budget * tokens  # flips over all tokens, as the end-to-end measurement counts them
    if not flips or sum(flips) <= allowed:
        return RECALL_OFF
    order = np.argsort(-np.asarray(margins), kind="stable")
    m, kept_flips = np.asarray(margins)[order], np.cumsum(np.asarray(flips)[order])
    ok = np.nonzero(kept_flips <= allowed)[0]  # keep the k+1 surest exits
    k = int(ok.max()) if len(ok) else -1
    while k >= 0 and k + 1 < len(m) and m[k + 1] == m[k]:  # ties: a margin keeps all equal margins
        k -= 1
    if k < 0:
        return float(min(np.nextafter(m[0], 1.0), np.nextafter(1.0, 0.0)))
    return float((m[k] + m[k + 1]) / 2)


RECALL_GRID = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # margins the end-to-end search tries, in order


def river_flip_rate(step, river, contract: StepContract, sequences: Sequence[Sequence[int]], start: Sequence[int],
                    gate_thresholds: Sequence[float], recall: float) -> float:
    """The share of tokens t >= start[i] whose next-token choice differs from the full model's when the
    River decodes them teacher-forced at these gate thresholds and recall margin, over *its own* history:
    the K/V its exits wrote for earlier tokens, which the per-token damage of ``collect`` (exact history)
    does not see. A recalled token repairs (``runtime/exit_history.py``): it and every earlier token
    become the full model's, so it is the step graph's step over the exact past. ``step`` and
    ``river``: sessions of the two graphs."""
    L, thr = contract.num_layers, np.asarray(gate_thresholds, np.float32)
    names = {id(s): [o.name for o in s.get_outputs()] for s in (step, river)}

    def run(session, feeds):
        return dict(zip(names[id(session)], session.run(None, feeds)))

    flips = total = 0
    for seq, s0 in zip(sequences, start):
        ids = np.asarray([seq], np.int64)
        s0 = max(s0, 1)
        exact = run(step, C.step_feeds(contract, ids))  # the full model over the exact history
        target = exact[C.LOGITS][0].argmax(-1)
        out = run(step, C.step_feeds(contract, ids[:, :s0]))
        for t in range(s0, ids.shape[1]):
            feeds = C.step_feeds(contract, ids[:, t:t + 1], C.past_of(out, L))
            out = run(river, {**feeds, THRESHOLDS: thr})
            if int(out[EXIT_LAYER][0]) < L and river_margin(out[C.LOGITS][0, -1])[()] < recall:
                out = {C.LOGITS: exact[C.LOGITS][:, t:t + 1],  # recalled and repaired: the full model's from here back
                       **{n: exact[n][:, :, :t + 1] for n in C.present_names(L)}}
            flips += int(out[C.LOGITS][0, -1].argmax() != target[t])
            total += 1
    return flips / max(total, 1)


def recall_points(data: Sequence[GateData], measure: Callable[[Sequence[float], float], float],
                  budgets: dict, measured: dict[float, float] | None = None) -> dict:
    """Per budget, the recall point ``<name>-recall``: every token out at the first gate (``recall_base``)
    and the lowest recall margin whose measured flip rate over all tokens (``measure(thresholds,
    margin)``, e.g. ``river_flip_rate``; recall budgets are flip rates, whatever the metric) is within
    the budget. The search starts at the per-token estimate (``recall_for_budget``) and walks
    ``RECALL_GRID`` up while the rate is over the budget, or down while it stays within (repairs make the
    end-to-end rate lower than per-token data says); where no margin is within the budget the last one
    tried stands, with its rate recorded. ``measured`` (margin -> flip rate) collects every measurement
    (calibration.json's ``recall_curve``)."""
    base = recall_base(len(data))
    measured = {} if measured is None else measured

    def rate(margin: float) -> float:
        if margin not in measured:
            measured[margin] = measure(base, margin)
        return measured[margin]

    points = {}
    for name, b in budgets.items():
        first = recall_for_budget(data, base, b)
        margin = first
        for margin in [first, *(m for m in RECALL_GRID if m > first)]:
            if rate(margin) <= b:
                break
        if margin == first and rate(first) <= b:
            for lower in sorted((m for m in RECALL_GRID if m < first), reverse=True):
                if rate(lower) > b:
                    break
                margin = lower
        points[recall_point_name(name)] = {"budget": b, "thresholds": base, "recall": margin,
                                           "flip_rate": measured[margin], "within_budget": measured[margin] <= b}
    return points


def report(data: Sequence[GateData], metric: str = "flip", budgets: dict | None = None) -> dict:
    """The calibration file: per-gate data summary, predictor fits and thresholds per named budget."""
    budgets = budgets or BUDGETS
    return {
        "gates": [d.layer for d in data],
        "metric": metric,
        "tokens": len(data[0].similarity) if data else 0,
        "fits": {str(d.layer): fit_predictor(d) for d in data},
        "operating_points": {name: {"budget": b, "thresholds": thresholds(data, b, metric)} for name, b in budgets.items()},
        "samples": {str(d.layer): {k: v.tolist() for k, v in d.arrays().items()} for d in data},
    }


def read_prompts(path: str | Path, what: str = "calibration prompts") -> list[str]:
    """A text file (one prompt per line) or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise RiverError(f"{what} file not found: {path}")
    try:
        text = path.read_text()
        prompts = json.loads(text) if path.suffix == ".json" else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RiverError(f"{what} file {path} cannot be read: {exc}") from None
    if prompts is None:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RiverError(f"{path}: expected prompts (one per line, or a JSON list of strings)")
    return prompts


def greedy_continuations(step_path: str | Path, prompts_ids: Sequence[Sequence[int]], new_tokens: int,
                         open_session: OpenSession, eos: Sequence[int] = ()) -> list[list[int]]:
    """Each prompt followed by the full model's own greedy continuation (what decoding will see)."""
    step = load_onnx(step_path)
    contract = StepContract.from_model(step)
    session = open_session(step)
    names = [o.name for o in session.get_outputs()]
    out = []
    for ids in prompts_ids:
        seq = list(ids)
        past = None
        new = np.asarray([seq], np.int64)
        for _ in range(new_tokens):
            r = dict(zip(names, session.run(None, C.step_feeds(contract, new, past))))
            tok = int(np.argmax(r[C.LOGITS][0, -1]))
            if tok in eos:
                break
            seq.append(tok)
            past = C.past_of(r, contract.num_layers)
            new = np.asarray([[tok]], np.int64)
        out.append(seq)
    return out


def calibrate_river(step_path: str | Path, river_path: str | Path, prompts: Sequence[str], tokenizer,
                    open_session: OpenSession, *, new_tokens: int = 32, metric: str = "flip",
                    budgets: dict | None = None, eos: Sequence[int] = (), log=None) -> dict:
    """Run calibration end to end on text prompts (chat template applied when the tokenizer has one)."""
    from tqdm import tqdm

    from river.models.tokenizer import encode_prompt

    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    sequences = greedy_continuations(step_path, prompt_ids, new_tokens, open_session, eos)
    total = sum(len(s) - len(p) for s, p in zip(sequences, prompt_ids))
    start = [len(p) for p in prompt_ids]
    with tqdm(total=total, desc="calibrating", unit="tok", file=log, disable=log is None) as bar:
        data = collect(step_path, river_path, sequences, start, open_session, bar)
    result = report(data, metric, budgets)
    step, river = open_session(load_onnx(step_path)), open_session(load_onnx(river_path))
    contract = StepContract.from_model(load_onnx_header(step_path))
    with tqdm(desc="calibrating recall", unit="margin", file=log, disable=log is None) as bar:
        def measure(gate_thresholds, margin):
            bar.update()
            return river_flip_rate(step, river, contract, sequences, start, gate_thresholds, margin)

        curve: dict[float, float] = {}
        result["recall_points"] = recall_points(data, measure, BUDGETS, curve)  # flip-rate budgets
    for name, point in result["recall_points"].items():
        if not point["within_budget"] and log is not None:
            print(f"[river] recall point {name}: no margin up to {point['recall']:g} keeps the flip rate within "
                  f"{point['budget']:g} (measured {point['flip_rate']:.2%}); it recalls nearly every exit", file=log)
    result["recall_curve"] = {"thresholds": recall_base(len(data)), "flip_rate": {f"{m:g}": r for m, r in sorted(curve.items())}}
    result["prompts"] = list(prompts)
    result["new_tokens"] = new_tokens
    return result


def set_default_thresholds(river_path: str | Path, values: Sequence[float]) -> None:
    """Rewrite the baked-in ``exit_thresholds`` default of a River graph file in place (weights untouched)."""
    path = Path(river_path)
    model = load_onnx_header(path)
    init = next((t for t in model.graph.initializer if t.name == THRESHOLDS), None)
    if init is None or init.dims[0] != len(values):
        raise RiverError(f"{path} has no exit_thresholds default of {len(values)} values")
    init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(values, np.float32), THRESHOLDS))
    write_bytes_atomic(path, model.SerializeToString())
