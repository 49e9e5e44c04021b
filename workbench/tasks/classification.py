"""Scene classification: one class (or a set of labels) per chip, from a pooled backbone."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from workbench.errors import UserInputError
from workbench.model import EncoderClassifier
from workbench.tasks.base import BaseTask


class ClassificationTask(BaseTask):
    """Backbone → global average pool → linear head.

    Batches hold ``image`` and ``label``: ``(B,)`` int64 classes (single-label, cross-entropy) or
    ``(B, K)`` 0/1 floats (``multi_label``, binary cross-entropy per label). Metrics: accuracy
    and macro F1 (+ mAP for multi-label) as ``{train,val,test}/<name>``.
    """

    def __init__(
        self,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        multi_label: bool = False,
        head_dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_classes: number of classes or labels; linked from the datamodule by the CLI.
            class_names: one name per class; linked from the datamodule.
            multi_label: several labels per chip (sigmoid outputs) instead of one class.
            head_dropout: dropout before the linear layer.
            **kwargs: :class:`BaseTask` arguments (backbone, pretrained, strategy, optimizer, ...).
        """
        names = class_names or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise UserInputError(f"class_names has {len(names)} names but num_classes is {num_classes}")
        super().__init__(**kwargs)
        self.class_names = names
        self.multi_label = multi_label
        self.setup_model()
        self.loss = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return EncoderClassifier(backbone, self.hparams.num_classes, self.hparams.head_dropout)

    def metrics(self, stage: str) -> MetricCollection:
        n = self.hparams.num_classes
        if self.multi_label:
            metrics = {"accuracy": MultilabelAccuracy(n), "F1": MultilabelF1Score(n, average="macro"),
                       "mAP": MultilabelAveragePrecision(n)}
        else:
            metrics = {"accuracy": MulticlassAccuracy(n, average="micro"), "F1": MulticlassF1Score(n, average="macro")}
        return MetricCollection(metrics, prefix=f"{stage}/")

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self.forward_batch(batch)
        label = batch["label"]
        loss = self.loss(logits, label.float() if self.multi_label else label)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=logits.shape[0])
        getattr(self, f"{stage}_metrics").update(logits.detach(), label.long() if self.multi_label else label)
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities ``(B, K)`` (softmax, or per-label sigmoid for multi-label)."""
        logits = self.forward_batch(batch)
        return logits.sigmoid() if self.multi_label else logits.softmax(1)
