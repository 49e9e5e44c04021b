"""Scene classification data: the segmentation layouts and splits, one label set per chip."""

from __future__ import annotations

import csv
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.raster import ChipDataset
from datamodules.segmentation import GeoSegmentationDataModule
from workbench.errors import UserInputError


class LabelledChips(Dataset):
    """A :class:`ChipDataset` whose samples get ``label`` from ``label_of(index, sample)``;
    their per-pixel ``mask`` (if any) is dropped."""

    def __init__(self, chips: ChipDataset, label_of: Any) -> None:
        self.chips = chips
        self.label_of = label_of

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.chips[index]
        sample["label"] = self.label_of(index, sample)
        sample.pop("mask", None)
        return sample


def read_label_table(path: Path, class_names: list[str], multi_label: bool) -> dict[str, Tensor]:
    """``file,labels`` CSV (labels separated by ``;``) → {file name: label tensor}."""
    if not path.is_file():
        raise UserInputError(f"data.labels: label file {path} does not exist")
    table = {}
    with path.open() as f:
        for row in csv.reader(f):
            if not row or row[0].startswith("#") or row[0] == "file":
                continue
            names = [n.strip() for n in row[1].split(";") if n.strip()] if len(row) > 1 else []
            unknown = [n for n in names if n not in class_names]
            if unknown or (not multi_label and len(names) != 1):
                raise UserInputError(
                    f"{path}: row {row} has labels {names}; expected "
                    + ("names from" if multi_label else "exactly one of") + f" {class_names}"
                )
            if multi_label:
                table[row[0]] = torch.tensor([float(n in names) for n in class_names])
            else:
                table[row[0]] = torch.tensor(class_names.index(names[0]))
    return table


class GeoClassificationDataModule(GeoSegmentationDataModule):
    """Chips → ``image`` and ``label``: ``(B,)`` class indices or ``(B, K)`` multi-hot labels.

    Labels come from a ``file,labels`` CSV (``labels``: one class name, or ``;``-separated names
    with ``multi_label``) keyed by image file name; files not listed are an error.
    """

    def __init__(self, labels: str | None = None, multi_label: bool = False, **kwargs: Any) -> None:
        """
        Args:
            labels: CSV of ``file,labels`` rows (file name as in the image folder).
            multi_label: several labels per chip.
            **kwargs: :class:`GeoSegmentationDataModule` arguments (root, images, bands, ...);
                ``masks`` is not needed.
        """
        super().__init__(**kwargs)
        self.labels = labels
        self.multi_label = multi_label

    @cached_property
    def label_table(self) -> dict[str, Tensor]:
        """{image file name: label}, read once from ``labels``."""
        if self.labels is None:
            raise UserInputError("data.labels: give the CSV of file,labels rows")
        return read_label_table(Path(self.labels), self.class_names, self.multi_label)

    def label_of(self, chips: ChipDataset) -> Any:
        """``(index, sample) → label`` for ``chips``."""
        table = self.label_table

        def lookup(index: int, _: dict[str, Tensor]) -> Tensor:
            name = chips.chips[index].image.name
            if name not in table:
                raise UserInputError(f"{chips.chips[index].image} has no row in data.labels {self.labels}")
            return table[name]

        return lookup

    def dataset(self, split: str, normalize: bool = True) -> Dataset:
        chips = super().dataset(split, normalize)
        return LabelledChips(chips, self.label_of(chips)) if normalize else chips
