"""Export a (lean) module to ONNX and prove it: checker, then onnxruntime against PyTorch.

* ``torch.onnx.export`` with the dynamo exporter (the TorchScript exporter as a fallback), a
  dynamic batch dimension, ``onnx.checker.check_model(full_check=True)``.
* Verification (:mod:`fxattn.verify`) runs the ONNX file in onnxruntime and the module in
  PyTorch on the same fresh inputs at two batch sizes (2 and 3 by default); every element must
  satisfy ``|ort - torch| <= atol + rtol * |torch|``, with a float64 check for ill-conditioned
  outputs.
* The write is atomic: the model is staged in a private folder next to ``path`` and moved over
  ``path`` only once checked and verified. A failure leaves no file behind, and an existing file
  at ``path`` stays as it was. A model over 2 GB (protobuf's limit) keeps its weights in
  ``<path>.data`` beside it, the layout onnxruntime and ``onnx.load`` expect.

Overwrite policy: an existing file is replaced (atomically) unless ``overwrite=False``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect as pyinspect
import io
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from ..analysis.graph import count_parameters
from ..capture import ExampleInputs
from ..config import DEFAULT_ATOL, DEFAULT_RTOL, Tolerance
from ..errors import ConfigError, ExportError, InputError, first_line
from ..files import atomic_path, check_output_path
from ..modules.graph_module import AttentionGraphModule, unwrap
from .compat import ExportCompatMode
from .dia_name_scope import mark_dia_name_scopes
from .lowp import apply_dia_weights, check_dia_weights
from .lowp import tolerance as lowp_tolerance
from .onnx_files import external_data_path, onnx_file_bytes, save_with_external_data
from .optimize import OnnxOptimize
from .outputs import AUTO, output_names, select_outputs
from .verify import VerificationReport, verify_onnx

__all__ = ["ExportReport", "export_portable"]

EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well it matched PyTorch."""

    path: str
    exporter: str
    opset: int
    file_bytes: int
    nodes: int
    op_counts: dict[str, int]
    parameters: int
    onnx_parameters: int
    export_seconds: float
    batch_sizes: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float  # max abs error / the output's largest magnitude
    atol: float
    rtol: float
    verified: bool
    verification: VerificationReport | None = None
    notes: list[str] = field(default_factory=list)
    static_batch: int | None = None  # the only batch size the ONNX model takes, if fixed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        by_count = sorted(self.op_counts.items(), key=lambda kv: -kv[1])
        ops = ", ".join(f"{op} {n}" for op, n in by_count)
        lines = [
            f"ONNX model: {self.path} ({self.file_bytes / 1e6:.2f} MB, opset {self.opset}, "
            f"{self.exporter} exporter, {self.export_seconds:.2f} s)",
            f"nodes: {self.nodes} [{ops}]",
            f"parameters: {self.parameters:,} (ONNX initializers: {self.onnx_parameters:,})",
        ]
        if self.verified and self.verification is not None:
            lines.append(
                f"onnxruntime vs PyTorch at batch {', '.join(map(str, self.batch_sizes))}: "
                f"{self.verification.summary()} - OK"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


#: Exports of models that are not one graph from tensors to tensors, tried in order before the
#: plain export: ``(recognises(module, inputs), export(module, path, inputs, **options))``.
#: :mod:`fxattn.export_detection` registers detectors (``list[image] -> list[dict]``); a
#: registry keeps this module below the special exports instead of importing them.
def _consolidate_external_data(staged: Path) -> None:
    """Leave at most one companion file, ``<name>.data``, whatever layout the exporter chose.

    The TorchScript exporter writes a model over 2 GB as one file per weight, named after the
    weight, beside the model; onnxruntime refuses some of those names and moving them all is
    fragile. They are gathered into the single ``<name>.data`` file the dynamo exporter writes.
    """
    import onnx

    data = external_data_path(staged)
    others = [p for p in staged.parent.iterdir() if p not in (staged, data)]
    if not others:
        return
    model = onnx.load(str(staged))  # loads every external tensor into memory
    for path in others:
        path.unlink()
    save_with_external_data(model, staged)


def _export_inputs(inputs: ExampleInputs) -> ExampleInputs:
    # torch.export specialises a dimension of size 1; trace with a batch of at least 2.
    if inputs.batch_size >= 2:
        return inputs
    return inputs.with_batch(2, torch.Generator().manual_seed(0))


def _dynamic_shapes(module: nn.Module, inputs: ExampleInputs) -> Any:
    batch = torch.export.Dim("batch", min=1, max=4096)
    spec = tree_map(
        lambda leaf: {0: batch} if isinstance(leaf, torch.Tensor) else None,
        (inputs.args, inputs.kwargs),
    )
    if not inputs.kwargs:
        return tuple(spec[0])
    bound = pyinspect.signature(module.forward).bind(*spec[0], **spec[1])
    return dict(bound.arguments)


def _positional(module: nn.Module, inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict]:
    """Keyword inputs moved to their positions: the TorchScript exporter traces positionally."""
    try:
        bound = pyinspect.signature(module.forward).bind(*inputs.args, **inputs.kwargs)
    except (TypeError, ValueError):
        return tuple(inputs.args), dict(inputs.kwargs)
    return tuple(bound.args), dict(bound.kwargs)


class _Forward(nn.Module):
    """A plain module that calls ``inner``: hides an fx.GraphModule's ``graph`` attribute."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.train(inner.training)  # the exporter exports the wrapper's mode

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def _run_exporter(
    kind: str,
    module: nn.Module,
    inputs: ExampleInputs,
    tmp: Path,
    opset: int | None,
    optimize: bool = True,
    dynamic_batch: bool = True,
) -> None:
    quiet = io.StringIO()
    outputs = output_names(module)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            torch.onnx.export(
                module,
                inputs.args,
                str(tmp),
                kwargs=inputs.kwargs or None,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(module, inputs) if dynamic_batch else None,
                opset_version=opset,
                external_data=False,
                optimize=optimize,
                verbose=False,
                output_names=outputs,
            )
        else:
            names = [f"input_{i}" for i in range(len(inputs.tensors()))]
            args, kwargs = _positional(module, inputs)
            torch.onnx.export(
                # the TorchScript exporter reads ``module.graph`` as a TorchScript graph when
                # dynamic axes are given; an fx.GraphModule's ``graph`` is an fx.Graph
                _Forward(module),
                args,
                str(tmp),
                kwargs=kwargs or None,
                dynamo=False,
                input_names=names,
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in names} if dynamic_batch else None,
                opset_version=opset or 17,
            )


def _export_checked(
    kind: str,
    module: nn.Module,
    inputs: ExampleInputs,
    tmp: Path,
    opset: int | None,
    dynamic_batch: bool = True,
) -> list[str]:
    """One export attempt into ``tmp``, which then passes ``onnx.checker``; returns notes.

    ``"dynamo+compat"`` runs the dynamo exporter under :class:`ExportCompatMode` with its
    layout rewrites (exact rewrites of calls it cannot convert; tried only after a plain export
    failed, so exportable models keep their exact graph); every dynamo export runs under its
    fixes for patterns onnxruntime computes wrongly. A dynamo export whose *optimized* graph
    fails the checker (onnxscript's optimizer has left nodes out of order, timm's Gemma-4 ViT)
    is redone unoptimized: onnxruntime optimizes the graph again when it loads it anyway.
    """
    import onnx

    exporter, _, variant = kind.partition("+")
    notes: list[str] = []
    for optimize in (True, False) if exporter == "dynamo" else (True,):
        for leftover in tmp.parent.iterdir():  # an earlier attempt's partial files
            leftover.unlink()
        # the layout rewrites only in the "+compat" attempt; the fixes for wrong numbers always
        compat = ExportCompatMode(layout_rewrites=variant == "compat")
        with compat if exporter == "dynamo" else contextlib.nullcontext():
            _run_exporter(exporter, module, inputs, tmp, opset, optimize, dynamic_batch)
        _consolidate_external_data(tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:  # noqa: BLE001 - retried unoptimized, else reported
            problem = f"the exported model fails onnx.checker: {first_line(exc)}"
            if not optimize or exporter != "dynamo":
                raise ExportError(problem) from exc
            notes.append(f"{problem}; exported again without the exporter's optimizer")
            continue
        if compat.report.changed:
            notes.append(str(compat.report))
        if exporter == "torchscript":
            mark_dia_name_scopes_in_file(tmp)
        return notes
    raise AssertionError("unreachable")  # the loop returns or raises


def mark_dia_name_scopes_in_file(path: Path) -> None:
    """Record DIA's name scopes in a TorchScript export (its node names lose them; see
    :func:`fxattn.export.dia_name_scope.mark_dia_name_scopes`), so DIA's rewrites find its
    nodes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    if mark_dia_name_scopes(model):
        onnx.save(model, str(path))


