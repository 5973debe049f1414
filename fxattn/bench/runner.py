""":func:`benchmark`: an original model against its lean fxattn version, side by side.

The models run interleaved in this process (:mod:`fxattn.bench.protocol`), per engine and
batch size: PyTorch in each execution mode and precision (:mod:`fxattn.bench.device`), and
onnxruntime (:mod:`fxattn.bench.onnx_models`); optionally the training step
(:mod:`fxattn.bench.training`) and the aten-operator account (:mod:`fxattn.bench.op_count`).
The result is a :class:`~fxattn.bench.results.BenchmarkResult`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DIA, Tolerance, resolve_dia, resolve_ssia
from ..errors import ConfigError, InputError, first_line
from ..export.portable import EXPORTERS
from ..export.runtime import torch_threads
from . import onnx_models
from .device import (
    engine_name,
    freeing,
    modes_for,
    ort_gpu_providers,
    precisions_for,
    resolve_device,
    to_device,
    torch_call,
)
from .op_count import OpAccount, default_loss, plan_of, step_ops
from .protocol import LatencyStats, interleaved, machine_info, synchronized
from .results import BenchmarkResult, ModelEntry, TrainingResult
from .training import peak_cuda_memory, training_steps

ENGINES = ("torch", "onnxruntime")
#: an extra model: a module, or a function of the lean module that makes one (a hand-written
#: reference loaded with the lean model's weights)
Extra = nn.Module | Callable[[nn.Module], nn.Module]


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
    extra: dict[str, Extra] | None = None,
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
    device: str | torch.device = "cpu",
    modes: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    train_batch: int | None = None,
    ops: bool | None = None,
    anchors: bool = False,
) -> BenchmarkResult:
    """Benchmark ``model`` (``original``) against its lean fxattn version (``lean``).

    The model is transformed with ``dia`` / ``ssia`` (as :func:`fxattn.transform`), stripped,
    and both are exported to ONNX (verified in onnxruntime). For each engine and batch size the
    models run interleaved in this process, with fixed thread counts; ``extra`` adds more
    models (e.g. a hand-written reference) to the same interleaving - a module, or a function
    that makes one from the lean module (``lambda lean: matched_reference(lean)``) - and each
    mode in ``dia_weights`` (``"fp16"``, ``"int8"``, ``"int4"``; ``"+fold"`` also folds the
    zero initial state, e.g. ``"fp32+fold"``, see :mod:`fxattn.export.lowp`) adds a lean
    onnxruntime model (its ``export s`` column is then the rewrite time) verified at that mode's
    tolerance; the low-precision modes run on top of the exact rewrites of
    :mod:`fxattn.export.optimize`, and ``unoptimized`` adds ``lean-noopt``, the lean model
    exported without them. ``cost`` adds DIA's cost account (:mod:`fxattn.bench.cost`) for
    every ONNX model but ``original`` (onnxruntime on the CPU only). ONNX files go to
    ``out_dir`` (a temporary folder when ``None``). The result's baseline is ``original``.
    ``tolerance`` is the export verification rule (:class:`fxattn.config.Tolerance`).
    ``spinning`` times onnxruntime with its default spinning worker threads, one live session
    at a time (see :mod:`fxattn.bench.onnx_models`); the default interleaves non-spinning
    sessions. ``compiled`` adds, for ``original``, ``lean`` and each low-precision variant, the
    model compiled for onnxruntime's CPU provider at each batch size (``<name>-ort-cpu``,
    :func:`fxattn.compile_ort_cpu`); the compiled models' cost accounts are taken against
    ``original-ort-cpu``. ``exporter`` exports every model (:func:`fxattn.export_onnx`'s
    choice: ``"auto"``, ``"dynamo"`` or ``"torchscript"``).

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``; a missing device raises
    :class:`~fxattn.ConfigError`) is where PyTorch runs. ``modes`` are its execution modes:
    ``"eager"``, ``"cuda-graph"`` (replayed from a CUDA graph; GPU only) and ``"compile"``
    (``torch.compile``); by default ``eager`` on the CPU and all three on a GPU. ``precisions``
    (``"fp32"``, ``"bf16"`` autocast; default ``fp32`` on the CPU, both on a GPU) apply to
    every mode and to the training step. Each mode and precision is an engine of the result
    (``torch`` = eager fp32, ``torch-bf16``, ``cuda-graph``, ``compile-bf16``...). On a GPU,
    ``onnxruntime`` means its CUDA and TensorRT execution providers (``onnxruntime-cuda``,
    ``onnxruntime-tensorrt``) where the installed build has them; the result's notes say
    plainly when it has not. ``train_batch`` adds the training step (forward, loss, backward,
    SGD) at that batch of ``original``, ``dia``, ``dia+ssia`` and the extra models, with peak
    memory on a GPU. ``ops`` (default: on a GPU) adds the aten-operator account (DIA per site,
    SSIA per tap; :mod:`fxattn.bench.op_count`) and, on a GPU, the CUDA kernels each model
    launches per eval forward and training step. ``anchors`` adds ``se-per-block`` (the model
    with one squeeze-and-excitation module per site: ``DIA(module="se", share="none")``) and,
    where :class:`~fxattn.DIA` has a ``fused`` field, ``lean-decomposed``
    (``DIA(fused=False)``, PyTorch only: its ONNX file is ``lean``'s).
    """
    from ..capture import ExampleInputs

    where = resolve_device(device)
    mode_list, precision_list = modes_for(where, modes), precisions_for(where, precisions)
    _check(engines, batch_sizes, runs, warmup, threads, exporter, model, where, spinning,
           compiled, train_batch)
    inputs = ExampleInputs.from_user(example_inputs)
    run = _Run(inputs, where, runs, warmup, threads)
    with torch_threads(threads):
        machine = machine_info(threads, spinning, where)
        arms = _Arms(model, example_inputs, dia, ssia)
        modules, models = arms.inference(extra, anchors)
        latency: dict[str, dict[int, dict[str, LatencyStats]]] = {}
        accounts: dict[str, dict[int, Any]] = {}
        settings: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            folder = Path(out_dir) if out_dir is not None else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="fxattn-bench-")))
            folder.mkdir(parents=True, exist_ok=True)
            total = _rounds(run, engines, batch_sizes, mode_list, precision_list, train_batch)
            run.advance = stack.enter_context(_progress_bar(total, "benchmark", progress))
            if "onnxruntime" in engines:
                onnx = {n: m for n, m in modules.items() if n not in arms.torch_only}
                args = (onnx, models, folder, example_inputs, inputs, tolerance or Tolerance(),
                        exporter)
                if where.type == "cuda":
                    latency |= _onnxruntime_gpu(run, batch_sizes, args, dia_weights,
                                                unoptimized)
                else:
                    accounts, more = _onnxruntime_cpu(
                        run, batch_sizes, args, dia_weights, unoptimized, spinning,
                        compiled, cost, latency)
                    settings |= more
            if "torch" in engines:
                latency = _torch_latency(run, modules, batch_sizes, mode_list,
                                         precision_list) | latency
            training = (_training(run, arms, extra, anchors, train_batch, precision_list)
                        if train_batch else None)
            wants_ops = ops if ops is not None else where.type == "cuda"
            op_account = arms.op_account() if wants_ops else None
            kernels = (_kernels(run, modules, arms, extra, anchors, batch_sizes, train_batch)
                       if wants_ops and where.type == "cuda" else {})
    settings = {"batch_sizes": list(batch_sizes), "threads": threads, "runs": runs,
                "warmup": warmup, "engines": list(engines), "dia_weights": list(dia_weights),
                "input_shape": [list(t.shape) for t in inputs.tensors()],
                "dia": repr(dia), "ssia": repr(ssia), "unoptimized": unoptimized,
                "spinning": spinning, "compiled": compiled, "exporter": exporter,
                "device": str(where), "modes": list(mode_list),
                "precisions": list(precision_list), "train_batch": train_batch,
                "anchors": anchors, **settings, **run.settings}
    if spinning:
        settings["spinning_blocks"] = onnx_models.spinning_blocks(runs)
    result = BenchmarkResult(title or f"{type(model).__name__}: original vs lean", "original",
                             machine, settings, models, latency, command, accounts,
                             training=training, ops=op_account, kernels=kernels,
                             notes=run.notes)
    if out_dir is not None:
        result.save(out_dir)
    return result


@dataclass
class _Run:
    """What every part of one benchmark shares: inputs, device, protocol, progress, notes."""

    inputs: Any
    device: torch.device
    runs: int
    warmup: int
    threads: int
    advance: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def batch(self, batch: int) -> Any:
        """The inputs at ``batch`` (fixed random values per batch), on the device."""
        fresh = self.inputs.with_batch(int(batch), torch.Generator().manual_seed(int(batch)))
        return to_device(fresh, self.device) if self.device.type == "cuda" else fresh


def _check(engines: Sequence[str], batch_sizes: Sequence[int], runs: int, warmup: int,
           threads: int, exporter: str, model: Any, where: torch.device, spinning: bool,
           compiled: bool, train_batch: int | None) -> None:
    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        raise ConfigError(f"engines must be among {', '.join(ENGINES)}, got {list(engines)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if runs < 1 or warmup < 0 or threads < 1:
        raise ConfigError("runs and threads must be >= 1 and warmup >= 0")
    if train_batch is not None and int(train_batch) < 1:
        raise ConfigError(f"train_batch must be a positive integer, got {train_batch}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if where.type == "cuda" and (spinning or compiled):
        raise ConfigError("spinning and compiled are options of onnxruntime's CPU provider; "
                          f"leave them off on device {str(where)!r}")
    if not isinstance(model, nn.Module):
        raise InputError(f"benchmark needs an nn.Module, got {type(model).__name__}")


class _Arms:
    """The models a benchmark compares, each transformed once when first asked for."""

    def __init__(self, model: nn.Module, example: Any, dia: Any, ssia: Any) -> None:
        self.model, self.example = model, example
        self.dia, self.ssia = resolve_dia(dia), resolve_ssia(ssia)
        self.torch_only: set[str] = set()
        self._cache: dict[str, nn.Module] = {}
        self._made: dict[str, dict[str, nn.Module]] = {}

    def _transform(self, key: str, dia: DIA | None, ssia: Any) -> nn.Module:
        from ..transform import transform

        if key not in self._cache:
            self._cache[key] = transform(self.model, self.example, dia=dia or False,
                                         ssia=ssia or False)
        return self._cache[key]

    def net(self) -> nn.Module:
        """The transformed model as asked for (DIA and SSIA)."""
        return self._transform("net", self.dia, self.ssia)

    def captured(self) -> nn.Module:
        """The original as fxattn captures it, nothing inserted (the operator baseline)."""
        return self._transform("captured", None, None)

    def dia_only(self) -> nn.Module | None:
        return None if self.dia is None else self._transform("dia", self.dia, None)

    def se_per_block(self) -> nn.Module:
        return self._transform("se", DIA(module="se", share="none"), None)

    def decomposed(self) -> nn.Module | None:
        """DIA as today's decomposed graph, where :class:`DIA` has a ``fused`` switch."""
        if self.dia is None or "fused" not in {f.name for f in dataclasses.fields(DIA)}:
            return None
        return self._transform("decomposed", dataclasses.replace(self.dia, fused=False), None)

    def inference(self, extra: dict[str, Extra] | None, anchors: bool,
                  ) -> tuple[dict[str, nn.Module], dict[str, ModelEntry]]:
        """The eval modules timed at inference and their entries."""
        from ..analysis.graph import count_parameters
        from ..transform import strip_ssia

        start = time.perf_counter()
        lean = strip_ssia(self.net())
        seconds = time.perf_counter() - start
        modules: dict[str, nn.Module] = {"original": _eval_copy(self.model), "lean": lean}
        for name, module in self.extras(extra, lean).items():
            if name in modules:
                raise ConfigError(f"extra model name {name!r} is taken; choose another")
            modules[name] = _eval_copy(module)
        if anchors:
            modules["se-per-block"] = strip_ssia(self.se_per_block())
            decomposed = self.decomposed()
            if decomposed is not None:
                modules["lean-decomposed"] = strip_ssia(decomposed)
                self.torch_only.add("lean-decomposed")
        models = {name: ModelEntry(name, count_parameters(m)) for name, m in modules.items()}
        models["lean"].transform_seconds = seconds
        return modules, models

    def extras(self, extra: dict[str, Extra] | None,
               lean: nn.Module | None = None) -> dict[str, nn.Module]:
        """The extra models, those given as a function of the lean module made from it once."""
        from ..transform import strip_ssia

        if "extras" not in self._made:
            self._made["extras"] = _extras(extra, lean if lean is not None
                                           else strip_ssia(self.net()))
        return self._made["extras"]

    def training(self, extra: dict[str, Extra] | None, anchors: bool) -> dict[str, nn.Module]:
        """Fresh training copies: ``original``, ``dia``, ``dia+ssia`` (or ``ssia``), the
        extra models and the anchors."""
        arms: dict[str, nn.Module] = {"original": self.model}
        if self.dia is not None:
            arms["dia"] = self.dia_only()
        if self.ssia is not None:
            arms["dia+ssia" if self.dia is not None else "ssia"] = self.net()
        arms |= self.extras(extra)
        if anchors:
            arms["se-per-block"] = self.se_per_block()
            decomposed = self.decomposed()
            if decomposed is not None:
                arms["dia-decomposed"] = decomposed
        return {name: copy.deepcopy(module).train() for name, module in arms.items()}

    def op_account(self) -> OpAccount:
        """Aten operators of the original, DIA and DIA + SSIA models (on the CPU)."""
        dia_net = self.dia_only()
        full = self.net() if self.ssia is not None else None
        either = dia_net if dia_net is not None else full
        sites = len(plan_of(either).sites) if either is not None else 0
        return OpAccount(step_ops(self.model, self.example),
                         step_ops(dia_net, self.example) if dia_net is not None else None,
                         step_ops(full, self.example) if full is not None else None,
                         sites, len(plan_of(full).taps) if full is not None else 0,
                         step_ops(self.captured(), self.example))


def _extras(extra: dict[str, Extra] | None, lean: nn.Module) -> dict[str, nn.Module]:
    """The extra models, those given as a function of the lean module made from it."""
    made = {}
    for name, value in (extra or {}).items():
        module = value if isinstance(value, nn.Module) else value(lean)
        if not isinstance(module, nn.Module):
            raise InputError(f"extra model {name!r}: its function returned "
                             f"{type(module).__name__}, not an nn.Module")
        made[name] = module
    return made


def _eval_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is wholly in eval mode, else an eval copy: never switch the
    caller's module."""
    if not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).eval()


