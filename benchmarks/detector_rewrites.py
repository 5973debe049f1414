"""Whole lean DIA detectors in onnxruntime, with and without the exact DIA rewrites.

``fxattn.export_onnx`` exports a torchvision detector whole (pre-processing to NMS) through
``fxattn.export.detector``; the exact rewrites of ``fxattn.export.optimize`` (on by default) now
apply there too. For each detector (random weights, SSIA off) this script exports the original,
the lean DIA detector with ``optimize=False``, with the defaults and with int4 DIA matrices
(``dia_weights="int4"``), and times the four files interleaved in one process (onnxruntime
CPU, 2 intra-op threads, no spinning, every session alive,
``fxattn.bench.interleaved_samples``: warm-up, then rounds in a shuffled order; medians)::

    python benchmarks/detector_rewrites.py                 # Faster R-CNN MobileNetV3-320, RetinaNet
    python benchmarks/detector_rewrites.py --models fasterrcnn_mobilenet_v3_large_320_fpn

Writes ``benchmarks/results/detector_rewrites.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

import fxattn
from fxattn.bench import interleaved_samples, machine_info
from fxattn.export.detection import random_detection_batch
from fxattn.export.runtime import ort_session

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks.common

from benchmarks.common.results_io import command_line, write_results  # noqa: E402

#: detector -> keyword arguments of its builder (image size: what its transform resizes to)
MODELS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {},
    "retinanet_resnet50_fpn": {"min_size": 320, "max_size": 320},
}


def build(name: str, folder: Path, size: int) -> tuple[dict[str, Path], dict[str, str]]:
    torch.manual_seed(0)
    detector = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                            num_classes=3, **MODELS[name]).eval()
    batch = random_detection_batch(2, sizes=((size, size), (size, size)), num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lean = fxattn.strip_ssia(fxattn.transform(detector, batch, ssia=False))
    images = (batch[0][:1],)  # one image: one ONNX input
    variants = {"original": (detector, True, None), "lean-unoptimized": (lean, False, None),
                "lean": (lean, True, None), "lean-int4": (lean, True, "int4")}
    files = {key: folder / f"{key}.onnx" for key in variants}
    notes = {}
    for key, (module, optimize, dia_weights) in variants.items():
        report = fxattn.export_onnx(module, files[key], images, optimize=optimize,
                                    dia_weights=dia_weights)
        notes[key] = "; ".join(n.split(" (")[0] for n in report.notes
                               if n.startswith(("exact DIA", "DIA matrices"))) or "-"
        print(f"{name} {key}: {report.nodes} nodes; {notes[key]}", flush=True)
    return files, notes


def time_files(files: dict[str, Path], size: int, rounds: int, warmup: int,
               threads: int) -> dict[str, list[float]]:
    image = np.random.default_rng(1).random((3, size, size), dtype=np.float32)
    sessions = {k: ort_session(str(p), threads=threads, spinning=False) for k, p in files.items()}
    calls = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: image}))
             for k, s in sessions.items()}
    samples = interleaved_samples(calls, rounds, warmup, shuffle=random.Random(0))
    return {k: [t * 1000 for t in v] for k, v in samples.items()}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Whole lean DIA detectors in onnxruntime: the exact DIA rewrites on and off", "",
        f"Command: `{results['command']}`. Machine: {m.get('cpu', '?')}, "
        f"{m.get('cpu_count', os.cpu_count())} logical CPUs; onnxruntime "
        f"{m.get('onnxruntime', '?')}, {results['threads']} intra-op threads, no spinning, "
        f"{results['rounds']} interleaved rounds per file, one {results['size']}x"
        f"{results['size']} image, random weights, SSIA off; load average "
        f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after.", "",
        "| detector | file | rewrites | p50 ms | over the original |",
        "|---|---|---|---:|---:|"]
    for name, run in results["models"].items():
        base = run["p50_ms"]["original"]
        for key, p50 in run["p50_ms"].items():
            over = "" if key == "original" else f"{(p50 / base - 1) * 100:+.1f}%"
            lines.append(f"| {name} | {key} | {run['rewrites'][key]} | {p50:.1f} | {over} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    models = {}
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            files, notes = build(name, Path(tmp), args.size)
            samples = time_files(files, args.size, args.rounds, args.warmup, args.threads)
        models[name] = {"rewrites": notes,
                        "p50_ms": {k: float(np.median(v)) for k, v in samples.items()},
                        "samples_ms": samples}
    results = {
        "command": command_line("detector_rewrites.py", argv),
        "machine": machine_info(args.threads, False), "threads": args.threads,
        "size": args.size, "rounds": args.rounds, "load_before": list(load_before),
        "load_after": list(os.getloadavg()), "models": models}
    write_results(args.out, "detector_rewrites", results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
