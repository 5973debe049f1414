"""Draw one residual block of a real model before and after fxattn's passes.

Usage: ``python benchmarks/tools/diagram.py`` -> ``docs/how-it-works.png``. The three columns are
the FX nodes of torchvision ResNet-18's ``layer1.1`` block (plus the stem tap, for SSIA) in
the original evaluation graph, in the transformed training graph, and in the lean graph that
``fxattn.strip_ssia`` returns. Each box is a node, with the nodes it reads; DIA nodes are red,
SSIA nodes blue.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import torchvision  # noqa: E402

import fxattn  # noqa: E402
from fxattn.capture import ExampleInputs, trace_dual  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BLOCK = "layer1.1"
COLORS = {"dia": "#f4b6b6", "ssia": "#b6cdf4", None: "#eeeeee"}


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        what = str(node.target)
    elif node.op == "call_function":
        what = getattr(node.target, "__name__", str(node.target))
    else:
        what = f"{node.op} {node.target}"
    inputs = ", ".join(a.name for a in node.all_input_nodes)
    return f"{node.name} = {what}({inputs})"


def _block_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Nodes of the block (by module path) plus fxattn's nodes inserted inside it."""
    chosen = []
    inside = False
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = str(node.target) if node.op == "call_module" else (
            list(stack.values())[-1][0] if stack else "")
        in_block = path.startswith(BLOCK)
        if in_block:
            inside = True
        if in_block or (inside and node.meta.get("fxattn")):
            if str(node.target) != "fxattn_ssia":  # the loss node sits before the output
                chosen.append(node)
        elif inside and not node.meta.get("fxattn"):
            break
    return chosen


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    original = trace_dual(model, ExampleInputs.from_user(x)).eval.graph
    net = fxattn.transform(model, x)
    lean = fxattn.strip_ssia(net)
    columns = [
        ("original (eval graph)", _block_nodes(original)),
        ("transformed (train graph)", _block_nodes(net.train_graph)),
        ("lean (strip_ssia)", _block_nodes(lean.graph)),
    ]
    rows = max(len(nodes) for _, nodes in columns)
    figure, axes = plt.subplots(1, 3, figsize=(16, 0.42 * rows + 1.2))
    for ax, (title, nodes) in zip(axes, columns, strict=True):
        ax.set_title(title, fontsize=11)
        ax.set_xlim(0, 1)
        ax.set_ylim(-rows, 0.5)
        ax.axis("off")
        for i, node in enumerate(nodes):
            kind = node.meta.get("fxattn")
            ax.text(0.02, -i, _label(node), fontsize=7.5, family="monospace", va="center",
                    bbox={"boxstyle": "round,pad=0.25", "fc": COLORS.get(kind, "#eee"),
                          "ec": "#999"})
    figure.suptitle(f"torchvision ResNet-18, block {BLOCK}: DIA (red) multiplies the branch "
                    "before the add; SSIA (blue) only in the training graph", fontsize=11)
    out = ROOT / "docs" / "how-it-works.png"
    figure.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
