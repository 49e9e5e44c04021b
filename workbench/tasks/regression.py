"""Pixel-wise regression: continuous values per pixel, from dense or sparse labels."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from workbench.run_plots import Panel, field_panel
from workbench.tasks.base import StepOutput
from workbench.tasks.dense import DenseTask, PixelOutput
from workbench.tasks.targets import RegressionTargets, check_target_std


class RegressionTask(RegressionTargets, DenseTask):
    """Backbone → neck → decoder → 1-channel head, trained on normalized targets.

    Batches also hold ``target`` ``(B, H, W)`` float32 with NaN where there is no label
    (sparse labels, nodata): those pixels are left out of the loss and the metrics. The model
    predicts ``(target - target_mean) / target_std``; metrics (RMSE, MAE, R²) and predictions
    are in target units.
    """

    output_kind = PixelOutput.VALUES

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
        check_target_std(target_std)
        self.output_names = [target_name]
        super().__init__(num_outputs=1, **kwargs)
        self.register_target_normalization(target_mean, target_std, persistent=False)  # always from the config

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Predictions ``(B, H, W)`` against ``target`` ``(B, H, W)``, scored where labelled."""
        pred = self.forward_batch(batch)[:, 0]
        target = batch["target"]
        labelled = target.isfinite()
        loss = self.loss(pred[labelled], self.normalized(target[labelled])) if labelled.any() else pred.sum() * 0.0
        return StepOutput(loss, self.in_target_units(pred), target, scored=labelled)

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """Input | target (blank where unlabelled) | prediction, in target units."""
        name = self.output_names[0]
        return [self.input_panel(batch, index), field_panel(step.target[index], f"target: {name}"),
                field_panel(step.preds[index], f"prediction: {name}")]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Predicted values in target units ``(B, 1, H, W)``."""
        return self.in_target_units(self.forward_batch(batch))
