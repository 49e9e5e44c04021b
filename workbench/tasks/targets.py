"""What the regression tasks share: losses, metrics and the normalisation of their targets."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from workbench.errors import UserInputError

LOSSES = {"mse": nn.MSELoss, "l1": nn.L1Loss, "huber": nn.HuberLoss}


def check_target_std(std: float | None) -> None:
    """``model.target_std`` must be positive where it is given."""
    if std is not None and std <= 0:
        raise UserInputError(f"model.target_std must be positive, got {std}")


class RegressionTargets:
    """Mixin of regression tasks: the model predicts ``(target - target_mean) / target_std``, the
    loss (``hparams.loss``: mse, l1, huber) compares normalized targets, the metrics (RMSE, MAE,
    R²) and predictions are in target units.

    ``target_mean`` and ``target_std`` are 0-d buffers; NaN where not given, then taken from the
    datamodule's ``target_stats()`` (:meth:`fill_target_stats`).
    """

    target_mean: Tensor
    target_std: Tensor

    def register_target_normalization(self, mean: float | None, std: float | None, persistent: bool) -> None:
        """Register the two buffers (``persistent``: saved in the checkpoint's state dict)."""
        for name, value in (("target_mean", mean), ("target_std", std)):
            self.register_buffer(name, torch.tensor(float("nan") if value is None else value), persistent=persistent)

    def configure_losses(self) -> None:
        self.loss = LOSSES[self.hparams.loss]()

    def metrics(self) -> MetricCollection:
        return MetricCollection({"RMSE": MeanSquaredError(squared=False), "MAE": MeanAbsoluteError(), "R2": R2Score()})

    def normalized(self, target: Tensor) -> Tensor:
        """Targets in target units → what the model predicts."""
        return (target - self.target_mean) / self.target_std

    def in_target_units(self, pred: Tensor) -> Tensor:
        """Model outputs → target units, in float32: a bfloat16 output (autocast) times the 0-d
        float32 buffers would stay bfloat16, rounding values near 3,000 to steps of 16."""
        return pred.float() * self.target_std + self.target_mean

    def fill_target_stats(self, datamodule: object) -> None:
        """Fill the statistics not given from ``datamodule.target_stats()`` (``(mean, std)`` of the
        training targets)."""
        if not (self.target_mean.isnan() or self.target_std.isnan()):
            return
        stats = getattr(datamodule, "target_stats", None)
        if stats is None:
            raise UserInputError("set model.init_args.target_mean and target_std (the datamodule has no target_stats)")
        for buffer, value in zip((self.target_mean, self.target_std), stats()):
            if buffer.isnan():
                buffer.fill_(value)
