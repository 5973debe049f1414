"""Verification of a compiled file: it must be no worse than the portable file it replaces.

The compiled and the portable file are two float32 computations of the same model, so the
compile is judged by fxattn's one rule for that (:mod:`fxattn.export.agreement`) with the
compiled file as the candidate and the portable file, run in onnxruntime on the same random
batch, as the reference:

1. ``allclose``: ``|compiled - portable| <= atol + rtol * |portable|`` elementwise (fxattn's
   defaults, 1e-6 and 1e-5). Most compiles pass here.
2. Where that fails, the portable file's own float32 error decides (near-cancelling outputs
   carry rounding errors of the size of the terms that cancel, in any float32 evaluation):

   * ``float64``, when the PyTorch module is given (``compile_ort_cpu(..., module=lean)``,
     ``fxattn compile --reference lean.fxattn``): both files are compared with the module run
     in float64, ``|compiled - torch64| <= atol + rtol * |torch64| + 16 * max |portable -
     torch64|`` - the compiled file may be off float64 by 16 times what the portable file
     is. The module is first checked to be the portable file's (the portable file must pass
     the export's own rule against it), so a wrong module cannot excuse a wrong compile.
   * ``spread``, without it: the portable file is run a second time without onnxruntime's
     graph optimisations (other kernels, other reduction orders), and ``|compiled - portable|
     <= atol + rtol * |portable| + 16 * max |portable - portable unoptimised|``.

A genuine error (one weight off by a relative 1e-3, a dropped DIA multiply) is orders of
magnitude above either allowance. Files with low-precision DIA weights (int8 ``MatMulNBits``
that quantise their input at run time) are judged by ``allclose`` alone with int8's tolerance:
their differences are quantisation steps, not rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Tolerance
from ..errors import ConfigError, VerificationError, first_line
from ..export.agreement import WorstElement, describe_rule, judge, judge_conditioned
from ..export.lowp import LOWP_ATOL, LOWP_RTOL, has_low_precision_weights
from ..export.onnx_graph import node_attr
from ..export.runtime import ort_session

LABELS = ("compiled", "portable")


@dataclass
class CompileVerification:
    """How the compiled file compared with the portable one, and by which rule."""

    rule: str  # "allclose", "float64" or "spread": the rule that decided
    passed: bool
    tolerance: Tolerance
    max_abs_error: float  # |compiled - portable|, largest over the outputs
    margin: float  # worst |compiled - portable| / (atol + rtol |portable|): <= 1 passes allclose
    ratio: float  # the worst element's ratio under ``rule``: <= 1 passes
    worst: WorstElement | None  # the worst element under ``rule``
    noise: float | None = None  # the portable file's own float32 error, where it was measured
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = (f"max abs error {self.max_abs_error:.1e} against the portable model in "
                f"onnxruntime, worst {self.margin:.3g} x atol + rtol*|ref|")
        if self.rule == "float64":
            text += (f"; near-cancelling outputs, judged against float64 PyTorch: the portable "
                     f"file is {self.noise:.2e} off it, the compiled worst ratio "
                     f"{self.ratio:.3g}")
        elif self.rule == "spread":
            text += (f"; near-cancelling outputs, judged within the portable file's own "
                     f"rounding spread {self.noise:.2e}: worst ratio {self.ratio:.3g}")
        return f"{text} (rule {self.rule})"


def compile_tolerance(model: Any) -> Tolerance:
    """The tolerance of a compile of the portable ``model`` (an ``onnx.ModelProto``).

    fxattn's default, except where DIA's ``MatMulNBits`` quantise their input row to int8 at
    run time (``accuracy_level=4``): there a float-reordered input (the folded convolution's
    pool, say) can round to the next int8 step, so the low-precision modes' own tolerance
    against PyTorch applies (int8's, the tighter of the two), without the rounding rules.
    """
    if any(node.op_type == "MatMulNBits" and node_attr(node, "accuracy_level", 0) == 4
           for node in model.graph.node):
        return Tolerance(LOWP_ATOL["int8"], LOWP_RTOL["int8"], float64_check=False)
    return Tolerance()


def verify_compiled(portable: str | Path, compiled: str | Path, batch_size: int, *,
                    module: Any = None, tolerance: Tolerance | None = None,
                    seed: int = 0) -> CompileVerification:
    """Judge the compiled file against the portable one on a random batch (module docstring).

    ``module`` is the PyTorch module the portable file was exported from (optional; it enables
    the ``float64`` rule). Raises :class:`~fxattn.VerificationError` naming the worst element
    and the rule when the compile is worse than the float32 computation it replaces, and
    :class:`~fxattn.ConfigError` when ``module`` does not compute what the portable file does.
    """
    import onnx

    proto = onnx.load(str(portable), load_external_data=False)
    tol = tolerance or compile_tolerance(proto)
    full_precision = not has_low_precision_weights(proto)
    del proto
    try:
        reference, session = ort_session(str(portable)), ort_session(str(compiled))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
        raise VerificationError(f"onnxruntime cannot load the compiled model: "
                                f"{first_line(exc)}") from exc
    feed = random_feed(reference, batch_size, seed)
    names = [o.name for o in reference.get_outputs()]
    expected = reference.run(None, feed)
    try:
        actual = session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
        raise VerificationError(f"the compiled model fails to run in onnxruntime "
                                f"({first_line(exc)}); keep the portable model and report this "
                                "model to fxattn") from exc
    result = judge(batch_size, actual, expected, names, tol, LABELS)
    report = CompileVerification("allclose", result.passed, tol, result.max_abs, result.margin,
                                 result.ratio, result.worst)
    if not result.passed and tol.float64_check:
        if module is not None and not full_precision:
            report.notes.append("the module was not used: the portable file stores DIA's "
                                "matrices at low precision, so it is not the module's float64 "
                                "reference")
        if module is not None and full_precision:
            exact = _float64_reference(module, portable, feed, expected, names, tol)
            judge_conditioned(result, actual, expected, names, tol, exact=exact)
        else:
            second = ort_session(str(portable), optimize=False).run(None, feed)
            judge_conditioned(result, actual, expected, names, tol, second=second)
        report.rule, report.passed, report.ratio = result.rule, result.passed, result.ratio
        report.worst, report.noise = result.worst, result.noise
    if not report.passed:
        raise VerificationError(failure_message(report))
    return report


def random_feed(session: Any, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs for ``session`` at ``batch_size`` (only the batch may be
    dynamic)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for value in session.get_inputs():
        if value.type != "tensor(float)":
            raise ConfigError(f"input {value.name} is {value.type}; compile_ort_cpu feeds "
                              "float tensors only (pass verify=False to skip the check)")
        shape = [batch_size if i == 0 else d for i, d in enumerate(value.shape)]
        if not all(isinstance(d, int) for d in shape):
            raise ConfigError(f"input {value.name} has shape {value.shape}: only the batch may "
                              "be dynamic to verify (pass verify=False to skip the check)")
        feed[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _float64_reference(module: Any, portable: str | Path, feed: dict[str, np.ndarray],
                       expected: list[np.ndarray], names: list[str],
                       tol: Tolerance) -> list[np.ndarray]:
    """``module`` in float64 on ``feed`` (its inputs, in order, as positional arguments),
    after checking that the portable file computes what ``module`` computes."""
    import torch

    from ..capture import ExampleInputs
    from ..export.verify import float64_call, float64_outputs, tensor_outputs

    inputs = ExampleInputs(tuple(torch.from_numpy(array) for array in feed.values()))
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            torch32 = tensor_outputs(inputs.call(module))
            exact = float64_outputs(float64_call(module), inputs)
    except Exception as exc:  # noqa: BLE001 - the module does not take these inputs
        raise ConfigError(f"the module given cannot run on the portable file's inputs "
                          f"({first_line(exc)}); give the module {portable} was exported from, "
                          "or none") from exc
    finally:
        module.train(training)
    batch = len(next(iter(feed.values())))
    try:
        check = judge(batch, expected, torch32, names, tol, ("portable", "PyTorch"))
        if not check.passed:
            judge_conditioned(check, expected, torch32, names, tol, exact=exact)
        why = check.worst.describe() if check.worst and not check.passed else ""
    except VerificationError as exc:  # outputs that differ in number or shape
        why = str(exc)
    if why:
        raise ConfigError(f"the module given does not compute what {portable} computes "
                          f"({why}); give the module it was exported from (in eval mode), "
                          "or none")
    return exact


def failure_message(report: CompileVerification) -> str:
    """The error of a refused compile: the worst element and the rule that refused it."""
    tol = report.tolerance
    worst = report.worst.describe() if report.worst else "an output"
    return (f"the compiled model differs from the portable one in onnxruntime: {worst}; that "
            f"is {report.ratio:.3g} times what the {report.rule} rule allows "
            f"({describe_rule(report.rule, tol, report.noise)}), so it is not float32 rounding. "
            "Keep the portable model and report this model to fxattn")


__all__ = ["CompileVerification", "compile_tolerance", "failure_message", "random_feed",
           "verify_compiled"]
