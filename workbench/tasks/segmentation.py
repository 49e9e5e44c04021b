"""Semantic segmentation: per-pixel classes from multispectral (multi-temporal) rasters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from workbench.errors import UserInputError
from workbench.tasks.dense import DenseTask


class SegmentationTask(DenseTask):
    """Backbone → neck → decoder → head trained with cross-entropy.

    Batches also hold ``mask`` ``(B, H, W)`` (int64, ``ignore_index`` where unlabelled). Logs
    loss, per-class IoU, mIoU, macro F1 and accuracy as ``{train,val,test}/<name>``.
    """

    output_kind = "classes"

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
            **kwargs: :class:`DenseTask` arguments (decoder, decoder_channels, head_dropout) and
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
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)

    def metrics(self, stage: str) -> MetricCollection:
        common = {"num_classes": self.num_classes, "ignore_index": self.ignore_index}
        return MetricCollection(
            {
                "IoU": MulticlassJaccardIndex(average="none", **common),
                "mIoU": MulticlassJaccardIndex(average="macro", **common),
                "F1": MulticlassF1Score(average="macro", **common),
                "accuracy": MulticlassAccuracy(average="micro", **common),
            },
            prefix=f"{stage}/",
        )

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self.forward_batch(batch)
        loss = self.loss(logits, batch["mask"])
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=logits.shape[0])
        getattr(self, f"{stage}_metrics").update(logits.argmax(1), batch["mask"])
        return loss

    def _log_metrics(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()
        per_class = values.pop(f"{stage}/IoU")
        values.update({f"{stage}/IoU_{n}": v for n, v in zip(self.class_names, per_class)})
        self.log_dict(values, prog_bar=stage != "train")
        metrics.reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities ``(B, num_classes, H, W)``."""
        return self.forward_batch(batch).softmax(1)
