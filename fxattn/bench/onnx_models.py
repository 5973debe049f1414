"""The onnxruntime side of a benchmark: the ONNX files it times and how it times them.

:func:`export_models` exports and verifies every model (and the low-precision and unoptimised
variants of ``lean``); :func:`compile_variants` compiles them for onnxruntime's CPU provider at
each batch; :func:`cost_accounts` adds DIA's cost account (:mod:`fxattn.bench.cost`) with the
measured added latency. :func:`time_cpu` times the sessions on the CPU provider, interleaved
without spinning, or (``spinning=True``) each alone with onnxruntime's default spinning workers
in blocks that alternate the models (workers that sleep between nodes cost DIA's many small
nodes a wake-up each: ResNet-50 with DIA measured +54% over the original without spinning and
+41% with it). :func:`time_gpu` times them through a GPU execution provider.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Tolerance
from ..errors import ConfigError, VerificationError, first_line
from ..export.runtime import ort_feed, ort_session
from .protocol import LatencyStats, interleaved, interleaved_samples, summarize
from .results import ModelEntry

#: the baseline of the compiled models: the original through the same compiler (onnxruntime's
#: own graph at a fixed batch; nothing to fuse), so that what a fixed batch alone gives a model
#: is not counted as DIA's
COMPILED_BASELINE = "original-ort-cpu"


def export_models(modules: dict[str, nn.Module], models: dict[str, ModelEntry], folder: Path,
                  example: Any, inputs: Any, tolerance: Tolerance, exporter: str,
                  unoptimized: bool, dia_weights: Sequence[str],
                  ) -> tuple[dict[str, Path], dict[str, str]]:
    """Export every module to ``folder/<name>.onnx`` (verified; its entry in ``models``
    replaced by the export's), then ``lean``'s variants; return the files and, per
    low-precision variant that failed its tolerance, why (a result, not a crash: it is
    reported and not timed)."""
    onnx_files: dict[str, Path] = {}
    unverified: dict[str, str] = {}
    for name, module in modules.items():
        entry = export_entry(name, module, folder / f"{name}.onnx", example, tolerance, exporter)
        entry.transform_seconds = models[name].transform_seconds
        models[name] = entry
        onnx_files[name] = folder / f"{name}.onnx"
    if unoptimized:
        models["lean-noopt"] = export_entry("lean-noopt", modules["lean"],
                                            folder / "lean-noopt.onnx", example, tolerance,
                                            exporter, optimize=False)
        onnx_files["lean-noopt"] = folder / "lean-noopt.onnx"
    for mode in dia_weights:
        name = f"lean-{mode}"
        try:
            models[name] = lowp_variant(name, mode, modules["lean"], folder, inputs, tolerance)
        except VerificationError as exc:
            unverified[name] = first_line(exc)
            continue
        onnx_files[name] = folder / f"{name}.onnx"
    return onnx_files, unverified


def export_entry(name: str, module: nn.Module, path: Path, example: Any,
                 tolerance: Tolerance, exporter: str, optimize: bool = True) -> ModelEntry:
    """Export ``module`` with :func:`fxattn.export_onnx` and describe the file."""
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


def lowp_variant(name: str, mode: str, lean: nn.Module, folder: Path, inputs: Any,
                 base: Tolerance) -> ModelEntry:
    """Copy ``lean.onnx``, apply ``mode`` (``int4``, ``int8+fold``, ``fp32+fold``...), verify."""
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
    proto = onnx.load(str(path))
    return ModelEntry(
        name=name,
        parameters=count_parameters(lean),
        onnx_nodes=len(proto.graph.node),
        onnx_ops=[node.op_type for node in proto.graph.node],
        onnx_mb=path.stat().st_size / 1e6,
        export_seconds=seconds,
        max_abs_error=verification.max_abs_error,
        note=f"{note}; vs PyTorch fp32: {verification.summary()}",
    )


def compile_variants(onnx_files: dict[str, Path], models: dict[str, ModelEntry],
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


def cost_accounts(onnx_files: dict[str, Path], inputs: Any, batch_sizes: Sequence[int],
                  threads: int, latency: dict,
                  batch_files: dict[int, dict[str, Path]] | None = None,
                  sources: dict[str, Path] | None = None) -> dict[str, dict[int, Any]]:
    """DIA's cost account of every ONNX model but ``original``, with its measured added time.

    A compiled model's account is taken at its own batch against :data:`COMPILED_BASELINE`
    (its extra passes and its added latency), with its branch-output bytes read from its
    portable source.
    """
    from .cost import cost_accounts as accounts_of
    from .cost import memory_bandwidth

    feeds = {int(b): [t.detach().cpu().numpy() for t in inputs.with_batch(
        int(b), torch.Generator().manual_seed(int(b))).tensors()] for b in batch_sizes}
    bandwidth = memory_bandwidth(threads)
    accounts = accounts_of(onnx_files, feeds, threads, bandwidth_gb_s=bandwidth)
    baselines = dict.fromkeys(onnx_files, "original")
    for batch, files in (batch_files or {}).items():
        by_name = accounts_of(files, {batch: feeds[batch]}, threads, baseline=COMPILED_BASELINE,
                              bandwidth_gb_s=bandwidth, site_sources=sources)
        for name, by_batch in by_name.items():
            accounts.setdefault(name, {}).update(by_batch)
            baselines[name] = COMPILED_BASELINE
    for name, by_batch in accounts.items():
        for batch, account in by_batch.items():
            stats = latency["onnxruntime"][batch]
            account.added_ms = stats[name].p50_ms - stats[baselines[name]].p50_ms
    return accounts


def cpu_sessions(onnx_files: dict[str, Path], threads: int, spinning: bool) -> dict[str, Any]:
    """Sessions that live for the whole measurement (none with spinning: those are made one
    at a time)."""
    if spinning:
        return {}
    return {name: ort_session(str(path), threads=threads) for name, path in onnx_files.items()}


def time_cpu(onnx_files: dict[str, Path], sessions: dict[str, Any],
             compiled: dict[str, Path], batch_inputs: Any, runs: int, warmup: int,
             threads: int, spinning: bool, advance: Callable[[], None],
             ) -> dict[str, LatencyStats]:
    """One batch on onnxruntime's CPU provider: the portable files and the batch's compiled
    ones (a compiled model runs at its own batch only)."""
    if spinning:
        return _alone_in_blocks({**onnx_files, **compiled}, batch_inputs, runs, warmup,
                                threads, advance)
    batch_sessions = {**sessions, **{name: ort_session(str(path), threads=threads)
                                     for name, path in compiled.items()}}
    calls = {}
    for name, session in batch_sessions.items():
        feed = ort_feed(session, batch_inputs)
        calls[name] = lambda s=session, f=feed: s.run(None, f)
    return interleaved(calls, runs, warmup, advance)


def cpu_rounds(onnx_files: int, compiled: int, runs: int, warmup: int, spinning: bool) -> int:
    """Progress ticks of :func:`time_cpu` for one batch."""
    if spinning:
        return (onnx_files + compiled) * (runs + warmup * spinning_blocks(runs))
    return runs + warmup


def spinning_blocks(runs: int) -> int:
    """Blocks that alternate the models when each is timed alone (at most 4)."""
    return min(4, runs)


def _alone_in_blocks(onnx_files: dict[str, Path], batch_inputs: Any, runs: int, warmup: int,
                     threads: int, advance: Callable[[], None]) -> dict[str, LatencyStats]:
    """onnxruntime with spinning workers: in each block every model in turn gets the only live
    session (an idle session's spinning workers would steal the timed one's cores), its
    ``warmup`` runs and its share of ``runs``; the block order alternates the models."""
    blocks = spinning_blocks(runs)
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


def gpu_sessions(onnx_files: dict[str, Path], provider: str, device: torch.device,
                 ) -> dict[str, Any]:
    """One session per file through a GPU execution provider (see
    :func:`fxattn.bench.device.ort_gpu_session`)."""
    from .device import ort_gpu_session

    return {name: ort_gpu_session(str(path), provider, device)
            for name, path in onnx_files.items()}


def time_gpu(sessions: dict[str, Any], batch_inputs: Any, runs: int, warmup: int,
             advance: Callable[[], None]) -> dict[str, LatencyStats]:
    """One batch through a GPU provider: numpy inputs in, numpy outputs out (each run's time
    includes the copies to and from the GPU; ``run`` returns when the outputs are on the
    host)."""
    calls = {}
    for name, session in sessions.items():
        feed = ort_feed(session, batch_inputs)
        calls[name] = lambda s=session, f=feed: s.run(None, f)
    return interleaved(calls, runs, warmup, advance)
