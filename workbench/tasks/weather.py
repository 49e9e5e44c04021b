"""Gridded weather with a Prithvi WxC-style backbone: forecasting at a lead time and downscaling,
scored per variable as WeatherBench does, beside the honest baselines (persistence and
climatology; bilinear and bicubic interpolation) computed on the same fields."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.image import StructuralSimilarityIndexMeasure

from backbones.prithvi_wxc import PrithviWxC
from workbench.errors import UserInputError
from workbench.model import FieldDownscaler, FieldForecaster
from workbench.run_plots import Panel, field_panel
from workbench.tasks.base import BaseTask, ModelInput, StepOutput
from workbench.tasks.field_scores import AnomalyCorrelation, LatitudeWeightedRMSE, latitude_weights, weighted_mean

LATITUDE = 0
"""Channel of the batch's ``static`` inputs holding the latitude in radians (Prithvi WxC's layout)."""


class FieldUnits(BaseTask):
    """Base of the gridded tasks: batches hold normalized fields; ``field_mean`` / ``field_std``
    ``(C,)`` (buffers, saved with the checkpoint, taken from the datamodule's ``channel_stats()``
    at the start of fit) bring them back to physical units for the scores and predictions.
    The ``C`` channels are the linked ``bands`` (``z500``, ``t850``, ...)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.hparams.bands:
            raise UserInputError("model.bands: gridded tasks need the channel names (linked from a weather datamodule)")
        for name in ("field_mean", "field_std"):
            self.register_buffer(name, torch.full((len(self.hparams.bands),), float("nan")))

    def start_at_residual(self, backbone: nn.Module) -> nn.Module:
        """A randomly initialised backbone starts as its residual target (persistence, climatology
        or the interpolation): its output layer ``unembed`` starts at zero, so training only adds
        what the data supports. Pretrained backbones keep their weights."""
        if not self.hparams.pretrained:
            nn.init.zeros_(backbone.unembed.weight), nn.init.zeros_(backbone.unembed.bias)
        return backbone

    @property
    def channel_names(self) -> list[str]:
        return list(self.hparams.bands)

    def on_fit_start(self) -> None:
        if self.field_mean.isnan().any():
            stats = getattr(self.trainer.datamodule, "channel_stats", None)
            if stats is None:
                raise UserInputError("gridded tasks need a weather datamodule (its channel_stats give physical units)")
            mean, std = stats()
            self.field_mean.copy_(torch.as_tensor(mean)), self.field_std.copy_(torch.as_tensor(std))
        super().on_fit_start()

    def physical(self, fields: Tensor) -> Tensor:
        """Normalized fields ``(..., C, H, W)`` → physical units."""
        return fields * self.field_std[:, None, None] + self.field_mean[:, None, None]

    def field_panels(self, fields: Tensor, step: StepOutput, index: int, titles: tuple[str, str, str]) -> list[Panel]:
        """Maps of the first variable in physical units: ``fields`` ``(C, h, w)`` (the input), the
        step's target and its prediction ``(C, H, W)`` of sample ``index``."""
        name = self.channel_names[0]
        maps = (fields, step.target[index], step.preds[index])
        return [field_panel(self.physical(m)[0], f"{title}: {name}") for title, m in zip(titles, maps)]

    @staticmethod
    def row_weights(batch: dict[str, Tensor]) -> Tensor:
        """Latitude weights ``(B, H)`` of the batch's fields, from their ``static`` latitudes."""
        return latitude_weights(batch["static"][:, LATITUDE, :, 0].cos())


