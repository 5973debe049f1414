"""Accuracy effect of int4 block size on trained DIA models where the block size matters.

``benchmarks/evidence.py`` measures ``dia_weights="int8"`` and ``"int4"`` on its trained models,
but those are narrow (widths 8, 16, 32): DIA's matrices have at most 32 columns, so one
quantisation block of 32 already spans a whole row and blocks of 64 or 128 quantise the *same*
numbers. Here the MNIST-1D task of that benchmark (same data, same recipe and learning rate,
``benchmarks/common/evidence_tasks.py``) is trained with networks four and eight times wider
(widths 32, 64, 128 and 64, 128, 256: DIA's first layers have up to 128 and 256 columns, its
second layers up to 32 and 64), so blocks of 32, 64 and 128 rows quantise differently. Each
seed's lean model is exported once in fp32 (verified against PyTorch) and copied with DIA's
matrices as int8 / int4 ``MatMulNBits`` at each block size
(:func:`fxattn.export.lowp.apply_dia_weights`); every file is scored on the test set in onnxruntime,
and each low-precision copy is compared with the same model's fp32 file (paired by seed: test
accuracy change with a 95% t-interval, prediction agreement, largest logit change).

    python benchmarks/lowp_blocks.py                 # 10 seeds, 2 worker processes
    python benchmarks/lowp_blocks.py --seeds 0 --epochs 1 --out /tmp/smoke

Writes ``benchmarks/results/lowp_blocks.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common

from accuracy import accuracy, fit  # noqa: E402
from evidence import _onnx_eval, build, paired, task_data  # noqa: E402

import fxattn  # noqa: E402
from benchmarks.common.evidence_tasks import TASKS  # noqa: E402
from benchmarks.common.results_io import command_line, write_results  # noqa: E402
from fxattn.export.lowp import apply_dia_weights  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: the evidence benchmark's MNIST-1D network is (8, 16, 32)
WIDTHS = ((32, 64, 128), (64, 128, 256))
TASK = TASKS["mnist1d"]
LR = 0.3  # evidence.py's choice for MNIST-1D (validation sweep on its baseline)
#: (label, dia_weights mode, block size)
MODES = (("int8-b32", "int8", 32), ("int8-b128", "int8", 128), ("int4-b32", "int4", 32),
         ("int4-b64", "int4", 64), ("int4-b128", "int4", 128))


def run_seed(seed: int, epochs: int, widths: tuple[int, ...]) -> dict[str, Any]:
    """Train one seed of the wide DIA model and score its fp32 and low-precision exports."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    task = replace(TASK, epochs=epochs, widths=widths)
    data = task_data(task.name)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = data["train"], data["val"], data["test"]
    net = build(task, "dia", seed, train_x[:2])
    start = time.perf_counter()
    fit(net, train_x, train_y, epochs=task.epochs, batch=task.batch, lr=LR,
        momentum=task.momentum, weight_decay=task.weight_decay,
        generator=torch.Generator().manual_seed(seed), evaluate=lambda: accuracy(net, val_x, val_y))
    record: dict[str, Any] = {"seed": seed, "widths": list(widths),
                              "train_seconds": round(time.perf_counter() - start, 1),
                              "torch_test_acc": accuracy(net, test_x, test_y)}
    lean = fxattn.strip_ssia(net)
    labels = test_y.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        report = fxattn.export_onnx(lean, fp32, test_x[:2], exporter="torchscript")
        reference = _onnx_eval(fp32, test_x)
        record["fp32"] = {"test_acc": float((reference.argmax(1) == labels).mean()),
                          "verify_max_abs_error": report.max_abs_error}
        for label, mode, block in MODES:
            path = Path(tmp) / f"{label}.onnx"
            shutil.copyfile(fp32, path)
            note = apply_dia_weights(path, mode, block_size=block)
            logits = _onnx_eval(path, test_x)
            record[label] = {
                "test_acc": float((logits.argmax(1) == labels).mean()), "note": note,
                "prediction_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
                "max_abs_logit_change": float(np.abs(logits - reference).max())}
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    fp32 = np.array([r["fp32"]["test_acc"] for r in records])
    out: dict[str, Any] = {"seeds": len(records), "fp32_test_acc": float(fp32.mean()),
                           "fp32_test_acc_std": float(fp32.std(ddof=1)) if len(fp32) > 1 else 0.0,
                           "modes": {}}
    for label, _, _ in MODES:
        change = paired(np.array([r[label]["test_acc"] for r in records]), fp32)
        out["modes"][label] = {
            "change_pp": change["mean"] * 100,
            "ci95_pp": [bound * 100 for bound in change["ci95"]],
            "min_agreement": min(r[label]["prediction_agreement"] for r in records),
            "max_abs_logit_change": max(r[label]["max_abs_logit_change"] for r in records)}
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# int4 block size: accuracy effect on trained DIA models whose rows span several blocks",
        "", f"Command: `{results['command']}`. MNIST-1D "
        "(`benchmarks/common/evidence_tasks.py`, the "
        f"evidence benchmark's data and recipe: {results['epochs']} epochs, lr {LR}), its 1-D "
        "residual CNN made wider (the evidence benchmark's is 8, 16, 32; DIA on every residual "
        "block, r = 4), one model per seed; test set scored in onnxruntime; each low-precision "
        "copy paired by seed with the same model's fp32 ONNX file (change of test accuracy, "
        "mean and 95% t-interval). Load average "
        f"{results['load_average'][0]:.2f} at the end.", "",
        "| widths | fp32 ONNX test acc. (%) | DIA weights | Δ test acc. (pp) [95% CI] | "
        "min. prediction agreement | max abs logit change |", "|---|---|---|---|---|---|"]
    for widths, s in results["summary"].items():
        for label, m in s["modes"].items():
            low, high = m["ci95_pp"]
            lines.append(
                f"| {widths} | {s['fp32_test_acc'] * 100:.2f} ± "
                f"{s['fp32_test_acc_std'] * 100:.2f} ({s['seeds']} seeds) | {label} | "
                f"{m['change_pp']:+.2f} [{low:+.2f}, {high:+.2f}] | "
                f"{m['min_agreement'] * 100:.2f}% | {m['max_abs_logit_change']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--epochs", type=int, default=TASK.epochs)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    jobs = [(seed, widths) for widths in WIDTHS for seed in args.seeds]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        records = list(pool.map(run_seed, [seed for seed, _ in jobs], [args.epochs] * len(jobs),
                                [widths for _, widths in jobs]))
    summary = {", ".join(map(str, widths)): summarise([r for r in records
                                                      if r["widths"] == list(widths)])
               for widths in WIDTHS}
    results = {
        "command": command_line("lowp_blocks.py", argv),
        "epochs": args.epochs, "lr": LR, "load_average": list(os.getloadavg()),
        "summary": summary, "runs": records}
    write_results(args.out, "lowp_blocks", results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
