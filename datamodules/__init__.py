"""Datamodules: datasets (what a sample is), layouts (where files are), datamodules (splits,
loaders), normalisation, and the embedded default data."""

import importlib

from datamodules.audio import AnimalSoundsDataModule, AudioFolderDataModule
from datamodules.classification import GeoClassificationDataModule
from datamodules.geobench import GeoBenchDataModule
from datamodules.landsat8 import Landsat8CloudDataModule
from datamodules.points import (
    ClassifiedLasDataModule,
    PointClassificationDataModule,
    PointSegmentationDataModule,
)
from datamodules.regression import GeoRegressionDataModule
from datamodules.samples import Sentinel2CoastDataModule, Sentinel2SwirDataModule, Sentinel2WaterDataModule
from datamodules.segmentation import GeoSegmentationDataModule
from datamodules.series import ForecastingDataModule, UCRDataModule
from datamodules.weather import (
    DownscalingDataModule,
    ERA5EnsembleForecastDataModule,
    EuropeT2mDownscalingDataModule,
    GriddedWeatherDataModule,
    WeatherForecastDataModule,
)

__all__ = [
    "AnimalSoundsDataModule",
    "AudioFolderDataModule",
    "ClassifiedLasDataModule",
    "DownscalingDataModule",
    "ERA5EnsembleForecastDataModule",
    "EuropeT2mDownscalingDataModule",
    "ForecastingDataModule",
    "GeoBenchDataModule",
    "GeoClassificationDataModule",
    "GeoRegressionDataModule",
    "GeoSceneDataModule",
    "GeoSegmentationDataModule",
    "GriddedWeatherDataModule",
    "Landsat8CloudDataModule",
    "PointClassificationDataModule",
    "PointSegmentationDataModule",
    "Sentinel2CoastDataModule",
    "Sentinel2SwirDataModule",
    "Sentinel2WaterDataModule",
    "TorchGeoDataModule",
    "UCRDataModule",
    "WeatherForecastDataModule",
]

# torchgeo (with geopandas, kornia) takes most of a second to import: only fits that use it pay
LAZY = {"GeoSceneDataModule": "datamodules.geo_scenes", "TorchGeoDataModule": "datamodules.torchgeo_data"}


def __getattr__(name: str) -> type:
    """The torchgeo-based datamodules, imported on first use (``datamodules.TorchGeoDataModule``)."""
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
