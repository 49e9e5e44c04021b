"""Time-series imputation: fill gaps (runs of missing steps) from the observed steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from backbones.layers import instance_normalize
from workbench.errors import UserInputError
from workbench.model import SeriesReconstructor
from workbench.run_plots import Panel, curve, lines_panel
from workbench.tasks.base import BaseTask, ModelInput, StepOutput


def sample_gaps(shape: torch.Size, ratio: float, span: int, generator: torch.Generator | None = None) -> Tensor:
    """Observed-step mask ``(B, 1, L)`` (True = observed) with runs of ``span`` missing steps
    covering about ``ratio`` of each series, at random places (the same steps in every channel)."""
    b, _, length = shape
    span = min(span, length)
    runs = max(1, round(length * ratio / span))
    starts = torch.randint(0, length - span + 1, (b, runs, 1), generator=generator)
    steps = torch.arange(length)
    missing = ((steps >= starts) & (steps < starts + span)).any(1, keepdim=True)
    return ~missing


class SeriesImputationTask(BaseTask):
    """Reconstruct series with sampled gaps; batches hold ``series`` ``(B, M, L)``.

    Gaps are ``span``-step runs covering about ``mask_ratio`` of each series: random in
    training, fixed (seeded per batch) in validation and test, so scores compare across runs.
    Loss: MSE on gap steps in units of each series' observed std. Metrics on gap steps in data
    units: MSE and MAE, beside ``mean_fill_MAE`` (filling with each channel's observed mean).
    """

    inputs = (ModelInput.SERIES,)

    def __init__(
        self,
        mask_ratio: float = 0.3,
        span: int = 8,
        head_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            mask_ratio: share of each series hidden, in (0, 1).
            span: length of each missing run, in steps.
            head_dropout: dropout before the reconstruction head.
            **kwargs: :class:`BaseTask` arguments (backbone, strategy, optimizer, ...).
        """
        if not 0.0 < mask_ratio < 1.0 or span < 1:
            raise UserInputError(f"model.mask_ratio ({mask_ratio}) must be in (0, 1) and span ({span}) >= 1")
        super().__init__(**kwargs)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return SeriesReconstructor(backbone, self.hparams.head_dropout)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"MSE": MeanSquaredError(), "MAE": MeanAbsoluteError()})

    def gaps(self, series: Tensor, stage: str) -> Tensor:
        """Observed mask for ``series``: random in training, seeded by batch index otherwise."""
        generator = None if stage == "train" else torch.Generator().manual_seed(self.batch_idx)
        hp = self.hparams
        return sample_gaps(series.shape, hp.mask_ratio, hp.span, generator).to(series.device)

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Reconstructions against ``series`` ``(B, M, L)`` on the gap steps, beside the mean fill's MAE."""
        series = batch["series"]
        observed = self.gaps(series, stage).expand_as(series)
        pred = self.model(series, observed)
        _, mean, std = instance_normalize(series, observed)
        gap = ~observed
        loss = ((pred - series) / std)[gap].square().mean()
        mean_fill_mae = (mean.expand_as(series) - series)[gap].abs().mean()
        return StepOutput(loss, pred, series, scored=gap, logs={"mean_fill_MAE": mean_fill_mae})

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The first channel: the true series and the model's values on the gap steps."""
        gap = step.scored[index, 0]
        filled = step.preds[index, 0].masked_fill(~gap, float("nan"))
        return [lines_panel({"series": curve(step.target[index, 0]), "filled gaps": curve(filled)}, "channel 0")]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Series ``(B, M, L)`` with NaN steps filled (``observed`` = finite steps)."""
        series = batch["series"]
        observed = series.isfinite()
        return torch.where(observed, series, self.model(series.nan_to_num(), observed))
