"""Regression of one value per sample (a series, a clip, a chip, a cloud) from pooled features."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from workbench.model import EncoderClassifier
from workbench.run_plots import Panel
from workbench.tasks.base import BaseTask, ModelInput, StepOutput
from workbench.tasks.targets import RegressionTargets, check_target_std


class ScalarRegressionTask(RegressionTargets, BaseTask):
    """Backbone → global average pool → linear → one value; batches hold ``target`` ``(B,)``.

    The model predicts ``(target - target_mean) / target_std``; when these are not given, they
    are taken from the datamodule's ``target_stats()`` (training targets) at the start of fit and
    saved with the checkpoint. Metrics RMSE, MAE and R² are in target units. The input is the
    batch's ``image``, ``series`` or ``points``, whichever the datamodule gives.
    """

    inputs = tuple(ModelInput)

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
        check_target_std(target_std)
        super().__init__(**kwargs)
        self.register_target_normalization(target_mean, target_std, persistent=True)  # may come from the data

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return EncoderClassifier(backbone, 1, self.hparams.head_dropout)

    def on_fit_start(self) -> None:
        self.fill_target_stats(self.trainer.datamodule)
        super().on_fit_start()

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Predictions ``(B,)`` against ``target`` ``(B,)``."""
        pred = self.forward_batch(batch)[:, 0]
        target = batch["target"].float()
        return StepOutput(self.loss(pred, self.normalized(target)), self.in_target_units(pred), target)

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The input, titled with the true and the predicted value."""
        title = f"true {float(step.target[index]):.4g} / predicted {float(step.preds[index]):.4g}"
        return [self.input_panel(batch, index, title)]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Predicted values ``(B,)`` in target units."""
        return self.in_target_units(self.forward_batch(batch)[:, 0])
