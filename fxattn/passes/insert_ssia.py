"""Insert the SSIA branch into the *training* graph.

Right after each tap, ``fxattn_ssia.maps.<i>(tap)`` reduces it to its attention map (small,
and immune to in-place ops that later reuse the tap's storage). A tap that the model then
modifies in place (timm's ``ReLU(inplace=True)`` right after a residual add) is cloned first:
the map's backward needs the values it read, and the in-place op would leave autograd a stale
tensor ("modified by an inplace operation"). Just before the output,
``fxattn_ssia(map_0, ..., map_n)`` computes the loss and stores it for
:func:`fxattn.ssia_loss`. The graph's output is untouched, so the transformed model returns
exactly what the original returned. With ``attach=True`` (``SSIA(attach=True)``) the output
goes through ``fxattn_ssia.attach(loss, output)`` first: the same values, carrying the SSIA
term's gradient (:mod:`fxattn.modules.attach`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx as fx

from ..analysis import Tap
from ..names import FXATTN_META, SSIA_ROOT


@dataclass(frozen=True)
class SSIAInsertReport:
    taps: tuple[str, ...]
    inserted_nodes: int


def insert_ssia(
    graph: fx.Graph,
    taps: list[Tap],
    replaced: dict[str, str] | None = None,
    attach: bool = False,
) -> tuple[fx.Graph, SSIAInsertReport]:
    """Return a copy of ``graph`` whose forward also computes the SSIA loss from the taps.

    ``replaced`` maps a tap that DIA re-routed (stage-output sites) to the node carrying the
    attended value, so SSIA sees the same features as the rest of the network. A tap the
    analysis found modified in place (``Tap.modified_in_place``) is cloned first.
    """
    replaced = replaced or {}
    new_graph = copy.deepcopy(graph)
    nodes = {node.name: node for node in new_graph.nodes}
    features = [nodes[replaced.get(tap.node, tap.node)] for tap in taps]
    maps = []
    inserted = 0
    for i, (tap, feature) in enumerate(zip(taps, features, strict=True)):
        source = feature
        with new_graph.inserting_before(feature.next):
            if tap.modified_in_place:
                source = new_graph.call_method("clone", (feature,))
                source.meta[FXATTN_META] = "ssia"
                inserted += 1
            node = new_graph.call_module(f"{SSIA_ROOT}.maps.{i}", (source,))
        node.meta[FXATTN_META] = "ssia"
        maps.append(node)
    output = next(iter(new_graph.find_nodes(op="output")))
    with new_graph.inserting_before(output):
        loss = new_graph.call_module(SSIA_ROOT, tuple(maps))
    loss.meta[FXATTN_META] = "ssia"
    inserted += len(maps) + 1
    if attach:
        with new_graph.inserting_before(output):
            attached = new_graph.call_module(f"{SSIA_ROOT}.attach", (loss, output.args[0]))
        attached.meta[FXATTN_META] = "ssia"
        output.args = (attached,)
        inserted += 1
    new_graph.lint()
    return new_graph, SSIAInsertReport(
        taps=tuple(n.name for n in features), inserted_nodes=inserted
    )
