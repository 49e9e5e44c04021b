"""LightningDataModule for GeoTIFF segmentation chips in the supported on-disk layouts."""

from __future__ import annotations

import logging
import random
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import rasterio
from rasterio.errors import RasterioError

from datamodules.bands import HLS_BANDS, SENTINEL2_BANDS, select_bands
from datamodules.layouts import SPLITS, burn_scars_pairs, crop_classification_pairs, glob_pairs, sen1floods11_pairs
from datamodules.normalize import Preprocessor, load_band_stats, write_band_stats
from datamodules.raster import BadFiles, Chip, ChipDataset, grid_windows
from datamodules.scenes import SceneSpec
from datamodules.splits import SplitDataModule, seeded_fraction
from workbench.errors import UserInputError

log = logging.getLogger(__name__)
Layout = Literal["glob", "sen1floods11", "burn_scars", "crop_classification"]
LAYOUT_BANDS: dict[str, tuple[str, ...]] = {
    "sen1floods11": SENTINEL2_BANDS, "burn_scars": HLS_BANDS, "crop_classification": HLS_BANDS}
# applied in order: crop classification's 0 (no data) → 255 first, then classes 1..13 → 0..12
LAYOUT_LABEL_MAPS: dict[str, dict[int, int]] = {
    "sen1floods11": {-1: 255}, "burn_scars": {-1: 255},
    "crop_classification": {0: 255, **{k: k - 1 for k in range(1, 14)}}}


