"""Where the down-sampling path of an encoder-decoder ends (UNets, FPN and YOLO necks).

An encoder-decoder up-samples deep features and merges them with earlier ones through skip
connections, so no single path runs from the input through every stage to the output: each
stage output feeds both the next stage and the decoder, and the main-path rule finds only the
stages before the first skip. Its *encoder* - the features computed before any up-sampling -
still has one down-sampling path. That path ends at the deepest encoder feature: the fewest
positions; of those the one the most parametrised ops deep (a segmentation model's main head,
not its auxiliary head on an earlier stage), and the latest of equals (a UNet's bottleneck
includes its mid block). The taps are the stage outputs on the main path to there.

An up-sampling is a feature with more positions than all the feature maps it is computed
from together: an interpolation, a transposed convolution, an unpatchify reshape. Broadcasts
of global vectors (an SE gate, ASPP's image pooling) and concatenations are not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from .graph import feature_nodes, reaching, tensor_parents
from .layouts import feature_grid


@dataclass(frozen=True)
class DownsamplingEnd:
    end: fx.Node  # the deepest feature computed before any up-sampling
    upsampling: fx.Node  # the first up-sampling, where the decoder starts


def downsampling_end(
    graph: fx.Graph,
    dims: dict[fx.Node, int | None],
    is_feature_map: Callable[[fx.Node], bool],
    is_parametrised: Callable[[fx.Node], bool],
) -> DownsamplingEnd | None:
    """The end of the encoder's down-sampling path, or ``None`` when nothing up-samples."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    if not placeholders:
        return None
    output = next(iter(graph.find_nodes(op="output")))
    features = feature_nodes(placeholders[0], is_parametrised) & reaching(
        graph, [output], forward=False
    )
    positions: dict[fx.Node, int] = {}
    depth: dict[fx.Node, int] = {}  # most parametrised ops on a path from the input
    nearest: dict[fx.Node, frozenset[fx.Node]] = {}  # the closest feature maps a node is from
    decoded: set[fx.Node] = set()  # up-samplings and what is computed from them
    first: fx.Node | None = None
    encoder: list[fx.Node] = []
    for node in graph.nodes:
        if node not in features or node is output:
            continue
        parents = [p for p in tensor_parents(node) if p in features]
        depth[node] = max((depth.get(p, 0) for p in parents), default=0) + int(
            is_parametrised(node)
        )
        sources = frozenset().union(*(nearest.get(p, frozenset()) for p in parents))
        if not is_feature_map(node):
            nearest[node] = sources
            if any(p in decoded for p in parents):
                decoded.add(node)
            continue
        nearest[node] = frozenset([node])
        positions[node] = math.prod(feature_grid(node, dims))
        maps = [positions[s] for s in sources if positions[s] > 1]
        if any(p in decoded for p in parents):
            decoded.add(node)
        elif maps and positions[node] > sum(maps):
            decoded.add(node)
            first = first or node
        elif positions[node] > 1:
            encoder.append(node)
    if first is None or not encoder:
        return None
    order = {node: i for i, node in enumerate(encoder)}
    end = max(encoder, key=lambda node: (-positions[node], depth[node], order[node]))
    return DownsamplingEnd(end, first)
