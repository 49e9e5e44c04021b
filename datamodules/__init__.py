"""Datamodules: datasets (what a sample is), layouts (where files are), datamodules (splits,
loaders), normalisation, and the embedded default data."""

from datamodules.classification import GeoClassificationDataModule
from datamodules.regression import GeoRegressionDataModule
from datamodules.samples import Sentinel2CoastDataModule, Sentinel2SwirDataModule, Sentinel2WaterDataModule
from datamodules.segmentation import GeoSegmentationDataModule

__all__ = [
    "GeoClassificationDataModule", "GeoRegressionDataModule", "GeoSegmentationDataModule",
    "Sentinel2CoastDataModule", "Sentinel2SwirDataModule", "Sentinel2WaterDataModule",
]
