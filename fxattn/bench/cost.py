"""DIA's cost account in onnxruntime: the bytes it must move, and the latency that takes at best.

DIA adds two kinds of memory traffic to a model, and at inference both are bound by memory
bandwidth rather than arithmetic:

* **its matrices**: the shared cell runs at every site of its group and reads its group's
  matrices each time (at the precision they are stored in: fp32, or int8/int4 with their scales
  for ``dia_weights``); counted from the ONNX graph, once per node that uses them;
* **extra passes over activations**: what onnxruntime's *optimised* graph does beyond the
  original's - layout reorders, unfused adds, multiplies, pools. Counted from onnxruntime's own
  profile of one run (each node's input and output shapes): the bytes read and written by the
  reorder / elementwise / pooling nodes of the DIA model minus those of the original model.

Divided by the machine's memory bandwidth, measured in the same process (a large tensor copy
with the benchmark's thread count), that is a lower bound on DIA's added latency. The account
reports the measured added latency as a multiple of it. The bound assumes every byte comes from
memory once: small groups' matrices that stay in cache can be read faster, so a multiple below
1 is possible for models whose DIA matrices fit in the last-level cache.

That bound takes the graph's own extra passes as given. The **traffic limit** does not: DIA
must read its matrices, and each site's branch output ``A`` must be written once and read once
more than without DIA (the pool can be a convolution's epilogue, but the multiply needs the
whole pool first; the multiply, the residual add and the ReLU can then be one pass that the
original makes anyway). ``2 * |A|`` per site plus the matrices, over the same bandwidth, is
what no graph that writes DIA's branch outputs can beat; it is counted from fxattn's own DIA
multiplies (``fxattn_dia`` name scope), so a model without them (a hand-written DIA) has none.
A graph can skip writing ``A`` where DIA's pool reads the input of the convolution that makes it:
:func:`fxattn.compile_ort_cpu` then folds ``h`` into that convolution's weights (a pass over the
weights instead of two over ``A``), so a compiled model can come in under this limit.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..deploy import NODE_PREFIX, SCALED_CONV

#: onnxruntime ops that make a pass over an activation without computing a convolution or matmul
PASS_OPS = frozenset({
    "ReorderInput", "ReorderOutput", "Add", "Sum", "Mul", "Div", "Sub", "Relu", "Sigmoid",
    "Tanh", "ReduceMean", "GlobalAveragePool", "Upsample", "Resize", "Expand", "Transpose",
    "Concat", "Split",
})
MATMUL_OPS = frozenset({"Gemm", "MatMul", "MatMulNBits", "FusedGemm", "FusedMatMul"})
_DTYPE_BYTES = {"float": 4, "float16": 2, "double": 8, "int64": 8, "int32": 4, "int8": 1,
                "uint8": 1, "bool": 1}


@dataclass
class CostAccount:
    """DIA's memory traffic and its lower-bound latency for one model at one batch size."""

    model: str
    batch: int
    dia_matrix_bytes: int
    extra_activation_bytes: int
    extra_ops: dict[str, int] = field(default_factory=dict)
    bandwidth_gb_s: float = 0.0
    added_ms: float | None = None
    site_bytes: int | None = None  # DIA's branch outputs per run (None: not fxattn's DIA)

    @property
    def traffic_limit_ms(self) -> float | None:
        """Matrices plus one extra write and read of every branch output, over the bandwidth."""
        if self.site_bytes is None or not self.bandwidth_gb_s:
            return None
        return 1e3 * (self.dia_matrix_bytes + 2 * self.site_bytes) / (self.bandwidth_gb_s * 1e9)

    @property
    def multiple_of_limit(self) -> float | None:
        limit = self.traffic_limit_ms
        if self.added_ms is None or not limit:
            return None
        return self.added_ms / limit

    @property
    def lower_bound_ms(self) -> float:
        total = self.dia_matrix_bytes + self.extra_activation_bytes
        return 1e3 * total / (self.bandwidth_gb_s * 1e9) if self.bandwidth_gb_s else float("nan")

    @property
    def multiple(self) -> float | None:
        if self.added_ms is None or not self.lower_bound_ms > 0:
            return None
        return self.added_ms / self.lower_bound_ms

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dia_matrix_mb_per_image"] = self.dia_matrix_bytes / self.batch / 1e6
        data["lower_bound_ms"] = self.lower_bound_ms
        data["multiple_of_lower_bound"] = self.multiple
        data["traffic_limit_ms"] = self.traffic_limit_ms
        data["multiple_of_traffic_limit"] = self.multiple_of_limit
        return data


