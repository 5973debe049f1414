"""DIA's deployed cost in onnxruntime: the exact rewrites, low-precision weights, and the account.

Regenerates ``benchmarks/results/dia_cost_<model>.{json,md,png}`` (+ ``_cost.png``) and
``benchmarks/results/dia_cost.md`` (verdicts)::

    python benchmarks/dia_cost.py                          # ResNet-50, MobileNetV2, ViT-S/16
    python benchmarks/dia_cost.py --models resnet50 --runs 10

For each model, one process and one interleaving per batch size (onnxruntime CPU,
``allow_spinning=0``): the original, ``lean`` (fxattn's lean DIA model with the exact rewrites of
``fxattn.export.optimize``, export_onnx's default), ``lean-noopt`` (the same model exported
without them), low-precision DIA weights on top of the rewrites (``lean-int8``, ``lean-int4``)
and, for ResNet-50, the hand-written DIA-ResNet-50 of ``benchmarks/common/handwritten_dia.py``
(``hand-dia``, weights copied from the lean model, outputs checked equal) and the SSIA-only lean
model (``ssia-lean``). The load average is recorded before and after each model's timing; on a
shared machine only the ratios measured side by side mean something.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
import torchvision

import fxattn
from fxattn.bench import COMPILED_BASELINE
from fxattn.bench.cost import CostAccount

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks.common

from benchmarks.common.handwritten_dia import matched_hand_dia  # noqa: E402

LOWP_MODES = ("int8", "int4")
MODELS = ("resnet50", "mobilenet_v2", "vit_small_patch16_224")


def _build(name: str) -> torch.nn.Module:
    if name.startswith("vit"):
        import timm

        return timm.create_model(name, pretrained=False).eval()
    return torchvision.models.get_model(name, weights=None).eval()


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _run_model(name: str, args: argparse.Namespace) -> tuple[fxattn.BenchmarkResult, list[str]]:
    torch.manual_seed(0)
    model = _build(name)
    x = torch.randn(2, 3, 224, 224)
    extra: dict[str, torch.nn.Module] = {}
    notes: list[str] = []
    if name == "resnet50":
        lean = fxattn.strip_ssia(fxattn.transform(model, x, ssia=False))
        hand, gap = matched_hand_dia(lean, x)
        notes.append(f"hand-dia: max abs difference to fxattn's lean model in PyTorch {gap:.1e}")
        extra = {"hand-dia": hand,
                 "ssia-lean": fxattn.strip_ssia(fxattn.transform(model, x, dia=False))}
        del lean
    load_before = os.getloadavg()
    result = fxattn.benchmark(
        model, x, dia=True, ssia=False, batch_sizes=args.batches, threads=args.threads,
        runs=args.runs, warmup=args.warmup, engines=("onnxruntime",), extra=extra,
        dia_weights=LOWP_MODES, unoptimized=True, compiled=True, progress=sys.stderr.isatty(),
        title=f"{name} 224x224: DIA's deployed cost in onnxruntime",
        command="python benchmarks/dia_cost.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    load_after = os.getloadavg()
    before, after = (tuple(round(v, 2) for v in load) for load in (load_before, load_after))
    notes.append(f"load average (1, 5, 15 min) before timing {before}, after {after}")
    return result, notes


def _decided(margin: float, noise: float | None) -> str:
    """``met`` / ``not met``, or ``not decided`` when the margin is inside the noise floor."""
    if noise is not None and abs(margin) <= noise:
        return "not decided by this run (margin inside the noise floor)"
    return "met" if margin >= 0 else "not met"


def _baseline(model: str, stats: dict) -> str:
    """What a model's overhead is measured against: a compiled model against the original
    compiled the same way (a fixed batch alone can change onnxruntime's graph)."""
    compiled = model.endswith("-ort-cpu") and COMPILED_BASELINE in stats
    return COMPILED_BASELINE if compiled else "original"


def _target3(lean: str, acc: CostAccount | None) -> list[str]:
    """Target 3 for one lean model at one batch: added latency over the cost account's bound."""
    if acc is None or acc.multiple is None or acc.added_ms is None:
        return []
    lines = [f"  - target 3 ({lean}'s added latency within 2x of its lower bound): "
             f"{acc.added_ms:.2f} ms added vs {acc.lower_bound_ms:.2f} ms bound = "
             f"{acc.multiple:.2f}x -> {'met' if acc.multiple <= 2 else 'not met'}"]
    if acc.multiple_of_limit is not None and acc.traffic_limit_ms is not None:
        lines.append(f"  - against DIA's traffic limit (its matrices + one extra write "
                     f"and read of every branch output, what no graph that writes them can beat): "
                     f"{acc.traffic_limit_ms:.2f} ms, added = {acc.multiple_of_limit:.2f}x")
    return lines


def verdicts(name: str, result: fxattn.BenchmarkResult) -> list[str]:
    """The issue's targets for one model. The noise floor is the SSIA-only lean model's
    distance from 1: its ONNX graph is the original's, node for node, so any ratio it shows is
    the machine's noise; a verdict whose margin is smaller is not decided by the run."""
    ort = "onnxruntime"
    lines = [f"### {name}", ""]
    for b in result.latency[ort]:
        over = {m: result.ratio(ort, b, m, _baseline(m, result.latency[ort][b])) - 1
                for m in result.latency[ort][b] if m not in ("original", COMPILED_BASELINE)}
        row = ", ".join(f"{m} {_pct(1 + v)}" for m, v in over.items())
        lines.append(f"- batch {b}: overhead over the original: {row}")
        if COMPILED_BASELINE in result.latency[ort][b]:
            lines.append(f"  - the compiled models' overheads are over {COMPILED_BASELINE} (the "
                         f"original through the same compiler), itself "
                         f"{_pct(result.ratio(ort, b, COMPILED_BASELINE))} against the "
                         "original")
        noise = abs(over["ssia-lean"]) if "ssia-lean" in over else None
        if noise is not None:
            lines.append(f"  - noise floor: SSIA-only lean (identical ONNX node list "
                         f"{result.same_onnx_ops('ssia-lean', 'original')}) measured "
                         f"{_pct(1 + over['ssia-lean'])}")
        for lean in [m for m in ("lean", "lean-ort-cpu") if m in over and "hand-dia" in over]:
            share = over[lean] / over["hand-dia"]
            margin = 0.85 * over["hand-dia"] - over[lean]
            lines.append(f"  - target 1 ({lean} fp32 overhead <= 0.85x hand-written's): "
                         f"{share:.2f}x -> {_decided(margin, noise)}")
        best = min((m for m in over if m.startswith("lean-int")), key=over.get, default=None)
        if best is not None and b == 1:
            lines.append(f"  - target 2 (low-precision overhead <= 12% at batch 1): best {best} "
                         f"{_pct(1 + over[best])} -> {_decided(0.12 - over[best], noise)}")
        for lean in ("lean", "lean-ort-cpu"):
            lines += _target3(lean, result.cost.get(lean, {}).get(b))
        if "lean-noopt" in over:
            lines.append(f"  - the exact rewrites: lean {_pct(1 + over['lean'])} vs lean-noopt "
                         f"{_pct(1 + over['lean-noopt'])}")
    entry = result.models["lean"]
    lines.append(f"- export (lean, with the rewrites): {entry.export_seconds:.1f} s; "
                 f"lean-noopt {result.models['lean-noopt'].export_seconds:.1f} s")
    for variant, error in result.settings.get("dia_weights_failed_verification", {}).items():
        lines.append(f"- {variant}: not timed, fails its tolerance on these random weights "
                     f"({error})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",")]
    torch.set_num_threads(args.threads)
    summary = ["# DIA's deployed cost: verdicts", "",
               "Generated by `python benchmarks/dia_cost.py "
               + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "`; details per model in "
               "`dia_cost_<model>.md`. Ratios are of medians measured side by side in one "
               "process; re-measure on an idle machine before trusting absolute figures.", ""]
    for name in args.models.split(","):
        result, notes = _run_model(name, args)
        paths = result.save(args.out, stem=f"dia_cost_{name}")
        text = paths["md"].read_text() + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        paths["md"].write_text(text)
        summary += verdicts(name, result) + [f"- {n}" for n in notes] + [""]
        (Path(args.out) / "dia_cost.md").write_text("\n".join(summary) + "\n")
        print("\n".join(verdicts(name, result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
