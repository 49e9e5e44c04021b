"""Shared test fixtures: tiny GeoTIFFs written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin


def write_geotiff(
    path: Path,
    array: np.ndarray,
    *,
    crs: str = "EPSG:32618",
    transform: rasterio.Affine | None = None,
    nodata: float | None = None,
) -> Path:
    """Write ``array`` ``(C, H, W)`` as a GeoTIFF (10 m pixels by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    transform = transform or from_origin(435730.0, 4179460.0, 10.0, 10.0)
    with rasterio.open(
        path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
        dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata,
    ) as dst:
        dst.write(array)
    return path


def smooth_field(rng: np.random.Generator, size: int, cells: int = 2) -> np.ndarray:
    """A smooth random field ``(size, size)`` in [0, 1]: coarse noise upsampled."""
    coarse = rng.random((cells, cells))
    reps = -(-size // cells)
    return np.kron(coarse, np.ones((reps, reps)))[:size, :size]


def make_segmentation_chips(root: Path, n: int = 8, size: int = 32, bands: int = 6, seed: int = 0) -> dict[str, str]:
    """A tiny glob-layout dataset whose mask is learnable: water where band 1 > band 3.

    Bands are smooth fields in [0, 1] (float32) plus a little noise; returns the root and the
    ``images``/``masks`` patterns.
    """
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = np.stack([smooth_field(rng, size) for _ in range(bands)]).astype(np.float32)
        image += rng.normal(0, 0.02, image.shape).astype(np.float32)
        mask = (image[1] > image[3]).astype(np.uint8)[None]
        write_geotiff(root / "images" / f"chip_{i:03d}.tif", image)
        write_geotiff(root / "masks" / f"chip_{i:03d}.tif", mask)
    return {"root": str(root), "images": "images/*.tif", "masks": "masks/*.tif"}