def export_portable(
    module: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    opset: int | None = None,
    exporter: str = "auto",
    verify: bool = True,
    batch_sizes: tuple[int, ...] = (2, 3),
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    float64_check: bool = True,
    overwrite: bool = True,
    seed: int = 0,
    dia_weights: str | None = None,
    optimize: bool | OnnxOptimize | None = True,
    outputs: str | Sequence[str] | None = AUTO,
) -> ExportReport:
    """The portable export of one module: :func:`fxattn.export.export_onnx` without the
    detector dispatch (the arguments are that function's)."""
    import onnx

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter={exporter!r} is not one of {', '.join(EXPORTERS)}")
    check_dia_weights(dia_weights)
    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx needs an nn.Module, got {type(module).__name__}")
    fixed_batch = _fixed_batch(unwrap(module))
    if verify and (len(set(batch_sizes)) < 2 or any(b < 1 for b in batch_sizes)):
        raise ExportError(f"verify needs two distinct positive batch sizes, got {batch_sizes}")
    try:
        tol = Tolerance(atol, rtol, float64_check)
    except ConfigError as exc:
        raise ExportError(
            f"{exc}; the defaults are atol={DEFAULT_ATOL:g}, rtol={DEFAULT_RTOL:g}"
        ) from None
    if opset is not None and not (
        isinstance(opset, int) and 7 <= opset <= onnx.defs.onnx_opset_version()
    ):
        raise ExportError(
            f"opset={opset!r} is not an ONNX opset this onnx supports (7 to "
            f"{onnx.defs.onnx_opset_version()}); leave it None for the exporter's default"
        )
    from .optimize import optimize_onnx_file, resolve_optimize

    rewrites = resolve_optimize(optimize)
    target = check_output_path(path, overwrite)
    inputs = ExampleInputs.from_user(example_inputs)
    notes: list[str] = []
    module = unwrap(module)
    if isinstance(module, AttentionGraphModule):
        from ..transform import strip_ssia

        if _takes(module, inputs):
            module = strip_ssia(module)
            notes.append("exported the stripped (lean) evaluation graph of the fxattn module")
        else:  # inference inputs other than the training ones (no labels): capture for them
            module = strip_ssia(module, example_inputs=inputs)
            notes.append(module.meta["fxattn_info"].plan.notes[-1])
    else:
        _check_lean_takes(module, inputs)
        if module.training:
            module = copy.deepcopy(module).eval()
    if fixed_batch is not None and inputs.batch_size != fixed_batch:
        inputs = inputs.with_batch(fixed_batch, torch.Generator().manual_seed(seed))
    module, chosen = select_outputs(module, _check_runs(module, inputs), outputs)
    notes += chosen
    export_inputs = _export_inputs(inputs) if fixed_batch is None else inputs
    order = {
        "auto": ["dynamo", "dynamo+compat", "torchscript"],
        "dynamo": ["dynamo", "dynamo+compat"],
        "torchscript": ["torchscript"],
    }[exporter]
    failures: list[str] = []
    with atomic_path(target) as tmp:
        start = time.perf_counter()
        used = None
        for kind in order:
            try:
                notes += _export_checked(kind, module, export_inputs, tmp, opset,
                                         dynamic_batch=fixed_batch is None)
                used = kind
                break
            except Exception as exc:  # noqa: BLE001 - try the next exporter, report all
                failures.append(f"{kind}: {first_line(exc)}")
        if used is None:
            raise ExportError(f"ONNX export failed ({'; '.join(failures)})")
        if failures:
            notes.append(f"fell back to the {used} exporter ({failures[0]})")
        static = fixed_batch if fixed_batch is not None else _static_batch(tmp)
        if static is not None and static != inputs.batch_size:
            # pinned at the export's batch of 2: export again at the user's own batch size
            _export_checked(used, module, inputs, tmp, opset, dynamic_batch=False)
            static = inputs.batch_size
        if static is not None:
            batch_sizes = (static, static)  # no other size runs: two fresh draws of it
            notes.append(_static_batch_note(static, captured=fixed_batch is not None))
        if rewrites is not None:  # exact DIA rewrites; lowp below composes with them
            notes += optimize_onnx_file(tmp, rewrites).notes
        seconds = time.perf_counter() - start
        if dia_weights not in (None, "fp32"):
            notes.append(apply_dia_weights(tmp, dia_weights))
            tol = lowp_tolerance(dia_weights, tol)
        model_proto = onnx.load(str(tmp))
        verification = None
        if verify:
            verification = verify_onnx(str(tmp), module, inputs, batch_sizes, tol, seed)
            notes += verification.notes
        file_bytes = onnx_file_bytes(tmp)
    ops = Counter(node.op_type for node in model_proto.graph.node)
    initializers = sum(int(np.prod(t.dims)) for t in model_proto.graph.initializer)
    return ExportReport(
        path=str(target),
        exporter=used,
        opset=next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), 0),
        file_bytes=file_bytes,
        nodes=len(model_proto.graph.node),
        op_counts=dict(ops),
        parameters=count_parameters(module),
        onnx_parameters=initializers,
        export_seconds=seconds,
        batch_sizes=tuple(batch_sizes) if verify else (),
        static_batch=static,
        max_abs_error=verification.max_abs_error if verification else 0.0,
        max_rel_error=verification.max_rel_error if verification else 0.0,
        atol=tol.atol,
        rtol=tol.rtol,
        verified=verify,
        verification=verification,
        notes=notes,
    )


