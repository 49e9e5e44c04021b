"""GeoTIFF image/mask chip dataset: whole files or windows cut from larger files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioError
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from datamodules.normalize import Preprocessor
from workbench.errors import UserInputError

log = logging.getLogger(__name__)
BadFiles = Literal["fail", "skip"]
T = TypeVar("T")


@dataclass(frozen=True)
class Chip:
    """One sample: an image file, its mask file (None for prediction), an optional window."""

    image: Path
    mask: Path | None
    window: Window | None = None


def grid_windows(path: Path, size: int) -> list[Window]:
    """Non-overlapping ``size``×``size`` windows covering ``path`` (partial edge windows dropped)."""
    with rasterio.open(path) as src:
        height, width = src.height, src.width
    if height < size or width < size:
        raise UserInputError(f"{path} is {height}x{width} pixels, smaller than chip_size {size}")
    return [Window(c, r, size, size) for r in range(0, height - size + 1, size) for c in range(0, width - size + 1, size)]


def check_classes(mask: Tensor, num_classes: int, ignore_index: int, source: str, fix: str) -> None:
    """Every value of ``mask`` must be a class ``0..num_classes-1`` or ``ignore_index``; others are
    an error naming ``source`` (the label file) and what to set (``fix``)."""
    bad = mask[((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)].unique()
    if bad.numel():
        raise UserInputError(f"{source} has values {bad.tolist()} outside classes 0..{num_classes - 1} "
                             f"and ignore_index {ignore_index}: set {fix}")


class ChipDataset(Dataset):
    """Reads chips with rasterio (windowed), preprocesses them and checks their labels.

    Items: ``image`` ``(C, H, W)`` or ``(C, T, H, W)`` float32, ``valid`` ``(H, W)`` bool (no
    input band is nodata) and, when the chip has a label
    file, either ``mask`` ``(H, W)`` int64 with ``ignore_index`` where unlabelled or nodata
    (``target_band=None``: classes), or ``target`` ``(H, W)`` float32 read from band
    ``target_band`` of the label file, NaN where missing, non-finite or nodata (values).
    """

    def __init__(
        self,
        chips: list[Chip],
        layers: list[int] | None,
        expected_layers: int | None,
        preprocess: Preprocessor | None,
        num_classes: int,
        ignore_index: int = 255,
        nodata: float | None = None,
        label_map: dict[int, int] | None = None,
        augment: bool = False,
        target_band: int | None = None,
        bad_files: BadFiles = "fail",
        cache_mb: float = 0,
    ) -> None:
        """
        Args:
            chips: the samples.
            layers: 0-based file layers to read (frame-major), None for all.
            expected_layers: layer count every image file must have (None: not checked).
            preprocess: normalisation; None returns raw layers (for statistics).
            num_classes: labels must lie in ``[0, num_classes)`` or equal ``ignore_index``.
            ignore_index: mask value for unlabelled pixels.
            nodata: image nodata value overriding the files' own.
            label_map: mask values to replace before checking, e.g. ``{-1: 255}``.
            augment: random flips and 90° rotations, applied to image and mask alike.
            target_band: 1-based band of the label file holding continuous targets (regression);
                None: the label file holds classes.
            bad_files: a chip whose file cannot be read (corrupt, truncated): ``fail`` with an
                error naming the file, or ``skip`` it (warned once; another chip is served).
            cache_mb: keep chips read in the main process in memory, up to this many MB, so later
                epochs skip reading and preprocessing (augmentation still runs on every read).
        """
        self.chips = chips
        self.layers = layers
        self.expected_layers = expected_layers
        self.preprocess = preprocess
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.nodata = nodata
        self.label_map = label_map or {}
        self.augment = augment
        self.target_band = target_band
        self.bad_files = bad_files
        self.skipped: set[int] = set()
        self.cache_budget = int(cache_mb * 2**20)
        self.cache: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """The chip, or with ``bad_files: skip`` the next readable one."""
        return self.first_readable(index, self.read_sample)

    def first_readable(self, index: int, read: Callable[[int], T]) -> T:
        """``read(index)``; an unreadable chip fails naming its files or, with ``bad_files: skip``,
        is skipped with a warning for the next readable one."""
        for offset in range(len(self.chips)):
            candidate = (index + offset) % len(self.chips)
            if candidate in self.skipped:
                continue
            try:
                return read(candidate)
            except RasterioError as err:
                chip = self.chips[candidate]
                if self.bad_files == "fail":
                    raise UserInputError(
                        f"{chip.image} (or its label {chip.mask}) could not be read: {err}. The file is corrupt "
                        "or truncated: replace or remove it, or set data.init_args.bad_files: skip"
                    ) from None
                log.warning("skipping unreadable chip %s (label %s): %s", chip.image, chip.mask, err)
                self.skipped.add(candidate)
        raise UserInputError(f"no chip of this split could be read ({len(self.skipped)} unreadable files)")

    def read_layers(self, index: int) -> tuple[np.ndarray, float | None]:
        """Raw selected layers ``(L, H, W)`` of chip ``index`` and the nodata value in force."""
        chip = self.chips[index]
        with rasterio.open(chip.image) as src:
            if self.expected_layers is not None and src.count != self.expected_layers:
                raise UserInputError(
                    f"{chip.image} has {src.count} bands but {self.expected_layers} are expected "
                    "(file_bands × num_frames): check `file_bands`, `num_frames` and the layout"
                )
            if self.layers is not None and max(self.layers) >= src.count:
                raise UserInputError(f"{chip.image} has {src.count} bands; data.bands asks for band index {max(self.layers)}")
            indexes = [i + 1 for i in self.layers] if self.layers is not None else None
            array = src.read(indexes, window=chip.window)
            nodata = self.nodata if self.nodata is not None else src.nodata
        return array, nodata

    def read_mask(self, index: int) -> Tensor:
        """Mask ``(H, W)`` int64 after ``label_map``; unexpected values are an error naming the file."""
        chip = self.chips[index]
        with rasterio.open(chip.mask) as src:
            mask = src.read(1, window=chip.window).astype(np.int64)
        for source, target in self.label_map.items():
            mask[mask == source] = target
        mask = torch.from_numpy(mask)
        check_classes(mask, self.num_classes, self.ignore_index, f"mask {chip.mask}",
                      "data.num_classes, data.label_map (e.g. {-1: 255}) or data.ignore_index")
        return mask

    def read_target(self, index: int) -> Tensor:
        """Continuous target ``(H, W)`` float32, NaN where the label file has nodata or no value."""
        chip = self.chips[index]
        with rasterio.open(chip.mask) as src:
            if self.target_band > src.count:
                raise UserInputError(f"{chip.mask} has {src.count} bands; data.target_band is {self.target_band}")
            target = src.read(self.target_band, window=chip.window).astype(np.float32)
            if src.nodata is not None:
                target[target == src.nodata] = np.nan
        target[~np.isfinite(target)] = np.nan
        return torch.from_numpy(target)

    def read_sample(self, index: int) -> dict[str, Tensor]:
        """Chip ``index`` read (or taken from the cache), preprocessed, checked and (in training)
        augmented."""
        sample = self.cache.get(index)
        if sample is None:
            sample = self.load_sample(index)
            self.keep(index, sample)
        return random_flip_rotate(sample) if self.augment else dict(sample)

    def keep(self, index: int, sample: dict[str, Tensor]) -> None:
        """Cache ``sample`` while the budget allows; only in the main process (a loader worker's
        copy of the dataset, and its cache, ends with the epoch)."""
        size = sum(t.nbytes for t in sample.values())
        if get_worker_info() is None and size <= self.cache_budget:
            self.cache[index] = sample
            self.cache_budget -= size

    def load_sample(self, index: int) -> dict[str, Tensor]:
        """Chip ``index`` read from its files, preprocessed and checked."""
        array, nodata = self.read_layers(index)
        if self.preprocess is None:
            return {"image": torch.from_numpy(array.astype(np.float32))}
        image, valid = self.preprocess(array, nodata)
        sample = {"image": image, "valid": valid}
        if self.chips[index].mask is not None and self.target_band is not None:
            sample["target"] = self.read_target(index).masked_fill(~valid, float("nan"))
        elif self.chips[index].mask is not None:
            sample["mask"] = self.read_mask(index).masked_fill(~valid, self.ignore_index)
        return sample


def random_flip_rotate(sample: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same random horizontal flip and k×90° rotation on every tensor's last two axes."""
    flip = bool(torch.rand(()) < 0.5)
    k = int(torch.randint(0, 4, ()))
    out = {}
    for key, value in sample.items():
        value = value.flip(-1) if flip else value
        out[key] = torch.rot90(value, k, dims=(-2, -1)).contiguous()
    return out