def _onnxruntime_cpu(run: _Run, batch_sizes: Sequence[int], export_args: tuple,
                     dia_weights: Sequence[str], unoptimized: bool, spinning: bool,
                     compiled: bool, cost: bool, latency: dict,
                     ) -> tuple[dict[str, dict[int, Any]], dict[str, Any]]:
    """Export, (compile,) time on onnxruntime's CPU provider, and take the cost account."""
    models, folder, inputs = export_args[1], export_args[2], export_args[4]
    onnx_files, unverified = onnx_models.export_models(*export_args, unoptimized, dia_weights)
    batch_files: dict[int, dict[str, Path]] = {}
    sources: dict[str, Path] = {}
    if compiled:
        batch_files, sources = onnx_models.compile_variants(onnx_files, models, folder,
                                                            batch_sizes)
    sessions = onnx_models.cpu_sessions(onnx_files, run.threads, spinning)
    latency["onnxruntime"] = {}
    for batch in batch_sizes:
        latency["onnxruntime"][int(batch)] = onnx_models.time_cpu(
            onnx_files, sessions, batch_files.get(int(batch), {}), run.batch(batch), run.runs,
            run.warmup, run.threads, spinning, run.advance)
        gc.collect()
    del sessions
    accounts = onnx_models.cost_accounts(onnx_files, inputs, batch_sizes, run.threads, latency,
                                         batch_files, sources) if (cost and onnx_files) else {}
    return accounts, ({"dia_weights_failed_verification": unverified} if unverified else {})