def _static_batch(path: Path) -> int | None:
    """The batch size of an export whose batch came out fixed although it was asked dynamic.

    torch.onnx drops the dynamic shapes and exports statically when torch.export cannot keep a
    dimension symbolic (a guard in the model's code pins it); it does so without an error.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
    return None


def _static_batch_note(batch: int, captured: bool) -> str:
    where = ("when the model was captured (see the plan's notes)" if captured
             else "in torch.export: a shape guard in the model's code pins it")
    return (f"static batch {batch}: the batch could not be kept dynamic {where}; the ONNX "
            f"model takes batches of {batch} only, verified on two fresh batches of {batch}")


def _fixed_batch(module: nn.Module) -> int | None:
    """The batch size a transformed model was captured at, when torch.export fixed it."""
    info = getattr(module, "fxattn_info", None)  # a transformed model
    if info is None and isinstance(module, fx.GraphModule):
        info = module.meta.get("fxattn_info")  # its stripped (lean) graph
    return getattr(info.plan, "fixed_batch", None) if info is not None else None


def _takes(module: nn.Module, inputs: ExampleInputs) -> bool:
    """Whether ``module.forward`` accepts the inputs' names and count (not their values)."""
    try:
        pyinspect.signature(module.forward).bind(*inputs.args, **inputs.kwargs)
    except TypeError:
        return False
    except ValueError:  # no readable signature: let the run decide
        return True
    return True


