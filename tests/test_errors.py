"""The error catalog (docs/errors.md), one test per entry, plus the no-damage guarantees.

Every bad input must end in an :class:`fxattn.FxAttnError` subclass whose message says what
was wrong and what to do, and must leave the caller's model and files exactly as they were.
API cases are checked against a model snapshot (parameters, buffers, modules, training
flags); CLI cases through ``fxattn.cli.main`` (exit code 2 and exactly one stderr line, no
traceback unless ``--debug``).
"""

from __future__ import annotations

import ast
import os
import re
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_state_equal, state_snapshot
from models import CifarResNet, DataDependent, LayerDrop, PlainMLP
from torch import nn

import fxattn
import fxattn.export.portable as onnx_export
import fxattn.serialization as serialization
from fxattn.capture import ExampleInputs
from fxattn.cli import main
from fxattn.export import export_onnx

X = torch.randn(2, 3, 16, 16)


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return CifarResNet(depth=11, num_classes=10)


class TwoInputs(nn.Module):
    """Image + side vector; used for batch-mismatch and keyword-input cases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 + 2, 3)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.conv(image).mean((2, 3)), extra], 1))


class Looped(nn.Module):
    """Runs its block once per image of a list: a part that runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.block(i[None])[0] + i for i in images]


class NeedsTargets(nn.Module):
    """Like a torchvision detector: its training forward needs targets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images: list[torch.Tensor], targets: Any = None) -> list[torch.Tensor]:
        if self.training and targets is None:
            raise ValueError("targets should not be none when in training mode")
        return [self.conv(i[None]) for i in images]


IMAGES = [torch.randn(3, 16, 16), torch.randn(3, 12, 16)]


def fingerprint(model: nn.Module) -> tuple[list[tuple[str, type, bool]], list[bool]]:
    """Module tree with training flags, and which parameters hold a gradient."""
    return ([(name, type(m), m.training) for name, m in model.named_modules()],
            [p.grad is None for p in model.parameters()])


def assert_untouched(model: nn.Module, snapshot: dict[str, torch.Tensor],
                     before: tuple[list[tuple[str, type, bool]], list[bool]]) -> None:
    assert_state_equal(model, snapshot)
    assert fingerprint(model) == before


def scripted(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        return torch.jit.script(model)


def meta_model() -> nn.Module:
    with torch.device("meta"):
        return CifarResNet(depth=11, num_classes=10)


# --------------------------------------------------------------------------- API catalog
# (catalog id, model factory, call(model) -> anything, error class, message fragments)
Case = tuple[str, Callable[[], Any], Callable[[Any], Any], type[Exception], tuple[str, ...]]

API_CASES: list[Case] = [
    ("not-a-module", lambda: "resnet18", lambda m: fxattn.transform(m, X),
     fxattn.InputError, ("torch.nn.Module", "got str")),
    ("state-dict-as-model", lambda: small_resnet().state_dict(), lambda m: fxattn.inspect(m, X),
     fxattn.InputError, ("torch.nn.Module", "state_dict")),
    ("untraceable-control-flow", DataDependent, lambda m: fxattn.transform(m, X),
     fxattn.TraceError, ("'gate' (Gate)", "models.py:", "if x.sum() > 0", "leaf_modules",
                         "concrete_args", "torch.export")),
    ("random-layer-skip", LayerDrop, lambda m: fxattn.transform(m, X),
     fxattn.TraceError, ("torch.export", "tensor's value", "layerdrop=0")),
    ("inputs-missing", small_resnet, lambda m: fxattn.transform(m, None),
     fxattn.InputError, ("example_inputs is required",)),
    ("inputs-not-tensors", small_resnet, lambda m: fxattn.transform(m, "x.png"),
     fxattn.InputError, ("tensor, a tuple/list or a dict", "got str")),
    ("inputs-no-tensor", small_resnet, lambda m: fxattn.transform(m, ()),
     fxattn.InputError, ("holds no tensor",)),
    ("inputs-scalar", small_resnet, lambda m: fxattn.transform(m, torch.tensor(1.0)),
     fxattn.InputError, ("scalar", "batch dimension")),
    ("inputs-wrong-rank", small_resnet, lambda m: fxattn.transform(m, torch.randn(3, 16, 16)),
     fxattn.InputError, ("(3, 16, 16)", "in module 'bn1' (BatchNorm2d)", "expected 4D input")),
    ("inputs-wrong-channels", small_resnet,
     lambda m: fxattn.transform(m, torch.randn(2, 4, 16, 16)),
     fxattn.InputError, ("in module 'conv1' (Conv2d)", "3 channels", "one real batch")),
    ("inputs-wrong-float-dtype", small_resnet, lambda m: fxattn.transform(m, X.double()),
     fxattn.InputError, ("float64", "float32", "x.to(")),
    ("inputs-integer-dtype", small_resnet,
     lambda m: fxattn.transform(m, torch.ones(2, 3, 16, 16, dtype=torch.long)),
     fxattn.InputError, ("int64", ".float()")),
    ("inputs-batch-mismatch", TwoInputs,
     lambda m: fxattn.inspect(m, (X, torch.randn(3, 2)), dia=False, ssia=False),
     fxattn.InputError, ("disagree on the batch size", "(3, 2)")),
    ("inputs-zero-batch", small_resnet, lambda m: fxattn.transform(m, torch.randn(0, 3, 16, 16)),
     fxattn.InputError, ("empty batch", "at least 1")),
    ("inputs-too-many", small_resnet, lambda m: fxattn.transform(m, (X, X)),
     fxattn.InputError, ("2 positional inputs", "takes 1 ('x')")),
    ("inputs-sample-count-mismatch", Looped,
     lambda m: fxattn.inspect(m, (IMAGES, [{"labels": torch.tensor([1])}])),
     fxattn.InputError, ("lists of 1 and 2 samples", "one entry per sample")),
    ("inputs-missing-targets", NeedsTargets, lambda m: fxattn.transform(m, (IMAGES,)),
     fxattn.InputError, ("in training mode", "targets should not be none", "(images, targets)")),
    ("scope-unknown-path", small_resnet, lambda m: fxattn.transform(m, X, scope="backbone"),
     fxattn.ConfigError, ("'backbone'", "not a submodule", "named_modules")),
    ("scope-part-runs-twice", Looped, lambda m: fxattn.transform(m, (IMAGES,), scope="block"),
     fxattn.ConfigError, ("'block'", "runs 2 time(s)", "Python loop")),
    ("scope-not-paths", small_resnet, lambda m: fxattn.transform(m, X, scope=3),
     fxattn.ConfigError, ("scope must be", "module path", "got 3")),
    ("inputs-unknown-keyword", TwoInputs,
     lambda m: fxattn.inspect(m, {"image": X, "side": torch.randn(2, 2)}, dia=False, ssia=False),
     fxattn.InputError, ("'side'", "'image', 'extra'")),
    ("inputs-wrong-features", PlainMLP, lambda m: fxattn.inspect(m, torch.randn(2, 7)),
     fxattn.InputError, ("in module 'net.0' (Linear)", "(2x7 and 16x32)")),
    ("model-on-meta-device", meta_model, lambda m: fxattn.transform(m, X),
     fxattn.InputError, ("meta device", "to_empty")),
    ("model-torch-compiled", lambda: torch.compile(small_resnet()),
     lambda m: fxattn.transform(m, X), fxattn.InputError, ("torch.compile", "model._orig_mod")),
    ("model-data-parallel", lambda: nn.DataParallel(small_resnet()),
     lambda m: fxattn.transform(m, X), fxattn.InputError, ("DataParallel", "model.module")),
    ("model-torchscript", lambda: scripted(small_resnet()),
     lambda m: fxattn.transform(m, X), fxattn.InputError, ("TorchScript", "Python nn.Module")),
    ("no-dia-site", PlainMLP, lambda m: fxattn.transform(m, torch.randn(2, 16)),
     fxattn.AnalysisError, ("no DIA site", "PlainMLP", "include", "dia=False")),
    ("no-ssia-taps", PlainMLP, lambda m: fxattn.transform(m, torch.randn(2, 16), dia=False),
     fxattn.AnalysisError, ("SSIA needs at least two stage outputs", "has 0", "ssia=False")),
    ("include-matches-nothing", small_resnet,
     lambda m: fxattn.transform(m, X, dia=fxattn.DIA(include=["^nowhere$"])),
     fxattn.AnalysisError, ("no DIA site",)),
    ("already-transformed", small_resnet,
     lambda m: fxattn.transform(fxattn.transform(m, X), X),
     fxattn.AlreadyTransformedError, ("already carries fxattn", "original model")),
    ("already-stripped", small_resnet,
     lambda m: fxattn.transform(fxattn.strip_ssia(fxattn.transform(m, X)), X),
     fxattn.AlreadyTransformedError, ("already carries fxattn",)),
    ("strip-foreign-module", small_resnet, fxattn.strip_ssia,
     fxattn.NotTransformedError, ("strip_ssia", "CifarResNet", "fxattn.transform")),
    ("ssia-loss-foreign-module", small_resnet, fxattn.ssia_loss,
     fxattn.NotTransformedError, ("ssia_loss", "CifarResNet", "fxattn.transform")),
    ("ssia-loss-before-forward", small_resnet,
     lambda m: fxattn.ssia_loss(fxattn.transform(m, X)),
     fxattn.SSIALossUnavailableError, ("net.train()", "forward")),
    ("ssia-loss-after-eval", small_resnet,
     lambda m: fxattn.ssia_loss(_forward_then_eval(fxattn.transform(m, X))),
     fxattn.SSIALossUnavailableError, ("eval",)),
    ("reduction-zero", small_resnet, lambda m: fxattn.transform(m, X, dia={"reduction": 0}),
     fxattn.ConfigError, ("reduction must be >= 1", "got 0")),
    ("reduction-above-channels", small_resnet,
     lambda m: fxattn.transform(m, X, dia=fxattn.DIA(reduction=257)),
     fxattn.ConfigError, ("reduction 257 exceeds the 64 channels", "<= 64")),
    ("reduction-not-integer", small_resnet, lambda m: fxattn.DIA(reduction=2.5),
     fxattn.ConfigError, ("positive integer", "2.5")),
    ("reduction-nan", small_resnet, lambda m: fxattn.DIA(reduction=float("nan")),
     fxattn.ConfigError, ("positive integer", "nan")),
    ("unknown-module-kind", small_resnet, lambda m: fxattn.DIA(module="gru"),
     fxattn.ConfigError, ("'gru'", "lstm, se")),
    ("unknown-share-mode", small_resnet, lambda m: fxattn.DIA(share="global"),
     fxattn.ConfigError, ("'global'", "stage, channels, none")),
    ("unknown-dia-init", small_resnet, lambda m: fxattn.DIA(init="zero"),
     fxattn.ConfigError, ("'zero'", "paper, identity")),
    ("param-groups-foreign-module", small_resnet,
     lambda m: fxattn.param_groups(m, lr=0.01, new_lr=0.1),
     fxattn.NotTransformedError, ("param_groups", "CifarResNet", "fxattn.transform")),
    ("param-groups-bad-lr", small_resnet,
     lambda m: fxattn.param_groups(fxattn.transform(m, X), lr=0.0, new_lr=0.1),
     fxattn.ConfigError, ("lr must be > 0", "0.0")),
    ("bad-include-regex", small_resnet, lambda m: fxattn.DIA(include=["layer("]),
     fxattn.ConfigError, ("'layer('", "not a valid regex")),
    ("negative-ssia-weight", small_resnet, lambda m: fxattn.SSIA(weight=-0.5),
     fxattn.ConfigError, ("weight must be >= 0", "-0.5")),
    ("nan-ssia-weight", small_resnet, lambda m: fxattn.transform(m, X, ssia={"weight": math_nan()}),
     fxattn.ConfigError, ("weight must be finite", "nan")),
    ("infinite-ssia-p", small_resnet, lambda m: fxattn.SSIA(p=float("inf")),
     fxattn.ConfigError, ("p must be finite",)),
    ("unknown-map-kind", small_resnet, lambda m: fxattn.SSIA(map="pixel"),
     fxattn.ConfigError, ("'pixel'", "spatial, channel")),
    ("token-taps-below-two", small_resnet, lambda m: fxattn.SSIA(token_taps=1),
     fxattn.ConfigError, (">= 2",)),
    ("unknown-option-key", small_resnet,
     lambda m: fxattn.transform(m, X, dia={"reducton": 8}),
     fxattn.ConfigError, ("'reducton'", "reduction")),
    ("options-wrong-type", small_resnet, lambda m: fxattn.transform(m, X, dia="lstm"),
     fxattn.ConfigError, ("fxattn.DIA(...)", "got str")),
    ("leaf-modules-bad-entry", small_resnet,
     lambda m: fxattn.transform(m, X, leaf_modules=[3]),
     fxattn.InputError, ("leaf_modules entries", "got 3")),
    ("leaf-modules-not-a-list", small_resnet,
     lambda m: fxattn.transform(m, X, leaf_modules=3),
     fxattn.InputError, ("leaf_modules must be a list",)),
    ("concrete-args-unknown-name", small_resnet,
     lambda m: fxattn.transform(m, X, concrete_args={"y": 1}),
     fxattn.InputError, ("'y'", "forward() does not take", "'x'")),
    ("concrete-args-not-a-dict", small_resnet,
     lambda m: fxattn.transform(m, X, concrete_args=[1]),
     fxattn.InputError, ("concrete_args must be a dict",)),
]


def math_nan() -> float:
    return float("nan")


def _forward_then_eval(net: fxattn.AttentionGraphModule) -> fxattn.AttentionGraphModule:
    net.train()
    net(X)
    return net.eval()


@pytest.mark.parametrize(("factory", "call", "error", "fragments"),
                         [case[1:] for case in API_CASES], ids=[case[0] for case in API_CASES])
def test_api_catalog(factory: Callable[[], Any], call: Callable[[Any], Any],
                     error: type[Exception], fragments: tuple[str, ...],
                     capfd: pytest.CaptureFixture[str]) -> None:
    model = factory()
    is_module = isinstance(model, nn.Module) and not any(
        p.is_meta for p in model.parameters())
    if is_module:
        model.train()
        snapshot, before = state_snapshot(model), fingerprint(model)
    capfd.readouterr()
    with pytest.raises(error) as info:
        call(model)
    assert capfd.readouterr().err == ""  # nothing printed behind the error (torch logs, ...)
    assert isinstance(info.value, fxattn.FxAttnError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if is_module:
        assert_untouched(model, snapshot, before)


def test_catalog_ids_are_documented() -> None:
    """Every API and CLI case has an entry in docs/errors.md (and no entry lacks a test)."""
    text = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    catalog = text.split("## Catalog", 1)[1]
    documented = {line.split("`")[1] for line in catalog.splitlines() if line.startswith("| `")}
    for name in DEDICATED_TESTS.values():
        assert callable(globals()[name]), name
    tested = ({case[0] for case in API_CASES} | set(CLI_CASES) | set(FILE_CASES)
              | set(DEDICATED_TESTS))
    assert tested <= documented, sorted(tested - documented)
    assert documented <= tested, sorted(documented - tested)
    assert len(tested) >= 25


# catalog entries with a test of their own (id -> test function)
DEDICATED_TESTS = {
    "export-folder-read-only": "test_export_to_a_folder_nothing_can_be_written_in",
    "export-existing-replaced": "test_existing_file_is_replaced_atomically_by_default",
    "verification-mismatch":
        "test_verification_mismatch_names_output_and_error_and_writes_nothing",
    "verification-nondeterministic": "test_a_forward_that_adds_fresh_noise_fails_as_such",
    "export-interrupted": "test_interrupted_export_leaves_no_partial_file",
    "save-failed-midway": "test_failed_save_leaves_no_partial_file",
    "load-would-run-code": "test_loading_never_runs_code_from_the_file",
    "load-truncated": "test_truncated_checkpoint_is_refused",
    "cli-internal-error": "test_cli_internal_error_is_one_line",
    "cli-debug": "test_cli_debug_shows_the_traceback",
    "compile-fixed-batch": "test_compiling_a_fixed_batch_model_at_another_batch",
    "compile-control-flow": "test_compiling_a_graph_with_branches",
}

# --------------------------------------------------------------------------- files: export


@pytest.fixture()
def lean() -> torch.fx.GraphModule:
    return fxattn.strip_ssia(fxattn.transform(small_resnet().eval(), X, ssia=False))


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _export_to_directory(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path, X)


def _export_missing_folder(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "no" / "such" / "model.onnx", X)


def _export_existing_no_overwrite(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "old.onnx", X, overwrite=False)


def _save_existing_no_overwrite(lean: nn.Module, tmp_path: Path) -> None:
    fxattn.save(lean, tmp_path / "old.onnx", X, overwrite=False)


def _save_foreign_module(lean: nn.Module, tmp_path: Path) -> None:
    fxattn.save(small_resnet(), tmp_path / "plain.fxattn", X)


def _export_not_a_module(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean.state_dict(), tmp_path / "model.onnx", X)


def _export_bad_atol(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "model.onnx", X, atol=float("nan"))


def _export_bad_rtol(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "model.onnx", X, rtol=-1e-4)


def _export_zero_tolerance(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "model.onnx", X, atol=0.0, rtol=0.0)


def _export_bad_exporter(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "model.onnx", X, exporter="tensorrt")


def _export_bad_dia_weights(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "model.onnx", X, dia_weights="int3")


def _export_wrong_inputs(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "model.onnx", torch.randn(2, 4, 16, 16))


class NoTensorOut(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


def _export_no_tensor_output(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(NoTensorOut(), tmp_path / "model.onnx", X)


def _export_bad_opset(lean: nn.Module, tmp_path: Path) -> None:
    export_onnx(lean, tmp_path / "model.onnx", X, opset=99)


def _load_missing(lean: nn.Module, tmp_path: Path) -> None:
    fxattn.load(tmp_path / "missing.fxattn")


def _load_directory(lean: nn.Module, tmp_path: Path) -> None:
    fxattn.load(tmp_path)


def _compile_missing(lean: nn.Module, tmp_path: Path) -> None:
    fxattn.compile_ort_cpu(tmp_path / "missing.onnx", tmp_path / "out.onnx", batch_size=1)


def _compile_not_onnx(lean: nn.Module, tmp_path: Path) -> None:
    fxattn.compile_ort_cpu(tmp_path / "old.onnx", tmp_path / "out.onnx", batch_size=1)


def _compile_bad_batch(lean: nn.Module, tmp_path: Path) -> None:
    fxattn.compile_ort_cpu(tmp_path / "old.onnx", tmp_path / "out.onnx", batch_size=0)


def _compile_over_source(lean: nn.Module, tmp_path: Path) -> None:
    fxattn.compile_ort_cpu(tmp_path / "old.onnx", tmp_path / "old.onnx", batch_size=1)


FILE_CASES: dict[str, tuple[Callable[[nn.Module, Path], None], type[Exception], str]] = {
    "export-path-is-directory": (_export_to_directory, fxattn.ExportError, "is a directory"),
    "export-folder-missing": (_export_missing_folder, fxattn.ExportError, "does not exist"),
    "export-exists-no-overwrite": (_export_existing_no_overwrite, fxattn.ExportError,
                                   "already exists"),
    "save-exists-no-overwrite": (_save_existing_no_overwrite, fxattn.ExportError,
                                 "already exists"),
    "save-foreign-module": (_save_foreign_module, fxattn.CheckpointError, "fxattn.transform"),
    "export-not-a-module": (_export_not_a_module, fxattn.InputError, "nn.Module"),
    "export-bad-atol": (_export_bad_atol, fxattn.ExportError, "atol"),
    "export-bad-rtol": (_export_bad_rtol, fxattn.ExportError, "rtol"),
    "export-zero-tolerance": (_export_zero_tolerance, fxattn.ExportError, "both 0"),
    "export-unknown-exporter": (_export_bad_exporter, fxattn.ExportError, "'tensorrt'"),
    "export-bad-dia-weights": (_export_bad_dia_weights, fxattn.ExportError,
                               "dia_weights='int3' is not one of fp32, fp16, int8, int4"),
    "export-wrong-inputs": (_export_wrong_inputs, fxattn.InputError,
                            "cannot run on the example inputs .*3 channels"),
    "export-no-tensor-output": (_export_no_tensor_output, fxattn.ExportError,
                                "returns no tensor \\(got NoneType\\)"),
    "export-bad-opset": (_export_bad_opset, fxattn.ExportError, "opset=99 .*7 to"),
    "load-missing-file": (_load_missing, fxattn.CheckpointError, "no such file"),
    "load-directory": (_load_directory, fxattn.CheckpointError, "directory"),
    "compile-missing-file": (_compile_missing, fxattn.ExportError, "export the model first"),
    "compile-not-onnx": (_compile_not_onnx, fxattn.ExportError, "not a readable ONNX model"),
    "compile-bad-batch": (_compile_bad_batch, fxattn.ConfigError,
                          "batch_size must be a positive integer"),
    "compile-over-source": (_compile_over_source, fxattn.ExportError,
                            "would overwrite the portable model"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_catalog(case: str, lean: torch.fx.GraphModule, tmp_path: Path) -> None:
    call, error, fragment = FILE_CASES[case]
    (tmp_path / "old.onnx").write_bytes(b"old bytes")
    before = folder_state(tmp_path)
    snapshot = state_snapshot(lean)
    with pytest.raises(error, match=fragment):
        call(lean, tmp_path)
    assert folder_state(tmp_path) == before
    assert_state_equal(lean, snapshot)


def test_compiling_a_fixed_batch_model_at_another_batch(lean: torch.fx.GraphModule,
                                                        tmp_path: Path) -> None:
    """A model compiled at batch 2 (its batch is now fixed) compiled again at batch 4."""
    export_onnx(lean, tmp_path / "lean.onnx", X)
    fxattn.compile_ort_cpu(tmp_path / "lean.onnx", tmp_path / "b2.onnx", 2, verify=False)
    before = folder_state(tmp_path)
    with pytest.raises(fxattn.ConfigError, match="fixed batch of 2, not 4; compile with "
                                                 "batch_size=2"):
        fxattn.compile_ort_cpu(tmp_path / "b2.onnx", tmp_path / "b4.onnx", 4)
    assert folder_state(tmp_path) == before


def test_compiling_a_graph_with_branches(tmp_path: Path) -> None:
    """A graph with an ``If`` (as a whole-detector export has): nothing to compile, no file."""
    import onnx
    from test_onnx_graph import branch_model

    onnx.save(branch_model(), str(tmp_path / "branches.onnx"))
    before = folder_state(tmp_path)
    with pytest.raises(fxattn.ConfigError, match="has control flow .* Deploy the portable file"):
        fxattn.compile_ort_cpu(tmp_path / "branches.onnx", tmp_path / "branches.b1.onnx", 1)
    assert folder_state(tmp_path) == before


def test_export_to_a_folder_nothing_can_be_written_in(lean: torch.fx.GraphModule,
                                                      tmp_path: Path) -> None:
    """A read-only folder. Root ignores permission bits, so as root the folder is /proc
    (a pseudo file system in which nobody can create files); otherwise a chmod 555 folder."""
    if os.geteuid() == 0:
        folder = Path("/proc")
    else:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
    before = sorted(os.listdir(folder)) if folder != Path("/proc") else None
    with pytest.raises(fxattn.ExportError, match=str(folder)):
        export_onnx(lean, folder / "model.onnx", X)
    with pytest.raises(fxattn.ExportError, match=str(folder)):
        fxattn.save(lean, folder / "model.fxattn", X)
    if before is not None:
        assert sorted(os.listdir(folder)) == before
        folder.chmod(0o755)
    assert not (folder / "model.onnx").exists()


def test_existing_file_is_replaced_atomically_by_default(lean: torch.fx.GraphModule,
                                                         tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    report = export_onnx(lean, target, X, verify=False)
    assert report.path == str(target) and target.read_bytes()[:3] != b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left


@pytest.mark.parametrize("layout", ["one_data_file", "file_per_weight"])
def test_model_with_external_data_lands_beside_target_and_loads(
    lean: torch.fx.GraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """A model over 2 GB keeps its weights outside the protobuf. Simulated on a small model by
    re-saving the exporter's file the way each exporter writes large models: the dynamo exporter
    as one ``<name>.data`` file, the TorchScript exporter as one file per weight. Either way the
    result is ``model.onnx`` + ``model.onnx.data``, verified in onnxruntime, nothing else left."""
    import onnx

    real = onnx_export._run_exporter

    def exporter_writing_external_data(*args: Any) -> None:
        real(*args)
        tmp = args[3]
        model = onnx.load(str(tmp))
        onnx.save_model(model, str(tmp), save_as_external_data=True,
                        all_tensors_to_one_file=layout == "one_data_file",
                        location=tmp.name + ".data")

    monkeypatch.setattr(onnx_export, "_run_exporter", exporter_writing_external_data)
    target = tmp_path / "model.onnx"
    report = export_onnx(lean, target, X, dia_weights="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    data = tmp_path / "model.onnx.data"
    assert report.file_bytes == target.stat().st_size + data.stat().st_size
    assert data.stat().st_size > target.stat().st_size  # the weights are in the data file
    locations = {
        entry.value
        for tensor in onnx.load(str(target), load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}
    report_again = onnx_export.verify_onnx(str(target), lean, ExampleInputs.from_user(X),
                                           tolerance=report.verification.tolerance)
    assert report_again.passed and report_again.max_abs_error == report.max_abs_error


def test_a_forward_that_adds_fresh_noise_fails_as_such(tmp_path: Path) -> None:
    """A forward drawing new noise each call can never match its export: the error says that
    PyTorch disagrees with itself (not that the tolerance is too tight), and nothing is written."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + 1e-2 * torch.randn_like(x[:, :4])

    with pytest.raises(fxattn.VerificationError, match="different values for the same inputs"):
        export_onnx(Noisy().eval(), tmp_path / "noisy.onnx", torch.randn(2, 8))
    assert folder_state(tmp_path) == {}


