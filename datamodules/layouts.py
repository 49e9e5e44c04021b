"""On-disk dataset layouts → (image, mask) file pairs per split."""

from __future__ import annotations

import csv
from pathlib import Path

from datamodules.splits import SPLITS
from workbench.errors import UserInputError

Pairs = list[tuple[Path, Path]]


def _find_one(root: Path, name: str) -> Path:
    found = sorted(root.rglob(name))
    if not found:
        raise UserInputError(f"{name} not found under {root}: is data.root the dataset's top folder?")
    return found[0]


def sen1floods11_pairs(root: Path) -> dict[str, Pairs]:
    """Sen1Floods11 hand-labelled S2 chips with the official split CSVs.

    Files: ``.../S2Hand/<Event>_<id>_S2Hand.tif`` (13 bands B1–B12 with B8A) and
    ``.../LabelHand/<Event>_<id>_LabelHand.tif`` (-1 no data, 0 not water, 1 water); splits
    ``flood_{train,valid,test}_data.csv`` (rows ``<id>_S1Hand.tif,<id>_LabelHand.tif``).
    """
    images = {p.name: p for p in root.rglob("*_S2Hand.tif")}
    labels = {p.name: p for p in root.rglob("*_LabelHand.tif")}
    pairs: dict[str, Pairs] = {}
    for split, name in zip(SPLITS, ("flood_train_data.csv", "flood_valid_data.csv", "flood_test_data.csv")):
        csv_path = _find_one(root, name)
        pairs[split] = []
        with open(csv_path, newline="") as f:
            for row in csv.reader(f):
                if not row:
                    continue
                image_name = row[0].strip().replace("S1Hand", "S2Hand")
                label_name = row[1].strip()
                for file_name, table in ((image_name, images), (label_name, labels)):
                    if file_name not in table:
                        raise UserInputError(f"{csv_path} lists {file_name}, which is not under {root}")
                pairs[split].append((images[image_name], labels[label_name]))
    return pairs


def burn_scars_pairs(root: Path) -> dict[str, Pairs]:
    """HLS Burn Scars: ``training/*_merged.tif`` + ``*.mask.tif``, same for ``validation/``.

    The dataset has no separate test split: ``validation`` serves as both val and test.
    """
    pairs: dict[str, Pairs] = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        images = sorted((root / folder).glob("*_merged.tif"))
        if not images:
            raise UserInputError(f"no *_merged.tif files in {root / folder}: is data.root the dataset's top folder?")
        pairs[split] = []
        for image in images:
            mask = image.with_name(image.name.replace("_merged.tif", ".mask.tif"))
            if not mask.is_file():
                raise UserInputError(f"mask {mask} for image {image} does not exist")
            pairs[split].append((image, mask))
    pairs["test"] = pairs["val"]
    return pairs


def crop_classification_pairs(root: Path) -> dict[str, Pairs]:
    """HLS multi-temporal crop classification (``ibm-nasa-geospatial/multi-temporal-crop-classification``).

    Files: ``training_chips/chip_XXX_YYY_merged.tif`` (3 frames × 6 HLS bands, frame-major) with
    ``chip_XXX_YYY.mask.tif`` beside it, the same in ``validation_chips/``; split lists
    ``training_data.txt`` / ``validation_data.txt`` (one chip id per line, found anywhere under
    ``root``). The dataset has no test split: ``validation`` serves as both val and test.
    """
    pairs: dict[str, Pairs] = {}
    for split, name in (("train", "training"), ("val", "validation")):
        listing = _find_one(root, f"{name}_data.txt")
        images = {p.name.removesuffix("_merged.tif"): p for p in root.rglob(f"{name}_chips/*_merged.tif")}
        pairs[split] = []
        for line in listing.read_text().splitlines():
            chip_id = Path(line.strip()).name.removesuffix(".tif").removesuffix("_merged").removesuffix(".mask")
            if not chip_id:
                continue
            if chip_id not in images:
                raise UserInputError(f"{listing} lists {chip_id}, but {chip_id}_merged.tif is not in {root}/{name}_chips")
            mask = images[chip_id].with_name(f"{chip_id}.mask.tif")
            if not mask.is_file():
                raise UserInputError(f"mask {mask} for image {images[chip_id]} does not exist")
            pairs[split].append((images[chip_id], mask))
    pairs["test"] = pairs["val"]
    return pairs


def _glob(root: Path, pattern: str, field: str) -> list[Path]:
    base = Path(pattern)
    files = sorted(base.parent.glob(base.name) if base.is_absolute() else root.glob(pattern))
    if not files:
        raise UserInputError(f"data.{field}: pattern {pattern!r} matches no file under {root}")
    return files


def glob_pairs(root: Path, images: str, masks: str | None) -> list[tuple[Path, Path | None]]:
    """Images and masks from two glob patterns, paired in sorted order."""
    image_files = _glob(root, images, "images")
    if masks is None:
        return [(image, None) for image in image_files]
    mask_files = _glob(root, masks, "masks")
    if len(image_files) != len(mask_files):
        raise UserInputError(
            f"data.images matches {len(image_files)} files but data.masks matches {len(mask_files)}: "
            "every image needs exactly one mask"
        )
    return list(zip(image_files, mask_files))
