"""River's Q4_1 op against ONNX Runtime's kernels for the same products, by rows a step.

For each of SmolLM2's layer product shapes (packed Q/K/V 576x960, output 576x576, gate|up 576x3072,
down 1536x576), a random Q4_1 weight (fp16 scales and offsets, as a GGUF's) runs as:
- ``Q41MatMul``: River's op (``compiler/ort_ops``), exact: the export's fp32 weights made on the fly;
- fp32 ``MatMul``: the same weights as an fp32 matrix (``--lowering ort-fp32``);
- ``MatMulNBits`` at accuracy 1 plus the offset path (``--lowering ort-grid``, ``grid_weights.py``);
- ``MatMulNBits`` 4-bit at accuracy 4 (int8 activations: not exact; what onnxruntime-genai's int4 runs);
- ``Q41MatMulInt8``: River's op for twins and ``--lowering ort-int8``: the exact 4-bit weights by int8
  activations (not exact; what llama.cpp runs for Q4_1);
- ``MatMulNBits`` 8-bit at accuracy 4 (what the River builder's twins were before ``q41_twins.py``).
Ten products chained in one graph a form (the input of each is the last output, tiled and cut to K), timed by
``session.run`` with 1, 2, 4, 8 and 64 rows; microseconds a product, one process, interleaved by round.
The chain's one weight stays in the CPU's caches, so the fp32 column shows fp32 compute, not the memory
traffic of a whole model's fp32 weights (SmolLM2: 425 MB a step; the model-level effect is in
``anchors.py``, e.g. ``--lowering ort`` against ``ort-fp32``).

    python benchmarks/q41_op.py --threads 2 [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx_graphsurgeon as gs

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate|up": (576, 3072), "down": (1536, 576)}
CHAIN = 10
ROWS = (1, 2, 4, 8, 64)


def q41_weight(k: int, n: int, rng) -> np.ndarray:
    q = rng.integers(0, 16, (k // 32, 32, n)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15
    d = (rng.random((k // 32, n)) * 0.02 + 1e-4).astype(np.float16).astype(np.float32)
    m = (-rng.random((k // 32, n)) * 0.15).astype(np.float16).astype(np.float32)
    return (d[:, None] * q + m[:, None]).reshape(k, n).astype(np.float32)


def chain(w: np.ndarray, form: str):
    """CHAIN products by ``w`` in one graph, each rewritten to ``form``."""
    from river.compiler import ort_ops
    from river.compiler.lowering import grid_weights, q41_matmul
    from river.compiler.lowering.patterns import MS_DOMAIN
    from river.compiler.quantize import NBITS_ACCURACY, ort_block_quant

    k, n = w.shape
    x = gs.Variable("x", np.float32, ["B", "S", k])
    cur, nodes = x, []
    repeats = np.array([1, 1, -(-k // n)])  # the next input: the output tiled to K columns, then cut
    for i in range(CHAIN):
        y, t, z = (gs.Variable(f"{v}{i}", np.float32) for v in "ytz")
        nodes.append(gs.Node("MatMul", f"p{i}", {}, [cur, gs.Constant(f"w{i}", w)], [y]))
        nodes.append(gs.Node("Tile", f"t{i}", {}, [y, gs.Constant(f"r{i}", repeats)], [t]))
        nodes.append(gs.Node("Slice", f"s{i}", {}, [t, gs.Constant(f"a{i}", np.array([0])), gs.Constant(f"b{i}", np.array([k])),
                                                  gs.Constant(f"c{i}", np.array([2]))], [z]))
        cur = z
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[cur], opset=21)
    if form in ("q41", "q41-int8"):
        assert q41_matmul.rewrite(graph, int8=form == "q41-int8") == CHAIN
    elif form == "nbits-acc1":
        assert grid_weights.rewrite(graph) == CHAIN
    elif form in ("nbits4-acc4", "nbits8-acc4"):
        bits = 4 if form == "nbits4-acc4" else 8
        packed, scales, zeros = ort_block_quant(w, bits, 32, symmetric=False)
        for node in [n for n in graph.nodes if n.op == "MatMul"]:
            node.op, node.domain = "MatMulNBits", MS_DOMAIN
            node.attrs = {"K": k, "N": n, "bits": bits, "block_size": 32, "accuracy_level": NBITS_ACCURACY}
            node.inputs = [node.inputs[0], gs.Constant(f"{node.name}/q", packed),
                           gs.Constant(f"{node.name}/s", scales), gs.Constant(f"{node.name}/z", zeros)]
    model = gs.export_onnx(graph)
    model.opset_import.add(domain=MS_DOMAIN, version=1)
    model.opset_import.add(domain=ort_ops.DOMAIN, version=1)
    return model


def main(argv: list[str] | None = None) -> int:
    from river.compiler import ort_ops
    from river.compiler.ort_session import make_session, use_shared_thread_pool

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each form, each rows count)")
    args = p.parse_args(argv)
    if ort_ops.library() is None:
        print(f"River's op is not available: {ort_ops.status()[1]}")
        return 1
    use_shared_thread_pool(args.threads)
    forms = ("q41", "fp32", "nbits-acc1", "nbits4-acc4", "q41-int8", "nbits8-acc4")
    rng = np.random.default_rng(0)
    print(f"microseconds a product, {args.threads} threads, kernels: {ort_ops.isa()}, median of {args.rounds} rounds")
    print("| product | rows | " + " | ".join(forms) + " | fp32 / q41 |")
    print("|---|---|" + "---|" * (len(forms) + 1))
    for name, (k, n) in SHAPES.items():
        w = q41_weight(k, n, rng)
        sessions = {f: make_session(chain(w, f), threads=args.threads) for f in forms}
        for rows in ROWS:
            x = rng.standard_normal((1, rows, k)).astype(np.float32)
            reps = max(5, 400 // rows)
            times = {f: [] for f in forms}
            for _ in range(args.rounds):
                for f, s in sessions.items():
                    s.run(None, {"x": x})
                    t = time.perf_counter()
                    for _ in range(reps):
                        s.run(None, {"x": x})
                    times[f].append((time.perf_counter() - t) / reps / CHAIN * 1e6)
            med = {f: float(np.median(v)) for f, v in times.items()}
            print(f"| {name} {k}x{n} | {rows} | " + " | ".join(f"{med[f]:.0f}" for f in forms)
                  + f" | {med['fp32'] / med['q41']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