def test_verification_mismatch_names_output_and_error_and_writes_nothing(
    lean: torch.fx.GraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime made to disagree (its outputs shifted by 0.5): VerificationError naming the
    worst element with its errors and the rule; no file, and an existing file keeps its bytes."""
    import fxattn.export.verify as verify

    real_session = verify.ort_session

    class Shifted:
        def __init__(self, path: str) -> None:
            self.session = real_session(path)

        def get_inputs(self) -> Any:
            return self.session.get_inputs()

        def get_outputs(self) -> Any:
            return self.session.get_outputs()

        def run(self, names: Any, feed: dict[str, Any]) -> list[Any]:
            return [out + 0.5 for out in self.session.run(names, feed)]

    monkeypatch.setattr(verify, "ort_session", Shifted)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old bytes")
    with pytest.raises(fxattn.VerificationError) as info:
        export_onnx(lean, target, X, atol=1e-4)
    message = str(info.value)
    assert re.search(r"output 0 \(\w+\) at batch \d, element \(\d+, \d+\)", message)
    assert "abs error 5.000e-01" in message and "atol 0.0001, rtol 1e-05" in message
    assert "not rounding" in message  # the float64 check ran and did not forgive it
    assert folder_state(tmp_path) == {"model.onnx": b"old bytes"}


def test_interrupted_export_leaves_no_partial_file(
    lean: torch.fx.GraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """^C in the middle of writing: the half-written temporary is removed, the old file stays."""

    def half_write(kind: str, module: nn.Module, inputs: Any, tmp: Path, *rest: Any) -> None:
        tmp.write_bytes(b"half an onnx file")
        Path(str(tmp) + ".data").write_bytes(b"half the weights")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_run_exporter", half_write)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old bytes")
    with pytest.raises(KeyboardInterrupt):
        export_onnx(lean, target, X)
    assert folder_state(tmp_path) == {"model.onnx": b"old bytes"}


def test_failed_save_leaves_no_partial_file(
    lean: torch.fx.GraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up half-way through ``fxattn.save``: an FxAttnError, nothing written."""
    real_save = torch.save

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization.torch, "save", disk_full)
    target = tmp_path / "net.fxattn"
    target.write_bytes(b"old checkpoint")
    with pytest.raises(fxattn.FxAttnError, match="No space left on device"):
        fxattn.save(lean, target, X)
    assert folder_state(tmp_path) == {"net.fxattn": b"old checkpoint"}


