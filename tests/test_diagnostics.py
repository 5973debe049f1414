"""The attention-correlation diagnostic: numbers equal a direct numpy computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from models import CifarResNet

import fxattn
from fxattn.cli import main
from fxattn.diagnostics import capture_attention


def _net(module: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CifarResNet(depth=29, num_classes=10)  # 3 stages of 3 bottlenecks
    x = torch.randn(4, 3, 16, 16)
    return fxattn.transform(model, x, dia=fxattn.DIA(module=module, share="none"), ssia=False)


@pytest.mark.parametrize("module", ["se", "lstm"])
def test_correlation_matches_numpy(module: str) -> None:
    net = _net(module)
    batch = torch.randn(6, 3, 16, 16)
    report = fxattn.attention_correlation(net, batch)
    attention = capture_attention(net, batch)
    assert len(report.stages) == 3 and all(len(s.sites) == 3 for s in report.stages)
    for stage in report.stages:
        for i, a in enumerate(stage.sites):
            for j, b in enumerate(stage.sites):
                if i == j:
                    assert stage.matrix[i, j] == 1.0
                    continue
                expected = np.mean([np.corrcoef(attention[a][k], attention[b][k])[0, 1]
                                    for k in range(6)])
                assert stage.matrix[i, j] == pytest.approx(expected, abs=1e-6)  # float32 attention
    # Each site's attention is a channel weighting in (0, 1) (sigmoid / o * sigmoid(c)).
    assert all(((v > 0) & (v < 1)).all() for v in attention.values())
    assert net.training  # mode restored


def test_heatmap_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = fxattn.attention_correlation(_net("se"), torch.randn(4, 3, 16, 16))
    path = report.save_heatmap(tmp_path / "corr.png")
    assert path.stat().st_size > 1000
    assert "mean Pearson r" in str(report)
    heatmap = tmp_path / "cli.png"
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "4,3,32,32", "--share",
                 "none", "--correlation", "--heatmap", str(heatmap)]) == 0
    out = capsys.readouterr().out
    assert "attention correlation" in out and heatmap.exists()


def test_correlation_needs_dia() -> None:
    model = CifarResNet(depth=29)
    net = fxattn.transform(model, torch.randn(2, 3, 16, 16), dia=False)
    with pytest.raises(fxattn.AnalysisError):
        fxattn.attention_correlation(net, torch.randn(2, 3, 16, 16))
    with pytest.raises(fxattn.NotTransformedError):
        fxattn.attention_correlation(model, torch.randn(2, 3, 16, 16))
