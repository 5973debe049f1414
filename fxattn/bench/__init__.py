"""Benchmark: latency, training-step cost and operator counts of the original, transformed and
lean models, on the CPU or a GPU.

One concept per file: ``protocol.py`` (interleaved, warmed-up runs; medians and percentiles;
the machine), ``device.py`` (the device, precision and PyTorch execution mode: eager, CUDA-graph
replay, ``torch.compile``; onnxruntime's GPU providers), ``runner.py`` (:func:`benchmark`),
``onnx_models.py`` (the ONNX files it times and how), ``training.py`` (training steps and their
peak memory), ``op_count.py`` (aten operators per DIA site), ``results.py`` and ``plots.py``
(:class:`BenchmarkResult`, its JSON, Markdown and PNG), ``cost.py`` (where DIA's time goes in
an ONNX file).
"""

from ..ops.counting import AtenOpCounter, count_aten_ops
from .device import ort_gpu_providers, resolve_device
from .onnx_models import COMPILED_BASELINE
from .op_count import OpAccount, StepOps, op_account, ops_per_site, step_ops
from .protocol import (
    LatencyStats,
    fxattn_version,
    interleaved,
    interleaved_samples,
    machine_info,
    summarize,
    synchronized,
)
from .results import BenchmarkResult, ModelEntry, TrainingResult
from .runner import ENGINES, benchmark
from .training import (
    StepMemory,
    TrainStep,
    peak_cuda_memory,
    peak_step_memory,
    train_step_benchmark,
    training_steps,
)

__all__ = [
    "COMPILED_BASELINE",
    "ENGINES",
    "AtenOpCounter",
    "BenchmarkResult",
    "LatencyStats",
    "ModelEntry",
    "OpAccount",
    "StepMemory",
    "StepOps",
    "TrainStep",
    "TrainingResult",
    "benchmark",
    "count_aten_ops",
    "fxattn_version",
    "interleaved",
    "interleaved_samples",
    "machine_info",
    "op_account",
    "ort_gpu_providers",
    "ops_per_site",
    "peak_cuda_memory",
    "peak_step_memory",
    "resolve_device",
    "step_ops",
    "summarize",
    "synchronized",
    "train_step_benchmark",
    "training_steps",
]
