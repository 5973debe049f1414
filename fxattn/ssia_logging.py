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
  configured logger and the progress bar like the module's own metrics;
- ultralytics: ``ssia_loss`` joins the criterion's loss items of every training forward, so
  the trainer treats it like ``box_loss``: its running mean in the progress bar, a
  ``train/ssia_loss`` column in ``results.csv``. It is not part of the loss the trainer
  backpropagates (the attached term already trains SSIA). ``val/ssia_loss`` stays 0: SSIA
  does not run in evaluation.

The transformed module is found inside the framework's model (the first module fxattn
transformed, or a scoped model), so a ``LightningModule`` wrapping it works unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError, SSIALossUnavailableError
from .modules.graph_module import AttentionGraphModule
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


class SSIALossItems:
    """An ultralytics criterion whose loss items gain ``ssia_loss`` in training forwards.

    ultralytics' ``model.loss(batch)`` returns ``criterion(preds, batch)``: the loss to
    backpropagate and a dict of detached items the trainer averages and prints. This wrapper
    leaves the loss alone and adds the SSIA value of the forward that made ``preds``. It holds
    the transformed module, so a deep copy or a pickle of the module keeps the pair together.
    """

    def __init__(self, criterion: Any, net: nn.Module) -> None:
        self.criterion = criterion
        self.net = net

    def __call__(self, preds: Any, batch: Any) -> Any:
        loss, items = self.criterion(preds, batch)
        value = latest_ssia(self.net) if self.net.training else None
        if value is not None and isinstance(items, dict) and items:
            reference = next(iter(items.values()))
            items = {**items, SSIA_LOG_KEY: torch.as_tensor(
                value, dtype=reference.dtype, device=reference.device)}
        return loss, items

    def __getattr__(self, name: str) -> Any:  # the criterion's own attributes (hyp, stride)
        if name in ("criterion", "net") or name.startswith("__"):
            raise AttributeError(name)  # not set yet: unpickling, copying
        return getattr(self.criterion, name)


def _install_ultralytics_items(trainer: Any) -> None:
    """``on_train_start``: wrap the criterion of the transformed module the trainer trains."""
    model = getattr(trainer.model, "module", trainer.model)  # DDP wraps it in ``module``
    net = transformed_in(model)
    if net is None:
        raise ConfigError(
            f"log_ssia: the ultralytics trainer trains a {type(model).__name__}, not a module "
            "fxattn transformed; set trainer.model = fxattn.transform(...) before train()"
        )
    if getattr(net, "criterion", None) is None:
        net.criterion = net.init_criterion()
    if not isinstance(net.criterion, SSIALossItems):
        net.criterion = SSIALossItems(net.criterion, net)


def log_ssia(trainer: Any) -> Any:
    """Log the SSIA loss per step through ``trainer``'s own logging; returns the callback.

    ``trainer`` is a ``transformers.Trainer``, a Lightning ``Trainer`` (``lightning`` or
    ``pytorch_lightning``) or an ultralytics trainer (``DetectionTrainer`` and the other
    tasks' trainers, which train the model they are handed), already built::

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
        if where == "ultralytics.engine.trainer.BaseTrainer":
            # the model is set up (moved, wrapped in DDP) inside train(): wrap it then
            trainer.add_callback("on_train_start", _install_ultralytics_items)
            return _install_ultralytics_items
    raise ConfigError(
        f"log_ssia takes a transformers.Trainer, a Lightning Trainer or an ultralytics "
        f"trainer, got {kind}; in a loop "
        "of your own, log fxattn.ssia_loss(net) after each training forward"
    )


__all__ = ["SSIA_LOG_KEY", "SSIALossItems", "log_ssia"]
