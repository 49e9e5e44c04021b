"""Semantic segmentation: per-pixel classes from multispectral (multi-temporal) rasters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import ClasswiseWrapper, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from workbench.errors import UserInputError
from workbench.run_plots import Panel, class_panel
from workbench.tasks.base import StepOutput
from workbench.tasks.dense import DenseTask, PixelOutput


class SegmentationTask(DenseTask):
    """Backbone → neck → decoder → head trained with cross-entropy.

    Batches also hold ``mask`` ``(B, H, W)`` (int64, ``ignore_index`` where unlabelled). Logs
    loss, per-class IoU, mIoU, macro F1 and accuracy as ``{train,val,test}/<name>``.
    """

    output_kind = PixelOutput.CLASSES

    def __init__(
        self,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        ignore_index: int = 255,
        class_weights: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_classes: number of classes; linked from the datamodule by the CLI.
            class_names: names used in metric keys (``val/IoU_water``); linked from the datamodule.
            ignore_index: mask value excluded from the loss and the metrics.
            class_weights: optional cross-entropy weight per class.
            **kwargs: :class:`DenseTask` arguments (decoder, decoder_channels, head_dropout, neck) and
                :class:`BaseTask` arguments (backbone, pretrained, strategy, optimizer, ...).
        """
        names = class_names or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise UserInputError(
                f"class_names has {len(names)} names but num_classes is {num_classes}: "
                "give one name per class."
            )
        if class_weights is not None and len(class_weights) != num_classes:
            raise UserInputError(
                f"model.class_weights has {len(class_weights)} values but num_classes is "
                f"{num_classes}: give one weight per class."
            )
        self.num_classes = num_classes
        self.class_names = self.output_names = names
        self.ignore_index = ignore_index
        super().__init__(num_outputs=num_classes, **kwargs)

    def configure_losses(self) -> None:
        weights = self.hparams.class_weights
        weight = torch.tensor(weights, dtype=torch.float32) if weights else None
        self.loss = nn.CrossEntropyLoss(weight=weight, ignore_index=self.ignore_index)

    def metrics(self) -> MetricCollection:
        # validate_args off: the step's loss has already refused class values out of range, and
        # torchmetrics' check (a unique() over every pixel) took 7 of the 11 ms of a flood step's update
        common = {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "validate_args": False}
        return MetricCollection({
            "IoU": ClasswiseWrapper(MulticlassJaccardIndex(average="none", **common), self.class_names, prefix="IoU_"),
            "mIoU": MulticlassJaccardIndex(average="macro", **common),
            "F1": MulticlassF1Score(average="macro", **common),
            "accuracy": MulticlassAccuracy(average="micro", **common),
        })

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Logits ``(B, K, H, W)`` against ``mask`` ``(B, H, W)``; the metrics take the argmax."""
        logits = self.forward_batch(batch)
        # max(1).indices: the same first-maximum index as argmax(1), which is ~50x slower on CPU over dim 1
        return StepOutput(self.loss(logits, batch["mask"]), logits.max(1).indices, batch["mask"])

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """Input | label (unlabelled pixels blank) | predicted classes."""
        return [self.input_panel(batch, index), class_panel(step.target[index], self.class_names, "label", self.ignore_index),
                class_panel(step.preds[index], self.class_names, "prediction")]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities ``(B, num_classes, H, W)``, float32 also under bfloat16 autocast."""
        return self.forward_batch(batch).float().softmax(1)
