"""DIA with low-precision weights, compiled, against ResNet-50: target 2, with confidence intervals.

Target 2 of the DIA speed work asks for the lean DIA-ResNet-50 with low-precision DIA weights to
add at most 12% over ResNet-50 at batch 1 (onnxruntime CPU, 2 threads). This script measures it
with the block protocol of ``dia_vs_handwritten.py`` (fresh sessions in every block, shuffled
rounds, a two-level bootstrap over blocks and rounds) for:

* ``original`` and ``original-ort-cpu``: ResNet-50, as exported and through
  ``fxattn.compile_ort_cpu`` (onnxruntime's own graph at a fixed batch). The overheads are
  measured against ``original-ort-cpu``, so that a fixed batch alone is not credited to DIA;
* ``lean-ort-cpu``: the exact fp32 lean model, compiled;
* ``lean-int8-ort-cpu``, ``lean-int4-ort-cpu``: its DIA matrices stored as int8 / int4
  ``MatMulNBits`` (``export_onnx(dia_weights=...)``: blocks of up to 128 rows, the default; its
  accuracy effect against blocks of 32 is measured by ``benchmarks/lowp_blocks.py``), compiled;
* ``lean-int4-b32-ort-cpu``: int4 with blocks of 32 rows (the default before; a scale per 32
  weights to read).

The target is *met* when the whole 95% interval of a low-precision model's overhead is at most
12%, *not met* when all of it is above, *not decided* otherwise.

    python benchmarks/dia_lowp.py                  # no spinning: every session alive, interleaved
    python benchmarks/dia_lowp.py --spinning       # onnxruntime's default threading

Writes ``benchmarks/results/dia_lowp[_spinning].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

import fxattn
from fxattn.bench import machine_info
from fxattn.export.lowp import DEFAULT_BLOCK_SIZE, apply_dia_weights

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks.common

from dia_vs_handwritten import BOOTSTRAP, resampled, time_blocks  # noqa: E402

from benchmarks.common.results_io import command_line, write_results  # noqa: E402

TARGET = 0.12
BASELINE = "original-ort-cpu"
#: portable files: name -> (model, DIA weights, int block size)
PORTABLE = {"original": ("original", None, DEFAULT_BLOCK_SIZE),
            "lean": ("lean", None, DEFAULT_BLOCK_SIZE),
            "lean-int8": ("lean", "int8", DEFAULT_BLOCK_SIZE),
            "lean-int4": ("lean", "int4", DEFAULT_BLOCK_SIZE),
            "lean-int4-b32": ("lean", "int4", 32)}
LOW_PRECISION = ("lean-int8-ort-cpu", "lean-int4-ort-cpu", "lean-int4-b32-ort-cpu")


def export_files(folder: Path, size: int) -> dict[str, Path]:
    """The portable ONNX files, each verified against PyTorch."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(2, 3, size, size)
    modules = {"original": model,
               "lean": fxattn.strip_ssia(fxattn.transform(model, x, ssia=False))}
    files = {}
    for name, (source, mode, block) in PORTABLE.items():
        files[name] = folder / f"{name}.onnx"
        if block == DEFAULT_BLOCK_SIZE:
            fxattn.export_onnx(modules[source], files[name], x, dia_weights=mode)
        else:  # the same fp32 export, requantised with another block size
            shutil.copy(files[source], files[name])
            apply_dia_weights(files[name], mode, block_size=block)
    return files


def compile_files(files: dict[str, Path], folder: Path, batch: int) -> dict[str, Path]:
    compiled = {}
    for name, source in files.items():
        compiled[f"{name}-ort-cpu"] = folder / f"{name}.b{batch}.onnx"
        report = fxattn.compile_ort_cpu(source, compiled[f"{name}-ort-cpu"], batch_size=batch)
        print(f"{name}-ort-cpu: {report.fused} of {report.dia_multiplies} fused "
              f"({report.folded} folded), max abs error {report.max_abs_error:.1e}", flush=True)
    return compiled