def _onnxruntime_gpu(run: _Run, batch_sizes: Sequence[int], export_args: tuple,
                     dia_weights: Sequence[str], unoptimized: bool,
                     ) -> dict[str, dict[int, dict[str, LatencyStats]]]:
    """Export and time through onnxruntime's GPU providers, where the build has them."""
    providers, note = ort_gpu_providers()
    if note:
        run.notes.append(note)
    if not providers:
        return {}
    onnx_files, unverified = onnx_models.export_models(*export_args, unoptimized, dia_weights)
    if unverified:
        run.settings["dia_weights_failed_verification"] = unverified
    latency: dict[str, dict[int, dict[str, LatencyStats]]] = {}
    for engine, provider in providers.items():
        try:
            sessions = onnx_models.gpu_sessions(onnx_files, provider, run.device)
            latency[engine] = {int(b): onnx_models.time_gpu(sessions, run.batch(b), run.runs,
                                                            run.warmup, run.advance)
                               for b in batch_sizes}
        except Exception as exc:  # noqa: BLE001 - a provider that fails is a result
            run.notes.append(f"{engine} ({provider}) not timed: {type(exc).__name__}: "
                             f"{first_line(exc)}")
        finally:
            sessions = {}
    return latency


def _torch_latency(run: _Run, modules: dict[str, nn.Module], batch_sizes: Sequence[int],
                   modes: Sequence[str], precisions: Sequence[str],
                   ) -> dict[str, dict[int, dict[str, LatencyStats]]]:
    """PyTorch latency per mode and precision (an engine each), batch and model; a mode that
    fails on this machine (capture, compile) is noted and left out, the others still run."""
    on_device = {name: _to(module, run.device) for name, module in modules.items()}
    latency: dict[str, dict[int, dict[str, LatencyStats]]] = {}
    compiled: dict[int, Any] = {}
    prepare: dict[str, float] = {}
    for batch in batch_sizes:
        batch_inputs = run.batch(batch)
        for mode in modes:
            for precision in precisions:
                engine = engine_name(mode, precision)
                with freeing(run.device):
                    try:
                        calls = {}
                        for name, module in on_device.items():
                            call, seconds = torch_call(module, batch_inputs, mode, precision,
                                                       run.device, compiled)
                            calls[name] = synchronized(call, run.device)
                            if mode != "eager":
                                prepare[f"{engine} batch {batch} {name}"] = round(seconds, 3)
                        stats = interleaved(calls, run.runs, run.warmup, run.advance)
                    except Exception as exc:  # noqa: BLE001 - one mode failing is a result
                        if mode == "eager":
                            raise
                        run.notes.append(f"{engine} at batch {batch} not timed: "
                                         f"{type(exc).__name__}: {first_line(exc)}")
                        continue
                    finally:
                        calls = {}
                latency.setdefault(engine, {})[int(batch)] = stats
    if prepare:
        run.settings["prepare_seconds"] = prepare  # CUDA-graph capture, first compile
    return latency


