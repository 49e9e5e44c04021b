"""Scene classification: label tables, single- and multi-label CLI fits, strategies on a pooled head."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import rasterio
import torch
import yaml

from datamodules.classification import read_label_table
from datamodules.samples import coast_class
from tests.conftest import fit_run, write_config
from workbench.cli import main
from workbench.errors import UserInputError


def test_label_table_single_and_multi(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("file,labels\na.tif,water\nb.tif,land;water\n")
    multi = read_label_table(table, ["land", "water"], multi_label=True)
    assert multi["b.tif"].tolist() == [1.0, 1.0] and multi["a.tif"].tolist() == [0.0, 1.0]
    with pytest.raises(UserInputError, match="exactly one of"):
        read_label_table(table, ["land", "water"], multi_label=False)
    table.write_text("a.tif,snow\n")
    with pytest.raises(UserInputError, match="snow"):
        read_label_table(table, ["land", "water"], multi_label=True)


def test_coast_class_rule() -> None:
    water = torch.ones(10, 10, dtype=torch.long)
    assert coast_class(water).item() == 2 and coast_class(water * 0).item() == 0
    half = water.clone()
    half[:5] = 0
    half[0, 0] = 255  # ignored
    assert coast_class(half).item() == 1


@pytest.mark.parametrize("multi_label", [False, True])
def test_classification_fit_learns(tmp_path: Path, multi_label: bool) -> None:
    path = write_config(tmp_path, trainer={"max_epochs": 6})
    config = yaml.safe_load(path.read_text())
    chips = Path(config["data"]["init_args"]["root"])
    rows = []
    for mask_file in sorted((chips / "masks").glob("*.tif")):  # label: does the chip's mask have >50 % water?
        with rasterio.open(mask_file) as src:
            water = src.read(1).mean() > 0.5
        names = ("water" if water else "land") + (";any" if multi_label else "")
        rows.append([mask_file.name, names])
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    classes = ["land", "water", "any"] if multi_label else ["land", "water"]
    config["trainer"]["callbacks"][0]["init_args"] = {"monitor": "val/F1", "mode": "max"}
    config["model"]["class_path"] = "workbench.tasks.ClassificationTask"
    config["model"]["init_args"] = {k: v for k, v in config["model"]["init_args"].items()
                                    if k not in ("decoder", "decoder_channels")} | {"multi_label": multi_label}
    data = config["data"]
    data["class_path"] = "datamodules.GeoClassificationDataModule"
    data["init_args"] = {k: v for k, v in data["init_args"].items() if k != "masks"} | {
        "labels": str(labels), "multi_label": multi_label, "num_classes": len(classes), "class_names": classes}
    path.write_text(yaml.safe_dump(config))
    losses, results = fit_run(path)
    assert losses[-1] < losses[0]
    assert 0.0 <= results["test"]["test/accuracy"] <= 1.0
    assert ("test/mAP" in results["test"]) == multi_label
    assert "lora" in results["strategy"]
    if not multi_label:  # scene-level models have no per-pixel map to write
        assert main(["predict", "--config", str(path), "--ckpt_path", results["best_checkpoint"],
                     "--inputs", str(next((chips / "images").glob("*.tif"))),
                     "--output_dir", str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists()
