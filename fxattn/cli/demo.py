"""``fxattn demo``: the whole pipeline on a built-in default, in well under two minutes.

torchvision ResNet-18 (random weights, 10 classes) -> transform (DIA + SSIA) -> a few SGD
steps on generated data with the SSIA loss -> strip -> ONNX export verified in onnxruntime ->
the lean model compiled for onnxruntime's CPU provider at batch 1 -> latency of the original,
the lean and the compiled lean model, measured side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from ..analysis.graph import count_parameters
from ..bench.protocol import interleaved
from ..capture import ExampleInputs
from ..deploy import compile_ort_cpu
from ..export import export_onnx
from ..export.runtime import ort_feed, ort_session
from ..transform import ssia_loss, strip_ssia, transform


@dataclass(frozen=True)
class DemoResult:
    losses: list[float]
    ssia_losses: list[float]
    baseline_ms: float
    lean_ms: float
    compiled_ms: float
    out_dir: Path


def synthetic_batches(
    classes: int, size: int, batch: int, steps: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable toy task: each class is a fixed random pattern plus noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, size, size, generator=generator)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, classes, (batch,), generator=generator)
        images = patterns[labels] + 0.5 * torch.randn(batch, 3, size, size, generator=generator)
        batches.append((images, labels))
    return batches


def run_demo(
    out_dir: Path = Path("fxattn-demo"),
    steps: int = 8,
    size: int = 96,
    batch: int = 8,
    runs: int = 20,
    console: Console | None = None,
) -> DemoResult:
    import torchvision

    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    example = torch.randn(2, 3, size, size)

    start = time.perf_counter()
    net = transform(model, example, dia=True, ssia=True)
    plan = net.plan
    console.print(
        f"[bold]transform[/] torchvision:resnet18 in {time.perf_counter() - start:.2f} s: "
        f"{len(plan.sites)} DIA sites in {len(plan.dia_modules)} shared cells "
        f"(+{plan.dia_parameters:,} params), {len(plan.active_pairs)} SSIA pairs"
    )

    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    losses, ssia_values = [], []
    net.train()
    for images, labels in synthetic_batches(10, size, batch, steps):
        optimizer.zero_grad()
        task = criterion(net(images), labels)
        aux = ssia_loss(net)
        (task + aux).backward()
        optimizer.step()
        losses.append(task.item())
        ssia_values.append(aux.item())
    console.print(
        f"[bold]train[/] {steps} SGD steps on generated data: task loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}, SSIA loss {ssia_values[0]:.4f} -> {ssia_values[-1]:.4f}"
    )

    lean = strip_ssia(net)
    console.print(
        f"[bold]strip[/] lean model: {count_parameters(lean):,} params "
        f"(original {count_parameters(model):,}); SSIA nodes removed: "
        f"{lean.meta['fxattn_strip'].removed_nodes}"
    )
    lean_path, base_path = out_dir / "resnet18_lean.onnx", out_dir / "resnet18_original.onnx"
    report = export_onnx(lean, lean_path, example)
    console.print(
        f"[bold]export[/] {lean_path} ({report.file_bytes / 1e6:.1f} MB, {report.nodes} nodes) "
        f"in {report.export_seconds:.1f} s; onnxruntime vs PyTorch max abs error "
        f"{report.max_abs_error:.1e} at batch 2 and 3"
    )
    model.eval()
    export_onnx(model, base_path, example, verify=False)
    compiled_path = out_dir / "resnet18_lean.b1.onnx"
    compiled = compile_ort_cpu(lean_path, compiled_path, batch_size=1)
    console.print(
        f"[bold]compile[/] {compiled_path} for onnxruntime's CPU provider at batch 1: "
        f"{compiled.fused} of {compiled.dia_multiplies} DIA multiplies fused into its blocked "
        f"convolutions; max abs error to the portable model {compiled.max_abs_error:.1e}"
    )

    threads = torch.get_num_threads()
    one = ExampleInputs.from_user(torch.randn(1, 3, size, size))
    sessions = {"original": ort_session(str(base_path), threads),
                "lean": ort_session(str(lean_path), threads),
                "compiled": ort_session(str(compiled_path), threads)}
    feeds = {name: ort_feed(s, one) for name, s in sessions.items()}
    stats = interleaved({name: (lambda s=s, f=feeds[name]: s.run(None, f))
                         for name, s in sessions.items()}, runs=runs, warmup=3)
    latency = {name: stats[name].p50_ms for name in sessions}
    base_ms = latency["original"]
    console.print(
        f"[bold]latency[/] onnxruntime, batch 1, {size}x{size}, {threads} threads, median of "
        f"{runs} interleaved runs: original {base_ms:.2f} ms -> lean (DIA) "
        f"{latency['lean']:.2f} ms ({latency['lean'] / base_ms:.2f}x), compiled "
        f"{latency['compiled']:.2f} ms ({latency['compiled'] / base_ms:.2f}x)"
    )
    picture = save_summary_picture(out_dir / "demo.png", lean, size, latency, runs)
    console.print(f"[bold]picture[/] {picture}: latency before/after and the DIA attention "
                  "correlation between the blocks of each stage")
    return DemoResult(losses, ssia_values, base_ms, latency["lean"], latency["compiled"],
                      out_dir)


def save_summary_picture(
    path: Path, lean: torch.nn.Module, size: int, latency: dict[str, float], runs: int
) -> Path:
    """One PNG: the latency bars and the attention-correlation heatmaps of the lean model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..diagnostics import attention_correlation, plot_correlation

    report = attention_correlation(lean, torch.randn(16, 3, size, size))
    figure, axes = plt.subplots(1, 1 + len(report.stages),
                                figsize=(3.4 * (1 + len(report.stages)), 3.6))
    labels = {"original": "original", "lean": "lean (DIA)", "compiled": "lean, compiled"}
    bars = axes[0].bar([labels[name] for name in latency], list(latency.values()),
                       color=["#888", "#c44", "#e83"][:len(latency)])
    axes[0].bar_label(bars, fmt="%.2f ms")
    axes[0].set_ylabel("onnxruntime p50 latency, batch 1 (ms)")
    axes[0].tick_params(axis="x", labelsize=8)
    axes[0].set_title(f"{size}x{size}, median of {runs} interleaved runs", fontsize=9)
    plot_correlation(report, axes=list(axes[1:]),
                     title="fxattn demo: ResNet-18 latency and DIA attention correlation")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
