"""Whole scenes (not chips) through torchgeo: GeoTIFFs in any CRS / resolution read as one
``RasterDataset`` on a common grid, labels from label rasters or vector polygons, random chips
for training and grid chips for validation and testing, over spatially separate regions."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
import torch
from pyproj.exceptions import CRSError
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from torch import Tensor
from torch.utils.data import DataLoader
from torchgeo.datasets import GeoDataset, IntersectionDataset, RasterDataset, VectorDataset
from torchgeo.datasets.splits import roi_split
from torchgeo.samplers import GeoSampler, GridGeoSampler, RandomGeoSampler

from datamodules.bands import select_bands
from datamodules.normalize import Preprocessor
from datamodules.raster import check_classes
from datamodules.segmentation import GeoSegmentationDataModule
from datamodules.splits import SPLITS, SplitDataModule, ratio_split, seeded_fraction
from workbench.errors import UserInputError

T = TypeVar("T")


def matching_rasters(root: Path, pattern: str, field: str) -> list[Path]:
    """The files of ``root`` matching the glob ``pattern`` (sorted), each a georeferenced raster;
    no match, a file that is no raster or one without a CRS is an error naming ``field``."""
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise UserInputError(f"data.{field}: no files match {root / pattern}: check data.root and the pattern")
    for path in files:
        try:
            with rasterio.open(path) as src:
                crs = src.crs
        except RasterioError as err:
            raise UserInputError(f"data.{field}: {path} could not be opened as a raster ({err}): replace or "
                                 "remove it") from None
        if crs is None:
            raise UserInputError(f"data.{field}: {path} has no CRS: georeference it (e.g. gdal_edit.py -a_srs "
                                 "EPSG:32618) or remove it")
    return files


class SceneRasters(RasterDataset):
    """GeoTIFF scenes warped on the fly to one ``crs`` and ``res`` (torchgeo ``WarpedVRT`` + merge).

    ``is_image``: samples hold ``image`` ``(L, H, W)`` float32 of the 0-based ``layers`` (None: all);
    else ``mask`` ``(H, W)`` int64 of band 1, resampled nearest.
    """

    def __init__(self, files: list[Path], crs: CRS | None, res: float | None, layers: list[int] | None,
                 is_image: bool) -> None:
        self.is_image = is_image
        super().__init__(paths=[str(f) for f in files], crs=crs, res=res)
        self.band_indexes = [i + 1 for i in layers] if layers is not None else None


def check_label_column(path: Path, layer: str | int | None, field: str, num_classes: int, ignore_index: int) -> None:
    """``field`` must be a column of ``path`` holding classes ``0..num_classes-1`` or ``ignore_index``."""
    try:
        table = gpd.read_file(path, layer=layer, ignore_geometry=True)
    except (OSError, ValueError) as err:
        raise UserInputError(f"data.vector_labels: {path} could not be read as vector data ({err})") from None
    if field not in table.columns:
        raise UserInputError(f"data.label_field: {path} has no column {field!r}; its columns are "
                             f"{list(table.columns)}: set data.label_field to the class column")
    values = pd.to_numeric(table[field], errors="coerce")
    known = values.notna() & (values % 1 == 0) & (values.between(0, num_classes - 1) | (values == ignore_index))
    bad = sorted(set(table[field][~known].astype(str)))
    if bad:
        raise UserInputError(f"data.label_field: column {field!r} of {path} has values {bad[:10]} that are not "
                             f"classes 0..{num_classes - 1} or ignore_index {ignore_index}: fix the column "
                             "or data.num_classes")


@dataclass
class ToBatchKeys:
    """A torchgeo sample → our keys: ``image`` ``(C, H, W)`` normalised (0 where nodata) and
    ``mask`` ``(H, W)`` int64, ``ignore_index`` where the image is nodata or the label raster
    has its own nodata. Labels outside ``0..num_classes-1`` are an error naming ``label_source``."""

    preprocess: Preprocessor
    nodata: float | None
    label_nodata: float | None
    num_classes: int
    ignore_index: int
    label_source: str

    def __call__(self, sample: dict[str, Any]) -> dict[str, Tensor]:
        image, valid = self.preprocess(sample["image"].numpy(), self.nodata)
        mask = sample["mask"].long()
        if self.label_nodata is not None:
            mask = mask.masked_fill(mask == self.label_nodata, self.ignore_index)
        check_classes(mask, self.num_classes, self.ignore_index, self.label_source, "data.num_classes or data.ignore_index")
        return {"image": image, "mask": mask.masked_fill(~valid, self.ignore_index)}


class GridChips:
    """Raw image chips of a scene dataset at ``queries`` (a :class:`~datamodules.normalize.RawChips`,
    for band statistics)."""

    def __init__(self, scenes: GeoDataset, queries: list[tuple[slice, slice, slice]], nodata: float | None) -> None:
        self.scenes, self.queries, self.nodata = scenes, queries, nodata

    def __len__(self) -> int:
        return len(self.queries)

    def read_layers(self, index: int) -> tuple[np.ndarray, float | None]:
        """Selected layers ``(L, H, W)`` of chip ``index`` and the nodata value in force."""
        return self.scenes[self.queries[index]]["image"].numpy(), self.nodata

    def first_readable(self, index: int, read: Callable[[int], T]) -> T:
        """``read(index)``: torchgeo has checked every file when it indexed the scenes."""
        return read(index)


def grid_cells(footprints: gpd.GeoSeries, side: float, origin: tuple[float, float]) -> list[shapely.Polygon]:
    """Squares of ``side`` on a grid through ``origin`` that overlap a footprint (scenes far apart
    do not make a grid over the empty space between them)."""
    x0, y0 = origin
    cells: set[tuple[int, int]] = set()
    for xmin, ymin, xmax, ymax in footprints.bounds.to_numpy():
        cols = range(math.floor((xmin - x0) / side), math.ceil((xmax - x0) / side))
        rows = range(math.floor((ymin - y0) / side), math.ceil((ymax - y0) / side))
        cells |= {(c, r) for c in cols for r in rows}
    return [shapely.box(x0 + c * side, y0 + r * side, x0 + (c + 1) * side, y0 + (r + 1) * side) for c, r in sorted(cells)]


def snap_inward(footprints: gpd.GeoSeries, origin: tuple[float, float], res: tuple[float, float]) -> gpd.GeoSeries:
    """Footprints → the largest boxes inside them whose edges lie on the pixel grid through
    ``origin``, so the samplers' chips read whole pixels of that grid (no resampling); footprints
    narrower than a pixel become empty."""
    (x0, y0), (xres, yres) = origin, res
    bounds = footprints.bounds.to_numpy()
    xmin = x0 + np.ceil((bounds[:, 0] - x0) / xres - 1e-6) * xres
    ymin = y0 + np.ceil((bounds[:, 1] - y0) / yres - 1e-6) * yres
    xmax = x0 + np.floor((bounds[:, 2] - x0) / xres + 1e-6) * xres
    ymax = y0 + np.floor((bounds[:, 3] - y0) / yres + 1e-6) * yres
    boxes = [shapely.box(*b) if b[2] > b[0] and b[3] > b[1] else shapely.Polygon() for b in zip(xmin, ymin, xmax, ymax)]
    return gpd.GeoSeries(boxes, index=footprints.index, crs=footprints.crs)


class GeoSceneDataModule(SplitDataModule):
    """Scenes → chips ``image`` ``(B, C, H, W)`` float (normalised), ``mask`` ``(B, H, W)`` int64.

    Images: the GeoTIFFs matching ``images`` under ``root``, in any CRS and resolution, read as one
    torchgeo ``RasterDataset`` warped to ``crs``/``res`` (default: the first file's). Labels: label
    rasters (``labels``) or vector polygons (``vector_labels``, rasterised on the chip's grid; the
    ``label_field`` column holds the class, pixels outside every polygon are class 0), joined to the
    images with a torchgeo ``IntersectionDataset``. Training draws ``chips_per_epoch`` random
    ``chip_size`` chips (``RandomGeoSampler``), val/test read a grid of chips (``GridGeoSampler``).
    Splits are spatially separate: squares of ``split_block × chip_size`` pixels assigned to
    train/val/test by seeded ``split_ratios``, or the boxes of ``split_rois``.
    """

    num_frames = 1  # read by the borrowed GeoSegmentationDataModule.preprocessor

    def __init__(
        self,
        root: str,
        images: str,
        labels: str | None = None,
        vector_labels: str | None = None,
        label_field: str | None = None,
        vector_layer: str | int | None = None,
        file_bands: list[str] | None = None,
        bands: list[str | int] | None = None,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        stats_file: str | None = None,
        nodata: float | None = None,
        ignore_index: int = 255,
        crs: str | None = None,
        res: float | None = None,
        chip_size: int = 64,
        chips_per_epoch: int | None = None,
        split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_block: int = 4,
        split_rois: dict[str, list[float]] | None = None,
        seed: int = 0,
        train_fraction: float = 1.0,
        augmentations: list[dict[str, Any]] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        """
        Args:
            root: folder the ``images`` / ``labels`` / ``vector_labels`` paths are relative to
                (``~`` is expanded, as in ``stats_file``).
            images: glob of the image GeoTIFFs, e.g. ``scenes/*.tif`` (mixed CRSs allowed).
            labels: glob of label GeoTIFFs (band 1: class per pixel; their nodata → ignore_index).
            vector_labels: a geopackage / shapefile of label polygons (instead of ``labels``).
            label_field: the column of ``vector_labels`` holding each polygon's class.
            vector_layer: layer of a multi-layer geopackage (name or index; default: the first).
            file_bands: names of the image files' bands in order.
            bands: bands fed to the model, by name or 0-based index; None: all.
            num_classes: classes in the labels (values ``0..num_classes-1``).
            class_names: one name per class.
            mean: per selected band, in file units; with ``std``, or use ``stats_file``.
            std: per selected band.
            stats_file: band statistics JSON; computed from the training chips when missing.
            nodata: image nodata value; default: the first image's, else 0 (what torchgeo
                fills where no scene covers a chip). Such pixels are ignore_index in the mask.
            ignore_index: mask value excluded from loss and metrics.
            crs: CRS every scene is warped to, e.g. ``EPSG:32618``; default: the first image's.
            res: pixel size in ``crs`` units; default: the first image's (once warped).
            chip_size: chip side in pixels.
            chips_per_epoch: random training chips per epoch; default: about as many as tile the
                training area.
            split_ratios: train/val/test fractions of the split squares.
            split_block: side of a split square, in chips.
            split_rois: ``{train, val, test}`` → ``[xmin, ymin, xmax, ymax]`` in ``crs`` (boxes
                must not overlap); replaces the square split.
            seed: seed of the split, of the ``train_fraction`` subset and of the training chips.
            train_fraction: train on this seeded fraction of the training squares.
            augmentations: kornia transforms on training batches (see :mod:`datamodules.augment`).
            batch_size: chips per batch.
            num_workers: DataLoader worker processes.
            pin_memory: pin batches for faster host-to-GPU copies; None: when the trainer runs on a GPU.
        """
        super().__init__(batch_size, num_workers, pin_memory, train_fraction, seed, augmentations)
        if (labels is None) == (vector_labels is None):
            raise UserInputError("set one of data.labels (label rasters glob) or data.vector_labels (polygons file)")
        if vector_labels is not None and label_field is None:
            raise UserInputError("data.label_field: name the column of data.vector_labels that holds the class")
        if class_names is not None and len(class_names) != num_classes:
            raise UserInputError(f"data.class_names has {len(class_names)} names for num_classes={num_classes}")
        if abs(sum(split_ratios) - 1.0) > 1e-6:
            raise UserInputError(f"data.split_ratios {list(split_ratios)} must sum to 1")
        if split_rois is not None and set(split_rois) != set(SPLITS):
            raise UserInputError(f"data.split_rois needs boxes for {list(SPLITS)}, got {sorted(split_rois)}")
        self.root = Path(root).expanduser()
        self.images, self.labels = images, labels
        self.vector_labels, self.label_field, self.vector_layer = vector_labels, label_field, vector_layer
        self.file_bands = file_bands
        self.layer_indices, self.bands = select_bands(bands, file_bands, "data.bands")
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.mean, self.std = mean, std
        self.stats_file = str(Path(stats_file).expanduser()) if stats_file else None
        self.ignore_index = ignore_index
        try:
            self.crs = CRS.from_user_input(crs) if crs is not None else None
        except (CRSError, RasterioError) as err:
            raise UserInputError(f"data.crs {crs!r} is not a CRS ({err}): use e.g. 'EPSG:32618'") from None
        self.res = res
        self.chip_size = chip_size
        self.chips_per_epoch = chips_per_epoch
        self.split_ratios, self.split_block, self.split_rois = split_ratios, split_block, split_rois
        self.image_files = matching_rasters(self.root, images, "images")
        with rasterio.open(self.image_files[0]) as src:
            self.file_band_count, first_nodata = src.count, src.nodata
        self.nodata = nodata if nodata is not None else first_nodata if first_nodata is not None else 0.0

    # GeoSegmentationDataModule's band statistics and normalisation, which read mean, std,
    # stats_file, bands, num_bands and num_frames.
    preprocessor = GeoSegmentationDataModule.preprocessor
    prepare_data = GeoSegmentationDataModule.prepare_data

    @property
    def num_bands(self) -> int:
        """Bands fed to the model."""
        return len(self.layer_indices) if self.layer_indices is not None else self.file_band_count

    # --- scenes and splits --------------------------------------------------------------------

    @cached_property
    def scenes(self) -> IntersectionDataset:
        """Images ∩ labels on one grid (CRS and resolution of ``crs``/``res`` or the first image)."""
        images = SceneRasters(self.image_files, self.crs, self.res, self.layer_indices, True)
        if self.labels is not None:
            labels: GeoDataset = SceneRasters(matching_rasters(self.root, self.labels, "labels"), images.crs,
                                              images.res, None, False)
        else:
            path = self.root / self.vector_labels
            if not path.is_file():
                raise UserInputError(f"data.vector_labels: {path} does not exist")
            check_label_column(path, self.vector_layer, self.label_field, self.num_classes, self.ignore_index)
            labels = VectorDataset(paths=[str(path)], crs=images.crs, res=images.res, label_name=self.label_field,
                                   layer=self.vector_layer)
        try:
            return IntersectionDataset(images, labels)
        except RuntimeError:
            raise UserInputError(f"the labels ({self.labels or self.vector_labels}) do not overlap the images "
                                 f"({self.images}) once both are in {images.crs}") from None

    @cached_property
    def label_nodata(self) -> float | None:
        """The first label raster's nodata value (None for polygons or when it declares none)."""
        if self.labels is None:
            return None
        with rasterio.open(self.scenes.datasets[1].index.filepath.iloc[0]) as src:
            return src.nodata

    @cached_property
    def split_scenes(self) -> dict[str, GeoDataset]:
        """``scenes`` restricted to each split's region; the regions of two splits never overlap."""
        scenes = self.scenes
        first = scenes.datasets[0].index.geometry.iloc[0].bounds
        origin = (first[0], first[3])  # upper-left corner of the first image: its pixel grid
        if self.split_rois is not None:
            try:
                parts = roi_split(scenes, [shapely.box(*self.split_rois[s]) for s in SPLITS])
            except (ValueError, TypeError) as err:
                raise UserInputError(f"data.split_rois: {err} (boxes are [xmin, ymin, xmax, ymax] in "
                                     f"{scenes.crs})") from None
            splits = dict(zip(SPLITS, parts))
        else:
            side = self.split_block * self.chip_size * max(scenes.res)
            cells = roi_split(scenes, grid_cells(scenes.index.geometry, side, origin))
            assigned = ratio_split(len(cells), self.split_ratios, self.seed)
            splits = {}
            for split in SPLITS:
                splits[split] = copy.copy(scenes)
                splits[split].index = pd.concat([cells[i].index for i in assigned[split]] or [scenes.index.iloc[:0]])
        for part in splits.values():
            part.index = part.index.set_geometry(snap_inward(part.index.geometry, origin, scenes.res))
            part.index = part.index[~part.index.geometry.is_empty]
        train = splits["train"]
        train.index = train.index.iloc[seeded_fraction(range(len(train.index)), self.train_fraction, self.seed)]
        return splits

    def sampler(self, split: str) -> GeoSampler:
        """Random chips for training, a grid of chips for val/test."""
        scenes = self.split_scenes[split]
        if split == "train":
            generator = torch.Generator().manual_seed(self.seed)
            sampler: GeoSampler = RandomGeoSampler(scenes, self.chip_size, self.chips_per_epoch, generator=generator)
        else:
            sampler = GridGeoSampler(scenes, self.chip_size, self.chip_size)
        if len(sampler) == 0:
            raise UserInputError(f"the {split} split holds no {self.chip_size}-pixel chip: lower data.chip_size, "
                                 "raise data.split_block or change data.split_ratios / data.split_rois")
        return sampler

    # --- datasets and loaders -----------------------------------------------------------------

    def dataset(self, split: str, normalize: bool = True) -> GeoDataset | GridChips:
        """The scenes of ``split`` serving our keys; ``normalize=False``: the raw grid chips of
        ``split`` (for band statistics)."""
        scenes = self.split_scenes[split]
        if not normalize:
            return GridChips(scenes, list(GridGeoSampler(scenes, self.chip_size, self.chip_size)), self.nodata)
        served = copy.copy(scenes)
        served.transforms = ToBatchKeys(self.preprocessor(), self.nodata, self.label_nodata, self.num_classes,
                                        self.ignore_index, f"data.labels {self.root / self.labels}" if self.labels else "")
        return served

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            sampler=self.sampler(split),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_batches,
        )
