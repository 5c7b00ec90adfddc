"""Per-row exits in a batch: runtime routing over segments against compaction, on a segmented River.

Routing (what runtime/batching does) keeps the rows that exited at a gate in the later backbone segments
(their writes go to the pool's slack); compaction would move them out of the batch, which saves backbone
work but copies their K/V for every later layer. This measures both costs, and a river run for one row
against several (batched rivers need row-independent twins).

    python benchmarks/batch_routing.py out/smollm2 --length 120
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def median_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("river_dir", help="a river-export folder written with --segmented")
    p.add_argument("--length", type=int, default=120, help="valid positions of every row")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    from river.compiler.ort_session import use_shared_thread_pool
    from river.runtime.batching.kv_pool import KVPool
    from river.runtime.segmented_backend import SegmentedBackend

    use_shared_thread_pool(args.threads)
    seg = SegmentedBackend(Path(args.river_dir) / "segments", threads=args.threads)
    c, gates = seg.contract, seg.index.gates
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, 8, 16, gates=len(gates),
                  capacity=KVPool.rounded(args.length + 16))
    pool.lengths[:8] = args.length

    def segments(n: int, names: list[str]):
        st = seg._step_state(np.full((n, 1), 7, np.int64), pool.rows(0, n))
        return lambda: [st["bindings"][name][0].run_with_iobinding(st["bindings"][name][1]) for name in names]

    after = [f"backbone{k}" for k in range(1, len(gates) + 1)]
    print(f"backbone after gate 0 (layers {gates[0] + 1}..{c.num_layers - 1} and the head), by rows in the batch:")
    for n in (8, 6, 4, 2):
        print(f"  {n} rows: {median_ms(segments(n, after)):.1f} ms")
    for n in (1, 4):
        print(f"river0, {n} row(s): {median_ms(segments(n, ['river0'])):.1f} ms")
    later = pool.cache.buffers()[2 * (gates[0] + 1):]
    exiting, staying, L = [1, 3, 5, 7], [0, 2, 4, 6], args.length

    def compact():
        for b in later:  # gather the exiting rows to the back and the staying ones to the front
            moved = b[exiting, :, :L].copy()
            b[[4, 5, 6, 7], :, :L] = b[staying, :, :L]
            b[[0, 1, 2, 3], :, :L] = moved

    print(f"compaction: moving 8 rows' K/V of the layers after gate 0 at length {L}: {median_ms(compact):.1f} ms")


if __name__ == "__main__":
    main()
