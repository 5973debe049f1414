"""The exact DIA rewrites of ``fxattn.export.optimize``: parity, structure, and no-ops elsewhere.

Each rewrite runs alone on a small CIFAR ResNet with DIA (2 bottlenecks per stage, 32x32 input,
groups of 64, 128 and 256 channels) and must keep onnxruntime's output equal to PyTorch's within
float-reordering error. Models without DIA (and SSIA-only lean models) must export node for node
as with the rewrites off.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models import CifarResNet, TokenResidual, cifar_dia_lean

import fxattn
from fxattn.errors import ConfigError
from fxattn.export import export_onnx
from fxattn.export.dia_name_scope import in_dia, mark_dia_name_scopes
from fxattn.export.lowp import LOWP_ATOL, LOWP_RTOL, apply_dia_weights
from fxattn.export.optimize import REQUIRES, OnnxOptimize, optimize_onnx_file, resolve_optimize
from fxattn.export.runtime import ort_session

SITES = 6  # two blocks in each of three stages
GROUPS = 3
IDENTITY_SHORTCUTS = SITES - GROUPS  # each stage's first block has a downsample convolution
ONLY = {name: OnnxOptimize(**{k: k == name or k in REQUIRES.get(name, ())
                              for k in OnnxOptimize().to_dict()})
        for name in OnnxOptimize().to_dict()}
TOKEN_REWRITES = ("token_pool",)  # for (B, N, C) tokens: tested on a token model below
ALL = OnnxOptimize(**dict.fromkeys(OnnxOptimize().to_dict(), True))
# measured: worst |ort - torch| 3e-7 on logits of magnitude ~0.3 (any combination of rewrites)
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def lean() -> torch.nn.Module:
    return cifar_dia_lean()


@pytest.fixture(scope="module")
def plain_onnx(lean: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("opt") / "plain.onnx"
    export_onnx(lean, path, torch.randn(2, 3, 32, 32), optimize=False, verify=False)
    return path


def _rewritten(plain: Path, tmp_path: Path, options: OnnxOptimize) -> tuple[Path, dict]:
    path = tmp_path / "rewritten.onnx"
    shutil.copy(plain, path)
    return path, optimize_onnx_file(path, options).counts


def _assert_parity(path: Path, lean: torch.nn.Module) -> None:
    session = ort_session(str(path), threads=1)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            want = lean(torch.from_numpy(x))
        torch.testing.assert_close(torch.from_numpy(got), want, atol=ATOL, rtol=RTOL)


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("name", [name for name in ONLY if name not in TOKEN_REWRITES])
def test_each_rewrite_alone_is_exact(name: str, lean: torch.nn.Module, plain_onnx: Path,
                                     tmp_path: Path) -> None:
    path, counts = _rewritten(plain_onnx, tmp_path, ONLY[name])
    assert counts[name] > 0 and all(v == 0 for k, v in counts.items()
                                    if k != name and k not in REQUIRES.get(name, ()))
    before, after = _ops(plain_onnx), _ops(path)
    if name == "blocked_pool":  # every DIA pool; the classifier's own pool stays
        assert counts[name] == SITES
        assert after["ReduceMean"] == before["ReduceMean"] - SITES
        assert after["GlobalAveragePool"] == before["GlobalAveragePool"] + SITES
    elif name == "blocked_scale":
        assert counts[name] == SITES
        assert after["Resize"] == SITES and after["Conv"] == before["Conv"] + SITES
    elif name == "fused_residual":  # a copy before each Add whose shortcut is no conv
        assert counts[name] == IDENTITY_SHORTCUTS
        assert after["Conv"] == before["Conv"] + SITES + IDENTITY_SHORTCUTS
    elif name == "pool_before_conv":
        # applies where (C_out - C_in) * H * W > C_out * C_in: stages 1 and 2, not 3 (8x8)
        assert counts[name] == 4
    elif name == "compose_first_layer":
        # not at a group's first site, whose zero state reads the pool's shape until
        # fold_initial_state (off here) removes it; pool_before_conv then applies wherever the
        # channels widen there, and by its own rule (stages 1 and 2) at the first sites
        assert counts[name] == SITES - GROUPS and counts["pool_before_conv"] == SITES - 1
        assert after["Conv"] == before["Conv"] + counts["pool_before_conv"] - counts[name]
    else:  # the hidden path of each group's first site: Gemm, ReLU, Gemm, f*c, c add, zeros
        assert counts[name] > 0 and after["Gemm"] == before["Gemm"] - 2 * GROUPS
    _assert_parity(path, lean)


def test_all_rewrites_together_are_exact_and_export_onnx_runs_them(
    lean: torch.nn.Module, plain_onnx: Path, tmp_path: Path
) -> None:
    report = export_onnx(lean, tmp_path / "default.onnx", torch.randn(2, 3, 32, 32))
    assert any(note.startswith("exact DIA rewrites") for note in report.notes)
    assert report.max_abs_error <= ATOL
    _assert_parity(tmp_path / "default.onnx", lean)
    counts = _rewritten(plain_onnx, tmp_path, OnnxOptimize())[1]
    assert counts == {"blocked_pool": 6, "pool_before_conv": 6, "compose_first_layer": 6,
                      "blocked_scale": 0, "fused_residual": 0,  # opt-in: measured slower
                      "token_pool": 0,  # no tokens here
                      "fold_initial_state": counts["fold_initial_state"]}
    every = _rewritten(plain_onnx, tmp_path, ALL)[1]
    assert every["blocked_scale"] == SITES and every["fused_residual"] == IDENTITY_SHORTCUTS


def _ort_optimised(path: Path, tmp_path: Path) -> Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.ort.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(options.optimized_model_filepath)
    return Counter(f"{n.domain}:{n.op_type}" for n in model.graph.node)


def test_onnxruntime_keeps_the_dia_multiply_and_add_in_the_blocked_layout(
    plain_onnx: Path, tmp_path: Path
) -> None:
    before = _ort_optimised(plain_onnx, tmp_path)
    if not before["com.microsoft.nchwc:Conv"]:
        pytest.skip("this CPU has no onnxruntime NCHWc kernels (no AVX2)")
    path, _ = _rewritten(plain_onnx, tmp_path, OnnxOptimize(blocked_scale=True))
    after = _ort_optimised(path, tmp_path)
    # DIA's input of each scale enters the blocked layout as a (B, C, 1, 1) vector and is
    # expanded there; the large activations no longer leave it
    assert after["com.microsoft.nchwc:Upsample"] == SITES
    assert after["com.microsoft.nchwc:ReorderInput"] == SITES  # only the small h vectors
    assert before["com.microsoft.nchwc:ReorderInput"] >= SITES - 1
    # the residual Add is fused into the downsample convolution of each stage's first block
    assert after[":Add"] < before[":Add"]


def test_onnxruntime_fuses_the_residual_add_and_relu_again(plain_onnx: Path,
                                                             tmp_path: Path) -> None:
    unfused, _ = _rewritten(plain_onnx, tmp_path, OnnxOptimize(blocked_scale=True))
    before = _ort_optimised(unfused, tmp_path)
    if not before["com.microsoft.nchwc:Conv"]:
        pytest.skip("this CPU has no onnxruntime NCHWc kernels (no AVX2)")
    fused = tmp_path / "fused.onnx"
    shutil.copy(plain_onnx, fused)
    optimize_onnx_file(fused, ALL)
    after = _ort_optimised(fused, tmp_path)
    # each identity-shortcut block's Add and ReLU run inside the copying convolution
    assert after[":Add"] == before[":Add"] - IDENTITY_SHORTCUTS
    assert after[":Relu"] == before[":Relu"] - IDENTITY_SHORTCUTS
    assert after["com.microsoft.nchwc:Conv"] == (before["com.microsoft.nchwc:Conv"]
                                                 + IDENTITY_SHORTCUTS)
    assert after["com.microsoft.nchwc:ReorderInput"] == before["com.microsoft.nchwc:ReorderInput"]


def test_models_without_dia_export_node_for_node_as_before(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CifarResNet(depth=11, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ssia_lean = fxattn.strip_ssia(fxattn.transform(model, x, dia=False, ssia=True))
    for name, module in (("plain", model), ("ssia-lean", ssia_lean)):
        on = export_onnx(module, tmp_path / f"{name}-on.onnx", x, verify=False)
        export_onnx(module, tmp_path / f"{name}-off.onnx", x, verify=False, optimize=False)
        assert not any(n.startswith("exact DIA rewrites") for n in on.notes)
        nodes_on = [(n.op_type, list(n.input), list(n.output))
                    for n in onnx.load(str(tmp_path / f"{name}-on.onnx")).graph.node]
        nodes_off = [(n.op_type, list(n.input), list(n.output))
                     for n in onnx.load(str(tmp_path / f"{name}-off.onnx")).graph.node]
        assert nodes_on == nodes_off


@pytest.mark.parametrize("options", ["token_pool", "all"])
def test_token_dia_gets_the_token_pool_and_the_state_fold(options: str, tmp_path: Path) -> None:
    """DIA on tokens ``(B, N, C)`` (a ViT): the spatial rewrites do not apply; DIA's mean over
    the tokens becomes a matrix-vector product, the model's own mean stays; the fold applies."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    lean = fxattn.strip_ssia(fxattn.transform(TokenResidual().eval(), x, ssia=False))
    plain = tmp_path / "tokens.onnx"
    export_onnx(lean, plain, x, optimize=False, verify=False)
    path, counts = _rewritten(plain, tmp_path, ALL if options == "all" else ONLY[options])
    assert counts["blocked_pool"] == counts["blocked_scale"] == counts["pool_before_conv"] == 0
    assert counts["compose_first_layer"] == 0
    assert counts["fused_residual"] == 0 and counts["token_pool"] == 3
    assert (counts["fold_initial_state"] > 0) == (options == "all")
    before, after = _ops(plain), _ops(path)
    assert after["ReduceMean"] == before["ReduceMean"] - 3 == 1  # the model's own mean stays
    model = onnx.load(str(path))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    pools = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] in weights]
    assert len(pools) == 3 and all(in_dia(n) for n in pools)
    np.testing.assert_array_equal(weights[pools[0].input[0]], np.full((1, 5), 0.2, np.float32))
    session = ort_session(str(path), threads=1)
    for batch in (1, 3):
        xs = torch.randn(batch, 5, 8)
        got = session.run(None, {session.get_inputs()[0].name: xs.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), lean(xs), atol=ATOL, rtol=RTOL)


