"""Semantic segmentation: per-pixel classes from multispectral (multi-temporal) rasters."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from workbench.errors import UserInputError
from workbench.model import build_encoder_decoder
from workbench.tasks.base import BaseTask

BACKBONE_INPUTS = ("temporal_coords", "location_coords")


class SegmentationTask(BaseTask):
    """Backbone → neck → decoder → head trained with cross-entropy.

    Batches are dicts with ``image`` ``(B, C, [T,] H, W)`` and ``mask`` ``(B, H, W)`` (int64,
    ``ignore_index`` where unlabelled), optionally ``temporal_coords`` ``(B, T, 2)`` and
    ``location_coords`` ``(B, 2)``. Logs loss, per-class IoU, mIoU, macro F1 and accuracy
    as ``{train,val,test}/<name>``.
    """

    def __init__(
        self,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        decoder: Literal["uper", "fcn"] = "uper",
        decoder_channels: int = 256,
        head_dropout: float = 0.1,
        ignore_index: int = 255,
        class_weights: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_classes: number of classes; linked from the datamodule by the CLI.
            class_names: names used in metric keys (``val/IoU_water``); linked from the datamodule.
            decoder: ``uper`` (UPerNet) or ``fcn``.
            decoder_channels: width of the decoder.
            head_dropout: dropout before the 1×1 classification conv.
            ignore_index: mask value excluded from the loss and the metrics.
            class_weights: optional cross-entropy weight per class.
            **kwargs: :class:`BaseTask` arguments (backbone, pretrained, strategy, optimizer, ...).
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
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.class_names = names
        self.setup_model()
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        self.train_metrics = self._metrics("train", ignore_index)
        self.val_metrics = self._metrics("val", ignore_index)
        self.test_metrics = self._metrics("test", ignore_index)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        hp = self.hparams
        return build_encoder_decoder(
            backbone,
            decoder=hp.decoder,
            decoder_channels=hp.decoder_channels,
            num_classes=hp.num_classes,
            head_dropout=hp.head_dropout,
        )

    def _metrics(self, stage: str, ignore_index: int) -> MetricCollection:
        common = {"num_classes": self.num_classes, "ignore_index": ignore_index}
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
        logits = self(batch["image"], **{k: batch[k] for k in BACKBONE_INPUTS if k in batch})
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

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities ``(B, num_classes, H, W)``."""
        logits = self(batch["image"], **{k: batch[k] for k in BACKBONE_INPUTS if k in batch})
        return logits.softmax(1)
