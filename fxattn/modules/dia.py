"""Dense-and-Implicit Attention modules, one shared by every site of a group.

The DIA-LSTM cell follows the official DIANet code: for site ``t`` with branch output
``A_t`` and ``C`` channels (gate order i, f, g, o as in ``nn.LSTM``)::

    x_t   = GAP(A_t)                                          # (B, C)
    gates = input_path(x_t) + hidden_path(h_{t-1})            # each Linear -> ReLU -> Linear(4C)
    i, f, g, o = split(gates, 4);  i, f, o = sigmoid(.);  g = tanh(.)
    c_t = f * c_{t-1} + i * g
    h_t = o * sigmoid(c_t)                                    # sigmoid, not tanh: h_t in (0, 1)
    out = A_t * h_t                                           # broadcast over H, W / tokens

``h_0 = c_0 = 0`` at the first site of a group (the call without state).

With ``fused=True`` (the default of :class:`fxattn.DIA`) a site runs as one fused operator
(``torch.ops.fxattn.dia_lstm`` / ``dia_se``, see :mod:`fxattn.ops`) reading the same
``nn.Linear`` parameters; the decomposed code below stays the reference, and runs whenever
:func:`fxattn.ops.fused_enabled` is false (ONNX export, :func:`fxattn.ops.decomposed`).

``init="identity"`` (``fxattn.DIA(init="identity")``, for trained weights) gives each module a
per-channel ``gate`` started at zero and multiplies by ``1 + gate * (h_t - 1)`` instead of
``h_t`` (``1 + gate * (a - 1)`` for SE): at insertion every site is an exact identity, so a
trained model computes what it computed before, yet the gate has a gradient from the first step
(``d out / d gate = A_t * (h_t - 1)``), as with ReZero / LayerScale / LoRA's zero ``B``. The
state passed on to the next site stays the paper's ``(h_t, c_t)``. ``init="paper"`` (the
default) has no ``gate``: the paper's math and state_dict keys, unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import ops


def _descriptor(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Global average over every dimension but batch and channels: ``(B, C)``."""
    channel_dim %= x.dim()  # -1: channels last, whatever the rank (tokens or a grid)
    dims = [d for d in range(1, x.dim()) if d != channel_dim]
    if not dims:
        return x
    return x.mean(dim=dims)


