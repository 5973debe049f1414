"""The prepared GPU benchmark: fxattn's DIA on a GPU, against the original, a hand-written DIA
and an SE-per-block model, in one short run over ``fxattn.benchmark``.

For the session that is lent a GPU, so that the device time goes to measuring, not to writing
code; it needs nothing beyond the GPU machine's image (torch, torchvision, onnxruntime)::

    PYTHONPATH=. python3 benchmarks/gpu.py --commit <sha>      # on the GPU: < 8 min on an H200
    python benchmarks/gpu.py --quick --out /tmp/gpu-smoke       # the same code, smoke-run on CPU

It measures torchvision ResNet-50 (random weights, 224x224) as ``original``, fxattn's ``lean``
model (DIA, SSIA stripped), ``hand-dia`` (``benchmarks/common/handwritten_dia.py`` with the
lean model's weights) and ``se-per-block`` (``DIA(module="se", share="none")``), plus
``lean-decomposed`` where ``fxattn.DIA`` has a ``fused`` switch:

* inference latency at batch 1, 8 and 64, fp32 and bf16 autocast, PyTorch eager and replayed
  from a CUDA graph (medians of interleaved runs, each call synchronised), and onnxruntime's
  CUDA / TensorRT providers when the installed onnxruntime has them (the report says so when it
  has not);
* the training step (forward, loss, backward, SGD) at batch 64, fp32 and bf16 autocast, of the
  original, DIA, DIA + SSIA and the anchors, with peak GPU memory;
* the aten operators DIA adds per site and SSIA per tap (counted on the CPU) and the CUDA
  kernels of each model's eval forward and training step;
* ``torch.compile`` latency of the original and the lean model at batch 1 (skipped, and said
  so, when the run is already past its time budget).

Writes ``benchmarks/results/gpu_<device name>.json`` and ``.md`` (``--out`` to change), which
say when, on which device, with which torch and CUDA, at which git commit they were measured.
Without CUDA it stops with a clear message unless ``--quick`` (a small model and protocol: the
CPU smoke test) or ``--allow-cpu`` (the full protocol on the CPU) is given.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fxattn  # noqa: E402
from benchmarks.common.handwritten_dia import matched_hand_dia  # noqa: E402
from benchmarks.common.results_io import command_line, write_results  # noqa: E402
from fxattn.bench import BenchmarkResult  # noqa: E402

FULL = {"model": "resnet50", "size": 224, "batches": [1, 8, 64], "precisions": ["fp32", "bf16"],
        "train_batch": 64, "runs": 30, "warmup": 5,
        "compile_batches": [1]}
QUICK = {"model": "resnet18", "size": 16, "batches": [2], "precisions": ["fp32"],
         "train_batch": 2, "runs": 1, "warmup": 0,
         "compile_batches": []}


def git_commit(given: str | None) -> str:
    """The commit measured: ``--commit``, else ``git rev-parse HEAD`` (a copy of the tree
    without ``.git`` on the GPU machine needs ``--commit``)."""
    if given:
        return given
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout; pass --commit)"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def run(args: argparse.Namespace, plan: dict[str, Any], device: torch.device,
        started: float) -> dict[str, BenchmarkResult]:
    """The main benchmark, then ``torch.compile`` if the time budget allows."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(plan["model"], weights=None).eval()
    example = torch.randn(2, 3, plan["size"], plan["size"])
    gpu = device.type == "cuda"
    results = {"main": fxattn.benchmark(
        model, example, device=str(device), engines=("torch", "onnxruntime") if gpu
        else ("torch",), modes=("eager", "cuda-graph") if gpu else ("eager",),
        precisions=plan["precisions"], batch_sizes=plan["batches"], runs=plan["runs"],
        warmup=plan["warmup"], train_batch=plan["train_batch"], ops=True, anchors=True,
        extra={"hand-dia": lambda lean: matched_hand_dia(lean, example, plan["model"])[0]},
        cost=False, threads=args.threads, progress=sys.stderr.isatty(),
        title=f"{plan['model']} {plan['size']}x{plan['size']} on {device_name(device)}")}
    elapsed = time.perf_counter() - started
    if plan["compile_batches"] and elapsed > args.budget_s - args.compile_s:
        results["main"].notes.append(
            f"torch.compile not run: {elapsed:.0f} s had passed, and compiling needs about "
            f"{args.compile_s} s of a {args.budget_s} s budget")
    elif plan["compile_batches"]:
        results["compile"] = fxattn.benchmark(
            model, example, device=str(device), engines=("torch",), modes=("compile",),
            precisions=plan["precisions"], batch_sizes=plan["compile_batches"],
            runs=plan["runs"], warmup=plan["warmup"], ops=False, threads=args.threads,
            progress=sys.stderr.isatty(),
            title=f"{plan['model']} torch.compile (Inductor) on {device_name(device)}")
    return results


def report(meta: dict[str, Any], results: dict[str, BenchmarkResult]) -> str:
    lines = [f"# fxattn on {meta['device_name']}", "",
             f"Measured {meta['time_utc']} UTC at commit `{meta['git_commit']}` by `"
             f"{meta['command']}` in {meta['seconds']:.0f} s; torch {meta['torch']}, CUDA "
             f"{meta['cuda']}, torchvision {meta['torchvision']}, onnxruntime "
             f"{meta['onnxruntime']}.", ""]
    return "\n".join(lines) + "\n" + "\n".join(r.to_markdown() for r in results.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu with --allow-cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a small model and protocol (ResNet-18, 16x16, 1 run): the smoke "
                             "test; runs on the CPU when there is no GPU")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the full protocol on the CPU when there is no GPU (slow)")
    parser.add_argument("--commit", default=None, help="the git commit measured")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="CPU threads of torch (the operator count runs on the CPU)")
    parser.add_argument("--budget-s", type=int, default=420,
                        help="skip torch.compile when less than --compile-s of this is left")
    parser.add_argument("--compile-s", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if not (args.quick or args.allow_cpu):
            print("benchmarks/gpu.py: no CUDA device on this machine (torch "
                  f"{torch.__version__}, torch.cuda.is_available() is False); run it on a GPU, "
                  "or pass --quick (CPU smoke run) or --allow-cpu", file=sys.stderr)
            return 2
        print("benchmarks/gpu.py: no CUDA device; running on the CPU", file=sys.stderr)
        device = torch.device("cpu")
    results = run(args, QUICK if args.quick else FULL, device, started)
    machine = results["main"].machine
    meta = {"device_name": device_name(device), "git_commit": git_commit(args.commit),
            "command": command_line("gpu.py", argv), "time_utc": machine["time_utc"],
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "torchvision": torchvision.__version__, "onnxruntime": machine["onnxruntime"],
            "quick": args.quick, "seconds": time.perf_counter() - started}
    stem = "gpu_" + slug(meta["device_name"]) + ("_quick" if args.quick else "")
    write_results(args.out, stem, {"meta": meta, **{k: r.to_dict() for k, r in results.items()}},
                  report(meta, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
