"""What whole-scene prediction needs from a datamodule: how to read and normalise a new scene
exactly as the training chips were read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from datamodules.normalize import Preprocessor


@dataclass(frozen=True)
class SceneSpec:
    """What a scene must look like: the layers to read and, when known, band count and dtype."""

    layers: list[int]
    bands_per_file: int | None
    dtype: str | None
    rgb: list[int] | None  # positions within ``layers`` of red, green, blue for the quicklook


@runtime_checkable
class SceneSource(Protocol):
    """A datamodule of raster scenes that can tell ``workbench predict`` how to read new ones."""

    nodata: float | None  # image nodata value overriding the files' own (None: the files')
    chip_size: int | None  # training window size in pixels (None: whole files)

    def scene_spec(self) -> SceneSpec:
        """The layers, band count, dtype and RGB positions of the training scenes."""

    def preprocessor(self) -> Preprocessor:
        """The normalisation of the training chips."""