def memory_bandwidth(threads: int, megabytes: int = 256, repeats: int = 7) -> float:
    """Copy bandwidth in GB/s (bytes read + written per second), median of ``repeats`` copies of
    a ``megabytes`` fp32 tensor with ``threads`` torch threads - far larger than any cache."""
    import torch

    from ..export.runtime import torch_threads

    with torch_threads(threads):
        src = torch.rand(megabytes * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch every page before timing
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def matrix_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of constant matrices one run reads through matmul-like nodes (``Gemm``, ``MatMul``,
    ``MatMulNBits``: its packed weight and scales; biases aside): each node reads them once, so a
    matrix shared by several sites counts once per site. A DIA model's count minus the
    original's is DIA's, however its weights are named (fxattn's or a hand-written model's)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        sizes[init.name] = int(np.prod(init.dims)) * itemsize
    dims = {init.name: len(init.dims) for init in model.graph.initializer}
    return sum(sizes.get(name, 0) for node in model.graph.node if node.op_type in MATMUL_OPS
               for name in node.input[1:]
               if dims.get(name, 0) >= 2 or node.op_type == "MatMulNBits")  # biases aside


def site_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of DIA's branch outputs per image (multiply by the batch for a run): the outputs
    of the multiplies in fxattn's DIA name scope that are larger than a ``(B, C)`` vector (the
    cell's own are not). ``None`` when the graph has no such multiply or one of their
    non-batch sizes is not static."""
    import onnx

    from ..export.optimize import in_dia

    model = onnx.load(str(path), load_external_data=False)
    shapes = {info.name: [d.dim_value if d.HasField("dim_value") else None
                          for d in info.type.tensor_type.shape.dim]
              for info in [*model.graph.value_info, *model.graph.output]}
    total, found = 0, False
    for node in model.graph.node:
        shape = shapes.get(node.output[0]) if node.op_type == "Mul" and in_dia(node) else None
        if not shape or len(shape) < 3:
            continue
        if any(d is None for d in shape[1:]):
            return None
        found = True
        total += int(np.prod(shape[1:])) * 4  # float32
    return total if found else None


def profile_passes(path: str | os.PathLike[str], arrays: list[np.ndarray],
                   threads: int) -> tuple[int, Counter]:
    """Bytes read and written by the :data:`PASS_OPS` nodes of onnxruntime's optimised graph in
    one run on ``arrays`` (the model's inputs in order; from onnxruntime's profile), and how
    many such nodes ran."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="fxattn-cost-") as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        session.run(None, dict(zip(names, arrays, strict=True)))
        events = json.loads(Path(session.end_profiling()).read_text())
    moved, ops = 0, Counter()
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        ours = event["name"].startswith(NODE_PREFIX)
        if (args.get("op_name") not in PASS_OPS and not ours) or (ours and (
                args.get("op_name") == "Reshape" or f"/{SCALED_CONV}_" in event["name"])):
            continue  # compiled: reshapes are views; a scaled convolution is the original's
        ops[args["op_name"]] += 1
        for entry in args.get("input_type_shape", []) + args.get("output_type_shape", []):
            for dtype, shape in entry.items():
                moved += int(np.prod(shape)) * _DTYPE_BYTES.get(dtype, 4)
    return moved, ops


def cost_accounts(
    paths: dict[str, Path],
    feeds: dict[int, list[np.ndarray]],
    threads: int,
    baseline: str = "original",
    bandwidth_gb_s: float | None = None,
    site_sources: dict[str, Path] | None = None,
) -> dict[str, dict[int, CostAccount]]:
    """The account of every model in ``paths`` but ``baseline``, at each batch of ``feeds``.

    ``site_sources`` names, for some models, the file to read their branch-output bytes from:
    a model compiled by :func:`fxattn.compile_ort_cpu` no longer carries DIA's name scopes and
    shapes, its portable source does.
    """
    bandwidth = bandwidth_gb_s or memory_bandwidth(threads)
    # what a file holds does not depend on the batch: read each once
    matrices = {name: matrix_bytes(path) for name, path in paths.items()}
    sources = site_sources or {}
    per_image = {name: site_bytes(sources.get(name, path)) for name, path in paths.items()
                 if name != baseline}
    accounts: dict[str, dict[int, CostAccount]] = {}
    for batch, feed in feeds.items():
        base_bytes, base_ops = profile_passes(paths[baseline], feed, threads)
        for name, path in paths.items():
            if name == baseline:
                continue
            moved, ops = profile_passes(path, feed, threads)
            extra = {op: ops[op] - base_ops.get(op, 0) for op in sorted(ops)
                     if ops[op] != base_ops.get(op, 0)}
            sites = per_image[name]
            accounts.setdefault(name, {})[batch] = CostAccount(
                model=name, batch=batch,
                dia_matrix_bytes=max(matrices[name] - matrices[baseline], 0),
                extra_activation_bytes=max(moved - base_bytes, 0), extra_ops=extra,
                bandwidth_gb_s=bandwidth, site_bytes=None if sites is None else batch * sites)
    return accounts
