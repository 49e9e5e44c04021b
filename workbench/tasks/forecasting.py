"""Time-series forecasting: the next ``horizon`` steps of every channel from a context window."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from backbones.layers import instance_normalize
from workbench.errors import UserInputError
from workbench.model import SeriesForecaster
from workbench.run_plots import Panel, curve, lines_panel
from workbench.tasks.base import BaseTask, ModelInput, StepOutput


class ForecastingTask(BaseTask):
    """PatchTST-style forecasting: batches hold ``series`` ``(B, M, context_length)`` and
    ``target`` ``(B, M, horizon)``.

    The loss is the MSE in units of each window's own standard deviation (scale-free across
    series); metrics MSE and MAE are in data units, next to ``naive_MAE`` (repeat the last
    observed value) for scale.
    """

    inputs = (ModelInput.SERIES,)

    def __init__(
        self,
        context_length: int = 36,
        horizon: int = 12,
        head_dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            context_length: steps the model sees (must equal ``data.context_length``).
            horizon: steps forecast (must equal ``data.horizon``).
            head_dropout: dropout before the flatten head.
            **kwargs: :class:`BaseTask` arguments (backbone, strategy, optimizer, ...).
        """
        super().__init__(**kwargs)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        hp = self.hparams
        return SeriesForecaster(backbone, hp.context_length, hp.horizon, hp.head_dropout)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"MSE": MeanSquaredError(), "MAE": MeanAbsoluteError()})

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        for field in ("context_length", "horizon"):
            if getattr(data, field, self.hparams[field]) != self.hparams[field]:
                raise UserInputError(
                    f"model.init_args.{field} is {self.hparams[field]} but data.init_args.{field} is "
                    f"{getattr(data, field)}: set both to the same value"
                )
        super().on_fit_start()

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Forecasts against ``target`` ``(B, M, horizon)``, beside the naive forecast's MAE."""
        series, target = batch["series"], batch["target"]
        pred = self.forward_batch(batch)
        _, _, scale = instance_normalize(series)
        loss = ((pred - target) / scale).square().mean()
        naive_mae = (series[..., -1:] - target).abs().mean()
        return StepOutput(loss, pred.flatten(), target.flatten(), logs={"naive_MAE": naive_mae})

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The first channel: its context window, then the target and the forecast."""
        series, target = batch["series"][index, 0], batch["target"][index, 0]
        forecast = step.preds.view_as(batch["target"])[index, 0]
        start = len(series)
        return [lines_panel({"context": curve(series), "target": curve(target, start),
                             "forecast": curve(forecast, start)}, "channel 0")]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Forecasts ``(B, M, horizon)`` in data units."""
        return self.forward_batch(batch)
