"""Datamodules: datasets (what a sample is), layouts (where files are), datamodules (splits,
loaders), normalisation, and the embedded default data."""

from datamodules.samples import Sentinel2WaterDataModule
from datamodules.segmentation import GeoSegmentationDataModule

__all__ = ["GeoSegmentationDataModule", "Sentinel2WaterDataModule"]
