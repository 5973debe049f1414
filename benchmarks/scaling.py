"""Scaling: onnxruntime latency vs batch size, and transform time vs model depth.

Regenerates ``benchmarks/results/scaling.{json,md,png}`` and the verdict of target 5::

    python benchmarks/scaling.py                     # ~6 minutes on 2 cores
    python benchmarks/scaling.py --batch 1,2 --runs 2 --depths resnet18,resnet50   # quick

* Latency vs batch: ResNet-50 224x224, original vs fxattn lean (DIA, fp32) vs lean with int8 DIA
  weights, onnxruntime CPU, interleaved per batch size (``fxattn.benchmark``).
* Transform time vs depth: ``fxattn.transform(model, x, dia=True, ssia=True)`` (trace both
  graphs, shape propagation, analysis, DIA and SSIA insertion) for torchvision ResNet-18/34/50/
  101/152, median of ``--repeats`` calls after one warm-up call, with the traced graph's node
  count. Shape propagation runs the model on the example batch (2 images), so the time is given
  at 224x224 (the target) and at 64x64 (where the graph work dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

import fxattn
from fxattn.bench import machine_info

HERE = Path(__file__).resolve().parent


def transform_times(names: list[str], size: int, repeats: int) -> dict[str, dict[str, float]]:
    rows = {}
    for name in names:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(2, 3, size, size)
        net = fxattn.transform(model, x)  # warm-up (imports, caches)
        nodes = len(net.graph.nodes)
        base_nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fxattn.transform(model, x)
            times.append(time.perf_counter() - start)
        rows[name] = {"seconds": statistics.median(times), "min_seconds": min(times),
                      "original_nodes": base_nodes, "transformed_nodes": nodes}
    return rows


def plot(path: Path, result: fxattn.BenchmarkResult, times: dict[int, dict[str, dict]],
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    by_batch = result.latency["onnxruntime"]
    batches = list(by_batch)
    for i, name in enumerate(by_batch[batches[0]]):
        per_image = [by_batch[bt][name].p50_ms / bt for bt in batches]
        a.plot(batches, per_image, "o-", color=f"C{i}", label=name)
    a.set_xscale("log", base=2)
    a.set_xlabel("batch size")
    a.set_ylabel("p50 ms per image (onnxruntime)")
    twin = a.twinx()
    twin.plot(batches, [result.ratio("onnxruntime", bt, "lean") for bt in batches], "k--",
              label="lean / original")
    twin.set_ylabel("lean / original (dashed)")
    a.legend(fontsize=8)
    for j, (size, rows) in enumerate(times.items()):
        nodes = [r["original_nodes"] for r in rows.values()]
        secs = [r["seconds"] for r in rows.values()]
        b.plot(nodes, secs, "o-", color=f"C{j}", label=f"input {size}x{size}")
        for name, n, s in zip(rows, nodes, secs, strict=True):
            b.annotate(name.replace("resnet", "R"), (n, s), fontsize=7)
    b.set_xlabel("FX graph nodes of the original model")
    b.set_ylabel("fxattn.transform seconds (median)")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,2,4,8,16,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--depths", default="resnet18,resnet34,resnet50,resnet101,resnet152")
    parser.add_argument("--sizes", default="224,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/scaling.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_before = os.getloadavg()
    names = args.depths.split(",")
    times = {int(s): transform_times(names, int(s), args.repeats) for s in args.sizes.split(",")}
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    batches = [int(b) for b in args.batch.split(",")]
    result = fxattn.benchmark(
        model, torch.randn(2, 3, 224, 224), dia=True, ssia=False, batch_sizes=batches,
        threads=args.threads, runs=args.runs, warmup=args.warmup, engines=("onnxruntime",),
        dia_weights=("int8",), progress=sys.stderr.isatty(),
        title="ResNet-50 224x224 latency vs batch size (onnxruntime)", command=command.strip())
    load_after = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = "Scaling: latency vs batch (ResNet-50) and transform time vs depth"
    plot(out / "scaling.png", result, times, title)
    data = {"title": title, "command": command.strip(), "machine": machine_info(args.threads),
            "load_average": {"before": load_before, "after": load_after},
            "transform": {str(k): v for k, v in times.items()},
            "latency_vs_batch": result.to_dict()}
    (out / "scaling.json").write_text(json.dumps(data, indent=2) + "\n")

    lines = [f"## {title}", "", "Command:", "", "```", command.strip(), "```", "",
             f"Load average (1, 5, 15 min) before: {tuple(round(v, 2) for v in load_before)}, "
             f"after: {tuple(round(v, 2) for v in load_after)} (2 cores shared with other jobs).",
             "", "### Transform time vs depth", "",
             "| model | input | original FX nodes | transformed nodes | transform s (median) |",
             "|---|---|---:|---:|---:|"]
    for size, rows in times.items():
        for name, r in rows.items():
            lines.append(f"| {name} | 2x3x{size}x{size} | {r['original_nodes']} | "
                         f"{r['transformed_nodes']} | {r['seconds']:.2f} |")
    lines += ["", "### onnxruntime latency vs batch size (ResNet-50, 224x224)", "",
              "| batch | original ms | lean ms | lean-int8 ms | lean / original | "
              "lean-int8 / original | lean images/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for bt, by_model in result.latency["onnxruntime"].items():
        lines.append(
            f"| {bt} | {by_model['original'].p50_ms:.1f} | {by_model['lean'].p50_ms:.1f} | "
            f"{by_model['lean-int8'].p50_ms:.1f} | {result.ratio('onnxruntime', bt, 'lean'):.3f} | "
            f"{result.ratio('onnxruntime', bt, 'lean-int8'):.3f} | "
            f"{1000 * bt / by_model['lean'].p50_ms:.1f} |")
    lines += ["", "## Verdict (target 5)", ""]
    for size, rows in times.items():
        if "resnet50" in rows and "resnet152" in rows:
            r50, r152 = rows["resnet50"], rows["resnet152"]
            time_ratio = r152["seconds"] / r50["seconds"]
            node_ratio = r152["original_nodes"] / r50["original_nodes"]
            ok = r50["seconds"] <= 2.0 and time_ratio <= 1.3 * node_ratio
            lines.append(
                f"- input {size}x{size}: **{'met' if ok else 'not met'}** - ResNet-50 transform "
                f"{r50['seconds']:.2f} s (target <= 2 s); ResNet-152 / ResNet-50 time ratio "
                f"{time_ratio:.2f} vs node-count ratio {node_ratio:.2f} (target <= 1.3 x "
                f"{node_ratio:.2f} = {1.3 * node_ratio:.2f}).")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
