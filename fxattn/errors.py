"""Every error fxattn raises derives from :class:`FxAttnError`.

Each subclass names one family of failure. Messages say what was wrong *and* what to do,
because the user usually did not write the model that failed.
"""

from __future__ import annotations

import re


class FxAttnError(Exception):
    """Base class of every error fxattn raises on purpose."""


class ConfigError(FxAttnError, ValueError):
    """An option object (DIA / SSIA / export / benchmark) holds an invalid value."""


class InputError(FxAttnError, ValueError):
    """The model or the example inputs handed to fxattn are unusable."""


class TraceError(FxAttnError):
    """Neither torch.fx symbolic tracing nor torch.export could capture the model."""


class AnalysisError(FxAttnError):
    """The graph holds nothing fxattn can attach to (no residual sites, no taps)."""


class NotTransformedError(FxAttnError, TypeError):
    """An fxattn function that needs a transformed module got something else."""


class AlreadyTransformedError(FxAttnError):
    """The model already carries fxattn's DIA / SSIA nodes."""


class SSIALossUnavailableError(FxAttnError):
    """`ssia_loss` was asked for before (or after) the training forward that produces it."""


class ExportError(FxAttnError):
    """ONNX export failed, or the output path cannot be written."""


class VerificationError(ExportError):
    """onnxruntime and PyTorch disagree beyond the tolerance."""


class ModelSpecError(FxAttnError):
    """A command-line model spec (``torchvision:resnet50``, a file, ...) cannot be resolved."""


class CheckpointError(FxAttnError):
    """A saved fxattn file is missing, truncated, corrupt or unsafe to load."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes.

    Third-party errors (the ONNX exporter's, torch.export's) can run to pages; fxattn's own
    messages quote one line of them.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
