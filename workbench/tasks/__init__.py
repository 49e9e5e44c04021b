"""Lightning tasks: one LightningModule per learning problem, sharing :class:`BaseTask`."""

from workbench.tasks.base import BaseTask
from workbench.tasks.pretrain import MAEPretrainTask
from workbench.tasks.segmentation import SegmentationTask

__all__ = ["BaseTask", "MAEPretrainTask", "SegmentationTask"]
