"""The prepared GPU check: lean-model latency in PyTorch and onnxruntime, Inductor, DDP over NCCL.

One short script for a machine with a GPU (see docs/deployment.md, "On a GPU"), so the
device time goes to measuring, not to writing code. Everything runs in one process but DDP,
which runs in a child process group of one rank per GPU::

    PYTHONPATH=. python3 benchmarks/gpu.py --out $OUT          # on the GPU machine
    python benchmarks/gpu.py --device cpu --size 64 --runs 3   # the same code, checked here

It measures, for ResNet-50 (random weights, 224x224) as ``original``, fxattn's ``lean`` model
(DIA, SSIA stripped) and the hand-written DIA-ResNet-50 of ``benchmarks/common/handwritten_dia.py``
(``hand-dia``, the lean model's weights):

* PyTorch latency at batch 1 and 8, eager and replayed from a CUDA graph, fp32 and bf16
  autocast (medians of interleaved runs, each call synchronised);
* ``torch.compile`` (Inductor) latency and its largest difference from eager;
* onnxruntime latency with the CUDA provider when the installed onnxruntime has it (the
  machine's image ships the CPU build; the result then says so rather than timing the CPU);
* a few DDP training steps of the transformed model with ``fxattn.ssia_loss`` over NCCL
  (gloo on CPU), checking that every rank ends with the same weights.

Writes ``gpu_<device name>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import fxattn  # noqa: E402
from benchmarks.common.handwritten_dia import matched_hand_dia  # noqa: E402
from fxattn.bench import interleaved_samples  # noqa: E402


def interleaved_ms(calls: dict[str, Callable[[], Any]], runs: int, warmup: int,
                   device: torch.device) -> dict[str, float]:
    """Median milliseconds of each call, interleaved run by run (``fxattn.bench``'s protocol);
    on a GPU each call waits for its kernels, so the wall clock times the work itself."""
    if device.type == "cuda":
        calls = {name: (lambda call=call: (call(), torch.cuda.synchronize()))
                 for name, call in calls.items()}
    samples = interleaved_samples(calls, runs, warmup)
    return {name: statistics.median(values) * 1000 for name, values in samples.items()}


def graph_call(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """A CUDA-graph replay of ``module(x)`` (static input; captured after a warm-up)."""
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            module(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        module(static)
    return graph.replay


def torch_latency(modules: dict[str, torch.nn.Module], size: int, batches: list[int],
                  runs: int, device: torch.device) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device)
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                      enabled=precision == "bf16")
            with torch.no_grad(), autocast:
                calls = {f"{name} eager": (lambda m=m, x=x: m(x)) for name, m in modules.items()}
                if device.type == "cuda":
                    calls |= {f"{name} cuda-graph": graph_call(m, x)
                              for name, m in modules.items()}
                results[f"batch {batch} {precision}"] = interleaved_ms(calls, runs, 5, device)
    return results


def inductor(modules: dict[str, torch.nn.Module], size: int, batches: list[int], runs: int,
             device: torch.device) -> dict[str, Any]:
    """``torch.compile`` (Inductor) of each model: latency and its largest error to eager."""
    results: dict[str, Any] = {}
    for name, module in modules.items():
        compiled = torch.compile(module)
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=device)
            with torch.no_grad():
                start = time.perf_counter()
                got = compiled(x)
                first = time.perf_counter() - start
                want = module(x)
                ms = interleaved_ms({"eager": lambda m=module, x=x: m(x),
                                     "inductor": lambda c=compiled, x=x: c(x)}, runs, 3, device)
            results[f"{name} batch {batch}"] = {
                **ms, "first_call_s": first,
                "max_abs_error": float((got - want).abs().max()),
                "max_abs_output": float(want.abs().max())}
    return results


def onnxruntime_cuda(modules: dict[str, torch.nn.Module], size: int, batches: list[int],
                     runs: int, folder: Path) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDA provider "
                           f"(available: {', '.join(providers)})"}
    example = torch.randn(2, 3, size, size)
    sessions = {}
    for name, module in modules.items():
        path = folder / f"{name}.onnx"
        fxattn.export_onnx(module.cpu(), path, example)
        sessions[name] = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    results: dict[str, Any] = {}
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype("f4")
        calls = {name: (lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x}))
                 for name, s in sessions.items()}
        results[f"batch {batch}"] = interleaved_ms(calls, runs, 5, torch.device("cpu"))
    return results


def _ddp_worker(rank: int, world: int, backend: str, port: int, steps: int,
                queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    net = fxattn.transform(model, torch.randn(2, 3, 64, 64)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 3, 64, 64, generator=generator).to(device)
        y = torch.randint(0, 10, (8,), generator=generator).to(device)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x), y) + fxattn.ssia_loss(ddp)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        queue.put({"backend": backend, "world_size": world, "losses": losses,
                   "ranks_hold_equal_weights": same})
    dist.destroy_process_group()


def ddp(device: torch.device, steps: int) -> dict[str, Any]:
    backend = "nccl" if device.type == "cuda" else "gloo"
    world = torch.cuda.device_count() if device.type == "cuda" else 2
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_ddp_worker, args=(world, backend, port, steps, queue), nprocs=world,
                       join=True, start_method="spawn")
    return queue.get(timeout=60)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# fxattn on {results['device_name']}", "",
             f"Command: `{results['command']}`; torch {results['torch_version']}, "
             f"{results['size']}x{results['size']} input, median of {results['runs']} "
             "interleaved runs (each call synchronised on a GPU).", ""]
    for title, key in (("PyTorch", "torch"), ("Inductor (torch.compile)", "inductor"),
                       ("onnxruntime, CUDA provider", "onnxruntime_cuda")):
        lines += [f"## {title}", ""]
        section = results.get(key, {})
        if "skipped" in section or "error" in section:
            lines += [section.get("skipped") or section["error"], ""]
            continue
        for group, values in section.items():
            lines.append(f"- {group}: " + ", ".join(
                f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"
                for name, value in values.items()))
        lines.append("")
    lines += ["## DDP", "", json.dumps(results.get("ddp", {})), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--ddp-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(2, 3, args.size, args.size)
    lean = fxattn.strip_ssia(fxattn.transform(model, x, ssia=False))
    hand, gap = matched_hand_dia(lean, x)
    modules = {"original": model, "lean": lean, "hand-dia": hand.eval()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {
        "device_name": name, "torch_version": torch.__version__, "size": args.size,
        "runs": args.runs,
        "hand_dia_gap": gap,
        "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as folder:
        results["onnxruntime_cuda"] = _guarded(lambda: onnxruntime_cuda(
            modules, args.size, args.batches, args.runs, Path(folder)))
    on_device = {k: m.to(device) for k, m in modules.items()}
    results["torch"] = _guarded(lambda: torch_latency(on_device, args.size, args.batches,
                                                      args.runs, device))
    results["inductor"] = _guarded(lambda: inductor(on_device, args.size, args.batches,
                                                    args.runs, device))
    results["ddp"] = _guarded(lambda: ddp(device, args.ddp_steps))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _guarded(step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One part's results, or its error in one line: the other parts still run."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001 - a failed part is a result of the run
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


if __name__ == "__main__":
    raise SystemExit(main())
