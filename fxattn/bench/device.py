"""Where and how a PyTorch model is timed: the device, the precision, the execution mode.

* :func:`resolve_device` turns ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a
  :class:`torch.device`, and raises :class:`~fxattn.ConfigError` when the machine has no such
  device (one readable line, also from ``fxattn bench --device``);
* :func:`torch_call` makes the timed call of a module in one mode: ``eager``; ``cuda-graph``
  (a ``torch.cuda.CUDAGraph`` captured from an eval forward with static inputs, after a warm-up
  on a side stream, as PyTorch's CUDA-graph docs show, and replayed: no launch cost);
  ``compile`` (``torch.compile``, Inductor, one static graph per batch size), each in fp32 or
  under bf16 autocast;
* :func:`ort_gpu_providers` says which of onnxruntime's GPU execution providers the installed
  build has, and :func:`cuda_kernels` counts the CUDA kernels a call launches (``torch.profiler``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import ConfigError

#: PyTorch execution modes: where each can run
MODES = ("eager", "cuda-graph", "compile")
PRECISIONS = ("fp32", "bf16")
#: onnxruntime's GPU execution providers the benchmark times, by the engine name it reports
ORT_GPU_PROVIDERS = {"onnxruntime-cuda": "CUDAExecutionProvider",
                     "onnxruntime-tensorrt": "TensorrtExecutionProvider"}


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, checked against this machine.

    Raises:
        ConfigError: not ``cpu``, ``cuda`` or ``cuda:N``; or a CUDA device this machine lacks.
    """
    text = str(device)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    resolved = torch.device(text)
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        raise ConfigError(f"device {text!r} asked for, but this machine has no CUDA device "
                          f"(torch {torch.__version__}, {built}; torch.cuda.is_available() "
                          "is False): benchmark on device 'cpu', or run on a machine with a GPU")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ConfigError(f"device {text!r} asked for, but this machine has {count} CUDA "
                          f"device(s): cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", resolved.index if resolved.index is not None
                        else torch.cuda.current_device())


def modes_for(device: torch.device, modes: Any) -> tuple[str, ...]:
    """The PyTorch modes to time: ``modes``, or by default every mode the device has
    (``eager`` on the CPU; ``eager``, ``cuda-graph`` and ``compile`` on a GPU)."""
    if modes is None:
        return MODES if device.type == "cuda" else ("eager",)
    chosen = tuple(modes)
    unknown = [m for m in chosen if m not in MODES]
    if unknown:
        raise ConfigError(f"modes must be among {', '.join(MODES)}, got {list(chosen)}")
    if "cuda-graph" in chosen and device.type != "cuda":
        raise ConfigError("mode 'cuda-graph' needs a CUDA device (device='cuda')")
    return chosen


def precisions_for(device: torch.device, precisions: Any) -> tuple[str, ...]:
    """``precisions``, or by default ``fp32`` on the CPU and ``fp32`` and ``bf16`` on a GPU."""
    if precisions is None:
        return PRECISIONS if device.type == "cuda" else ("fp32",)
    chosen = tuple(precisions)
    if not chosen or any(p not in PRECISIONS for p in chosen):
        raise ConfigError(f"precisions must be among {', '.join(PRECISIONS)}, got {list(chosen)}")
    return chosen


def engine_name(mode: str, precision: str) -> str:
    """The latency table's engine of a PyTorch mode: ``torch`` (eager fp32, as before
    devices), ``torch-bf16``, ``cuda-graph``, ``compile-bf16``..."""
    base = "torch" if mode == "eager" else mode
    return base if precision == "fp32" else f"{base}-{precision}"


def autocast(device: torch.device, precision: str, cache: bool = True) -> Any:
    """bf16 autocast on ``device`` for ``precision == "bf16"``, else nothing. CUDA-graph
    capture needs ``cache=False`` (autocast's weight cache would outlive the capture)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def to_device(inputs: Any, device: torch.device) -> Any:
    """An :class:`~fxattn.capture.ExampleInputs` with every tensor on ``device``."""
    move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)  # noqa: E731
    return type(inputs)(tree_map(move, inputs.args), tree_map(move, inputs.kwargs))


def torch_call(module: nn.Module, inputs: Any, mode: str, precision: str,
               device: torch.device, compiled: dict[int, Any] | None = None,
               ) -> tuple[Callable[[], Any], float]:
    """The timed inference call of ``module`` on ``inputs`` (on ``device``) in ``mode`` and
    ``precision``, and the seconds its preparation took (capture or first compile).

    ``compiled`` caches one ``torch.compile`` wrapper per module (by ``id``) across calls.
    """
    start = time.perf_counter()
    if mode == "cuda-graph":
        call = _cuda_graph(module, inputs, precision, device)
    else:
        target: Any = module
        if mode == "compile":
            cache = compiled if compiled is not None else {}
            target = cache.setdefault(id(module), torch.compile(module, dynamic=False))

        def call() -> Any:
            with torch.inference_mode(mode == "eager"), torch.no_grad(), \
                    autocast(device, precision):
                return inputs.call(target)

        call()  # the first call compiles: not part of the timing
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return call, time.perf_counter() - start


def _cuda_graph(module: nn.Module, inputs: Any, precision: str,
                device: torch.device) -> Callable[[], Any]:
    """Capture ``module``'s forward on static ``inputs`` into a CUDA graph; return its replay.

    The warm-up runs on a side stream (cuDNN picks its algorithms there), then one forward is
    captured; replaying it reruns those kernels on the same buffers.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad(), autocast(device, precision, cache=False):
        for _ in range(3):
            inputs.call(module)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), autocast(device, precision, cache=False):
        static_output = inputs.call(module)

    def replay() -> Any:
        graph.replay()
        return static_output

    return replay


def ort_gpu_providers() -> tuple[dict[str, str], str]:
    """onnxruntime's GPU providers this build has (engine name -> provider), and a sentence
    saying which it lacks (``""`` when it has both)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    have = {engine: p for engine, p in ORT_GPU_PROVIDERS.items() if p in available}
    missing = [p for p in ORT_GPU_PROVIDERS.values() if p not in available]
    note = "" if not missing else (
        f"the installed onnxruntime {ort.__version__} has no {' or '.join(missing)} "
        f"(available: {', '.join(available)})"
        + ("; onnxruntime was not timed on the GPU" if not have else ""))
    return have, note


def ort_gpu_session(path: str, provider: str, device: torch.device) -> Any:
    """An onnxruntime session on ``device`` through ``provider`` (CUDA or TensorRT, with the
    CUDA provider behind TensorRT for what it does not take)."""
    import onnxruntime as ort

    index = device.index or 0
    chain: list[Any] = [(provider, {"device_id": index})]
    if provider != "CUDAExecutionProvider":
        chain.append(("CUDAExecutionProvider", {"device_id": index}))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=[*chain, "CPUExecutionProvider"])


def cuda_kernels(call: Callable[[], Any], device: torch.device) -> int:
    """How many CUDA kernels one ``call()`` launches (``torch.profiler``; memory copies and
    sets left out)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    return sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA
               and not event.name.startswith(("Memcpy", "Memset")))


@contextlib.contextmanager
def freeing(device: torch.device) -> Iterator[None]:
    """Give cached GPU memory back after a block (CUDA graphs, compiled models, a batch)."""
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
