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
from workbench.run_plots import Panel
from workbench.tasks.base import BaseTask, ModelInput, StepOutput


class ClassificationTask(BaseTask):
    """Backbone → global average pool → linear head.

    Batches hold ``image`` and ``label``: ``(B,)`` int64 classes (single-label, cross-entropy) or
    ``(B, K)`` 0/1 floats (``multi_label``, binary cross-entropy per label). Metrics: accuracy
    and macro F1 (+ mAP for multi-label) as ``{train,val,test}/<name>``. The input is the batch's
    ``image``, ``series`` or ``points``, whichever the datamodule gives.
    """

    inputs = tuple(ModelInput)

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
        self.class_names = names
        self.multi_label = multi_label
        super().__init__(**kwargs)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return EncoderClassifier(backbone, self.hparams.num_classes, self.hparams.head_dropout)

    def configure_losses(self) -> None:
        self.loss = nn.BCEWithLogitsLoss() if self.multi_label else nn.CrossEntropyLoss()

    def metrics(self) -> MetricCollection:
        n = self.hparams.num_classes
        if self.multi_label:
            return MetricCollection({"accuracy": MultilabelAccuracy(n), "F1": MultilabelF1Score(n, average="macro"),
                                     "mAP": MultilabelAveragePrecision(n)})
        return MetricCollection({"accuracy": MulticlassAccuracy(n, average="micro"),
                                 "F1": MulticlassF1Score(n, average="macro")})

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Logits ``(B, K)`` against ``label`` ``(B,)`` classes or ``(B, K)`` 0/1 labels."""
        logits = self.forward_batch(batch)
        label = batch["label"]
        if self.multi_label:
            return StepOutput(self.loss(logits, label.float()), logits, label.long())
        return StepOutput(self.loss(logits, label), logits, label)

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The input (image, spectrogram, series or points), titled with the true and the predicted
        class (multi-label: the labels set and those predicted with probability over 0.5)."""
        logits, label = step.preds[index], step.target[index]
        if self.multi_label:
            true, pred = (", ".join(self.class_names[k] for k in chosen.nonzero()[:, 0]) or "none"
                          for chosen in (label > 0, logits > 0))
        else:
            true, pred = self.class_names[int(label)], self.class_names[int(logits.argmax())]
        return [self.input_panel(batch, index, f"true: {true} / predicted: {pred}")]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities ``(B, K)`` (softmax, or per-label sigmoid for multi-label), float32
        also when the model computes in bfloat16."""
        logits = self.forward_batch(batch).float()
        return logits.sigmoid() if self.multi_label else logits.softmax(1)
