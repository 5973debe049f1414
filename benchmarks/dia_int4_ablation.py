"""Where the compiled int4 DIA-ResNet-50's overhead goes: parts of DIA taken away, side by side.

Target 2's model (``dia_lowp.py``: the lean DIA-ResNet-50 with int4 DIA matrices, compiled for
onnxruntime's CPU provider at batch 1) is timed beside variants of its compiled graph, each with
one part of DIA taken away (they compute something else: they are measurements, not models):

* ``lean-int4-standin``: every ``MatMulNBits`` (DIA's 56 matrix products) replaced by a
  stand-in that reads its input and writes its output shape (``ReduceMax(x) * row``), so the
  rest of the cell, the pools and the multiplies run as before;
* ``lean-int4-nocell``: DIA's cell, pools and matrices removed; every site's ``h`` is a row
  computed from one element of the input image (so nothing is constant-folded), and the scaled
  convolutions and blocked multiplies that consume ``h`` run as before: the multiply's cost;
* ``lean-int2``: the same model with 2-bit DIA matrices (``MatMulNBits`` bits=2, half int4's
  bytes; ``fxattn.export.lowp.quantize_dia_nbits``), to see whether the products are bound by bytes.

All are timed with onnxruntime's default spinning threads by ``dia_vs_handwritten.time_blocks``
(each file in turn the only live session, fresh sessions in every block) and compared with the
original compiled the same way (two-level bootstrap, as ``dia_lowp.py``).

    python benchmarks/dia_int4_ablation.py              # 10 blocks x 20 rounds, batch 1

Writes ``benchmarks/results/dia_int4_ablation.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from onnx import helper, numpy_helper

import fxattn
from fxattn.bench import machine_info
from fxattn.export.lowp import quantize_dia_nbits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks.common

from dia_lowp import BASELINE, BOOTSTRAP, add_block_arguments, statistics  # noqa: E402
from dia_vs_handwritten import time_blocks  # noqa: E402

from benchmarks.common.results_io import command_line, write_results  # noqa: E402

WHAT = {
    "original-ort-cpu": "ResNet-50, compiled",
    "lean-int4-ort-cpu": "the lean DIA-ResNet-50, int4 DIA matrices, compiled (target 2's model)",
    "lean-int4-standin": "its 56 DIA matrix products replaced by stand-ins",
    "lean-int4-nocell": "DIA's cell, pools and matrices removed; h from one input element",
    "lean-int2-ort-cpu": "2-bit DIA matrices instead of 4-bit",
}


def _prune(model: onnx.ModelProto) -> None:
    """Drop the nodes, initializers and inputs nothing reaches the outputs through."""
    needed = {output.name for output in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    initializers = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)


def standin(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every ``MatMulNBits`` -> ``ReduceMax(x, keepdims) * row(N)``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        columns = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "N")
        row = f"{node.name}/standin_row"
        model.graph.initializer.append(numpy_helper.from_array(
            np.full((1, columns), 0.01, np.float32), row))
        nodes += [helper.make_node("ReduceMax", [node.input[0]], [f"{node.name}/max"],
                                   keepdims=1),
                  helper.make_node("Mul", [f"{node.name}/max", row], list(node.output))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _prune(model)
    return model


def no_cell(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every site's ``h`` (the input of the compiler's ``ReshapeW``) -> ``x[0, 0, 0, 0] *
    row(C)``: the consumers of ``h`` stay, DIA's cell and pools become dead and are dropped."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    image = model.graph.input[0].name
    consts = {"start": [0, 0, 0, 0], "end": [1, 1, 1, 1], "flat": [1, 1]}
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), f"ablate/{k}")
                                   for k, v in consts.items())
    head = [helper.make_node("Slice", [image, "ablate/start", "ablate/end"], ["ablate/pixel"]),
            helper.make_node("Reshape", ["ablate/pixel", "ablate/flat"], ["ablate/scalar"])]
    channels = {}  # h -> its channel count, read from one run of the compiled model
    run = onnx.ModelProto.FromString(model.SerializeToString())
    sites = [n for n in model.graph.node if n.name.endswith("/ReshapeW")]
    for node in sites:
        run.graph.output.append(helper.make_tensor_value_info(node.input[0], 1, None))
    session = ort.InferenceSession(run.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = np.zeros([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim],
                    np.float32)
    values = session.run([n.input[0] for n in sites], {image: feed})
    for node, value in zip(sites, values, strict=True):
        channels[node.input[0]] = int(np.prod(value.shape[1:]))
    for k, node in enumerate(sites):
        row = f"ablate/row{k}"
        model.graph.initializer.append(numpy_helper.from_array(
            np.full((1, channels[node.input[0]]), 0.5, np.float32), row))
        head.append(helper.make_node("Mul", ["ablate/scalar", row], [f"ablate/h{k}"]))
        node.input[0] = f"ablate/h{k}"
    nodes = head + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _prune(model)
    return model


def build(folder: Path, size: int) -> dict[str, Path]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(2, 3, size, size)
    lean = fxattn.strip_ssia(fxattn.transform(model, x, ssia=False))
    fxattn.export_onnx(model, folder / "original.onnx", x)
    fxattn.export_onnx(lean, folder / "lean-int4.onnx", x, dia_weights="int4")
    fxattn.export_onnx(lean, folder / "lean.onnx", x)
    int2 = quantize_dia_nbits(onnx.load(str(folder / "lean.onnx")), 2)
    onnx.save(int2, str(folder / "lean-int2.onnx"))
    files = {}
    for name in ("original", "lean-int4", "lean-int2"):
        files[f"{name}-ort-cpu"] = folder / f"{name}.b1.onnx"
        report = fxattn.compile_ort_cpu(folder / f"{name}.onnx", files[f"{name}-ort-cpu"],
                                        batch_size=1)
        print(f"{name}-ort-cpu: {report.fused} of {report.dia_multiplies} fused", flush=True)
    compiled = onnx.load(str(files["lean-int4-ort-cpu"]))
    for name, variant in (("lean-int4-standin", standin), ("lean-int4-nocell", no_cell)):
        files[name] = folder / f"{name}.onnx"
        onnx.save(variant(compiled), str(files[name]))
    return {name: files[name] for name in WHAT}


def markdown(results: dict) -> str:
    s, m = results["batch1"], results["machine"]
    lines = [
        "# Where the compiled int4 DIA-ResNet-50's overhead goes (batch 1)", "",
        f"Command: `{results['command']}`. Machine: {m.get('cpu', '?')}, "
        f"{m.get('cpu_count', os.cpu_count())} logical CPUs; onnxruntime "
        f"{m.get('onnxruntime', '?')}, {results['threads']} intra-op threads, spinning workers "
        "(onnxruntime's default), each file in turn the only live session; "
        f"{results['size']}x{results['size']} input; load average "
        f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after.", "",
        f"Overhead = median / median of `{BASELINE}` - 1; 95% intervals by a two-level "
        f"bootstrap (blocks, then rounds; {BOOTSTRAP} draws). The ablated files compute "
        "something else: they measure what the part taken away costs.", "",
        "| file | what | p50 ms | overhead [95% CI] |", "|---|---|---:|---|"]
    for name, p50 in s["p50_ms"].items():
        low, high = s["ci95"][name]
        lines.append(f"| {name} | {WHAT[name]} | {p50:.2f} | {s['overhead'][name] * 100:+.1f}% "
                     f"[{low * 100:+.1f}, {high * 100:+.1f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_block_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files = build(Path(tmp), args.size)
        load_before = os.getloadavg()
        feed = np.random.default_rng(1).standard_normal(
            (1, 3, args.size, args.size)).astype(np.float32)
        samples = time_blocks(files, feed, args.blocks, args.rounds, args.warmup, args.threads,
                              random.Random(0), spinning=True)
        load_after = os.getloadavg()
    stats = statistics(samples)
    results = {
        "command": command_line("dia_int4_ablation.py", argv),
        "machine": machine_info(args.threads, True), "threads": args.threads, "size": args.size,
        "load_before": list(load_before), "load_after": list(load_after),
        "batch1": {**{k: v for k, v in stats.items() if k != "verdict"}, "samples_ms": samples}}
    write_results(args.out, "dia_int4_ablation", results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
