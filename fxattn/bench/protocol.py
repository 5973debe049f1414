"""The timing protocol: interleaved runs, warm-up, medians and percentiles, and the machine.

Interleaving (A, B, A, B, ...) makes a *ratio* hold on a noisy machine: both sides see the
same background load. Every benchmark of fxattn times its candidates with :func:`interleaved`
(or :func:`interleaved_samples` for the raw seconds) and records :func:`machine_info` beside
the numbers. On a GPU, :func:`synchronized` makes each timed call wait for its kernels, so the
wall clock times the work itself (launches included).
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


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


def synchronized(call: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``call`` followed by ``torch.cuda.synchronize(device)`` on a CUDA device (itself
    elsewhere): a timed call then ends when its kernels have."""
    if device.type != "cuda":
        return call

    def timed() -> Any:
        result = call()
        torch.cuda.synchronize(device)
        return result

    return timed


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def fxattn_version() -> str:
    """The installed distribution's version (``unknown`` when fxattn runs uninstalled, from
    a source tree on ``PYTHONPATH``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxattn")
    except PackageNotFoundError:
        return "unknown (not installed)"


def device_info(device: torch.device) -> dict[str, Any]:
    """The accelerator a benchmark ran on: its name, capability, memory and CUDA version
    (``{"device": "cpu"}`` on the CPU)."""
    if device.type != "cuda":
        return {"device": str(device)}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "device": f"cuda:{index}",
        "gpu": torch.cuda.get_device_name(index),
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_multiprocessors": props.multi_processor_count,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def machine_info(threads: int, spinning: bool = False,
                 device: torch.device | None = None) -> dict[str, Any]:
    """Machine, versions and thread settings, recorded with every result."""
    import onnx
    import onnxruntime
    import torchvision

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
        "fxattn": fxattn_version(),
        "torch_num_threads": torch.get_num_threads(),
        "ort_intra_op_num_threads": threads,
        "ort_inter_op_num_threads": 1,
        "ort_allow_spinning": int(spinning),
        "load_average_1_5_15": [round(v, 2) for v in load],
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        **device_info(device or torch.device("cpu")),
    }
