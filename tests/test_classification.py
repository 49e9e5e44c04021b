"""Scene classification: label tables, single- and multi-label CLI fits, strategies on a pooled head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

from datamodules.classification import read_label_table
from datamodules.samples import coast_class
from tests.conftest import direct_outputs, fit_run, write_classification_config
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
    path = write_classification_config(tmp_path, multi_label)  # label: has the chip's mask > 50 % water?
    chips = Path(yaml.safe_load(path.read_text())["data"]["init_args"]["root"])
    losses, results = fit_run(path)
    assert losses[-1] < losses[0]
    logits, labels = direct_outputs(results["best_checkpoint"], path)  # the checkpoint run here
    accuracy = MultilabelAccuracy(3)(logits, labels) if multi_label else MulticlassAccuracy(2, average="micro")(
        logits.argmax(1), labels)
    assert results["test"]["test/accuracy"] == pytest.approx(accuracy.item(), abs=1e-6)
    assert ("test/mAP" in results["test"]) == multi_label
    assert "lora" in results["strategy"]
    if not multi_label:  # scene-level models have no per-pixel map to write
        assert main(["predict", "--config", str(path), "--ckpt_path", results["best_checkpoint"],
                     "--inputs", str(next((chips / "images").glob("*.tif"))),
                     "--output_dir", str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists()