# --------------------------------------------------------------------------- files: loading

SENTINEL = "fxattn-test-pwned"


def _run_code(path: str) -> None:  # what a malicious pickle would call on load
    Path(path).write_text("code ran")


class Malicious:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_run_code, (self.path,))


def test_loading_never_runs_code_from_the_file(tmp_path: Path) -> None:
    ran = tmp_path / SENTINEL
    path = tmp_path / "evil.fxattn"
    torch.save({"format": "fxattn/1", "payload": Malicious(ran)}, path)
    with pytest.raises(fxattn.CheckpointError, match="arbitrary code"):
        fxattn.load(path)
    assert not ran.exists()
    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 2
    assert not ran.exists()


def test_truncated_checkpoint_is_refused(lean: torch.fx.GraphModule, tmp_path: Path) -> None:
    path = fxattn.save(lean, tmp_path / "net.fxattn", X)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(fxattn.CheckpointError, match="truncated or corrupt"):
        fxattn.load(path, model=small_resnet())


# --------------------------------------------------------------------------- CLI catalog


def _full_module_pickle(tmp_path: Path) -> str:
    path = tmp_path / "full.pt"
    torch.save(small_resnet(), path)
    return str(path)


def _truncated_file(tmp_path: Path) -> str:
    path = tmp_path / "cut.fxattn"
    lean = fxattn.strip_ssia(fxattn.transform(small_resnet(), X, ssia=False))
    fxattn.save(lean, path, X)
    path.write_bytes(path.read_bytes()[:300])
    return str(path)