def test_options_are_validated() -> None:
    assert resolve_optimize(True) == OnnxOptimize()
    assert resolve_optimize(False) is None
    with pytest.raises(ConfigError, match="blocked_scale"):
        OnnxOptimize(blocked_scale="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="optimize must be"):
        resolve_optimize("all")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="blocked_scale=True too"):
        OnnxOptimize(fused_residual=True)  # it would rewrite nothing


def test_the_fold_leaves_zeros_outside_dia_alone(tmp_path: Path) -> None:
    """A model's own ``zeros + x`` broadcast (a (B, C, H, W) zero plus a (1, C, H, W) bias) is
    not DIA's: folding it to ``x`` would drop the batch dimension, so it stays."""

    class ZeroBias(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = CifarResNet(depth=11, num_classes=10)
            self.bias = torch.nn.Parameter(torch.randn(1, 3, 32, 32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(torch.zeros_like(x) + self.bias + x)

    torch.manual_seed(0)
    model = ZeroBias().eval()
    x = torch.randn(2, 3, 32, 32)
    lean = fxattn.strip_ssia(fxattn.transform(model, x, ssia=False))
    plain = tmp_path / "zero-bias.onnx"
    export_onnx(lean, plain, x, optimize=False, verify=False)
    path, counts = _rewritten(plain, tmp_path, ONLY["fold_initial_state"])
    assert counts["fold_initial_state"] > 0  # DIA's own zero state still folds

    def zeros(file: Path) -> list[tuple[str, bool]]:
        return [(n.name, in_dia(n)) for n in onnx.load(str(file)).graph.node
                if n.op_type in ("Expand", "ConstantOfShape")]

    assert any(dia for _, dia in zeros(plain)) and not any(dia for _, dia in zeros(path))
    model_zeros = [name for name, dia in zeros(plain) if not dia]
    assert model_zeros and model_zeros == [name for name, _ in zeros(path)]
    session = ort_session(str(path), threads=1)
    xs = torch.randn(3, 3, 32, 32)
    got = session.run(None, {session.get_inputs()[0].name: xs.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), lean(xs), atol=ATOL, rtol=RTOL)


def test_a_rewrite_that_fails_leaves_the_file_as_exported(
    plain_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fxattn.export.optimize as optimizer

    def broken(*args: object) -> int:
        raise ValueError("unexpected pattern")

    monkeypatch.setattr(optimizer, "blocked_pool", broken)
    path = tmp_path / "copy.onnx"
    shutil.copy(plain_onnx, path)
    report = optimize_onnx_file(path, OnnxOptimize())
    assert not report.changed and "ValueError: unexpected pattern" in str(report)
    assert path.read_bytes() == plain_onnx.read_bytes()


def test_compose_first_layer_reads_one_small_matrix_per_site(tmp_path: Path) -> None:
    """Each site's pooled pointwise convolution and DIA's shared first layer become one
    ``(C/r, C_in)`` matrix; convolution biases (batch norms that are not the identity) are
    carried into its bias; fewer matrix bytes per run; parity with PyTorch."""
    from fxattn.bench.cost import matrix_bytes

    lean = cifar_dia_lean(random_norms=True)
    plain = tmp_path / "plain.onnx"
    export_onnx(lean, plain, torch.randn(2, 3, 32, 32), optimize=False, verify=False)
    composed, counts = _rewritten(plain, tmp_path, OnnxOptimize())
    separate = tmp_path / "separate.onnx"
    shutil.copy(plain, separate)
    optimize_onnx_file(separate, OnnxOptimize(compose_first_layer=False))
    assert counts["compose_first_layer"] == counts["pool_before_conv"] == SITES
    model = onnx.load(str(composed))
    producer = {out: node for node in model.graph.node for out in node.output}
    assert not any(node.op_type == "Conv"
                   and producer.get(node.input[0], node).op_type == "GlobalAveragePool"
                   for node in model.graph.node)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    first = sorted(weights[n.input[1]].shape for n in model.graph.node
                   if n.op_type == "Gemm" and ".composed." in n.input[1])
    # groups of 64, 128, 256 channels, r = 4; the bottleneck's last convolution reads C / 4
    assert first == [(16, 16)] * 2 + [(32, 32)] * 2 + [(64, 64)] * 2
    assert not any(name.startswith("fxattn_dia.") and name.endswith("input_path.0.weight")
                   for name in weights)  # the shared (C/r, C) matrices are no longer read
    assert matrix_bytes(composed) < matrix_bytes(separate)
    _assert_parity(composed, lean)
    # low-precision copies quantise the composed matrices, within int4's tolerance
    quantised = tmp_path / "int4.onnx"
    shutil.copy(composed, quantised)
    apply_dia_weights(quantised, "int4")
    packed = [n for n in onnx.load(str(quantised)).graph.node if n.op_type == "MatMulNBits"
              and ".composed." in n.input[1]]
    assert len(packed) == SITES
    session = ort_session(str(quantised), threads=1)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = lean(torch.from_numpy(x))
    torch.testing.assert_close(
        torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x})[0]), want,
        atol=LOWP_ATOL["int4"], rtol=LOWP_RTOL["int4"])


def test_compose_first_layer_leaves_a_narrowing_projection_alone(tmp_path: Path) -> None:
    """An inverted residual (MobileNetV2's): the branch ends in a 1x1 convolution that narrows
    the channels, so the composed matrix would be larger than DIA's own: nothing changes."""

    class Inverted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(
                torch.nn.Conv2d(16, 64, 1), torch.nn.ReLU(), torch.nn.Conv2d(64, 16, 1))
                for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            for block in self.blocks:
                x = x + block(x)
            return x.mean((2, 3))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    lean = fxattn.strip_ssia(fxattn.transform(Inverted().eval(), x, ssia=False))
    plain = tmp_path / "inverted.onnx"
    export_onnx(lean, plain, x, optimize=False, verify=False)
    path, counts = _rewritten(plain, tmp_path, OnnxOptimize())
    assert counts["blocked_pool"] == 3
    assert counts["pool_before_conv"] == counts["compose_first_layer"] == 0



def test_torchscript_dia_scopes_are_marked_unless_a_model_module_shares_the_name() -> None:
    """``mark_dia_name_scopes``: nodes under every call of a DIA group (``/inner/g0/``,
    ``/inner/g0_1/``...) are DIA's; a call under which the model's own parameters are read (a
    module of the model named like the group) is left unmarked."""
    helper = onnx.helper
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32),
                                          "inner.fxattn_dia.g0.input_path.0.weight")
    own = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "inner.g0.weight")
    nodes = [helper.make_node("Gemm", ["x", weight.name], ["a"], name="/inner/g0/path/Gemm"),
             helper.make_node("Sigmoid", ["a"], ["b"], name="/inner/g0/Sigmoid"),
             helper.make_node("Sigmoid", ["b"], ["c"], name="/inner/g0_1/Sigmoid"),
             helper.make_node("Gemm", ["c", own.name], ["d"], name="/inner/g0_2/Gemm"),
             helper.make_node("Relu", ["d"], ["e"], name="/inner/g0_2/Relu"),
             helper.make_node("Relu", ["e"], ["y"], name="/inner/g0x/Relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4])],
                              [helper.make_tensor_value_info("y", 1, [1, 4])], [weight, own])
    model = helper.make_model(graph)
    assert [in_dia(n) for n in model.graph.node] == [False] * 6
    assert mark_dia_name_scopes(model) == 3
    assert [in_dia(n) for n in model.graph.node] == [True, True, True, False, False, False]
    assert mark_dia_name_scopes(model) == 0  # marked once
