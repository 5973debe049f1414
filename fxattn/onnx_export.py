"""Export a (lean) module to ONNX and prove it: checker, then onnxruntime against PyTorch.

* ``torch.onnx.export`` with the dynamo exporter (the TorchScript exporter as a fallback), a
  dynamic batch dimension, ``onnx.checker.check_model(full_check=True)``.
* Verification runs the ONNX file in onnxruntime and the module in PyTorch on the same fresh
  inputs at two batch sizes (2 and 3 by default) and fails above ``atol``.
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
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .errors import ExportError, InputError, VerificationError
from .export_compat import ExportCompatMode
from .graph_module import AttentionGraphModule, unwrap
from .tracing import ExampleInputs, count_parameters

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
    max_rel_error: float
    atol: float
    verified: bool
    notes: list[str] = field(default_factory=list)

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
        if self.verified:
            lines.append(
                f"onnxruntime vs PyTorch at batch {', '.join(map(str, self.batch_sizes))}: "
                f"max abs error {self.max_abs_error:.2e}, max rel error {self.max_rel_error:.2e} "
                f"(tolerance {self.atol:g}) - OK"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def check_output_path(path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Fail early, with a clear message, when ``path`` cannot receive a file."""
    target = Path(path)
    if str(path) == "" or target.name == "":
        raise ExportError("the output path is empty; give a file name such as model.onnx")
    if target.is_dir():
        raise ExportError(f"output path {target} is a directory; give a file name inside it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise ExportError(f"the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ExportError(f"{parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"the folder {parent} is not writable; choose another output path")
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pass overwrite=True (--force) to replace it")
    return target


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield ``target``'s name in a private folder beside it; move it over ``target`` on success.

    Writers that add companion files keep their names right: an ONNX model over 2 GB stores its
    weights in ``<name>.data``, referenced by that name from inside the model, so the model is
    staged under its final name and the data file moves along with it (data first, model last,
    so ``target`` never names a model whose data is missing).

    An ``OSError`` on the way (a folder nothing can be created in, a full disk) becomes an
    :class:`ExportError`; either way the staging folder is removed and ``target`` is untouched.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ExportError(
            f"cannot create a file in {target.parent} ({exc.strerror or exc}); choose a "
            "writable folder"
        ) from None
    staged = staging / target.name
    try:
        try:
            yield staged
            data = external_data_path(staged)
            if data.exists():
                os.replace(data, external_data_path(target))
            os.replace(staged, target)
        except OSError as exc:
            raise ExportError(
                f"writing {target} failed ({exc.strerror or exc}); nothing was written"
            ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def external_data_path(model_path: Path) -> Path:
    """Where a model over 2 GB keeps its weights: ``<model file name>.data`` beside it."""
    return model_path.with_name(model_path.name + ".data")


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


def save_with_external_data(model: Any, path: Path) -> None:
    """Save ONNX ``model`` at ``path`` with its weights in the one file ``<name>.data``."""
    import onnx

    data = external_data_path(path)
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name)


def onnx_file_bytes(path: Path) -> int:
    """Bytes on disk of an ONNX model: the file plus its ``<name>.data`` file, if any."""
    data = external_data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


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
) -> None:
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            torch.onnx.export(
                module,
                inputs.args,
                str(tmp),
                kwargs=inputs.kwargs or None,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(module, inputs),
                opset_version=opset,
                external_data=False,
                optimize=optimize,
                verbose=False,
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
                dynamic_axes={name: {0: "batch"} for name in names},
                opset_version=opset or 17,
            )


def _export_checked(
    kind: str, module: nn.Module, inputs: ExampleInputs, tmp: Path, opset: int | None
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
            _run_exporter(exporter, module, inputs, tmp, opset, optimize)
        _consolidate_external_data(tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:  # noqa: BLE001 - retried unoptimized, else reported
            problem = f"the exported model fails onnx.checker: {_first_line(exc)}"
            if not optimize or exporter != "dynamo":
                raise ExportError(problem) from exc
            notes.append(f"{problem}; exported again without the exporter's optimizer")
            continue
        if compat.report.changed:
            notes.append(str(compat.report))
        return notes
    raise AssertionError("unreachable")  # the loop returns or raises


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    opset: int | None = None,
    exporter: str = "auto",
    verify: bool = True,
    batch_sizes: tuple[int, ...] = (2, 3),
    atol: float = 1e-4,
    overwrite: bool = True,
    seed: int = 0,
    dia_weights: str | None = None,
) -> ExportReport:
    """Export ``module`` to ``path`` as ONNX with a dynamic batch and verify it in onnxruntime.

    An fxattn training module is stripped first (its lean evaluation graph is exported). The
    module is exported in eval mode; a module in training mode is copied, never switched.

    Args:
        module: the module to export (typically ``fxattn.strip_ssia(net)``).
        path: the ``.onnx`` file to write (see the overwrite policy in the module docstring).
        example_inputs: one batch, as for :func:`fxattn.transform`.
        opset: ONNX opset (exporter default when ``None``).
        exporter: ``"auto"`` (dynamo, then TorchScript on failure), ``"dynamo"`` or
            ``"torchscript"``. When the dynamo exporter fails, it is retried once with exact
            export-compatibility rewrites (:mod:`fxattn.export_compat`); the report then says
            ``"dynamo+compat"``.
        verify: compare onnxruntime with PyTorch at ``batch_sizes`` (two sizes, not only 1).
        atol: maximum absolute error allowed (default 1e-4 for fp32).
        dia_weights: ``"fp16"``, ``"int8"`` or ``"int4"`` stores only DIA's matrices at lower
            precision (see :mod:`fxattn.lowp`); verification then uses that mode's looser
            tolerance (``fxattn.lowp.LOWP_ATOL``) when it exceeds ``atol``.

    A detector (a scoped fxattn model, or a module fed a list of images) is exported whole
    by :func:`fxattn.export_detection.export_detector`, which verifies detections instead of
    elements and returns its ``DetectionExportReport``.

    Raises:
        ExportError: the path cannot be written or no exporter could export the module.
        VerificationError: onnxruntime disagrees with PyTorch by more than ``atol``.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter={exporter!r} is not one of {', '.join(EXPORTERS)}")
    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx needs an nn.Module, got {type(module).__name__}")
    if verify and (len(set(batch_sizes)) < 2 or any(b < 1 for b in batch_sizes)):
        raise ExportError(f"verify needs two distinct positive batch sizes, got {batch_sizes}")
    if not atol > 0:
        raise ExportError(f"atol must be > 0, got {atol}")
    if opset is not None and not (
        isinstance(opset, int) and 7 <= opset <= onnx.defs.onnx_opset_version()
    ):
        raise ExportError(
            f"opset={opset!r} is not an ONNX opset this onnx supports (7 to "
            f"{onnx.defs.onnx_opset_version()}); leave it None for the exporter's default"
        )
    target = check_output_path(path, overwrite)
    inputs = ExampleInputs.from_user(example_inputs)
    notes: list[str] = []
    module = unwrap(module)
    if _is_detection_export(module, inputs):  # list[image] -> list[dict]: its own export
        from .export_detection import export_detector

        return export_detector(module, target, inputs.args, verify=verify,  # type: ignore
                               overwrite=overwrite, seed=seed,
                               exporter="auto" if exporter == "auto" else exporter, opset=opset)
    if isinstance(module, AttentionGraphModule):
        from .transform import strip_ssia

        module = strip_ssia(module)
        notes.append("exported the stripped (lean) evaluation graph of the fxattn module")
    elif module.training:
        module = copy.deepcopy(module).eval()
    _check_runs(module, inputs)
    export_inputs = _export_inputs(inputs)
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
                notes += _export_checked(kind, module, export_inputs, tmp, opset)
                used = kind
                break
            except Exception as exc:  # noqa: BLE001 - try the next exporter, report all
                failures.append(f"{kind}: {_first_line(exc)}")
        if used is None:
            raise ExportError(f"ONNX export failed ({'; '.join(failures)})")
        if failures:
            notes.append(f"fell back to the {used} exporter ({failures[0]})")
        seconds = time.perf_counter() - start
        if dia_weights not in (None, "fp32"):
            from .lowp import apply_dia_weights, tolerance

            notes.append(apply_dia_weights(tmp, dia_weights))
            atol = tolerance(dia_weights, atol)
        model_proto = onnx.load(str(tmp))
        abs_err = rel_err = 0.0
        if verify:
            abs_err, rel_err = verify_onnx(str(tmp), module, inputs, batch_sizes, atol, seed)
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
        max_abs_error=abs_err,
        max_rel_error=rel_err,
        atol=atol,
        verified=verify,
        notes=notes,
    )


def _is_detection_export(module: nn.Module, inputs: ExampleInputs) -> bool:
    """A scoped fxattn model, or a forward fed a list of images (a torchvision detector)."""
    from .scope import scope_info

    return scope_info(module) is not None or bool(
        inputs.args and isinstance(inputs.args[0], list) and inputs.batches()[1])


def _check_runs(module: nn.Module, inputs: ExampleInputs) -> None:
    """Run the module once before exporting: a module that rejects its inputs, or returns no
    tensor, would otherwise fail deep inside both exporters or onnxruntime."""
    try:
        with torch.no_grad():
            result = inputs.call(module)
    except Exception as exc:  # noqa: BLE001 - the module rejected the example inputs
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs.tensors())
        raise InputError(
            f"{type(module).__name__} cannot run on the example inputs [{shapes}]: "
            f"{_first_line(exc)}; pass inputs shaped and typed like one real batch"
        ) from exc
    if not any(isinstance(t, torch.Tensor) for t in tree_leaves(result)):
        raise ExportError(
            f"{type(module).__name__} returns no tensor (got {type(result).__name__}); an "
            "ONNX model needs at least one tensor output"
        )


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter's terminal colours
    return text.splitlines()[0] if text else type(exc).__name__


def ort_session(path: str, threads: int | None = None, spinning: bool = False) -> Any:
    """An onnxruntime CPU session; worker threads do not spin (see the benchmark notes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_feed(session: Any, inputs: ExampleInputs) -> dict[str, np.ndarray]:
    tensors = inputs.tensors()
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise VerificationError(
            f"the ONNX model takes {len(names)} inputs but the example has {len(tensors)} tensors"
        )
    return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors, strict=True)}


def verify_onnx(
    path: str,
    module: nn.Module,
    inputs: ExampleInputs,
    batch_sizes: tuple[int, ...] = (2, 3),
    atol: float = 1e-4,
    seed: int = 0,
) -> tuple[float, float]:
    """Max absolute and relative error of onnxruntime vs PyTorch over ``batch_sizes``."""
    try:
        session = ort_session(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
        raise VerificationError(f"onnxruntime cannot load the exported model: "
                                f"{_first_line(exc)}") from exc
    generator = torch.Generator().manual_seed(seed)
    worst_abs = worst_rel = 0.0
    for batch in batch_sizes:
        batch_inputs = inputs.with_batch(batch, generator)
        with torch.no_grad():
            outputs = tree_leaves(batch_inputs.call(module))
        expected = [t for t in outputs if isinstance(t, torch.Tensor)]
        actual = session.run(None, ort_feed(session, batch_inputs))
        if len(actual) != len(expected):
            raise VerificationError(
                f"onnxruntime returned {len(actual)} outputs, PyTorch {len(expected)}"
            )
        for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
            want_np = (want.detach().float() if want.is_floating_point() else want).cpu().numpy()
            if got.shape != want_np.shape:
                raise VerificationError(
                    f"output {i} at batch {batch}: onnxruntime shape {got.shape}, "
                    f"PyTorch {want_np.shape}"
                )
            diff = np.abs(got.astype(np.float64) - want_np.astype(np.float64))
            abs_err = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(want_np).max()) if want_np.size else 0.0
            rel_err = abs_err / scale if scale > 0 else abs_err
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
            if not abs_err <= atol:
                raise VerificationError(
                    f"onnxruntime and PyTorch disagree: output {i} at batch {batch} has max abs "
                    f"error {abs_err:.3e} (relative {rel_err:.3e}) > tolerance {atol:g}; "
                    "check for non-deterministic or training-only ops, or raise atol"
                )
    return worst_abs, worst_rel
