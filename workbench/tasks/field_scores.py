"""Scores of gridded fields as WeatherBench (Rasp et al. 2020) computes them: per-variable RMSE and
anomaly correlation, each weighted by latitude within a field and averaged over forecasts."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def latitude_weights(cos_latitude: Tensor) -> Tensor:
    """``(B, H)`` weights ∝ cos(latitude), mean 1 over each field's rows (WeatherBench's ``L(j)``)."""
    cos_latitude = cos_latitude.clamp_min(0)
    return cos_latitude / cos_latitude.mean(dim=-1, keepdim=True).clamp_min(1e-12)


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``(B, C, H, W)`` values averaged over each field with row weights ``(B, H)`` → ``(B, C)``."""
    return (values * weights[:, None, :, None]).mean(dim=(-2, -1))


class FieldMetric(Metric):
    """A per-variable score averaged over fields: ``compute`` gives ``{name: score}`` for the
    ``names`` of the ``C`` channels (a ``MetricCollection`` logs them as ``<key>_<name>``)."""

    full_state_update = False

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.add_state("total", torch.zeros(len(names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fields", torch.tensor(0), dist_reduce_fx="sum")

    def accumulate(self, per_field: Tensor) -> None:
        """Add the scores ``(B, C)`` of ``B`` fields."""
        self.total += per_field.detach().double().sum(0)
        self.fields += per_field.shape[0]

    def compute(self) -> dict[str, Tensor]:
        mean = (self.total / self.fields.clamp_min(1)).float()
        return dict(zip(self.names, mean))


class LatitudeWeightedRMSE(FieldMetric):
    """RMSE per variable: ``sqrt(mean_ij L(i) (f - t)²)`` of each field, averaged over fields.
    ``preds`` and ``target`` ``(B, C, H, W)`` in physical units, ``weights`` ``(B, H)``
    (:func:`latitude_weights`; ones for an unweighted RMSE)."""

    def update(self, preds: Tensor, target: Tensor, weights: Tensor) -> None:
        self.accumulate(weighted_mean((preds - target).square(), weights).sqrt())


class AnomalyCorrelation(FieldMetric):
    """Anomaly correlation coefficient per variable: the latitude-weighted correlation of forecast
    and observed anomalies from ``climate`` ``(B, C, H, W)``, per field, averaged over fields. A
    forecast of climatology itself has no anomaly and scores 0."""

    def update(self, preds: Tensor, target: Tensor, climate: Tensor, weights: Tensor) -> None:
        forecast, observed = preds - climate, target - climate
        covariance = weighted_mean(forecast * observed, weights)
        scale = (weighted_mean(forecast.square(), weights) * weighted_mean(observed.square(), weights)).sqrt()
        self.accumulate(covariance / scale.clamp_min(1e-12))
