"""Training step time and peak memory: baseline / DIA / DIA+SSIA / hand-written DIA-ResNet-50.

Regenerates ``benchmarks/results/training.{json,md,png}`` and the verdict of target 6::

    python benchmarks/training.py                 # ResNet-50, batch 8, 224x224, ~5 minutes
    python benchmarks/training.py --size 64 --runs 3   # a quick look

Step time: one training step is ``zero_grad, forward, cross-entropy (+ fxattn.ssia_loss),
backward, SGD(momentum) step``; the four models run interleaved in one process
(``fxattn.bench.train_step_benchmark``) with ``torch.set_num_threads(threads)``.

Peak memory: each model is measured in its own fresh process (this script re-run with
``--memory-child``) with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed tensor
memory to the kernel instead of caching it; after one warm-up step (which creates gradients and
optimizer state) the kernel's peak-RSS counter is reset and the peak over two steps is read
(``fxattn.bench.peak_step_memory``). ``step MB`` is that peak minus the resident set before the
steps (activations, gradients' temporaries, autograd buffers); ``peak MB`` is the absolute peak
RSS of the process. ``tracemalloc`` would see none of torch's tensor memory, so it is not used.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

import fxattn
from fxattn.bench import machine_info, peak_step_memory, train_step_benchmark

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks.common

from benchmarks.common.handwritten_dia import hand_dia_resnet  # noqa: E402

CONFIGS = ("baseline", "dia", "dia+ssia", "hand-dia")
LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def build(config: str, batch: int, size: int) -> tuple[nn.Module, LossFn, torch.Tensor]:
    """The model of ``config``, its loss function and one batch of inputs (fixed seeds)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2))
    ce = nn.functional.cross_entropy

    def plain(m: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return ce(m(inputs), target)

    def with_ssia(m: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return ce(m(inputs), target) + fxattn.ssia_loss(m)

    example = x[:2]
    if config == "baseline":
        return model, plain, x
    if config == "dia":
        return fxattn.transform(model, example, dia=True, ssia=False), plain, x
    if config == "dia+ssia":
        return fxattn.transform(model, example, dia=True, ssia=True), with_ssia, x
    if config == "hand-dia":
        return hand_dia_resnet("resnet50"), plain, x
    raise SystemExit(f"unknown config {config}")


def memory_child(config: str, batch: int, size: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model, loss_fn, x = build(config, batch, size)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, x).backward()
        optimizer.step()

    step()  # gradients and momentum buffers exist from here on
    print(json.dumps(peak_step_memory(step, steps=2)))


def measure_memory(config: str, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-child", config, "--batch", str(args.batch),
           "--size", str(args.size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plot(path: Path, step_ms: dict[str, float], memory: dict[str, dict[str, float]],
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = list(step_ms)
    colors = [f"C{i}" for i in range(len(names))]
    bars = a.bar(names, [step_ms[n] for n in names], color=colors)
    for bar, n in zip(bars, names, strict=True):
        a.annotate(f"{step_ms[n] / step_ms['baseline']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                   bar.get_height()), ha="center", va="bottom", fontsize=8)
    a.set_ylabel("training step p50, ms")
    bars = b.bar(names, [memory[n]["delta_mb"] for n in names], color=colors)
    for bar, n in zip(bars, names, strict=True):
        b.annotate(f"{memory[n]['delta_mb'] / memory['baseline']['delta_mb']:.2f}x",
                   (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                   va="bottom", fontsize=8)
    b.set_ylabel("step memory (peak RSS - RSS before), MB")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.batch, args.size, args.threads)
        return 0

    torch.set_num_threads(args.threads)
    command = "python benchmarks/training.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_before = os.getloadavg()
    candidates = {}
    for config in CONFIGS:
        model, loss_fn, x = build(config, args.batch, args.size)
        candidates[config] = (model, loss_fn)
    stats = train_step_benchmark(candidates, x, runs=args.runs, warmup=args.warmup)
    load_mid = os.getloadavg()
    memory = {config: measure_memory(config, args) for config in CONFIGS}
    load_after = os.getloadavg()
    machine = machine_info(args.threads)

    step = {n: s.p50_ms for n, s in stats.items()}
    dia_vs_hand = step["dia"] / step["hand-dia"]
    ssia_vs_dia = step["dia+ssia"] / step["dia"]
    mem_ratio = memory["dia+ssia"]["delta_mb"] / memory["dia"]["delta_mb"]
    peak_ratio = memory["dia+ssia"]["peak_mb"] / memory["dia"]["peak_mb"]
    title = f"ResNet-50 training step, batch {args.batch}, {args.size}x{args.size}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "title": title, "command": command.strip(), "machine": machine,
        "settings": {"batch": args.batch, "size": args.size, "threads": args.threads,
                     "runs": args.runs, "warmup": args.warmup, "optimizer": "SGD momentum 0.9",
                     "memory_method": "fresh process per model, MALLOC_MMAP_THRESHOLD_=65536, "
                                      "VmHWM reset via /proc/self/clear_refs, peak over 2 steps"},
        "step_ms": {n: s.to_dict() for n, s in stats.items()},
        "memory_mb": memory,
        "load_average": {"before": load_before, "after_timing": load_mid, "after": load_after},
        "ratios": {"dia_vs_hand": dia_vs_hand, "dia_ssia_vs_dia": ssia_vs_dia,
                   "step_memory_dia_ssia_vs_dia": mem_ratio,
                   "peak_rss_dia_ssia_vs_dia": peak_ratio},
    }
    (out / "training.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(out / "training.png", step, memory, title)
    lines = [
        f"## {title}", "", "Command:", "", "```", command.strip(), "```", "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} logical CPUs); torch "
        f"{machine['torch']}, torch.set_num_threads({args.threads}). Load average (1, 5, 15 min) "
        f"before: {tuple(round(v, 2) for v in load_before)}, after the step timing: "
        f"{tuple(round(v, 2) for v in load_mid)} (2 cores shared with other jobs).",
        f"Step: zero_grad, forward, cross-entropy (+ `fxattn.ssia_loss` for dia+ssia), backward, "
        f"SGD momentum step; {args.runs} interleaved steps per model after {args.warmup} "
        "warm-up rounds. Memory: " + data["settings"]["memory_method"] + " (see the script's "
        "docstring for why).", "",
        "| model | step p50 ms | p90 ms | vs baseline | step MB | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, s in stats.items():
        lines.append(f"| {n} | {s.p50_ms:.0f} | {s.p90_ms:.0f} | {s.p50_ms / step['baseline']:.3f} "
                     f"| {memory[n]['delta_mb']:.0f} | {memory[n]['peak_mb']:.0f} |")
    met = dia_vs_hand <= 1.05 and ssia_vs_dia <= 1.10 and mem_ratio <= 1.10
    lines += [
        "", "## Verdict (target 6)", "",
        f"6. **{'met' if met else 'not met'}.** DIA-only step / hand-written DIA-ResNet-50 step = "
        f"{dia_vs_hand:.3f} (target <= 1.05); DIA+SSIA / DIA-only = {ssia_vs_dia:.3f} (target "
        f"<= 1.10); step memory DIA+SSIA / DIA-only = {mem_ratio:.3f} (target <= 1.10; absolute "
        f"peak RSS ratio {peak_ratio:.3f}).", "",
    ]
    (out / "training.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