def _check_lean_takes(module: nn.Module, inputs: ExampleInputs) -> None:
    """A lean graph takes the inputs it was transformed with; say how to get another one."""
    if not isinstance(module, fx.GraphModule) or "fxattn_info" not in module.meta:
        return
    if _takes(module, inputs):
        return
    takes = ", ".join(pyinspect.signature(module.forward).parameters)
    given = ", ".join([*(f"<positional {i}>" for i in range(len(inputs.args))), *inputs.kwargs])
    raise InputError(
        f"this lean graph takes ({takes}), the inputs it was transformed with, not ({given}); "
        "to export it for other inputs (inference without labels), pass the training module "
        "itself, fxattn.export_onnx(net, path, inputs), or strip it for them: "
        "fxattn.strip_ssia(net, example_inputs=inputs)"
    )


def _check_runs(module: nn.Module, inputs: ExampleInputs) -> Any:
    """Run the module once before exporting (and return its output): a module that rejects
    its inputs, or returns no tensor, would otherwise fail deep inside both exporters or
    onnxruntime."""
    try:
        with torch.no_grad():
            result = inputs.call(module)
    except Exception as exc:  # noqa: BLE001 - the module rejected the example inputs
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs.tensors())
        raise InputError(
            f"{type(module).__name__} cannot run on the example inputs [{shapes}]: "
            f"{first_line(exc)}; pass inputs shaped and typed like one real batch"
        ) from exc
    if not any(isinstance(t, torch.Tensor) for t in tree_leaves(result)):
        raise ExportError(
            f"{type(module).__name__} returns no tensor (got {type(result).__name__}); an "
            "ONNX model needs at least one tensor output"
        )
    return result