class WeatherForecastTask(FieldUnits):
    """Fields at the input times → the fields ``lead_time`` hours after the last one.

    Batches hold ``x`` ``(B, T, C, H, W)``, ``target`` and ``climate`` ``(B, C, H, W)``, ``static``
    ``(B, S, H, W)``, ``input_time`` and ``lead_time`` ``(B,)``, all fields normalized. The loss is
    the latitude-weighted MSE in normalized units. Logged per variable in physical units:
    ``RMSE_<name>`` and ``ACC_<name>`` (WeatherBench), beside ``persistence_RMSE/ACC_<name>``
    (the last input repeated) and ``climatology_RMSE_<name>`` (the climatology; its ACC is 0).
    Continued masked pretraining as in Prithvi WxC: ``backbone_kwargs.mask_ratio_inputs`` > 0
    (tokens masked in training) with a lead of zero steps or more.
    """

    inputs = (ModelInput.FIELDS,)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return FieldForecaster(self.start_at_residual(backbone))

    def forward_batch(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch)

    def metrics(self) -> MetricCollection:
        names = self.channel_names
        return MetricCollection({
            "RMSE": LatitudeWeightedRMSE(names), "ACC": AnomalyCorrelation(names),
            "persistence_RMSE": LatitudeWeightedRMSE(names), "persistence_ACC": AnomalyCorrelation(names),
            "climatology_RMSE": LatitudeWeightedRMSE(names),
        })

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Forecast against ``target``; persistence and climatology ride along for the scores."""
        forecast, target, weights = self.forward_batch(batch), batch["target"], self.row_weights(batch)
        loss = weighted_mean((forecast - target).square(), weights).mean()
        extras = {"persistence": batch["x"][:, -1], "climatology": batch["climate"]}
        return StepOutput(loss, forecast, target, extras={**extras, "weights": weights})

    def update_metrics(self, metrics: MetricCollection, step: StepOutput) -> None:
        target, climate = self.physical(step.target), self.physical(step.extras["climatology"])
        weights = step.extras["weights"]
        for prefix, forecast in (("", step.preds.detach()), ("persistence_", step.extras["persistence"])):
            forecast = self.physical(forecast)
            metrics[f"{prefix}RMSE"].update(forecast, target, weights)
            metrics[f"{prefix}ACC"].update(forecast, target, climate, weights)
        metrics["climatology_RMSE"].update(climate, target, weights)

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The first variable in physical units: last input | target | forecast."""
        return self.field_panels(batch["x"][index, -1], step, index, ("last input", "target", "forecast"))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Prithvi WxC's ``masking_mode: both`` alternates local and global masking step by step."""
        if isinstance(self.model.backbone, PrithviWxC):
            self.model.backbone.swap_masking()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Forecast fields ``(B, C, H, W)`` in physical units."""
        return self.physical(self.forward_batch(batch))

    @torch.no_grad()
    def rollout(self, batch: dict[str, Tensor], steps: int) -> Tensor:
        """Autoregressive forecast ``(B, steps, C, H, W)`` in physical units: each forecast becomes
        the newest input and the oldest drops out, so the input times must be ``lead_time`` apart."""
        x, hours, forecasts = batch["x"], batch["input_time"], []
        for _ in range(steps):
            forecast = self.model({**batch, "x": x, "input_time": hours})
            forecasts.append(forecast)
            x, hours = torch.cat([x[:, 1:], forecast[:, None]], dim=1), hours + batch["lead_time"]
        return self.physical(torch.stack(forecasts, dim=1))


class DownscalingTask(FieldUnits):
    """Coarse fields ``coarse`` ``(B, C, h, w)`` → fine fields ``(B, C, factor·h, factor·w)``
    (bicubic interpolation plus the backbone's correction; ``static`` ``(B, S, H, W)`` at the fine
    grid). The loss is the MSE against ``fine`` in normalized units. Logged per variable:
    ``RMSE_<name>`` (physical units) and ``SSIM`` (normalized fields), beside the same scores of
    ``bilinear_`` and ``bicubic_`` interpolation.
    """

    inputs = (ModelInput.COARSE_FIELDS,)
    BASELINES = ("bilinear", "bicubic")

    def __init__(self, factor: int = 4, **kwargs: Any) -> None:
        """
        Args:
            factor: fine cells per coarse cell along each axis (must equal the data's).
            **kwargs: :class:`BaseTask` arguments (backbone, strategy, optimizer, ...).
        """
        if factor < 2:
            raise UserInputError(f"model.factor {factor} must be at least 2")
        super().__init__(**kwargs)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return FieldDownscaler(self.start_at_residual(backbone), self.hparams.factor)

    def forward_batch(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch["coarse"], batch["static"])

    def metrics(self) -> MetricCollection:
        return MetricCollection({
            f"{prefix}{name}": metric for prefix in ("", *(f"{b}_" for b in self.BASELINES))
            for name, metric in (("RMSE", LatitudeWeightedRMSE(self.channel_names)),
                                 ("SSIM", StructuralSimilarityIndexMeasure(data_range=8.0)))
        })

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Downscaled fields against ``fine``; the interpolations ride along for the scores."""
        fine, coarse = batch["fine"], batch["coarse"]
        if fine.shape[-1] != coarse.shape[-1] * self.hparams.factor:
            raise UserInputError(f"model.factor {self.hparams.factor} does not match the data: coarse "
                                 f"{tuple(coarse.shape[-2:])} vs fine {tuple(fine.shape[-2:])}")
        downscaled = self.forward_batch(batch)
        extras = {mode: F.interpolate(coarse, scale_factor=self.hparams.factor, mode=mode, align_corners=False)
                  for mode in self.BASELINES}
        return StepOutput(F.mse_loss(downscaled, fine), downscaled, fine, extras=extras)

    def update_metrics(self, metrics: MetricCollection, step: StepOutput) -> None:
        target = step.target
        uniform = target.new_ones(target.shape[0], target.shape[-2])  # regional patches: unweighted
        for prefix, fields in (("", step.preds.detach()), *((f"{b}_", step.extras[b]) for b in self.BASELINES)):
            metrics[f"{prefix}RMSE"].update(self.physical(fields), self.physical(target), uniform)
            metrics[f"{prefix}SSIM"].update(fields, target)

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The first variable in physical units: coarse input | fine target | downscaled."""
        return self.field_panels(batch["coarse"][index], step, index, ("coarse input", "fine target", "downscaled"))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Downscaled fields ``(B, C, H, W)`` in physical units."""
        return self.physical(self.forward_batch(batch))