def _to(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device``: itself on the CPU, else a copy (the caller's stays put)."""
    return module if device.type == "cpu" else copy.deepcopy(module).to(device)


def _training(run: _Run, arms: _Arms, extra: dict[str, Extra] | None, anchors: bool,
              batch: int, precisions: Sequence[str]) -> TrainingResult:
    """Interleaved training steps of every arm at ``batch``, per precision; on a GPU, each
    arm's peak memory."""
    batch_inputs = run.batch(batch)
    result = TrainingResult(int(batch), {})
    for precision in precisions:
        with freeing(run.device):
            modules = {n: m.to(run.device) for n, m in arms.training(extra, anchors).items()}
            steps = training_steps({n: (m, _loss) for n, m in modules.items()}, batch_inputs,
                                   device=run.device, precision=precision)
            for step in steps.values():
                step()  # the optimizer's state exists before any timing or memory reading
            if run.device.type == "cuda":
                result.memory[precision] = {n: peak_cuda_memory(s) for n, s in steps.items()}
            result.latency[precision] = interleaved(dict(steps), run.runs, run.warmup,
                                                    run.advance)
            del steps, modules
    return result


def _loss(module: nn.Module, inputs: Any) -> torch.Tensor:
    return default_loss(module, inputs.call(module))


def _kernels(run: _Run, modules: dict[str, nn.Module], arms: _Arms,
             extra: dict[str, Extra] | None, anchors: bool, batch_sizes: Sequence[int],
             train_batch: int | None) -> dict[str, dict[str, int]]:
    """CUDA kernels per eval forward (first batch size, fp32) and per training step (fp32),
    per model (``torch.profiler``); a failure is noted, not raised."""
    from .device import cuda_kernels

    counts: dict[str, dict[str, int]] = {}
    try:
        batch_inputs = run.batch(batch_sizes[0])
        for name, module in modules.items():
            on_device = _to(module, run.device)
            with torch.no_grad():
                counts.setdefault(name, {})[f"eval forward, batch {batch_sizes[0]}"] = (
                    cuda_kernels(lambda m=on_device: batch_inputs.call(m), run.device))
        if train_batch:
            train_inputs = run.batch(train_batch)
            for name, module in arms.training(extra, anchors).items():
                (step,) = training_steps({name: (module.to(run.device), _loss)}, train_inputs,
                                         device=run.device).values()
                step()
                key = f"training step, batch {train_batch}"
                counts.setdefault(name, {})[key] = cuda_kernels(step, run.device)
    except Exception as exc:  # noqa: BLE001 - the account is a report, not the benchmark
        run.notes.append(f"CUDA kernel count failed: {type(exc).__name__}: {first_line(exc)}")
    columns = {key for c in counts.values() for key in c}
    return {name: {k: c.get(k, -1) for k in sorted(columns)} for name, c in counts.items()}


def _rounds(run: _Run, engines: Sequence[str], batch_sizes: Sequence[int],
            modes: Sequence[str], precisions: Sequence[str], train_batch: int | None) -> int:
    """Progress ticks (rounds of interleaved runs), close enough for a progress bar."""
    per_group = run.runs + run.warmup
    total = len(batch_sizes) * per_group * (
        ("torch" in engines) * len(modes) * len(precisions) + ("onnxruntime" in engines))
    return total + (per_group * len(precisions) if train_batch else 0)


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