def _broadcastable(weights: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``(B, C)`` -> shape that broadcasts over ``like``'s non-channel dims."""
    channel_dim %= like.dim()
    for d in range(1, like.dim()):
        if d != channel_dim:
            weights = weights.unsqueeze(d)
    return weights


class CarriedState(NamedTuple):
    """The ``c`` a fused training forward hands to the next site: the cell state and the
    group's packed parameters (one tensor, so the backward sums one gradient per site)."""

    c: torch.Tensor
    params: torch.Tensor


def _linear_params(mlp: nn.Sequential) -> tuple[torch.Tensor, ...]:
    """``(w1, b1, w2, b2)`` of a ``Linear -> ReLU -> Linear``, as the fused ops take them."""
    first, second = mlp[0], mlp[2]
    return first.weight, first.bias, second.weight, second.bias


def gated_scale(weights: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The multiplier: the paper's ``weights``, or ``1 + gate * (weights - 1)`` with a gate.

    ``addcmul(1 - gate, gate, weights)`` is one fused elementwise op on ``(B, C)`` (``1 - gate``
    is a constant once exported); with ``gate == 0`` it is exactly 1.
    """
    if gate is None:
        return weights
    return torch.addcmul(1 - gate, gate, weights)


def _identity_gate(module: nn.Module, channels: int, init: str) -> None:
    """Register ``gate`` (zeros, ``(C,)``) for ``init="identity"``; none for ``"paper"``."""
    if init == "identity":
        module.gate = nn.Parameter(torch.zeros(channels))
    elif init == "paper":
        module.gate = None
    else:
        raise ValueError(f"unknown DIA init {init!r}")  # fxattn.DIA validates it first


def _calls_do_work(*mlps: nn.Module) -> bool:
    """Whether calling these MLPs' modules does more than their math.

    The fused operators read the ``nn.Linear`` weights directly and never call the modules.
    A module with forward hooks expects to be called: FSDP2's ``fully_shard`` unshards its
    parameters (DTensors) in a pre-forward hook, and a user's hook reads activations. Such a
    module runs the decomposed path, which calls every module as the paper's code does.
    """
    return any(module._forward_hooks or module._forward_pre_hooks
               for mlp in mlps for module in mlp.modules())


def _mlp(channels: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, out))


class DIALSTMCell(nn.Module):
    """The DIA-LSTM cell. ``forward(x, h=None, c=None) -> (x * h_t, h_t, c_t)``; with
    ``init="identity"`` the first output is ``x * (1 + gate * (h_t - 1))``."""

    gate: nn.Parameter | None

    def __init__(
        self, channels: int, reduction: int = 4, channel_dim: int = 1, fused: bool = True,
        init: str = "paper",
    ) -> None:
        super().__init__()
        hidden = channels // reduction
        self.channels = channels
        self.channel_dim = channel_dim
        self.fused = fused
        self.pack_params = True  # False when the cell serves one site (nothing to share)
        self.input_path = _mlp(channels, hidden, 4 * channels)
        self.hidden_path = _mlp(channels, hidden, 4 * channels)
        _identity_gate(self, channels, init)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor | None = None, c: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (self.fused and ops.fused_enabled()
                and not _calls_do_work(self.input_path, self.hidden_path)):
            return self._fused_forward(x, h, c)
        if isinstance(c, CarriedState):
            c = c.c
        descriptor = _descriptor(x, self.channel_dim)
        if h is None or c is None:
            h = torch.zeros_like(descriptor)
            c = torch.zeros_like(descriptor)
        gates = self.input_path(descriptor) + self.hidden_path(h)
        i, f, g, o = gates.chunk(4, dim=1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.sigmoid(c_next)
        scale = gated_scale(h_next, self.gate)
        return x * _broadcastable(scale, x, self.channel_dim), h_next, c_next

    def _fused_forward(
        self, x: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | CarriedState | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | CarriedState]:
        """One ``torch.ops.fxattn.dia_lstm`` call; packs the parameters when training.

        In a training forward the group's first site packs the eight parameters into one
        tensor (``dia_pack``) and hands it on with the cell state, so the backward sums one
        gradient per site instead of eight (see :func:`fxattn.ops.dia_lstm.dia_pack`).
        """
        params = [*_linear_params(self.input_path), *_linear_params(self.hidden_path)]
        packed = None
        if isinstance(c, CarriedState):
            c, packed = c
        elif (h is None and self.pack_params and self.training and torch.is_grad_enabled()
              and any(p.requires_grad for p in params)):
            packed = ops.dia_pack(params)
        out, h_next, c_next = ops.dia_lstm(x, h, c, params if packed is None else [packed],
                                           self.gate, self.channel_dim)
        return out, h_next, c_next if packed is None else CarriedState(c_next, packed)

    def extra_repr(self) -> str:
        init = ", init=identity" if self.gate is not None else ""
        return f"channels={self.channels}, channel_dim={self.channel_dim}{init}, fused={self.fused}"


class SharedSE(nn.Module):
    """Squeeze-excitation MLP shared by a group, without state: ``forward(x) -> x * a``
    (``x * (1 + gate * (a - 1))`` with ``init="identity"``)."""

    stateful = False

    gate: nn.Parameter | None

    def __init__(
        self, channels: int, reduction: int = 4, channel_dim: int = 1, fused: bool = True,
        init: str = "paper",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.channel_dim = channel_dim
        self.fused = fused
        self.fc = _mlp(channels, channels // reduction, channels)
        _identity_gate(self, channels, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and ops.fused_enabled() and not _calls_do_work(self.fc):
            return ops.dia_se(x, *_linear_params(self.fc), self.gate, self.channel_dim)
        weights = gated_scale(torch.sigmoid(self.fc(_descriptor(x, self.channel_dim))), self.gate)
        return x * _broadcastable(weights, x, self.channel_dim)

    def extra_repr(self) -> str:
        init = ", init=identity" if self.gate is not None else ""
        return f"channels={self.channels}, channel_dim={self.channel_dim}{init}, fused={self.fused}"


DIALSTMCell.stateful = True  # type: ignore[attr-defined]

# Registry instead of an if-chain: DIA(module=...) names a key here.
DIA_MODULES: dict[str, type[nn.Module]] = {"lstm": DIALSTMCell, "se": SharedSE}


def build_dia_module(
    kind: str, channels: int, reduction: int, channel_dim: int, fused: bool = True,
    init: str = "paper",
) -> nn.Module:
    return DIA_MODULES[kind](channels, reduction, channel_dim, fused=fused, init=init)
