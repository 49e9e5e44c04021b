"""Per-band normalisation: the preprocessing shared by training chips and whole-scene prediction,
and the band statistics it needs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from workbench.atomic import write_json
from workbench.errors import UserInputError

T = TypeVar("T")


class RawChips(Protocol):
    """Chips read without normalisation."""

    def __len__(self) -> int: ...

    def read_layers(self, index: int) -> tuple[np.ndarray, float | None]:
        """Raw selected layers ``(L, H, W)`` of chip ``index`` and the nodata value in force."""

    def first_readable(self, index: int, read: Callable[[int], T]) -> T:
        """``read(index)``, unreadable chips failing by name or skipped (``bad_files``)."""


class StatsSource(Protocol):
    """A datamodule whose training chips band statistics are computed from."""

    @property
    def bands(self) -> list[str] | None:
        """Names of the selected bands (None when unknown)."""

    @property
    def num_bands(self) -> int:
        """Selected bands per frame."""

    def dataset(self, split: str, normalize: bool = True) -> RawChips:
        """The chips of ``split``; ``normalize=False``: raw layers."""


def valid_pixels(array: np.ndarray, nodata: float | None) -> np.ndarray:
    """``(L, H, W)`` raw layers → ``(H, W)`` bool: no selected layer is nodata or NaN."""
    invalid = np.isnan(array).any(0) if array.dtype.kind == "f" else np.zeros(array.shape[1:], bool)
    if nodata is not None:
        invalid |= (array == nodata).any(0)
    return ~invalid


@dataclass
class Preprocessor:
    """Raw selected layers → model input, identical for training and prediction.

    Input: ``(L, H, W)`` with ``L = num_frames * C`` layers ordered frame-major (the layers
    already selected from the file). Output: image ``(C, H, W)`` or ``(C, T, H, W)`` float32,
    normalised per band, 0 where invalid; and the valid mask ``(H, W)``.
    """

    mean: Sequence[float]
    std: Sequence[float]
    num_frames: int = 1

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise UserInputError(f"data.mean has {len(self.mean)} values but data.std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise UserInputError(f"data.std must be positive, got {list(self.std)}")

    def __call__(self, array: np.ndarray, nodata: float | None) -> tuple[Tensor, Tensor]:
        valid = valid_pixels(array, nodata)
        c = len(self.mean)
        image = torch.from_numpy(array.astype(np.float32)).reshape(self.num_frames, c, *array.shape[1:])
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, c, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, c, 1, 1)
        image = ((image - mean) / std).transpose(0, 1)  # (C, T, H, W)
        valid_t = torch.from_numpy(valid)
        image = image.masked_fill(~valid_t, 0.0)
        return (image[:, 0] if self.num_frames == 1 else image), valid_t


def load_band_stats(path: str | Path, bands: Sequence[str] | None) -> tuple[list[float], list[float]]:
    """Read ``mean``/``std`` from a stats JSON for the selected ``bands`` (by name when the file
    names its bands: a file covering more bands serves any subset of them)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data.stats_file {path} does not exist: run `workbench stats --config <config>`")
    stats = json.loads(path.read_text())
    named = stats.get("bands")
    if bands is None or not named:
        return list(stats["mean"]), list(stats["std"])
    missing = [b for b in bands if b not in named]
    if missing:
        raise UserInputError(
            f"data.stats_file {path} has statistics for bands {named} but not for {missing}: "
            "recompute it with `workbench stats --config <config>`"
        )
    index = [list(named).index(b) for b in bands]
    return [stats["mean"][i] for i in index], [stats["std"][i] for i in index]


def compute_band_stats(chips: Iterable[tuple[np.ndarray, float | None]], num_bands: int) -> dict[str, Any]:
    """Streaming per-band mean/std over ``((L, H, W) layers frame-major, nodata)`` chips."""
    total = np.zeros(num_bands)
    squares = np.zeros(num_bands)
    count = 0
    for array, nodata in chips:
        valid = valid_pixels(array, nodata)
        pixels = array.reshape(-1, num_bands, *array.shape[1:]).astype(np.float64)[:, :, valid]
        total += pixels.sum(axis=(0, 2))
        squares += (pixels**2).sum(axis=(0, 2))
        count += pixels.shape[0] * pixels.shape[2]
    if count == 0:
        raise UserInputError("no valid pixels to compute band statistics from (all nodata?)")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return {"mean": mean.tolist(), "std": [s if s > 0 else 1.0 for s in std.tolist()], "pixels": count}


def write_band_stats(datamodule: StatsSource, path: str | Path, max_samples: int = 512) -> dict[str, Any]:
    """Compute mean/std over (up to ``max_samples`` evenly spaced) training chips; write JSON atomically."""
    dataset = datamodule.dataset("train", normalize=False)
    step = max(1, math.ceil(len(dataset) / max_samples))
    chips = (dataset.first_readable(i, dataset.read_layers) for i in range(0, len(dataset), step))
    stats = {"bands": datamodule.bands, **compute_band_stats(chips, datamodule.num_bands)}
    write_json(path, stats)
    return stats
