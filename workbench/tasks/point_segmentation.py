"""Per-point semantic segmentation of point clouds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from workbench.errors import UserInputError
from workbench.model import PointSegmenter
from workbench.run_plots import Panel, points_panel
from workbench.tasks.base import BaseTask, ModelInput, StepOutput

IGNORED = -1  # points whose class is not learned


class PointSegmentationTask(BaseTask):
    """Point transformer → token propagation → per-point classes.

    Batches hold ``points`` ``(B, N, 3 + F)`` and ``mask`` ``(B, N)`` class indices (-1: not
    scored). Loss: cross-entropy (optionally class-weighted); metrics: overall accuracy and mean
    IoU over the classes as ``{train,val,test}/<name>``.
    """

    inputs = (ModelInput.POINTS,)

    def __init__(
        self,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        class_weights: list[float] | None = None,
        head_dropout: float = 0.5,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_classes: number of classes; linked from the datamodule by the CLI.
            class_names: one name per class; linked from the datamodule.
            class_weights: cross-entropy weight per class (rare classes up), default equal.
            head_dropout: dropout in the per-point classifier.
            **kwargs: :class:`BaseTask` arguments (backbone, pretrained, strategy, optimizer, ...).
        """
        names = class_names or [str(i) for i in range(num_classes)]
        if len(names) != num_classes or (class_weights is not None and len(class_weights) != num_classes):
            raise UserInputError(f"class_names / class_weights must have num_classes ({num_classes}) entries")
        self.class_names = names
        super().__init__(**kwargs)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return PointSegmenter(backbone, self.hparams.num_classes, self.hparams.head_dropout)

    def configure_losses(self) -> None:
        weights = self.hparams.class_weights
        weight = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.loss = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORED)

    def metrics(self) -> MetricCollection:
        n = self.hparams.num_classes
        return MetricCollection({"accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORED),
                                 "mIoU": MulticlassJaccardIndex(n, ignore_index=IGNORED)})

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Logits ``(B, K, N)`` against ``mask`` ``(B, N)``; the metrics take the argmax (``max(1).indices``:
        the same first-maximum index as ``argmax(1)``, which is far slower on CPU over dim 1)."""
        logits = self.forward_batch(batch)
        return StepOutput(self.loss(logits, batch["mask"]), logits.max(1).indices, batch["mask"])

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The points from above, coloured by label | by predicted class."""
        xyz = batch["points"][index]
        return [points_panel(xyz, step.target[index], "label", self.class_names, IGNORED),
                points_panel(xyz, step.preds[index], "prediction", self.class_names)]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Per-point classes ``(B, N)``."""
        return self.forward_batch(batch).max(1).indices