def _random_bytes(tmp_path: Path) -> str:
    path = tmp_path / "noise.fxattn"
    path.write_bytes(bytes(range(256)) * 4)
    return str(path)


def _directory(tmp_path: Path) -> str:
    return str(tmp_path)


def _missing(tmp_path: Path) -> str:
    return str(tmp_path / "missing.fxattn")


MODEL = ["torchvision:resnet18", "--input-shape", "2,3,32,32"]

# catalog id -> (argv builder, message fragment)
CLI_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "cli-unknown-spec": (lambda t: ["inspect", "resnet-18"], "unknown model spec"),
    "cli-empty-spec": (lambda t: ["inspect", ""], "empty model spec"),
    "cli-factory-fails": (lambda t: ["inspect", "torchvision:resnet18", "--model-kwargs",
                                     '{"num_classes": -1}'], "failed: RuntimeError"),
    "cli-input-too-large": (lambda t: ["inspect", "torchvision:resnet18", "--input-shape",
                                       "2,3,100000,100000"], "cannot allocate"),
    "cli-unknown-zoo-model": (lambda t: ["inspect", "torchvision:resnet1"],
                              "did you mean resnet18"),
    "cli-unimportable-factory": (lambda t: ["inspect", "no_such_pkg.models:build"],
                                 "cannot import 'no_such_pkg.models'"),
    "cli-bad-model-kwargs": (lambda t: ["inspect", *MODEL, "--model-kwargs", '{"depth": 3}'],
                             "unexpected keyword argument 'depth'"),
    "cli-model-kwargs-not-json": (lambda t: ["inspect", *MODEL, "--model-kwargs", "{depth:3}"],
                                  "not valid JSON"),
    "cli-missing-file": (lambda t: ["export", _missing(t), "-o", str(t / "m.onnx")],
                         "no such file"),
    "cli-spec-is-missing-file": (lambda t: ["inspect", _missing(t)], "no such file"),
    "cli-checkpoint-directory": (lambda t: ["export", _directory(t) + "/", "-o",
                                            str(t / "m.onnx")], "directory"),
    "cli-truncated-checkpoint": (lambda t: ["export", _truncated_file(t), "-o",
                                            str(t / "m.onnx")], "truncated or corrupt"),
    "cli-corrupt-checkpoint": (lambda t: ["export", _random_bytes(t), "-o", str(t / "m.onnx")],
                               "not the zip archive"),
    "cli-pickled-module": (lambda t: ["export", _full_module_pickle(t), "-o",
                                      str(t / "m.onnx")], "arbitrary code"),
    "cli-reduction-zero": (lambda t: ["inspect", *MODEL, "--reduction", "0"],
                           "--reduction: expected a positive integer, got 0"),
    "cli-reduction-not-a-number": (lambda t: ["inspect", *MODEL, "--reduction", "four"],
                                   "got 'four'"),
    "cli-reduction-above-channels": (lambda t: ["inspect", *MODEL, "--reduction", "513"],
                                     "exceeds the 64 channels"),
    "cli-negative-ssia-weight": (lambda t: ["inspect", *MODEL, "--ssia-weight", "-1"],
                                 "finite number >= 0"),
    "cli-nan-ssia-weight": (lambda t: ["inspect", *MODEL, "--ssia-weight", "nan"],
                            "finite number >= 0, got nan"),
    "cli-bad-input-shape": (lambda t: ["inspect", "torchvision:resnet18", "--input-shape",
                                       "2x3xbig"], "not a comma-separated list"),
    "cli-zero-input-shape": (lambda t: ["inspect", "torchvision:resnet18", "--input-shape",
                                        "0,3,32,32"], "positive sizes"),
    "cli-input-shape-wrong-rank": (lambda t: ["inspect", "torchvision:resnet18",
                                              "--input-shape", "2,3,32"], "in module 'conv1'"),
    "cli-bad-opset": (lambda t: ["export", *MODEL, "-o", str(t / "m.onnx"), "--opset", "3"],
                      "ONNX opset from 7"),
    "cli-bad-atol": (lambda t: ["export", *MODEL, "-o", str(t / "m.onnx"), "--atol", "-1e-4"],
                     "--atol"),
    "cli-bad-choice": (lambda t: ["inspect", *MODEL, "--share", "all"], "invalid choice"),
    "cli-bad-regex": (lambda t: ["inspect", *MODEL, "--include", "layer("], "not a valid regex"),
    "cli-no-command": (lambda t: [], "required"),
    "cli-unknown-command": (lambda t: ["train", *MODEL], "invalid choice"),
    "cli-export-to-directory": (lambda t: ["export", *MODEL, "-o", str(t)], "is a directory"),
    "cli-export-missing-folder": (lambda t: ["export", *MODEL, "-o", str(t / "x" / "m.onnx")],
                                  "does not exist"),
    "cli-transform-no-overwrite": (lambda t: ["transform", *MODEL, "-o", str(t / "old.onnx"),
                                              "--no-force"], "already exists"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_catalog(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_argv, fragment = CLI_CASES[case]
    argv = build_argv(tmp_path)
    (tmp_path / "old.onnx").write_bytes(b"old bytes")
    before = folder_state(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("fxattn: error: ") and "Traceback" not in err
    assert "\x1b" not in err  # no terminal colour codes
    assert fragment in err, err
    assert folder_state(tmp_path) == before


def test_cli_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(fxattn.ModelSpecError):
        main(["--debug", "inspect", "resnet-18"])
    with pytest.raises(fxattn.ModelSpecError):
        main(["inspect", "resnet-18", "--debug"])


def test_cli_internal_error_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bug inside fxattn (here: a ZeroDivisionError) is exit 1 and one line, not a trace."""
    import fxattn.capture.specs

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(fxattn.capture.specs, "build_model", broken)
    assert main(["inspect", "torchvision:resnet18"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError: division by zero" in err
    assert "--debug" in err


def test_cli_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--help"]) == 0
    assert "--reduction" in capsys.readouterr().out


# --------------------------------------------------------------------------- no global state


def _token_model() -> nn.Module:
    import timm

    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                             num_classes=4)


def _transform(job: tuple[nn.Module, torch.Tensor]) -> fxattn.AttentionGraphModule:
    model, x = job
    return fxattn.transform(model, x, ssia=fxattn.SSIA(map="channel"))


def test_two_threads_transform_like_one() -> None:
    """Two different models transformed concurrently give the plans, graphs and (with equal
    weights) outputs of sequential transforms: nothing is shared between calls."""
    jobs = [(small_resnet(), X), (_token_model(), torch.randn(2, 3, 32, 32))]
    sequential = [_transform(job) for job in jobs]
    barrier = threading.Barrier(2)

    def together(job: tuple[nn.Module, torch.Tensor]) -> fxattn.AttentionGraphModule:
        barrier.wait()
        return _transform(job)

    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(together, jobs))
    for (_, x), seq, par in zip(jobs, sequential, threaded, strict=True):
        assert par.plan.to_dict() == seq.plan.to_dict()
        for graph in ("train_graph", "eval_graph"):
            code = [getattr(net, graph).python_code("self").src for net in (seq, par)]
            assert code[0] == code[1], graph
        par.load_state_dict(seq.state_dict())  # DIA weights are random: make them equal
        for mode in (True, False):
            seq.train(mode)
            par.train(mode)
            with torch.no_grad():
                assert torch.equal(par(x), seq(x))
        lean_seq, lean_par = fxattn.strip_ssia(seq), fxattn.strip_ssia(par)
        assert lean_par.code == lean_seq.code


# --------------------------------------------------------------------------- security


def _package_calls() -> list[tuple[str, ast.Call]]:
    root = Path(fxattn.__file__).parent
    return [
        (f"{path.relative_to(root)}:{node.lineno}", node)
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
    ]


def test_package_source_has_no_eval_or_exec() -> None:
    """No user string (model spec, option, file content) can reach eval/exec: the package
    calls neither (searched in the syntax tree, so ``net.eval()`` and docstrings don't count)."""
    calls = _package_calls()
    assert len(calls) > 100  # the search does see the package
    offenders = [where for where, call in calls
                 if isinstance(call.func, ast.Name) and call.func.id in ("eval", "exec",
                                                                        "compile")]
    assert offenders == []


def test_every_torch_load_is_weights_only() -> None:
    """Each ``torch.load`` in the package passes ``weights_only=True`` (no unpickled code)."""
    loads = [(where, call) for where, call in _package_calls()
             if isinstance(call.func, ast.Attribute) and call.func.attr == "load"
             and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"]
    assert loads
    for where, call in loads:
        flags = [k.value for k in call.keywords if k.arg == "weights_only"]
        assert flags and isinstance(flags[0], ast.Constant) and flags[0].value is True, where


def test_factory_specs_are_documented_as_importing_code() -> None:
    import fxattn.capture.specs
    from fxattn.cli import build_parser

    assert "imports and runs code" in " ".join((fxattn.capture.specs.__doc__ or "").split())
    help_text = build_parser()._subparsers._group_actions[0].choices["inspect"].format_help()
    assert "imports that module" in " ".join(help_text.split())
    docs = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    assert "imports and runs" in docs
