"""Lightning tasks: one LightningModule per learning problem, sharing :class:`BaseTask`."""

from workbench.tasks.base import BaseTask
from workbench.tasks.classification import ClassificationTask
from workbench.tasks.forecasting import ForecastingTask
from workbench.tasks.imputation import ImputationTask
from workbench.tasks.point_segmentation import PointSegmentationTask
from workbench.tasks.pretrain import MAEPretrainTask
from workbench.tasks.regression import RegressionTask
from workbench.tasks.scalar_regression import ScalarRegressionTask
from workbench.tasks.segmentation import SegmentationTask
from workbench.tasks.series_imputation import SeriesImputationTask
from workbench.tasks.weather import DownscalingTask, WeatherForecastTask

__all__ = [
    "BaseTask", "ClassificationTask", "DownscalingTask", "ForecastingTask", "ImputationTask", "MAEPretrainTask",
    "PointSegmentationTask", "RegressionTask", "ScalarRegressionTask", "SegmentationTask", "SeriesImputationTask",
    "WeatherForecastTask",
]