class GeoSegmentationDataModule(SplitDataModule):
    """Image/mask GeoTIFF chips → batches of ``image`` ``(B, C, [T,] H, W)``, ``mask`` ``(B, H, W)``.

    Layouts: ``glob`` (``images`` + ``masks`` patterns), ``sen1floods11``, ``burn_scars`` and
    ``crop_classification`` (official folder and split-file layouts; crop classification's
    18-band chips are 3 frames of 6 bands: set ``num_frames: 3``). With ``chip_size``, each file is cut into a grid of
    windows read lazily with rasterio. Without split files, chips are split by seeded ratios over
    blocks of ``split_block``×``split_block`` windows, so val/test never overlap training.
    A :class:`~datamodules.scenes.SceneSource`: ``workbench predict`` reads scenes as its chips.
    """

    target_band: int | None = None  # regression datamodules read continuous targets from this band

    def __init__(
        self,
        root: str,
        layout: Layout = "glob",
        images: str | None = None,
        masks: str | None = None,
        file_bands: list[str] | None = None,
        bands: list[str | int] | None = None,
        num_frames: int = 1,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        stats_file: str | None = None,
        nodata: float | None = None,
        ignore_index: int = 255,
        label_map: dict[int, int] | None = None,
        chip_size: int | None = None,
        splits: dict[str, str] | None = None,
        split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_block: int = 1,
        seed: int = 0,
        train_fraction: float = 1.0,
        augment: bool = True,
        bad_files: BadFiles = "fail",
        cache_mb: float = 1024,
        augmentations: list[dict[str, Any]] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        """
        Args:
            root: dataset folder (glob patterns are relative to it).
            layout: ``glob``, ``sen1floods11``, ``burn_scars`` or ``crop_classification``.
            images: glob layout: image file pattern, e.g. ``images/*.tif``.
            masks: glob layout: mask file pattern, paired with images in sorted order.
            file_bands: names of the files' bands in order (per frame); layouts know theirs.
            bands: bands fed to the model, by name (``BLUE``, ``B8A``) or 0-based index; None: all.
            num_frames: frames per file; layers are ordered frame-major.
            num_classes: classes in the masks (values ``0..num_classes-1``).
            class_names: one name per class (metric names, output metadata).
            mean: per selected band, in file units; with ``std``, or use ``stats_file``.
            std: per selected band.
            stats_file: band statistics JSON (used when mean/std are not given); when the file
                does not exist yet it is computed from the training chips once and written there,
                as ``workbench stats`` does, then reused by every later run.
            nodata: image nodata value (default: each file's own); such pixels are ignored.
            ignore_index: mask value excluded from loss and metrics.
            label_map: mask values to replace, e.g. ``{-1: 255}`` (layouts set their own).
            chip_size: cut files into windows of this size; None: one chip per file.
            splits: ``{train, val, test}`` → text/CSV file listing image file names.
            split_ratios: train/val/test fractions when no split files are given.
            split_block: windows per block side for the ratio split.
            seed: seed of the ratio split and of the ``train_fraction`` subset.
            train_fraction: train on this seeded fraction of the training chips (val/test unchanged).
            augment: random flips and rotations on the training split.
            bad_files: chips whose files cannot be read (corrupt, truncated) ``fail`` the run
                with the file named, or are ``skip``-ped with a warning.
            cache_mb: memory (per split, in MB) for chips read in the training process, so later
                epochs skip the reading and normalisation (``num_workers: 0``; workers re-read).
                0 turns the cache off.
            augmentations: kornia / torchgeo transforms (``class_path``/``init_args``) applied to
                training batches on the device, image and mask together (:mod:`datamodules.augment`).
            batch_size: chips per batch.
            num_workers: DataLoader worker processes.
            pin_memory: pin batches for faster host-to-GPU copies; None: when the trainer runs on a GPU.
        """
        super().__init__(batch_size, num_workers, pin_memory, train_fraction, seed, augmentations)
        if layout == "glob" and images is None:
            raise UserInputError("data.images: the glob layout needs an image pattern, e.g. 'images/*.tif'")
        if class_names is not None and len(class_names) != num_classes:
            raise UserInputError(f"data.class_names has {len(class_names)} names for num_classes={num_classes}")
        if abs(sum(split_ratios) - 1.0) > 1e-6:
            raise UserInputError(f"data.split_ratios {list(split_ratios)} must sum to 1")
        self.root = Path(root)
        self.layout = layout
        self.images = images
        self.masks = masks
        self.file_bands = file_bands or list(LAYOUT_BANDS.get(layout, ())) or None
        self.layer_indices, self.bands = select_bands(bands, self.file_bands, "data.bands")
        self.num_frames = num_frames
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.mean, self.std, self.stats_file = mean, std, stats_file
        self.nodata = nodata
        self.ignore_index = ignore_index
        self.label_map = label_map if label_map is not None else LAYOUT_LABEL_MAPS.get(layout)
        self.chip_size = chip_size
        self.splits = splits
        self.split_ratios = split_ratios
        self.split_block = split_block
        self.augment = augment
        self.bad_files = bad_files
        self.cache_mb = cache_mb

    # --- files, chips and splits -------------------------------------------------------------

    def _pairs(self) -> dict[str, list[tuple[Path, Path | None]]] | list[tuple[Path, Path | None]]:
        if not self.root.is_dir():
            raise UserInputError(f"data.root {self.root} is not a folder")
        if self.layout == "sen1floods11":
            return sen1floods11_pairs(self.root)
        if self.layout == "burn_scars":
            return burn_scars_pairs(self.root)
        if self.layout == "crop_classification":
            return crop_classification_pairs(self.root)
        return glob_pairs(self.root, self.images, self.masks)

    def _chips(self, pairs: list[tuple[Path, Path | None]]) -> list[tuple[tuple, Chip]]:
        """Chips with a block key for the ratio split: (file, block row, block col)."""
        if self.chip_size is None:
            return [((i,), Chip(image, mask)) for i, (image, mask) in enumerate(pairs)]
        block = self.chip_size * self.split_block
        keyed = []
        for i, (image, mask) in enumerate(pairs):
            try:
                windows = grid_windows(image, self.chip_size)
            except RasterioError as err:
                if self.bad_files == "fail":
                    raise UserInputError(f"{image} could not be opened ({err}): replace or remove it, or set "
                                         "data.init_args.bad_files: skip") from None
                log.warning("skipping unreadable file %s: %s", image, err)
                continue
            keyed += [((i, int(w.row_off) // block, int(w.col_off) // block), Chip(image, mask, w)) for w in windows]
        return keyed

    def _ratio_split(self, keyed: list[tuple[tuple, Chip]]) -> dict[str, list[Chip]]:
        blocks = sorted({key for key, _ in keyed})
        random.Random(self.seed).shuffle(blocks)
        bounds = [round(len(blocks) * sum(self.split_ratios[: i + 1])) for i in range(3)]
        split_of = {b: SPLITS[next(i for i, end in enumerate(bounds) if n < end)] for n, b in enumerate(blocks)}
        return {s: [chip for key, chip in keyed if split_of[key] == s] for s in SPLITS}

    def _listed_split(self, keyed: list[tuple[tuple, Chip]]) -> dict[str, list[Chip]]:
        out = {}
        for split in SPLITS:
            listing = Path(self.splits.get(split, "")) if split in self.splits else None
            if listing is None or not listing.is_file():
                raise UserInputError(f"data.splits.{split}: split file {listing} does not exist")
            names = {line.split(",")[0].strip() for line in listing.read_text().splitlines() if line.strip()}
            out[split] = [chip for _, chip in keyed if chip.image.name in names]
        return out

    @cached_property
    def split_chips(self) -> dict[str, list[Chip]]:
        """Chips of each split (``train``, ``val``, ``test``); headers are opened, pixels are not."""
        pairs = self._pairs()
        if isinstance(pairs, dict):
            splits = {split: [chip for _, chip in self._chips(p)] for split, p in pairs.items()}
        else:
            keyed = self._chips(pairs)
            splits = self._listed_split(keyed) if self.splits else self._ratio_split(keyed)
        if splits.get("train"):
            splits["train"] = seeded_fraction(splits["train"], self.train_fraction, self.seed)
        return splits

    # --- bands and normalisation -------------------------------------------------------------

    @cached_property
    def bands_per_frame(self) -> int:
        """Bands per frame in the files (from ``file_bands``, else the first file's band count)."""
        if self.file_bands:
            return len(self.file_bands)
        first = next(chip for chips in self.split_chips.values() for chip in chips)
        with rasterio.open(first.image) as src:
            if src.count % self.num_frames:
                raise UserInputError(f"{first.image} has {src.count} bands, not a multiple of num_frames={self.num_frames}")
            return src.count // self.num_frames

    @property
    def num_bands(self) -> int:
        """Bands per frame fed to the model."""
        return len(self.layer_indices) if self.layer_indices is not None else self.bands_per_frame

    @property
    def layers(self) -> list[int]:
        """0-based file layers to read, frame-major."""
        per_frame = self.layer_indices if self.layer_indices is not None else list(range(self.bands_per_frame))
        return [f * self.bands_per_frame + i for f in range(self.num_frames) for i in per_frame]

    def prepare_data(self) -> None:
        """Compute the band statistics into ``stats_file`` when it is used and not there yet (once)."""
        uses_stats_file = self.mean is None and self.std is None and self.stats_file is not None
        if uses_stats_file and not Path(self.stats_file).is_file():
            log.warning("computing band statistics of the training chips once into %s", self.stats_file)
            write_band_stats(self, self.stats_file)

    def preprocessor(self) -> Preprocessor:
        """The normalisation used for training and for whole-scene prediction alike."""
        if self.mean is not None or self.std is not None:
            mean, std = self.mean, self.std
            if mean is None or std is None:
                raise UserInputError("data.mean and data.std go together: set both, or use data.stats_file")
        elif self.stats_file is not None:
            mean, std = load_band_stats(self.stats_file, self.bands)
        else:
            raise UserInputError(
                "no band statistics: set data.mean and data.std (one value per selected band), or run "
                "`workbench stats --config <your config>` and set data.stats_file to the file it writes"
            )
        for field, values in (("mean", mean), ("std", std)):
            if len(values) != self.num_bands:
                raise UserInputError(
                    f"data.{field} has {len(values)} values but {self.num_bands} bands are selected"
                    + (f" ({self.bands})" if self.bands else "")
                )
        return Preprocessor(mean, std, self.num_frames)

    def scene_spec(self) -> SceneSpec:
        """How predict reads a scene: :attr:`layers`, the files' bands per frame (``file_bands``, or
        else the first training file's band count), the training chips' dtype (from the same header)
        and the RGB positions for quicklooks."""
        dtype, per_frame = None, len(self.file_bands) if self.file_bands else None
        chips = self.split_chips.get("train") or []
        if chips and chips[0].image.is_file():
            with rasterio.open(chips[0].image) as src:
                dtype = src.dtypes[0]
                per_frame = per_frame or src.count // self.num_frames
        names = self.bands or []
        rgb = [names.index(b) for b in ("RED", "GREEN", "BLUE")] if {"RED", "GREEN", "BLUE"} <= set(names) else None
        return SceneSpec(self.layers, per_frame, dtype, rgb)

    # --- datasets and loaders ----------------------------------------------------------------

    def dataset(self, split: str, normalize: bool = True) -> ChipDataset:
        """The chips of ``split``; ``normalize=False`` yields raw layers (for statistics)."""
        chips = self.split_chips[split]
        if not chips:
            raise UserInputError(f"the {split} split is empty: check data.splits / data.split_ratios")
        return ChipDataset(
            chips,
            layers=self.layers,
            expected_layers=self.bands_per_frame * self.num_frames if self.file_bands else None,
            preprocess=self.preprocessor() if normalize else None,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            nodata=self.nodata,
            label_map=self.label_map,
            augment=self.augment and split == "train",
            target_band=self.target_band,
            bad_files=self.bad_files,
            cache_mb=self.cache_mb if normalize else 0,
        )
