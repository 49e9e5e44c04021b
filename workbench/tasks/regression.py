"""Pixel-wise regression: continuous values per pixel, from dense or sparse labels."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from workbench.errors import UserInputError
from workbench.tasks.dense import DenseTask

LOSSES = {"mse": nn.MSELoss, "l1": nn.L1Loss, "huber": nn.HuberLoss}


class RegressionTask(DenseTask):
    """Backbone → neck → decoder → 1-channel head, trained on normalized targets.

    Batches also hold ``target`` ``(B, H, W)`` float32 with NaN where there is no label
    (sparse labels, nodata): those pixels are left out of the loss and the metrics. The model
    predicts ``(target - target_mean) / target_std``; metrics (RMSE, MAE, R²) and predictions
    are in target units.
    """

    output_kind = "values"

    def __init__(
        self,
        target_name: str = "value",
        target_mean: float = 0.0,
        target_std: float = 1.0,
        loss: Literal["mse", "l1", "huber"] = "mse",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            target_name: name of the predicted quantity (output band description).
            target_mean: target normalization offset, in target units.
            target_std: target normalization scale, in target units.
            loss: ``mse``, ``l1`` or ``huber`` (on normalized targets).
            **kwargs: :class:`DenseTask` and :class:`BaseTask` arguments.
        """
        if target_std <= 0:
            raise UserInputError(f"model.target_std must be positive, got {target_std}")
        self.target_mean, self.target_std = target_mean, target_std
        self.output_names = [target_name]
        super().__init__(num_outputs=1, **kwargs)
        self.loss = LOSSES[loss]()

    def metrics(self, stage: str) -> MetricCollection:
        return MetricCollection(
            {"RMSE": MeanSquaredError(squared=False), "MAE": MeanAbsoluteError(), "R2": R2Score()},
            prefix=f"{stage}/",
        )

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        pred = self.forward_batch(batch)[:, 0]
        target = batch["target"]
        labelled = target.isfinite()
        normalized = (target[labelled] - self.target_mean) / self.target_std
        loss = self.loss(pred[labelled], normalized) if labelled.any() else pred.sum() * 0.0
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=pred.shape[0])
        if labelled.any():
            values = pred[labelled].detach() * self.target_std + self.target_mean
            getattr(self, f"{stage}_metrics").update(values, target[labelled])
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Predicted values in target units ``(B, 1, H, W)``."""
        return self.forward_batch(batch) * self.target_std + self.target_mean
