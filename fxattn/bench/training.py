"""Training-step cost: interleaved step times, peak memory on a GPU and on the CPU.

:func:`train_step_benchmark` times interleaved training steps (forward, loss, backward, SGD
step) of several models, on the CPU or a GPU, in fp32 or under bf16 autocast;
:func:`peak_cuda_memory` reads a step's peak GPU memory (``torch.cuda.max_memory_allocated``)
and :func:`peak_step_memory` a step's peak resident memory on the CPU (see its docstring for
why RSS, and how it is made honest).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device import autocast
from .protocol import LatencyStats, interleaved

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def train_step_benchmark(
    candidates: dict[str, tuple[nn.Module, LossFn]],
    inputs: Any,
    runs: int = 10,
    warmup: int = 2,
    lr: float = 0.01,
    progress: Callable[[], None] | None = None,
    *,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> dict[str, LatencyStats]:
    """Interleaved training steps (forward, loss, backward, SGD step) of each candidate.

    ``candidates`` maps a name to ``(module, loss_fn)`` where ``loss_fn(module, inputs)``
    returns the scalar loss of one forward (e.g. cross-entropy plus ``fxattn.ssia_loss``). Each
    module is put in training mode and gets its own SGD optimizer (momentum 0.9). On a CUDA
    ``device`` (where modules and inputs must already be) each step ends with a synchronise;
    ``precision="bf16"`` runs the forward and the loss under bf16 autocast.
    """
    steps = training_steps(candidates, inputs, lr, device=device, precision=precision)
    return interleaved(dict(steps), runs, warmup, progress)


def training_steps(candidates: dict[str, tuple[nn.Module, LossFn]], inputs: Any,
                   lr: float = 0.01, *, device: torch.device | str | None = None,
                   precision: str = "fp32") -> dict[str, TrainStep]:
    """One :class:`TrainStep` per candidate, as :func:`train_step_benchmark` times them."""
    where = torch.device(device) if device is not None else torch.device("cpu")
    return {name: TrainStep(module, loss_fn, inputs, lr, where, precision)
            for name, (module, loss_fn) in candidates.items()}


class TrainStep:
    """One training step of ``module`` (put in training mode, with its own SGD optimizer,
    momentum 0.9): zero the gradients, forward and loss (under bf16 autocast for
    ``precision="bf16"``), backward, optimizer step; synchronised on a CUDA device."""

    def __init__(self, module: nn.Module, loss_fn: LossFn, inputs: Any, lr: float,
                 device: torch.device, precision: str) -> None:
        self.module, self.loss_fn, self.inputs = module.train(), loss_fn, inputs
        self.device, self.precision = device, precision
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.loss_fn(self.module, self.inputs)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss.detach()

    def state_bytes(self) -> int:
        """Bytes of the module's parameters and buffers and of the optimizer's state."""
        tensors = [*self.module.parameters(), *self.module.buffers(),
                   *(v for state in self.optimizer.state.values() for v in state.values()
                     if isinstance(v, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class StepMemory:
    """Peak GPU memory of a training step: ``step_mib`` the peak above what was allocated
    before it (activations, gradients, temporaries), ``state_mib`` the module's parameters,
    buffers and optimizer state, ``peak_mib`` their sum (what the module alone would need,
    whatever else lives on the GPU beside it)."""

    step_mib: float
    state_mib: float
    peak_mib: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def peak_cuda_memory(step: TrainStep, steps: int = 2) -> StepMemory:
    """Run ``step`` ``steps`` times on its CUDA device and read its peak memory
    (``torch.cuda.max_memory_allocated``). Run it once before: the optimizer's state then
    exists and counts as state, not as the step's."""
    device = step.device
    step.optimizer.zero_grad(set_to_none=True)  # its gradients count as the step's
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    added = torch.cuda.max_memory_allocated(device) - before
    state = step.state_bytes()
    mib = 2**20
    return StepMemory(added / mib, state / mib, (added + state) / mib)


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
