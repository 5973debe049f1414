"""Export compatibility rewrites: exact, and they make exportable what torch.onnx alone cannot."""

from __future__ import annotations

import warnings
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from torch import nn

import fxattn
from fxattn.export import export_onnx
from fxattn.export.compat import (
    ExportCompatMode,
    scaled_dot_product_attention_4d,
    zero_pad_by_concat,
)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    length=st.integers(1, 5),
    source=st.integers(1, 5),
    features=st.integers(1, 4),
    mask_rank=st.sampled_from([None, 2, "full"]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_folded_to_4d_equals_attention_of_any_rank(
    lead: list[int], length: int, source: int, features: int, mask_rank: object,
    causal: bool, seed: int,
) -> None:
    """(batch, *lead, heads, L, E) in any rank from 3 to 6, with or without a mask."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, *lead, length, features)
    q = torch.randn(shape, generator=generator)
    k = torch.randn((*shape[:-2], source, features), generator=generator)
    v = torch.randn((*shape[:-2], source, features), generator=generator)
    kwargs: dict[str, object] = {}
    if causal and mask_rank is None:
        kwargs["is_causal"] = True
    elif mask_rank == 2:
        kwargs["attn_mask"] = torch.randn(length, source, generator=generator)
    elif mask_rank == "full":
        kwargs["attn_mask"] = torch.rand((*shape[:-2], length, source), generator=generator) > 0.3
        kwargs["attn_mask"][..., 0] = True  # every query attends to something
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = scaled_dot_product_attention_4d(q, k, v, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class GroupedAttention(nn.Module):
    """Attention within groups as Twins / NesT write it: 5-D (B, groups, heads, L, E) tensors,
    then ``transpose(...).reshape(...)`` back to tokens."""

    def __init__(self, dim: int = 16, heads: int = 2, groups: int = 4) -> None:
        super().__init__()
        self.heads, self.groups = heads, groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, C)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, self.groups, n // self.groups, 3, self.heads, -1)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, G, H, L, E)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, n, c)
        return x + self.proj(out)


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.blocks = nn.Sequential(*(GroupedAttention() for _ in range(4)))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))


def test_model_torch_onnx_cannot_export_is_exported_with_the_rewrites(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    lean = fxattn.strip_ssia(fxattn.transform(TokenNet(), x))
    batch = torch.export.Dim("batch", min=1, max=64)
    with pytest.raises(Exception, match="ONNX"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lean.eval(), (x,), str(tmp_path / "plain.onnx"), dynamo=True,
                          dynamic_shapes=({0: batch},), verbose=False)
    report = export_onnx(lean, tmp_path / "m.onnx", x, exporter="dynamo")
    assert report.exporter == "dynamo+compat"
    assert report.max_abs_error <= 1e-4 and report.batch_sizes == (2, 3)
    assert any("4 attention call(s) folded to 4-D" in note for note in report.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_mode_counts_rewrites_and_changes_nothing_outside_its_block() -> None:
    block = GroupedAttention().eval()
    x = torch.randn(2, 8, 16)
    expected = block(x)
    with ExportCompatMode() as compat:
        got = block(x)
    assert compat.report.attention_folded_to_4d == 1 and compat.report.contiguous_reshapes == 1
    torch.testing.assert_close(got, expected)
    after = ExportCompatMode()
    block(x)
    assert not after.report.changed  # not entered: nothing was intercepted


def test_exportable_model_keeps_the_plain_dynamo_graph(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(x)
    report = export_onnx(model, tmp_path / "m.onnx", x)
    assert report.exporter == "dynamo"
    assert not any("compatibility" in note for note in report.notes)



@pytest.mark.parametrize("style", ["method", "aten"])
def test_view_of_a_transpose_that_is_contiguous_while_tracing_is_copied_first(style: str) -> None:
    """The BEiT / HF Swin case, as the mode sees it: a transpose whose result happens to be
    contiguous (the source was stored transposed, as CPU attention stores its output), then a
    reshape (FX graphs: ``Tensor.reshape``) or ``aten.view`` (torch.export graphs). The view must
    be taken of a copy, whatever the layout is when traced; other reshapes are left alone."""
    stored_transposed = torch.randn(2, 5, 3).transpose(1, 2)  # (2, 3, 5), heads-minor storage
    with ExportCompatMode() as compat:
        if style == "method":
            swapped = stored_transposed.transpose(1, 2)
            out = swapped.reshape(2, 15)
            plain = torch.randn(2, 3, 5).reshape(2, 15)
        else:
            aten = torch.ops.aten
            swapped = aten.transpose.int(stored_transposed, 1, 2)
            out = aten.view.default(swapped, [2, 15])
            plain = aten.view.default(torch.randn(2, 3, 5), [2, 15])
    assert swapped.is_contiguous()  # so a plain view would have been taken while tracing
    assert compat.report.contiguous_reshapes == 1 and plain.shape == (2, 15)
    assert out.untyped_storage().data_ptr() != swapped.untyped_storage().data_ptr()
    torch.testing.assert_close(out, stored_transposed.transpose(1, 2).reshape(2, 15))


def test_optimized_graph_failing_the_checker_is_exported_again_unoptimized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxscript's optimizer can leave nodes out of topological order (timm's Gemma-4 ViT):
    simulated by reversing the optimized graph's nodes. The export is redone unoptimized."""
    import onnx

    import fxattn.export.portable as onnx_export

    real = onnx_export._run_exporter
    calls: list[bool] = []

    def exporter_with_a_broken_optimizer(kind: str, module: nn.Module, inputs: object,
                                         tmp: Path, opset: object, optimize: bool = True,
                                         dynamic_batch: bool = True) -> None:
        calls.append(optimize)
        real(kind, module, inputs, tmp, opset, optimize, dynamic_batch)
        if optimize:
            model = onnx.load(str(tmp))
            nodes = list(model.graph.node)[::-1]
            del model.graph.node[:]
            model.graph.node.extend(nodes)
            onnx.save(model, str(tmp))

    monkeypatch.setattr(onnx_export, "_run_exporter", exporter_with_a_broken_optimizer)
    x = torch.randn(2, 3, 16, 16)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(1))
    report = export_onnx(model, tmp_path / "m.onnx", x, exporter="dynamo")
    assert calls == [True, False] and report.exporter == "dynamo" and report.verified
    assert any("without the exporter's optimizer" in note for note in report.notes)
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)


