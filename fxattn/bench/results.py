"""What a benchmark measured, and its report: :class:`BenchmarkResult` writes JSON, Markdown
and PNG plots (drawn by :mod:`fxattn.bench.plots`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .op_count import OpAccount
from .protocol import LatencyStats
from .training import StepMemory


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
class TrainingResult:
    """Training steps at one batch size: step time per precision and model, and on a GPU the
    peak memory of each model's step."""

    batch: int
    latency: dict[str, dict[str, LatencyStats]]  # precision -> model -> stats
    memory: dict[str, dict[str, StepMemory]] = field(default_factory=dict)

    def to_dict(self, baseline: str) -> dict[str, Any]:
        return {"batch": self.batch, "latency": {
            precision: {name: {**stats.to_dict(),
                               f"ratio_vs_{baseline}": stats.p50_ms / by_model[baseline].p50_ms,
                               **({"memory": self.memory[precision][name].to_dict()}
                                  if name in self.memory.get(precision, {}) else {})}
                        for name, stats in by_model.items()}
            for precision, by_model in self.latency.items()}}

    def markdown(self, baseline: str) -> list[str]:
        lines = [f"Training step (forward, loss, backward, SGD step) at batch {self.batch}:",
                 "", f"| precision | model | p50 ms | p90 ms | x {baseline} | peak MiB | "
                 "step MiB |", "|---|---|---:|---:|---:|---:|---:|"]
        for precision, by_model in self.latency.items():
            for name, st in by_model.items():
                memory = self.memory.get(precision, {}).get(name)
                lines.append(
                    f"| {precision} | {name} | {st.p50_ms:.2f} | {st.p90_ms:.2f} | "
                    f"{st.p50_ms / by_model[baseline].p50_ms:.3f} | "
                    f"{_fmt(memory and memory.peak_mib, '.0f')} | "
                    f"{_fmt(memory and memory.step_mib, '.0f')} |")
        if not self.memory:
            lines += ["", "Peak memory is read on a GPU only (`torch.cuda.max_memory_allocated`);"
                      " on the CPU see `fxattn.bench.peak_step_memory`."]
        else:
            lines += ["", "peak MiB = the step's peak above what was allocated before it (step "
                      "MiB) + the model's parameters, buffers and optimizer state."]
        return lines


@dataclass
class BenchmarkResult:
    """Everything one :func:`benchmark` call measured; ``save`` writes JSON, Markdown and PNG.

    ``latency`` maps an engine (``torch`` = PyTorch eager fp32, ``torch-bf16``, ``cuda-graph``,
    ``compile``, ``onnxruntime``, ``onnxruntime-cuda``...) to batch, model and statistics.
    """

    title: str
    baseline: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    models: dict[str, ModelEntry]
    latency: dict[str, dict[int, dict[str, LatencyStats]]]  # engine -> batch -> model -> stats
    command: str = ""
    cost: dict[str, dict[int, Any]] = field(default_factory=dict)  # model -> batch -> account
    training: TrainingResult | None = None
    ops: OpAccount | None = None
    kernels: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> what -> count
    notes: list[str] = field(default_factory=list)

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
            "training": self.training.to_dict(self.baseline) if self.training else None,
            "ops": self.ops.to_dict() if self.ops else None,
            "cuda_kernels": self.kernels,
            "notes": self.notes,
        }

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.command:
            lines += ["Command:", "", "```", self.command, "```", ""]
        lines += [*_machine_lines(self.machine, self.settings), "",
                  "| model | parameters | ONNX nodes | ONNX MB | export s | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for entry in self.models.values():
            lines.append(
                f"| {entry.name} | {entry.parameters:,} | {_fmt(entry.onnx_nodes)} | "
                f"{_fmt(entry.onnx_mb, '.1f')} | {_fmt(entry.export_seconds, '.2f')} | "
                f"{entry.note} |"
            )
        lines += self._latency_markdown()
        if self.training is not None:
            lines += ["", *self.training.markdown(self.baseline)]
        lines += self._ops_markdown()
        lines += self._cost_markdown()
        if self.notes:
            lines += ["", "Notes:", "", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines) + "\n"

    def _latency_markdown(self) -> list[str]:
        lines = ["", "| engine | batch | model | p50 ms | p90 ms | p99 ms | images/s "
                 f"| vs {self.baseline} |", "|---|---:|---|---:|---:|---:|---:|---:|"]
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
        return lines

    def _ops_markdown(self) -> list[str]:
        lines = []
        if self.ops is not None:
            lines += ["", "Aten operators dispatched (device-independent; "
                      "`fxattn.bench.op_account`): per site = (transformed - original) / DIA "
                      "sites, per tap = (DIA + SSIA - DIA) / SSIA taps.", "",
                      *self.ops.markdown()]
        if self.kernels:
            lines += ["", "CUDA kernels launched (`torch.profiler`):", "",
                      "| model | " + " | ".join(next(iter(self.kernels.values()))) + " |",
                      "|---|" + "---:|" * len(next(iter(self.kernels.values())))]
            lines += [f"| {name} | " + " | ".join(str(n) for n in counts.values()) + " |"
                      for name, counts in self.kernels.items()]
        return lines

    def _cost_markdown(self) -> list[str]:
        if not self.cost:
            return []
        bandwidth = next(iter(next(iter(self.cost.values())).values())).bandwidth_gb_s
        lines = [
            "", f"DIA's cost account (onnxruntime; see `fxattn.bench.cost`): memory bandwidth "
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

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Bar chart: p50 latency per model, one panel per engine and batch, ratio on top."""
        from .plots import plot_latency

        plot_latency(self, path)

    def plot_cost(self, path: str | os.PathLike[str]) -> None:
        """Bars: DIA's added latency next to its memory-bandwidth lower bound, per batch."""
        from .plots import plot_cost

        plot_cost(self, path)

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


def _machine_lines(m: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """The machine and protocol sentences of a report."""
    device = m.get("device", "cpu")
    gpu = (f"GPU: {m['gpu']} ({device}, compute capability {m['gpu_capability']}, "
           f"{m['gpu_memory_gib']} GiB), CUDA {m['cuda']}, cuDNN {m['cudnn']}; every timed "
           "call synchronised. " if "gpu" in m else "")
    return [
        f"{gpu}Machine: {m['cpu']} ({m['cpu_count']} logical CPUs), load average "
        f"{m['load_average_1_5_15']} at the start; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, onnx {m['onnx']}, python {m['python']}, fxattn "
        f"{m.get('fxattn', '?')}; measured {m.get('time_utc', '?')} UTC.",
        f"Threads: torch.set_num_threads({m['torch_num_threads']}), onnxruntime "
        f"intra_op_num_threads={m['ort_intra_op_num_threads']}, inter_op_num_threads=1, "
        f"session.intra_op.allow_spinning={m.get('ort_allow_spinning', 0)}.",
        f"Protocol: {s['runs']} interleaved runs after {s['warmup']} warm-up rounds per "
        f"engine and batch size, input {s['input_shape']}; ratios are of medians (p50) "
        "measured side by side in this process."
        + (f" onnxruntime with spinning workers: each model timed with the only live "
           f"session, in {s['spinning_blocks']} blocks that alternate the models."
           if s.get("spinning") else ""),
    ]


def _fmt(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)
