"""The SSIA loss value in a framework's own logs, with one line: ``fxattn.log_ssia(trainer)``.

With ``SSIA(attach=True)`` a framework trains SSIA without knowing it, so it cannot log it
either. :func:`log_ssia` installs a callback on a Hugging Face ``transformers.Trainer`` or a
Lightning ``Trainer`` that reads ``fxattn.ssia_loss`` of the transformed module after every
training (micro-)step:

- Hugging Face: the mean over the steps since the last log joins every ``loss`` entry as
  ``ssia_loss``, in ``trainer.state.log_history`` (saved with each checkpoint) and in the
  ``logs`` every reporting integration receives (the callback is put first, so TensorBoard,
  W&B and the console see it);
- Lightning: ``pl_module.log("ssia_loss", value)`` on every training batch, so it reaches the
  configured logger and the progress bar like the module's own metrics.

The transformed module is found inside the framework's model (the first module fxattn
transformed, or a scoped model), so a ``LightningModule`` wrapping it works unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import ConfigError, SSIALossUnavailableError
from .graph_module import AttentionGraphModule
from .scope import scope_info
from .transform import ssia_loss

SSIA_LOG_KEY = "ssia_loss"


def transformed_in(model: nn.Module) -> nn.Module | None:
    """The module fxattn transformed inside ``model`` (itself, a part or a scoped model)."""
    for module in model.modules():
        if isinstance(module, AttentionGraphModule) or scope_info(module) is not None:
            return module
    return None


def latest_ssia(model: nn.Module | None) -> float | None:
    """The latest training forward's SSIA value, or ``None`` when there is none to log."""
    net = transformed_in(model) if model is not None else None
    if net is None:
        return None
    try:
        return float(ssia_loss(net).detach())
    except SSIALossUnavailableError:
        return None


def _hf_callback() -> Any:
    from transformers import TrainerCallback

    class SSIALogCallback(TrainerCallback):
        """Collects the SSIA value per micro-step; adds their mean to each ``loss`` log."""

        def __init__(self) -> None:
            self.values: list[float] = []

        def _collect(self, model: nn.Module | None) -> None:
            value = latest_ssia(model)
            if value is not None:
                self.values.append(value)

        def on_substep_end(self, args: Any, state: Any, control: Any, model: Any = None,
                           **kwargs: Any) -> None:
            self._collect(model)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                        **kwargs: Any) -> None:
            self._collect(model)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
                   **kwargs: Any) -> None:
            if logs is None or "loss" not in logs or not self.values:
                return
            value = sum(self.values) / len(self.values)
            self.values.clear()
            logs[SSIA_LOG_KEY] = value
            # Trainer.log appended a copy of these logs before calling the callbacks
            if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                state.log_history[-1][SSIA_LOG_KEY] = value

    return SSIALogCallback()


def _lightning_callback() -> Any:
    from lightning.pytorch.callbacks import Callback

    class SSIALogCallback(Callback):
        """``pl_module.log("ssia_loss", ...)`` after every training batch."""

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            value = latest_ssia(pl_module)
            if value is not None:
                pl_module.log(SSIA_LOG_KEY, value, on_step=True, prog_bar=True)

    return SSIALogCallback()


def log_ssia(trainer: Any) -> Any:
    """Log the SSIA loss per step through ``trainer``'s own logging; returns the callback.

    ``trainer`` is a ``transformers.Trainer`` or a Lightning ``Trainer`` (``lightning`` or
    ``pytorch_lightning``), already built::

        trainer = transformers.Trainer(model=net, args=args, train_dataset=ds)
        fxattn.log_ssia(trainer)            # logs now carry "ssia_loss"
        trainer.train()
    """
    kind = f"{type(trainer).__module__}.{type(trainer).__qualname__}"
    for base in type(trainer).__mro__:
        where = f"{base.__module__}.{base.__qualname__}"
        if where.startswith("transformers.") and base.__name__ == "Trainer":
            callback = _hf_callback()
            # first, so every reporting integration's on_log sees the added key
            trainer.callback_handler.callbacks.insert(0, callback)
            return callback
        if where.endswith("trainer.trainer.Trainer") and "lightning" in where:
            callback = _lightning_callback()
            trainer.callbacks.append(callback)
            return callback
    raise ConfigError(
        f"log_ssia takes a transformers.Trainer or a Lightning Trainer, got {kind}; in a loop "
        "of your own, log fxattn.ssia_loss(net) after each training forward"
    )


__all__ = ["SSIA_LOG_KEY", "log_ssia"]
