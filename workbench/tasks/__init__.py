"""Lightning tasks: one LightningModule per learning problem, sharing :class:`BaseTask`."""

from workbench.tasks.base import BaseTask
from workbench.tasks.classification import ClassificationTask
from workbench.tasks.imputation import ImputationTask
from workbench.tasks.pretrain import MAEPretrainTask
from workbench.tasks.regression import RegressionTask
from workbench.tasks.segmentation import SegmentationTask

__all__ = ["BaseTask", "ClassificationTask", "ImputationTask", "MAEPretrainTask", "RegressionTask", "SegmentationTask"]