def statistics(samples: dict[str, list[list[float]]], seed: int = 0) -> dict[str, Any]:
    """Each model's overhead over ``original-ort-cpu`` with its 95% two-level bootstrap
    interval (blocks, then rounds within a block), and the target's verdicts."""
    arrays = {n: np.asarray(v) for n, v in samples.items()}  # (blocks, rounds)
    blocks, rounds = arrays[BASELINE].shape

    def overheads(values: dict[str, np.ndarray]) -> dict[str, float]:
        base = np.median(values[BASELINE])
        return {n: float(np.median(v) / base - 1) for n, v in values.items()}

    draws: dict[str, list[float]] = {n: [] for n in arrays}
    for sample in resampled(arrays, seed):
        for name, value in overheads(sample).items():
            draws[name].append(value)
    point = overheads(arrays)
    out: dict[str, Any] = {"blocks": blocks, "rounds_per_block": rounds,
                           "p50_ms": {n: float(np.median(v)) for n, v in arrays.items()},
                           "overhead": point, "ci95": {}, "verdict": {}}
    for name in arrays:
        low, high = (float(np.percentile(draws[name], q)) for q in (2.5, 97.5))
        out["ci95"][name] = [low, high]
        if name in LOW_PRECISION:
            out["verdict"][name] = ("met" if high <= TARGET else "not met" if low > TARGET
                                    else "not decided")
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    threading = ("spinning workers (onnxruntime's default); each block gives every file in turn "
                 "the only live session" if results["spinning"] else
                 "no spinning; each block opens fresh sessions, each round runs every session "
                 "once in a shuffled order")
    lines = [
        "# Low-precision DIA weights, compiled: ResNet-50 overhead (target 2: <= 12% at batch 1)",
        "", f"Command: `{results['command']}`. Machine: {m.get('cpu', '?')}, "
        f"{m.get('cpu_count', os.cpu_count())} logical CPUs; onnxruntime "
        f"{m.get('onnxruntime', '?')}, {results['threads']} intra-op threads, {threading}; "
        f"{results['size']}x{results['size']} input; load average "
        f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after.", "",
        f"Overhead = median / median of `{BASELINE}` - 1 (the original through the same "
        "compiler); 95% intervals by a two-level bootstrap (blocks, then rounds; "
        f"{BOOTSTRAP} draws). `original` is the portable original: its distance from "
        f"`{BASELINE}` is what a fixed batch alone gives. int8 / int4: DIA's matrices as "
        f"`MatMulNBits` with blocks of up to {DEFAULT_BLOCK_SIZE} rows (`b32`: 32), symmetric, "
        "`accuracy_level` 4.", "",
        "| batch | blocks x rounds | model | p50 ms | overhead [95% CI] | target 2 |",
        "|---:|---:|---|---:|---|---|",
    ]
    for batch, s in results["batches"].items():
        for name, p50 in s["p50_ms"].items():
            low, high = s["ci95"][name]
            lines.append(f"| {batch} | {s['blocks']} x {s['rounds_per_block']} | {name} | "
                         f"{p50:.2f} | {s['overhead'][name] * 100:+.1f}% "
                         f"[{low * 100:+.1f}, {high * 100:+.1f}] | "
                         f"{s['verdict'].get(name, '')} |")
    return "\n".join(lines) + "\n"


def add_block_arguments(parser: argparse.ArgumentParser) -> None:
    """The block protocol's settings (``time_blocks``), the image side and the output folder."""
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=HERE / "results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    add_block_arguments(parser)
    parser.add_argument("--spinning", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files = export_files(Path(tmp), args.size)
        load_before = os.getloadavg()
        rng = random.Random(0)
        batches = {}
        for batch in args.batches:
            feed = np.random.default_rng(batch).standard_normal(
                (batch, 3, args.size, args.size)).astype(np.float32)
            timed = {"original": files["original"], **compile_files(files, Path(tmp), batch)}
            samples = time_blocks(timed, feed, args.blocks, args.rounds, args.warmup,
                                  args.threads, rng, spinning=args.spinning)
            batches[str(batch)] = {**statistics(samples), "samples_ms": samples}
            print(f"batch {batch}: " + json.dumps({k: v for k, v in batches[str(batch)].items()
                                                   if k != "samples_ms"}), flush=True)
        load_after = os.getloadavg()
    results = {
        "command": command_line("dia_lowp.py", argv),
        "machine": machine_info(args.threads, args.spinning), "threads": args.threads,
        "size": args.size, "spinning": args.spinning,
        "load_before": list(load_before), "load_after": list(load_after), "batches": batches,
    }
    stem = "dia_lowp_spinning" if args.spinning else "dia_lowp"
    write_results(args.out, stem, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
