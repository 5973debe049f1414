"""Interleaved wall-clock *and process CPU time* of ONNX files in onnxruntime: A/B on a busy box.

On a machine shared with other jobs, wall-clock medians move with the others' load; the CPU
time a run consumes (``time.process_time``: all of onnxruntime's threads, which do not spin
with ``allow_spinning=0``) moves much less, since time spent descheduled is not counted (cache
and memory-bandwidth contention still are). Same protocol otherwise: one process, interleaved
runs after warm-up, ratios of medians to the first file::

    python benchmarks/cpu_time_ab.py --batch 1 --runs 30 original.onnx lean-noopt.onnx lean.onnx
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxattn.export.runtime import ort_session  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.size, args.size)).astype(np.float32)
    sessions = {f: ort_session(f, threads=args.threads) for f in args.files}
    feeds = {f: {s.get_inputs()[0].name: x} for f, s in sessions.items()}
    wall: dict[str, list[float]] = {f: [] for f in args.files}
    cpu: dict[str, list[float]] = {f: [] for f in args.files}
    load_before = os.getloadavg()
    for i in range(args.warmup + args.runs):
        for f, session in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            session.run(None, feeds[f])
            c1, t1 = time.process_time(), time.perf_counter()
            if i >= args.warmup:
                wall[f].append(t1 - t0)
                cpu[f].append(c1 - c0)
    load_after = os.getloadavg()
    base_wall, base_cpu = (statistics.median(d[args.files[0]]) for d in (wall, cpu))
    print(f"batch {args.batch}, {args.threads} threads, {args.runs} interleaved runs; load "
          f"before {tuple(round(v, 2) for v in load_before)}, after "
          f"{tuple(round(v, 2) for v in load_after)}")
    print("| file | wall p50 ms | wall ratio | CPU p50 ms | CPU ratio |\n|---|---:|---:|---:|---:|")
    for f in args.files:
        w, c = statistics.median(wall[f]), statistics.median(cpu[f])
        print(f"| {Path(f).name} | {w * 1e3:.1f} | {w / base_wall:.3f} | {c * 1e3:.1f} | "
              f"{c / base_cpu:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