@settings(max_examples=30, deadline=None)
@given(pads=st.lists(st.integers(0, 3), min_size=2, max_size=6).filter(lambda p: len(p) % 2 == 0),
       seed=st.integers(0, 2**16))
def test_zero_pad_by_concat_equals_zero_pad(pads: list[int], seed: int) -> None:
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(zero_pad_by_concat(x, pads), F.pad(x, pads))


class PaddedStem(nn.Module):
    """HF BiT's stem: convolution, zero padding, max pooling (values are negative too)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.pad = nn.ConstantPad2d(1, 0.0)
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pad(self.conv(x)))


def test_zero_pad_then_max_pool_exports_with_the_right_numbers(tmp_path: Path) -> None:
    """onnxruntime's PadFusion folds Pad(0) -> MaxPool into the pool's -inf padding; the export
    concatenates the zeros instead, so onnxruntime agrees with PyTorch at the border."""
    torch.manual_seed(0)
    model = PaddedStem().eval()
    x = torch.randn(2, 3, 32, 32) - 1.0  # mostly negative maps: the border zeros matter
    report = export_onnx(model, tmp_path / "m.onnx", x)
    assert report.exporter == "dynamo" and report.max_abs_error <= 1e-4
    assert any("1 zero pad(s) before a max pool concatenated" in n for n in report.notes)
    assert "Pad" not in report.op_counts and report.op_counts.get("Concat", 0) >= 1
