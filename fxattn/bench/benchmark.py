"""The benchmark protocol: interleaved A/B latency, training step time and peak memory.

Interleaving (A, B, A, B, ...) makes a *ratio* hold on a noisy machine: both sides see the
same background load. onnxruntime sessions are created with ``allow_spinning = 0`` so an idle
session's worker threads do not steal cores from the one being timed (with several sessions
alive in one process on 2 cores, spinning idle sessions roughly doubled ResNet-50's latency).
``spinning=True`` measures onnxruntime's default threading instead (what a deployment gets):
each model is then timed with the only live session, in blocks that alternate the models
(workers that sleep between nodes cost DIA's many small nodes a wake-up each: ResNet-50 with
DIA measured +54% over the original without spinning and +41% with it).

:func:`benchmark` compares an original model with its lean fxattn version (and optional extra
models, e.g. a hand-written reference, and low-precision DIA exports) in PyTorch eager and in
onnxruntime, at several batch sizes, and returns a :class:`BenchmarkResult` that writes JSON,
Markdown and a PNG plot. :func:`train_step_benchmark` times interleaved training steps.
:func:`peak_step_memory` measures the peak resident memory of training steps (see its docstring
for why RSS, and how it is made honest).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Tolerance
from ..errors import ConfigError, InputError, VerificationError, first_line
from ..export.portable import EXPORTERS
from ..export.runtime import ort_feed, ort_session, torch_threads

ENGINES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class LatencyStats:
    name: str
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(name: str, seconds: Sequence[float]) -> LatencyStats:
    values = sorted(s * 1000.0 for s in seconds)
    return LatencyStats(
        name=name,
        runs=len(values),
        p50_ms=_percentile(values, 0.50),
        p90_ms=_percentile(values, 0.90),
        p99_ms=_percentile(values, 0.99),
        mean_ms=statistics.fmean(values),
    )


def interleaved(
    candidates: dict[str, Callable[[], Any]],
    runs: int = 30,
    warmup: int = 5,
    progress: Callable[[], None] | None = None,
) -> dict[str, LatencyStats]:
    """Time each callable ``runs`` times, alternating between them, after ``warmup`` rounds.

    ``progress`` is called once per round (warm-up rounds included).
    """
    samples = interleaved_samples(candidates, runs, warmup, progress)
    return {name: summarize(name, values) for name, values in samples.items()}


def interleaved_samples(
    candidates: dict[str, Callable[[], Any]],
    runs: int = 30,
    warmup: int = 5,
    progress: Callable[[], None] | None = None,
    shuffle: random.Random | None = None,
) -> dict[str, list[float]]:
    """The seconds of every timed call of :func:`interleaved`, per candidate, in round order.

    With ``shuffle``, each round (warm-up included) runs the candidates in a new order drawn
    from it, so that no candidate always follows the same neighbour.
    """
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + runs):
        if shuffle is not None:
            shuffle.shuffle(names)
        for name in names:
            start = time.perf_counter()
            candidates[name]()
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    return samples


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(threads: int, spinning: bool = False) -> dict[str, Any]:
    """Machine, versions and thread settings, recorded with every result."""
    import onnx
    import onnxruntime
    import torchvision

    from .. import __version__

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "fxattn": __version__,
        "torch_num_threads": torch.get_num_threads(),
        "ort_intra_op_num_threads": threads,
        "ort_inter_op_num_threads": 1,
        "ort_allow_spinning": int(spinning),
        "load_average_1_5_15": [round(v, 2) for v in load],
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


# --------------------------------------------------------------------------- latency benchmark


@dataclass
class ModelEntry:
    """One model of a benchmark: its parameters, its ONNX export and how long things took."""

    name: str
    parameters: int
    onnx_nodes: int | None = None
    onnx_ops: list[str] = field(default_factory=list)
    onnx_mb: float | None = None
    export_seconds: float | None = None
    transform_seconds: float | None = None
    max_abs_error: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("onnx_ops")
        return data


@dataclass
class BenchmarkResult:
    """Everything one :func:`benchmark` call measured; ``save`` writes JSON, Markdown and PNG."""

    title: str
    baseline: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    models: dict[str, ModelEntry]
    latency: dict[str, dict[int, dict[str, LatencyStats]]]  # engine -> batch -> model -> stats
    command: str = ""
    cost: dict[str, dict[int, Any]] = field(default_factory=dict)  # model -> batch -> account

    def ratio(self, engine: str, batch: int, model: str, baseline: str | None = None) -> float:
        """Ratio of medians ``model / baseline`` measured side by side."""
        stats = self.latency[engine][batch]
        return stats[model].p50_ms / stats[baseline or self.baseline].p50_ms

    def same_onnx_ops(self, a: str, b: str) -> bool:
        """Whether two models exported the same ONNX node list (op types in order)."""
        return self.models[a].onnx_ops == self.models[b].onnx_ops

    def to_dict(self) -> dict[str, Any]:
        latency = {
            engine: {
                str(batch): {
                    name: {**stats.to_dict(),
                           "throughput_per_s": 1000.0 * batch / stats.p50_ms,
                           f"ratio_vs_{self.baseline}": stats.p50_ms
                           / by_model[self.baseline].p50_ms}
                    for name, stats in by_model.items()
                }
                for batch, by_model in by_batch.items()
            }
            for engine, by_batch in self.latency.items()
        }
        return {
            "title": self.title,
            "command": self.command,
            "baseline": self.baseline,
            "machine": self.machine,
            "settings": self.settings,
            "models": {name: entry.to_dict() for name, entry in self.models.items()},
            "latency": latency,
            "cost": {name: {str(b): account.to_dict() for b, account in by_batch.items()}
                     for name, by_batch in self.cost.items()},
        }

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.command:
            lines += ["Command:", "", "```", self.command, "```", ""]
        m, s = self.machine, self.settings
        lines += [
            f"Machine: {m['cpu']} ({m['cpu_count']} logical CPUs), load average "
            f"{m['load_average_1_5_15']} at the start; torch {m['torch']}, onnxruntime "
            f"{m['onnxruntime']}, onnx {m['onnx']}, python {m['python']}.",
            f"Threads: torch.set_num_threads({m['torch_num_threads']}), onnxruntime "
            f"intra_op_num_threads={m['ort_intra_op_num_threads']}, inter_op_num_threads=1, "
            f"session.intra_op.allow_spinning={m.get('ort_allow_spinning', 0)}.",
            f"Protocol: {s['runs']} interleaved runs after {s['warmup']} warm-up rounds per "
            f"engine and batch size, input {s['input_shape']}; ratios are of medians (p50) "
            "measured side by side in this process."
            + (f" onnxruntime with spinning workers: each model timed with the only live "
               f"session, in {s['spinning_blocks']} blocks that alternate the models."
               if s.get("spinning") else ""),
            "",
            "| model | parameters | ONNX nodes | ONNX MB | export s | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for entry in self.models.values():
            lines.append(
                f"| {entry.name} | {entry.parameters:,} | {_fmt(entry.onnx_nodes)} | "
                f"{_fmt(entry.onnx_mb, '.1f')} | {_fmt(entry.export_seconds, '.2f')} | "
                f"{entry.note} |"
            )
        lines += [
            "",
            "| engine | batch | model | p50 ms | p90 ms | p99 ms | images/s "
            f"| vs {self.baseline} |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for engine, by_batch in self.latency.items():
            for batch, by_model in by_batch.items():
                for name, st in by_model.items():
                    ratio = st.p50_ms / by_model[self.baseline].p50_ms
                    lines.append(
                        f"| {engine} | {batch} | {name} | {st.p50_ms:.2f} | {st.p90_ms:.2f} | "
                        f"{st.p99_ms:.2f} | {1000.0 * batch / st.p50_ms:.1f} | {ratio:.3f} |"
                    )
        if {"torch", "onnxruntime"} <= set(self.latency):
            lines += ["", "onnxruntime speed-up over PyTorch eager "
                      "(p50 torch / p50 onnxruntime):", ""]
            for batch in self.latency["onnxruntime"]:
                if batch not in self.latency["torch"]:
                    continue
                parts = []
                for name in self.latency["onnxruntime"][batch]:
                    if name in self.latency["torch"][batch]:
                        speedup = (self.latency["torch"][batch][name].p50_ms
                                   / self.latency["onnxruntime"][batch][name].p50_ms)
                        parts.append(f"{name} {speedup:.2f}x")
                lines.append(f"- batch {batch}: " + ", ".join(parts))
        lines += self._cost_markdown()
        return "\n".join(lines) + "\n"

    def _cost_markdown(self) -> list[str]:
        if not self.cost:
            return []
        bandwidth = next(iter(next(iter(self.cost.values())).values())).bandwidth_gb_s
        lines = [
            "", f"DIA's cost account (onnxruntime; see `fxattn.cost`): memory bandwidth "
            f"{bandwidth:.1f} GB/s (tensor copy, measured in this run); lower bound = (DIA "
            "matrix bytes + extra activation bytes) / bandwidth; traffic limit = (DIA matrix "
            "bytes + one extra write and read of every branch output) / bandwidth, what no "
            "graph that writes DIA's branch outputs can beat (a compiled model that folds h "
            "into a convolution's weights writes fewer); added = p50 - p50 of "
            f"{self.baseline}.", "",
            "| model | batch | DIA matrices MB/run | MB/image | extra activation MB/run | "
            "extra ops in onnxruntime's graph | lower bound ms | added ms | multiple | "
            "traffic limit ms | multiple of it |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for name, by_batch in self.cost.items():
            for batch, acc in by_batch.items():
                ops = ", ".join(f"{op} {n:+d}" for op, n in acc.extra_ops.items()) or "-"
                lines.append(
                    f"| {name} | {batch} | {acc.dia_matrix_bytes / 1e6:.1f} | "
                    f"{acc.dia_matrix_bytes / batch / 1e6:.1f} | "
                    f"{acc.extra_activation_bytes / 1e6:.1f} | {ops} | "
                    f"{acc.lower_bound_ms:.2f} | {_fmt(acc.added_ms, '.2f')} | "
                    f"{_fmt(acc.multiple, '.2f')} | {_fmt(acc.traffic_limit_ms, '.2f')} | "
                    f"{_fmt(acc.multiple_of_limit, '.2f')} |")
        return lines

    def plot_cost(self, path: str | os.PathLike[str]) -> None:
        """Bars: DIA's added latency next to its memory-bandwidth lower bound, per batch."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batches = sorted({b for by_batch in self.cost.values() for b in by_batch})
        fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8),
                                 squeeze=False)
        for ax, batch in zip(axes[0], batches, strict=True):
            names = [n for n, by_batch in self.cost.items() if batch in by_batch]
            accounts = [self.cost[n][batch] for n in names]
            xs = np.arange(len(names))
            ax.bar(xs - 0.2, [a.lower_bound_ms for a in accounts], 0.4, label="lower bound")
            ax.bar(xs + 0.2, [a.added_ms or 0.0 for a in accounts], 0.4, label="added (measured)")
            for x, acc in zip(xs, accounts, strict=True):
                if acc.multiple is not None:
                    ax.annotate(f"{acc.multiple:.1f}x", (x + 0.2, acc.added_ms or 0.0),
                                ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                                textcoords="offset points")
            ax.set_xticks(xs)
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel("ms per run", fontsize=8)
            ax.set_title(f"batch {batch}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"{self.title}: DIA's added latency vs its bandwidth lower bound",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Bar chart: p50 latency per model, one panel per engine and batch, ratio on top."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(e, b) for e, by_batch in self.latency.items() for b in by_batch]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
        for ax, (engine, batch) in zip(axes[0], panels, strict=True):
            by_model = self.latency[engine][batch]
            names = list(by_model)
            p50 = [by_model[n].p50_ms for n in names]
            p90 = [by_model[n].p90_ms for n in names]
            bars = ax.bar(range(len(names)), p50, color=[f"C{i}" for i in range(len(names))])
            ax.errorbar(range(len(names)), p50, yerr=[[0] * len(names),
                        [hi - lo for hi, lo in zip(p90, p50, strict=True)]],
                        fmt="none", ecolor="black", capsize=3, linewidth=0.8)
            base = by_model[self.baseline].p50_ms
            for bar, value in zip(bars, p50, strict=True):
                ax.annotate(f"{value / base:.2f}x", (bar.get_x() + bar.get_width() / 2, value),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                            textcoords="offset points")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{engine}, batch {batch}", fontsize=9)
            ax.set_ylabel("p50 latency, ms (bar to p90)", fontsize=8)
        fig.suptitle(f"{self.title} (ratio vs {self.baseline} on each bar)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def save(self, out_dir: str | os.PathLike[str], stem: str = "bench") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {ext: folder / f"{stem}.{ext}" for ext in ("json", "md", "png")}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["md"].write_text(self.to_markdown())
        self.plot(paths["png"])
        if self.cost:
            paths["cost_png"] = folder / f"{stem}_cost.png"
            self.plot_cost(paths["cost_png"])
        return paths


def _fmt(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


@contextlib.contextmanager
def _progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _export(name: str, module: nn.Module, path: Path, example: Any,
            tolerance: Tolerance, exporter: str, optimize: bool = True) -> ModelEntry:
    import onnx

    from ..analysis.graph import count_parameters
    from ..export import export_onnx

    report = export_onnx(module, path, example, atol=tolerance.atol, rtol=tolerance.rtol,
                         float64_check=tolerance.float64_check, optimize=optimize,
                         exporter=exporter)
    proto = onnx.load(str(path), load_external_data=False)
    return ModelEntry(
        name=name,
        parameters=count_parameters(module),
        onnx_nodes=report.nodes,
        onnx_ops=[node.op_type for node in proto.graph.node],
        onnx_mb=report.file_bytes / 1e6,
        export_seconds=report.export_seconds,
        max_abs_error=report.max_abs_error,
        note="; ".join(n for n in report.notes if "stripped" not in n),
    )


def _lowp_variant(name: str, mode: str, lean: nn.Module, folder: Path, inputs: Any,
                  base: Tolerance) -> ModelEntry:
    """Copy ``lean.onnx``, apply ``mode`` (``int4``, ``int8+fold``, ``fp32+fold``...), verify."""
    import shutil

    import onnx

    from ..analysis.graph import count_parameters
    from ..export import verify_onnx
    from ..export.lowp import apply_dia_weights, tolerance

    precision, _, option = mode.partition("+")
    if option not in ("", "fold"):
        raise ConfigError(f"dia_weights mode {mode!r}: the only option after '+' is 'fold'")
    path = folder / f"{name}.onnx"
    shutil.copy(folder / "lean.onnx", path)
    start = time.perf_counter()
    note = apply_dia_weights(path, precision, fold_state=option == "fold")
    seconds = time.perf_counter() - start
    tol = tolerance(precision, base)
    verification = verify_onnx(str(path), lean, inputs, (2, 3), tol)
    abs_err = verification.max_abs_error
    proto = onnx.load(str(path))
    return ModelEntry(
        name=name,
        parameters=count_parameters(lean),
        onnx_nodes=len(proto.graph.node),
        onnx_ops=[node.op_type for node in proto.graph.node],
        onnx_mb=path.stat().st_size / 1e6,
        export_seconds=seconds,
        max_abs_error=abs_err,
        note=f"{note}; vs PyTorch fp32: {verification.summary()}",
    )


def benchmark(
    model: nn.Module,
    example_inputs: Any,
    *,
    dia: Any = True,
    ssia: Any = True,
    batch_sizes: Sequence[int] = (1, 8),
    threads: int = 2,
    runs: int = 30,
    warmup: int = 5,
    engines: Sequence[str] = ENGINES,
    extra: dict[str, nn.Module] | None = None,
    dia_weights: Sequence[str] = (),
    unoptimized: bool = False,
    cost: bool = True,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    title: str | None = None,
    command: str = "",
    tolerance: Tolerance | None = None,
    spinning: bool = False,
    compiled: bool = False,
    exporter: str = "auto",
) -> BenchmarkResult:
    """Benchmark ``model`` (``original``) against its lean fxattn version (``lean``).

    The model is transformed with ``dia`` / ``ssia`` (as :func:`fxattn.transform`), stripped,
    and both are exported to ONNX (verified in onnxruntime). For each engine and batch size the
    models run interleaved in this process, with fixed thread counts; ``extra`` adds more
    models (e.g. a hand-written reference) to the same interleaving, and each mode in
    ``dia_weights`` (``"fp16"``, ``"int8"``, ``"int4"``; ``"+fold"`` also folds the zero initial
    state, e.g. ``"fp32+fold"``, see :mod:`fxattn.lowp`) adds a lean onnxruntime model (its
    ``export s`` column is then the rewrite time) verified at that mode's tolerance; the
    low-precision modes run on top of the exact rewrites of :mod:`fxattn.onnx_optimize`, and
    ``unoptimized`` adds ``lean-noopt``, the lean model exported without them. ``cost`` adds
    DIA's cost account (:mod:`fxattn.cost`) for every ONNX model but ``original``. ONNX files
    go to ``out_dir`` (a temporary folder when ``None``). The result's baseline is ``original``.
    ``tolerance`` is the export verification rule (:class:`fxattn.verify.Tolerance`).
    ``spinning`` times onnxruntime with its default spinning worker threads, one live session
    at a time (see the module docstring); the default interleaves non-spinning sessions.
    ``compiled`` adds, for ``original``, ``lean`` and each low-precision variant, the model
    compiled for onnxruntime's CPU provider at each batch size (``<name>-ort-cpu``,
    :func:`fxattn.compile_ort_cpu`: DIA's multiply fused into the blocked convolutions); the
    compiled models' cost accounts are taken against ``original-ort-cpu``. ``exporter``
    exports every model (:func:`fxattn.export_onnx`'s choice: ``"auto"``, ``"dynamo"`` or
    ``"torchscript"``).
    """
    from ..analysis.graph import count_parameters
    from ..capture import ExampleInputs
    from ..transform import strip_ssia, transform

    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        raise ConfigError(f"engines must be among {', '.join(ENGINES)}, got {list(engines)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if runs < 1 or warmup < 0 or threads < 1:
        raise ConfigError("runs and threads must be >= 1 and warmup >= 0")
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if not isinstance(model, nn.Module):
        raise InputError(f"benchmark needs an nn.Module, got {type(model).__name__}")
    inputs = ExampleInputs.from_user(example_inputs)
    with torch_threads(threads):
        machine = machine_info(threads, spinning)
        start = time.perf_counter()
        net = transform(model, example_inputs, dia=dia, ssia=ssia)
        lean = strip_ssia(net)
        transform_seconds = time.perf_counter() - start
        modules: dict[str, nn.Module] = {"original": _eval_copy(model), "lean": lean}
        for name, extra_module in (extra or {}).items():
            if name in modules:
                raise ConfigError(f"extra model name {name!r} is taken; choose another")
            modules[name] = _eval_copy(extra_module)
        models = {name: ModelEntry(name, count_parameters(m)) for name, m in modules.items()}
        models["lean"].transform_seconds = transform_seconds
        onnx_files: dict[str, Path] = {}
        unverified: dict[str, str] = {}  # low-precision variants that failed their tolerance
        with contextlib.ExitStack() as stack:
            folder = Path(out_dir) if out_dir is not None else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="fxattn-bench-")))
            folder.mkdir(parents=True, exist_ok=True)
            if "onnxruntime" in engines:
                for name, module in modules.items():
                    entry = _export(name, module, folder / f"{name}.onnx", example_inputs,
                                    tolerance or Tolerance(), exporter)
                    entry.transform_seconds = models[name].transform_seconds
                    models[name] = entry
                    onnx_files[name] = folder / f"{name}.onnx"
                if unoptimized:
                    models["lean-noopt"] = _export("lean-noopt", lean, folder / "lean-noopt.onnx",
                                                   example_inputs, tolerance or Tolerance(),
                                                   exporter, optimize=False)
                    onnx_files["lean-noopt"] = folder / "lean-noopt.onnx"
                for mode in dia_weights:
                    name = f"lean-{mode}"
                    try:
                        models[name] = _lowp_variant(name, mode, lean, folder, inputs,
                                                     tolerance or Tolerance())
                    except VerificationError as exc:
                        # a precision this model cannot take is a result, not a crash: it is
                        # reported with its error and not timed
                        unverified[name] = first_line(exc)
                        continue
                    onnx_files[name] = folder / f"{name}.onnx"
            batch_files: dict[int, dict[str, Path]] = {}
            sources: dict[str, Path] = {}
            if compiled and "onnxruntime" in engines:
                batch_files, sources = _compile_variants(onnx_files, models, folder, batch_sizes)
            latency = _measure(modules, onnx_files, inputs, engines, batch_sizes, runs, warmup,
                               threads, spinning, progress, batch_files)
            accounts = _cost(onnx_files, inputs, batch_sizes, threads, latency, batch_files,
                             sources) if (cost and onnx_files) else {}
    settings = {"batch_sizes": list(batch_sizes), "threads": threads, "runs": runs,
                "warmup": warmup, "engines": list(engines), "dia_weights": list(dia_weights),
                "input_shape": [list(t.shape) for t in inputs.tensors()],
                "dia": repr(dia), "ssia": repr(ssia)}
    settings["unoptimized"] = unoptimized
    settings["spinning"] = spinning
    settings["compiled"] = compiled
    settings["exporter"] = exporter
    if spinning:
        settings["spinning_blocks"] = _spinning_blocks(runs)
    if unverified:
        settings["dia_weights_failed_verification"] = unverified
    result = BenchmarkResult(title or f"{type(model).__name__}: original vs lean", "original",
                             machine, settings, models, latency, command, accounts)
    if out_dir is not None:
        result.save(out_dir)
    return result


#: the baseline of the compiled models: the original through the same compiler (onnxruntime's
#: own graph at a fixed batch; nothing to fuse), so that what a fixed batch alone gives a model
#: is not counted as DIA's
COMPILED_BASELINE = "original-ort-cpu"


def _compile_variants(onnx_files: dict[str, Path], models: dict[str, ModelEntry],
                      folder: Path, batch_sizes: Sequence[int],
                      ) -> tuple[dict[int, dict[str, Path]], dict[str, Path]]:
    """The original, ``lean`` and its low-precision variants compiled for onnxruntime's CPU at
    each batch: batch -> name -> file, and each compiled name's portable source."""
    from ..deploy import compile_ort_cpu

    batch_files: dict[int, dict[str, Path]] = {}
    sources: dict[str, Path] = {}
    for source in [n for n in onnx_files if n in ("original", "lean") or (
            n.startswith("lean-") and n != "lean-noopt")]:
        name = f"{source}-ort-cpu"
        sources[name] = onnx_files[source]
        seconds, fused = [], set()
        for batch in batch_sizes:
            path = folder / f"{name}.b{int(batch)}.onnx"
            report = compile_ort_cpu(onnx_files[source], path, int(batch))
            batch_files.setdefault(int(batch), {})[name] = path
            seconds.append(report.seconds)
            fused.add(f"{report.fused} of {report.dia_multiplies}"
                      + (f" ({report.folded} folded into weights)" if report.folded else ""))
        models[name] = ModelEntry(
            name, models[source].parameters, onnx_nodes=report.nodes["compiled"],
            onnx_mb=models[source].onnx_mb, export_seconds=max(seconds),
            max_abs_error=report.max_abs_error,
            note=f"{source} compiled for onnxruntime's CPU at each batch "
                 f"(fxattn.compile_ort_cpu): DIA multiplies fused {', '.join(sorted(fused))}")
    return batch_files, sources


def _cost(onnx_files: dict[str, Path], inputs: Any, batch_sizes: Sequence[int],
          threads: int, latency: dict, batch_files: dict[int, dict[str, Path]] | None = None,
          sources: dict[str, Path] | None = None) -> dict[str, dict[int, Any]]:
    """DIA's cost account of every ONNX model but ``original``, with its measured added time.

    A compiled model's account is taken at its own batch against :data:`COMPILED_BASELINE`
    (its extra passes and its added latency), with its branch-output bytes read from its
    portable source.
    """
    from .cost import cost_accounts, memory_bandwidth

    feeds = {int(b): [t.detach().cpu().numpy() for t in inputs.with_batch(
        int(b), torch.Generator().manual_seed(int(b))).tensors()] for b in batch_sizes}
    bandwidth = memory_bandwidth(threads)
    accounts = cost_accounts(onnx_files, feeds, threads, bandwidth_gb_s=bandwidth)
    baselines = dict.fromkeys(onnx_files, "original")
    for batch, files in (batch_files or {}).items():
        by_name = cost_accounts(files, {batch: feeds[batch]}, threads,
                                baseline=COMPILED_BASELINE, bandwidth_gb_s=bandwidth,
                                site_sources=sources)
        for name, by_batch in by_name.items():
            accounts.setdefault(name, {}).update(by_batch)
            baselines[name] = COMPILED_BASELINE
    for name, by_batch in accounts.items():
        for batch, account in by_batch.items():
            stats = latency["onnxruntime"][batch]
            account.added_ms = stats[name].p50_ms - stats[baselines[name]].p50_ms
    return accounts


def _eval_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is wholly in eval mode, else an eval copy: never switch the
    caller's module."""
    import copy

    if not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).eval()


