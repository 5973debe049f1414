"""Find where attention goes: residual *sites*, their *groups*, stage-output *taps* and the
SSIA *pairs* between them, collected in a :class:`Plan`.

Everything here reads a shape-propagated ``torch.fx`` graph and returns plain data; nothing
is modified. One concept per module (see the README's "How it works"):

* :mod:`.ops` - what an op is (parametrised, channel side, pool, reshape);
* :mod:`.graph` - walking the graph (module paths, stable keys, the main path);
* :mod:`.layouts` - the channel dimension and layout of every tensor;
* :mod:`.sites` - residual additions ``y = shortcut + branch``;
* :mod:`.groups` - runs of sites sharing one DIA module;
* :mod:`.taps` - stage outputs, low to high;
* :mod:`.pairs` - which tap supervises which;
* :mod:`.plan` - the :class:`Plan` and :func:`analyze`, which builds it.
"""

from .groups import DIAModuleSpec, dia_module_parameters
from .ops import modifies_in_place
from .pairs import Pair
from .plan import Plan, analyze
from .sites import Site
from .taps import Tap

__all__ = ["DIAModuleSpec", "Pair", "Plan", "Site", "Tap", "analyze", "dia_module_parameters",
           "modifies_in_place"]
