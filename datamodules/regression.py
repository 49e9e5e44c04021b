"""Pixel-wise regression data: the segmentation layouts with continuous targets."""

from __future__ import annotations

from typing import Any

from datamodules.segmentation import GeoSegmentationDataModule


class GeoRegressionDataModule(GeoSegmentationDataModule):
    """Image/target GeoTIFF chips → ``image`` ``(B, C, [T,] H, W)``, ``target`` ``(B, H, W)``
    float32 with NaN where there is no label (sparse labels, nodata in the target or the image).

    Same layouts, band selection, normalisation and splits as :class:`GeoSegmentationDataModule`;
    the ``masks`` files hold values instead of classes (``num_classes`` etc. are unused).
    """

    def __init__(self, target_band: int = 1, **kwargs: Any) -> None:
        """
        Args:
            target_band: 1-based band of the target files holding the values.
            **kwargs: :class:`GeoSegmentationDataModule` arguments (root, images, masks, bands, ...).
        """
        super().__init__(**kwargs)
        self.target_band = target_band