def _measure(
    modules: dict[str, nn.Module],
    onnx_files: dict[str, Path],
    inputs: Any,
    engines: Sequence[str],
    batch_sizes: Sequence[int],
    runs: int,
    warmup: int,
    threads: int,
    spinning: bool,
    progress: bool,
    batch_files: dict[int, dict[str, Path]] | None = None,
) -> dict[str, dict[int, dict[str, LatencyStats]]]:
    # non-spinning sessions live for the whole measurement; spinning ones one at a time
    sessions = {} if spinning else {name: ort_session(str(path), threads=threads)
                                    for name, path in onnx_files.items()}
    batch_files = batch_files or {}
    files_per_batch = len(onnx_files) + max((len(f) for f in batch_files.values()), default=0)
    ort_rounds = files_per_batch * (runs + warmup * _spinning_blocks(runs)) if spinning else (
        runs + warmup)
    total = len(batch_sizes) * (("torch" in engines) * (runs + warmup)
                                + ("onnxruntime" in engines) * ort_rounds)
    latency: dict[str, dict[int, dict[str, LatencyStats]]] = {e: {} for e in engines}
    with _progress_bar(total, "benchmark", progress) as advance:
        for batch in batch_sizes:
            batch_inputs = inputs.with_batch(int(batch), torch.Generator().manual_seed(int(batch)))
            if "torch" in engines:
                calls = {name: _torch_call(m, batch_inputs) for name, m in modules.items()}
                latency["torch"][int(batch)] = interleaved(calls, runs, warmup, advance)
            compiled = batch_files.get(int(batch), {})
            if "onnxruntime" in engines and spinning:
                latency["onnxruntime"][int(batch)] = _alone_in_blocks(
                    {**onnx_files, **compiled}, batch_inputs, runs, warmup, threads, advance)
            elif "onnxruntime" in engines:
                calls = {}
                batch_sessions = {**sessions, **{name: ort_session(str(path), threads=threads)
                                                 for name, path in compiled.items()}}
                for name, session in batch_sessions.items():
                    feed = ort_feed(session, batch_inputs)
                    calls[name] = lambda s=session, f=feed: s.run(None, f)
                latency["onnxruntime"][int(batch)] = interleaved(calls, runs, warmup, advance)
                del calls, batch_sessions  # a compiled model runs at its own batch only
            gc.collect()
    return latency


