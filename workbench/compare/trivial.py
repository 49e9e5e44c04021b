"""The trivial baseline of a comparison: one constant answer for every input, fitted in closed form
to the training targets and scored by the task's own validation and test metrics.

Class targets get the log class frequencies of the training split (every pixel, point or image
gets the majority class; cross-entropy's best constant), 0/1 label vectors the log-odds of each
label (a label is predicted where more than half the training samples carry it), values the mean
of the labelled training targets (squared error's best constant).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workbench.compare.arms import TRIVIAL
from workbench.errors import UserInputError


def class_logits(targets: Iterable[Tensor], num_classes: int, multi_label: bool) -> Tensor:
    """Constant logits ``(K,)`` from training targets: class indices ``(B, ...)`` (values outside
    ``0..K-1``, such as ``ignore_index``, are not counted) or 0/1 label vectors ``(B, K)``."""
    counts, seen = torch.zeros(num_classes, dtype=torch.float64), 0
    for target in targets:
        if multi_label:
            labels = target.reshape(-1, num_classes).double()
            counts, seen = counts + labels.sum(0), seen + len(labels)
        else:
            labelled = target[(target >= 0) & (target < num_classes)]
            counts += torch.bincount(labelled.flatten(), minlength=num_classes).double()
            seen += labelled.numel()
    if seen == 0:
        raise UserInputError(f"--strategies {TRIVIAL}: the training split has no labelled sample to count")
    frequency = (counts / seen).clamp(1e-9, 1 - 1e-9)
    return (frequency.log() - (1 - frequency).log() if multi_label else frequency.log()).float()


def target_mean(targets: Iterable[Tensor]) -> Tensor:
    """The mean ``(1,)`` of the finite values of training targets (NaN: unlabelled)."""
    total, seen = 0.0, 0
    for target in targets:
        labelled = target[target.isfinite()].double()
        total, seen = total + labelled.sum().item(), seen + labelled.numel()
    if seen == 0:
        raise UserInputError(f"--strategies {TRIVIAL}: the training split has no labelled target")
    return torch.tensor([total / seen], dtype=torch.float32)


class ConstantOutput:
    """A task's ``forward_batch`` replaced by ``value`` ``(K,)`` for every input, shaped by the
    batch's ``key`` target ``(B, *S)``: ``(B, K, *S)`` (pixels, points, or ``(B, K)`` for one label
    or value per sample); ``(B, K)`` for 0/1 label vectors (``per_sample``)."""

    def __init__(self, value: Tensor, key: str, per_sample: bool = False) -> None:
        self.value, self.key, self.per_sample = value, key, per_sample

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        target = batch[self.key]
        spatial = () if self.per_sample else target.shape[1:]
        return self.value.to(target.device).view(1, -1, *[1] * len(spatial)).expand(len(target), -1, *spatial)


def constant_output(task: Any, train_batches: Iterable[dict[str, Tensor]]) -> ConstantOutput:
    """The best constant output of ``task`` for the targets of ``train_batches``."""
    from workbench.tasks import ClassificationTask, PointSegmentationTask, SegmentationTask
    from workbench.tasks.targets import RegressionTargets

    if isinstance(task, RegressionTargets):  # the model predicts normalized values
        return ConstantOutput(task.normalized(target_mean(b["target"] for b in train_batches)), "target")
    if isinstance(task, SegmentationTask | PointSegmentationTask):
        return ConstantOutput(class_logits((b["mask"] for b in train_batches), task.hparams.num_classes, False), "mask")
    if isinstance(task, ClassificationTask):
        logits = class_logits((b["label"] for b in train_batches), task.hparams.num_classes, task.multi_label)
        return ConstantOutput(logits, "label", per_sample=task.multi_label)
    raise UserInputError(f"--strategies {TRIVIAL}: defined for class and value targets (segmentation, "
                         f"classification, regression), not {type(task).__name__}; forecasting, imputation and "
                         "weather tasks log their own reference scores (naive forecast, mean fill, persistence, "
                         "climatology, bicubic) beside their metrics")


def trivial_results(cli_args: list[str]) -> dict[str, Any]:
    """Build the model, data and trainer of a fit config (``cli_args``: ``--config`` and overrides, as
    ``workbench fit`` takes them), fit the constant to the training split, validate and test it like
    a trained arm, and write ``results.json`` in the run folder; returns its content."""
    from workbench.atomic import write_json
    from workbench.cli import lightning_cli

    cli = lightning_cli(cli_args, run=False)
    task, data, trainer = cli.model, cli.datamodule, cli.trainer
    data.prepare_data()
    data.setup("fit")
    if hasattr(task, "fill_target_stats"):  # regression statistics fit would take from the data at its start
        task.fill_target_stats(data)
    constant = constant_output(task, data.train_dataloader())
    task.forward_batch = constant
    val = trainer.validate(task, datamodule=data)
    test = trainer.test(task, datamodule=data)
    results = {
        "strategy": TRIVIAL,
        "summary": f"{TRIVIAL}: constant output {[round(v, 4) for v in constant.value.tolist()]} from the training targets",
        "trainable": 0, "total": constant.value.numel(), "backbone_trainable": 0, "backbone_total": 0,
        "best_checkpoint": None, "val": val[0] if val else {}, "test": test[0] if test else {},
    }  # fmt: skip
    write_json(Path(trainer.log_dir) / "results.json", results)
    return results


if __name__ == "__main__":  # `workbench compare` runs the trivial arm in its own process, as every arm
    import sys

    from workbench.cli import explain_errors

    sys.exit(explain_errors(lambda: trivial_results(sys.argv[1:])))
