"""The attention-correlation diagnostic of the DIA paper.

DIANet's starting observation is that independent per-block SE modules produce channel
attention vectors that are strongly correlated between the blocks of a stage (Pearson about
0.85), which is what justifies *sharing* one attention module across a stage. This module
measures that on any module :func:`fxattn.transform` made (or its lean
:func:`fxattn.strip_ssia` copy):

* every DIA site's channel attention is captured on a real batch with forward hooks on the
  ``fxattn_dia.*`` modules (``h_t`` of the DIA-LSTM cell, ``sigmoid(fc(GAP(x)))`` of SE; a
  module shared by several sites is called once per site, in site order);
* for every pair of sites of a stage (a run of sites with the same channel count), the
  Pearson correlation of their attention vectors is computed per sample (across channels)
  and averaged over the batch;
* :meth:`CorrelationReport.save_heatmap` draws the per-stage matrices with their numbers.

With ``DIA(share="none")`` (one SE or LSTM module per block) this is the paper's diagnostic;
with the default ``share="stage"`` it shows how differently one shared cell attends at the
sites it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from . import ops
from .analysis import Plan, Site
from .capture import ExampleInputs
from .errors import AnalysisError, NotTransformedError
from .modules.dia import DIALSTMCell, SharedSE, gated_scale
from .modules.graph_module import AttentionGraphModule, unwrap
from .names import DIA_ROOT


@dataclass(frozen=True)
class StageCorrelation:
    """Correlation matrix of the attention vectors of one stage (one run of sites)."""

    group: int
    channels: int
    sites: tuple[int, ...]
    module_paths: tuple[str, ...]
    matrix: np.ndarray  # (n, n), symmetric, ones on the diagonal

    @property
    def mean_off_diagonal(self) -> float:
        """Mean Pearson r over distinct site pairs (nan for a stage of one site)."""
        n = len(self.sites)
        if n < 2:
            return float("nan")
        upper = self.matrix[np.triu_indices(n, k=1)]
        return float(np.mean(upper))

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "channels": self.channels,
            "sites": list(self.sites),
            "module_paths": list(self.module_paths),
            "matrix": np.round(self.matrix, 6).tolist(),
            "mean_off_diagonal": _json_float(self.mean_off_diagonal),
        }


@dataclass
class CorrelationReport:
    """What :func:`attention_correlation` measured; ``print(report)`` shows a summary."""

    module_kind: str  # "lstm" | "se"
    share: str
    batch: int
    stages: list[StageCorrelation]
    attention: dict[int, np.ndarray] = field(repr=False)  # site index -> (batch, channels)

    @property
    def mean_pearson(self) -> float:
        """Mean off-diagonal r over every stage with at least two sites."""
        values = [s.mean_off_diagonal for s in self.stages if len(s.sites) > 1]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module_kind,
            "share": self.share,
            "batch": self.batch,
            "mean_pearson": _json_float(self.mean_pearson),
            "stages": [stage.to_dict() for stage in self.stages],
        }

    def __str__(self) -> str:
        lines = [
            f"attention correlation (DIA module={self.module_kind}, share={self.share}, "
            f"batch {self.batch}): mean Pearson r between blocks of a stage "
            f"{self.mean_pearson:.3f}"
        ]
        for stage in self.stages:
            lines.append(
                f"  stage {stage.group} ({stage.channels} channels, {len(stage.sites)} sites: "
                f"{', '.join(p or 'root' for p in stage.module_paths)}): mean r "
                f"{stage.mean_off_diagonal:.3f}"
            )
            for row, path in zip(stage.matrix, stage.module_paths, strict=True):
                values = " ".join(f"{v:6.3f}" for v in row)
                lines.append(f"    {path or 'root':>14} {values}")
        return "\n".join(lines)

    def save_heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """Write the per-stage correlation matrices as one PNG (numbers in the cells)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure = plot_correlation(self, title=title)
        figure.savefig(path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        return path


def _json_float(value: float) -> float | None:
    return None if value != value else round(value, 6)


def pearson_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of ``a[i]`` and ``b[i]`` across channels, for every sample ``i``.

    A constant vector has no defined correlation; it gives ``nan`` (numpy's convention).
    """
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=1) / denominator


def _plan_of(net: nn.Module) -> tuple[nn.Module, Plan, dict[str, Any]]:
    module = unwrap(net)
    if isinstance(module, AttentionGraphModule):
        info = module.fxattn_info
    elif isinstance(module, fx.GraphModule) and "fxattn_info" in module.meta:
        info = module.meta["fxattn_info"]
    else:
        raise NotTransformedError(
            f"attention_correlation needs a module made by fxattn.transform (or its "
            f"fxattn.strip_ssia copy), got {type(net).__name__}; transform the model with "
            "dia=fxattn.DIA(share='none') to measure per-block attention"
        )
    if info.dia is None or not info.plan.sites:
        raise AnalysisError(
            "this module has no DIA attention to measure (it was transformed with dia=False); "
            "transform it with dia=True or dia=fxattn.DIA(share='none', module='se')"
        )
    return module, info.plan, info.dia


def _attention_hook(
    cell: nn.Module, sink: list[torch.Tensor]
) -> tuple[nn.Module, Callable[..., None]]:
    """Which submodule to hook and how to turn its output into a ``(B, C)`` attention (the
    multiplier itself: ``1 + gate * (h - 1)`` for ``DIA(init="identity")``)."""
    if isinstance(cell, DIALSTMCell):
        return cell, lambda _m, _i, out: sink.append(
            gated_scale(out[1], cell.gate).detach().float())
    if isinstance(cell, SharedSE):
        return cell.fc, lambda _m, _i, out: sink.append(
            gated_scale(torch.sigmoid(out), cell.gate).detach().float())
    raise AnalysisError(  # pragma: no cover - every registered DIA module is handled above
        f"no attention capture for DIA module type {type(cell).__name__}"
    )


@torch.no_grad()
def capture_attention(net: nn.Module, inputs: Any) -> dict[int, np.ndarray]:
    """Run ``inputs`` through ``net`` in eval mode; every DIA site's ``(batch, C)`` attention.

    The module's train/eval mode is restored afterwards.
    """
    module, plan, _ = _plan_of(net)
    example = ExampleInputs.from_user(inputs)
    dia_root = getattr(module, DIA_ROOT)
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, cell in dia_root.named_children():
        captured[name] = []
        target, hook = _attention_hook(cell, captured[name])
        handles.append(target.register_forward_hook(hook))
    was_training = module.training
    try:
        module.eval()
        with ops.decomposed():  # the hooks sit on the decomposed path's submodules
            example.call(module)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    by_module: dict[str, list[Site]] = {}
    for site in plan.sites:
        by_module.setdefault(site.module, []).append(site)
    attention: dict[int, np.ndarray] = {}
    for name, sites in by_module.items():
        calls = captured.get(name, [])
        if len(calls) != len(sites):
            raise AnalysisError(
                f"DIA module {DIA_ROOT}.{name} ran {len(calls)} time(s) for {len(sites)} "
                "site(s); the graph was edited after fxattn.transform, re-run transform"
            )
        for site, values in zip(sites, calls, strict=True):
            attention[site.index] = values.cpu().numpy()
    return attention


def attention_correlation(net: nn.Module, inputs: Any) -> CorrelationReport:
    """Pearson correlation of channel attention between the blocks of each stage.

    Args:
        net: a module returned by :func:`fxattn.transform` with DIA, or its lean
            :func:`fxattn.strip_ssia` copy. ``DIA(share="none")`` gives the paper's per-block
            diagnostic; shared cells are measured per site.
        inputs: one batch (tensor, tuple or dict, as for ``transform``); real data gives
            meaningful numbers, and at least a few dozen samples give stable ones.

    Example::

        >>> net = fxattn.transform(model, x, dia=fxattn.DIA(module="se", share="none"),
        ...                        ssia=False)
        >>> report = fxattn.attention_correlation(net, test_images)
        >>> report.mean_pearson, report.save_heatmap("correlation.png")
    """
    _, plan, dia = _plan_of(net)
    attention = capture_attention(net, inputs)
    stages: list[StageCorrelation] = []
    for sites in plan.groups:
        n = len(sites)
        matrix = np.eye(n)
        for i in range(n):
            for j in range(i + 1, n):
                r = pearson_per_sample(attention[sites[i].index], attention[sites[j].index])
                matrix[i, j] = matrix[j, i] = float(np.nanmean(r)) if np.any(r == r) else np.nan
        stages.append(
            StageCorrelation(
                group=sites[0].group,
                channels=sites[0].channels,
                sites=tuple(s.index for s in sites),
                module_paths=tuple(s.module_path for s in sites),
                matrix=matrix,
            )
        )
    batch = next(iter(attention.values())).shape[0]
    return CorrelationReport(
        module_kind=str(dia["module"]),
        share=str(dia["share"]),
        batch=int(batch),
        stages=stages,
        attention=attention,
    )


def plot_correlation(report: CorrelationReport, title: str | None = None, axes: Any = None) -> Any:
    """A matplotlib figure with one annotated heatmap per stage (returns the figure)."""
    import matplotlib.pyplot as plt

    stages = report.stages
    if axes is None:
        figure, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.6),
                                    squeeze=False)
        axes = list(axes[0])
    else:
        figure = axes[0].figure
    image = None
    for ax, stage in zip(axes, stages, strict=False):
        image = ax.imshow(stage.matrix, vmin=-1.0, vmax=1.0, cmap="coolwarm")
        labels = [p or "root" for p in stage.module_paths]
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for (i, j), value in np.ndenumerate(stage.matrix):
            text = "nan" if value != value else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if abs(value) > 0.6 else "black")
        ax.set_title(f"stage {stage.group}: {stage.channels} ch, mean r "
                     f"{stage.mean_off_diagonal:.2f}", fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="Pearson r")
    figure.suptitle(title or f"DIA attention correlation ({report.module_kind}, "
                    f"share={report.share}), mean r {report.mean_pearson:.2f}", fontsize=10)
    return figure