def _spinning_blocks(runs: int) -> int:
    """Blocks that alternate the models when each is timed alone (at most 4)."""
    return min(4, runs)


def _alone_in_blocks(onnx_files: dict[str, Path], batch_inputs: Any, runs: int, warmup: int,
                     threads: int, advance: Callable[[], None]) -> dict[str, LatencyStats]:
    """onnxruntime with spinning workers: in each block every model in turn gets the only live
    session (an idle session's spinning workers would steal the timed one's cores), its
    ``warmup`` runs and its share of ``runs``; the block order alternates the models."""
    blocks = _spinning_blocks(runs)
    shares = [runs // blocks + (block < runs % blocks) for block in range(blocks)]
    samples: dict[str, list[float]] = {name: [] for name in onnx_files}
    order = list(onnx_files)
    for block, share in enumerate(shares):
        for name in order if block % 2 == 0 else order[::-1]:
            session = ort_session(str(onnx_files[name]), threads=threads, spinning=True)
            feed = ort_feed(session, batch_inputs)
            timed = interleaved_samples({name: lambda s=session, f=feed: s.run(None, f)},
                                        share, warmup, advance)
            samples[name] += timed[name]
            del session
            gc.collect()
    return {name: summarize(name, values) for name, values in samples.items()}


def _torch_call(module: nn.Module, batch_inputs: Any) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return batch_inputs.call(module)

    return call


# --------------------------------------------------------------------------- training


def train_step_benchmark(
    candidates: dict[str, tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]],
    inputs: torch.Tensor,
    runs: int = 10,
    warmup: int = 2,
    lr: float = 0.01,
    progress: Callable[[], None] | None = None,
) -> dict[str, LatencyStats]:
    """Interleaved training steps (forward, loss, backward, SGD step) of each candidate.

    ``candidates`` maps a name to ``(module, loss_fn)`` where ``loss_fn(module, x)`` returns the
    scalar loss of one forward (e.g. cross-entropy plus ``fxattn.ssia_loss``). Each module is
    put in training mode and gets its own SGD optimizer (momentum 0.9).
    """
    steps = {}
    for name, (module, loss_fn) in candidates.items():
        module.train()
        optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
        steps[name] = _train_step(module, loss_fn, optimizer, inputs)
    return interleaved(steps, runs, warmup, progress)


def _train_step(module: nn.Module, loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                optimizer: torch.optim.Optimizer, inputs: torch.Tensor) -> Callable[[], float]:
    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(module, inputs)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def peak_step_memory(step: Callable[[], Any], steps: int = 3) -> dict[str, float]:
    """Peak resident memory (MB) while running ``step`` ``steps`` times, Linux only.

    ``tracemalloc`` does not see tensor storage (torch allocates outside Python's allocator) and
    torch has no CPU memory counters, so this reads the kernel's own numbers: the peak resident
    set (``VmHWM``) is reset through ``/proc/self/clear_refs`` before the steps, and the result
    is that peak minus the resident set just before (``delta_mb``: activations, gradients and
    temporaries of a step) and the absolute peak (``peak_mb``). glibc keeps freed memory for
    reuse, which would hide a later step's allocations, so run this in a fresh process with
    ``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors are then mmap-ed and returned on free);
    ``benchmarks/training.py`` does both. Call ``step`` once before (optimizer state).
    """
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    for _ in range(steps):
        step()
    peak = _status_kb("VmHWM")
    return {"rss_before_mb": before / 1024, "peak_mb": peak / 1024,
            "delta_mb": (peak - before) / 1024}
