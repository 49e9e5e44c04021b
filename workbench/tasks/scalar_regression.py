"""Regression of one value per sample (a series, a clip, a chip, a cloud) from pooled features."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from workbench.errors import UserInputError
from workbench.model import EncoderClassifier
from workbench.tasks.base import BaseTask
from workbench.tasks.regression import LOSSES


class ScalarRegressionTask(BaseTask):
    """Backbone → global average pool → linear → one value; batches hold ``target`` ``(B,)``.

    The model predicts ``(target - target_mean) / target_std``; when these are not given, they
    are taken from the datamodule's ``target_stats()`` (training targets) at the start of fit and
    saved with the checkpoint. Metrics RMSE, MAE and R² are in target units.
    """

    def __init__(
        self,
        target_name: str = "value",
        target_mean: float | None = None,
        target_std: float | None = None,
        loss: Literal["mse", "l1", "huber"] = "mse",
        head_dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            target_name: name of the predicted quantity.
            target_mean: target normalization offset; None: from the training targets.
            target_std: target normalization scale; None: from the training targets.
            loss: ``mse``, ``l1`` or ``huber`` (on normalized targets).
            head_dropout: dropout before the linear layer.
            **kwargs: :class:`BaseTask` arguments (backbone, strategy, optimizer, ...).
        """
        if target_std is not None and target_std <= 0:
            raise UserInputError(f"model.target_std must be positive, got {target_std}")
        super().__init__(**kwargs)
        self.setup_model()
        self.loss = LOSSES[loss]()
        self.register_buffer("target_mean", torch.tensor(target_mean if target_mean is not None else float("nan")))
        self.register_buffer("target_std", torch.tensor(target_std if target_std is not None else float("nan")))

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return EncoderClassifier(backbone, 1, self.hparams.head_dropout)

    def metrics(self, stage: str) -> MetricCollection:
        return MetricCollection(
            {"RMSE": MeanSquaredError(squared=False), "MAE": MeanAbsoluteError(), "R2": R2Score()}, prefix=f"{stage}/"
        )

    def on_fit_start(self) -> None:
        if self.target_mean.isnan() or self.target_std.isnan():
            stats = getattr(self.trainer.datamodule, "target_stats", None)
            if stats is None:
                raise UserInputError("set model.init_args.target_mean and target_std (the datamodule has no target_stats)")
            mean, std = stats()
            self.target_mean.fill_(mean if self.hparams.target_mean is None else self.hparams.target_mean)
            self.target_std.fill_(std if self.hparams.target_std is None else self.hparams.target_std)
        super().on_fit_start()

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        pred = self.forward_batch(batch)[:, 0]
        target = batch["target"].float()
        loss = self.loss(pred, (target - self.target_mean) / self.target_std)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=pred.shape[0])
        getattr(self, f"{stage}_metrics").update(pred.detach() * self.target_std + self.target_mean, target)
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Predicted values ``(B,)`` in target units."""
        return self.forward_batch(batch)[:, 0] * self.target_std + self.target_mean
