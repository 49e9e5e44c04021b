"""Standard benchmark layouts: HLS multi-temporal crop classification and GEO-Bench (HDF5).

Each test writes a tiny copy of the official on-disk layout and checks the datamodule's samples
against the files' pixels, reordered and normalised here; one ``workbench fit`` per layout checks
the reported test metric against the checkpoint's outputs scored outside Lightning.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from torchmetrics.classification import MulticlassAccuracy

from datamodules import GeoBenchDataModule, GeoSegmentationDataModule
from tests.conftest import TINY_BACKBONE, direct_outputs, fit_run, reference_miou, write_geotiff, write_task_config
from workbench.errors import UserInputError

CROP_MEAN = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
CROP_STD = [2.0, 4.0, 5.0, 8.0, 10.0, 20.0]
SIZE = 16


# --- a tiny copy of the crop classification layout -------------------------------------------

def crop_tree(root: Path) -> dict[str, np.ndarray]:
    """3 listed chips (2 training, 1 validation) and one unlisted training chip; returns each
    chip id's 18-band image (frame-major: 3 frames × Blue, Green, Red, NIR, SWIR1, SWIR2) and,
    under ``<id>.mask``, its mask (0 no data, 1..13 classes)."""
    rng = np.random.default_rng(0)
    files = {}
    for folder, chip_ids in (("training_chips", ["chip_000_000", "chip_000_001", "chip_009_009"]),
                             ("validation_chips", ["chip_001_000"])):
        for chip_id in chip_ids:
            image = (rng.integers(0, 100, (18, SIZE, SIZE)) + 100 * np.arange(18)[:, None, None]).astype(np.int16)
            mask = rng.integers(0, 14, (1, SIZE, SIZE)).astype(np.uint8)
            write_geotiff(root / folder / f"{chip_id}_merged.tif", image)
            write_geotiff(root / folder / f"{chip_id}.mask.tif", mask)
            files[chip_id], files[f"{chip_id}.mask"] = image, mask[0]
    (root / "training_data.txt").write_text("chip_000_000\nchip_000_001\n")  # chip_009_009 is not listed
    (root / "validation_data.txt").write_text("chip_001_000\n")
    return files


def crop_datamodule(root: Path, **kwargs: object) -> GeoSegmentationDataModule:
    return GeoSegmentationDataModule(root=str(root), layout="crop_classification", num_frames=3, num_classes=13,
                                     mean=CROP_MEAN, std=CROP_STD, augment=False, **kwargs)


def test_crop_classification_frames_labels_and_splits(tmp_path: Path) -> None:
    files = crop_tree(tmp_path)
    dm = crop_datamodule(tmp_path)
    assert dm.bands == ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
    names = {split: [chip.image.name for chip in chips] for split, chips in dm.split_chips.items()}
    assert names == {"train": ["chip_000_000_merged.tif", "chip_000_001_merged.tif"],
                     "val": ["chip_001_000_merged.tif"], "test": ["chip_001_000_merged.tif"]}
    for split, chip_id in (("train", "chip_000_001"), ("val", "chip_001_000")):
        sample = dm.dataset(split)[names[split].index(f"{chip_id}_merged.tif")]
        frames = files[chip_id].astype(np.float32).reshape(3, 6, SIZE, SIZE)  # (T, C, H, W)
        expected = (frames - np.array(CROP_MEAN)[:, None, None]) / np.array(CROP_STD)[:, None, None]
        torch.testing.assert_close(sample["image"], torch.from_numpy(expected.transpose(1, 0, 2, 3)).float())
        mask = files[f"{chip_id}.mask"].astype(np.int64)
        assert torch.equal(sample["mask"], torch.from_numpy(np.where(mask == 0, 255, mask - 1)))


def test_crop_classification_bad_layouts(tmp_path: Path) -> None:
    crop_tree(tmp_path)
    (tmp_path / "validation_data.txt").unlink()
    with pytest.raises(UserInputError, match="validation_data.txt not found"):
        crop_datamodule(tmp_path).split_chips
    (tmp_path / "validation_data.txt").write_text("chip_404_404\n")
    with pytest.raises(UserInputError, match="lists chip_404_404"):
        crop_datamodule(tmp_path).split_chips
    (tmp_path / "validation_data.txt").write_text("chip_001_000\n")
    with pytest.raises(UserInputError, match="18 bands but 6 are expected"):  # num_frames left at 1
        GeoSegmentationDataModule(root=str(tmp_path), layout="crop_classification", num_classes=13,
                                  mean=CROP_MEAN, std=CROP_STD).dataset("train")[0]


# --- a tiny copy of the GEO-Bench layout -------------------------------------------------------
# Stand-ins for the geobench classes its pickles hold (the loader reads them without geobench).

class Sentinel2:
    def __init__(self, name: str) -> None:
        self.name, self.alt_names, self.spatial_resolution = name, (), 10


class SemanticSegmentation:
    def __init__(self, n_classes: int, class_names: list[str]) -> None:
        self.n_classes, self._class_names = n_classes, class_names


class Classification(SemanticSegmentation):
    pass


class TaskSpecifications:
    def __init__(self, bands_info: list[Sentinel2], label_type: Classification) -> None:
        self.bands_info, self.label_type, self.n_time_steps = bands_info, label_type, 1


GEOBENCH_BANDS = ["02 - Blue", "03 - Green", "04 - Red", "08 - NIR"]
PARTITION = {"train": ["id_0", "id_1"], "valid": ["id_2"], "test": ["id_3"]}


def geobench_task(root: Path, task: str, segmentation: bool) -> dict[str, dict[str, np.ndarray]]:
    """``root/<benchmark>/<task>`` with 4 samples, task specs, band stats and two partitions;
    segmentation samples carry dated band names (``02 - Blue_2020-06-01``). Returns each sample's
    arrays by band name (and ``label``)."""
    benchmark = "segmentation_v1.0" if segmentation else "classification_v1.0"
    folder = root / benchmark / task
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    label_type = (SemanticSegmentation if segmentation else Classification)(3, ["field", "forest", "water"])
    (folder / "task_specs.pkl").write_bytes(pickle.dumps(
        TaskSpecifications([Sentinel2(b) for b in GEOBENCH_BANDS], label_type), protocol=4))
    suffix = "_2020-06-01" if segmentation else ""
    samples = {}
    for i in range(4):
        bands = {b: rng.normal(1000 * (k + 1), 100, (SIZE, SIZE)).astype(np.float32)
                 for k, b in enumerate(GEOBENCH_BANDS)}
        attributes: dict[str, object] = {b + suffix: {"band_info": Sentinel2(b), "date": None} for b in bands}
        with h5py.File(folder / f"id_{i}.hdf5", "w") as sample:
            for band, array in bands.items():
                sample.create_dataset(band + suffix, data=array)
            if segmentation:
                bands["label"] = rng.integers(0, 3, (SIZE, SIZE)).astype(np.int16)
                sample.create_dataset("label" + suffix, data=bands["label"])
            else:
                bands["label"] = np.array(i % 3)
                attributes["label"] = i % 3
            sample.attrs["pickle"] = str(pickle.dumps(attributes))
        samples[f"id_{i}"] = bands
    stats = {b: {"mean": 1000.0 * (k + 1), "std": 100.0 + k, "min": 0.0} for k, b in enumerate(GEOBENCH_BANDS)}
    (folder / "band_stats.json").write_text(json.dumps(stats))
    (folder / "default_partition.json").write_text(json.dumps(PARTITION))
    (folder / "0.50x_train_partition.json").write_text(json.dumps({**PARTITION, "train": ["id_1"]}))
    return samples


@pytest.mark.parametrize("segmentation", [False, True])
def test_geobench_bands_labels_and_partitions(tmp_path: Path, segmentation: bool) -> None:
    samples = geobench_task(tmp_path, "m-task", segmentation)
    dm = GeoBenchDataModule(root=str(tmp_path), task="m-task", bands=["RED", "02 - Blue", "08 - NIR"], augment=False)
    assert dm.bands == ["RED", "BLUE", "B8"] and dm.num_classes == 3
    assert dm.class_names == ["field", "forest", "water"]
    assert {s: [f.stem for f in files] for s, files in dm.split_files.items()} == {
        "train": ["id_0", "id_1"], "val": ["id_2"], "test": ["id_3"]}
    for split, index, name in (("train", 1, "id_1"), ("test", 0, "id_3")):
        sample = dm.dataset(split)[index]
        expected = [(samples[name][b] - 1000.0 * (k + 1)) / (100.0 + k)
                    for b, k in (("04 - Red", 2), ("02 - Blue", 0), ("08 - NIR", 3))]
        torch.testing.assert_close(sample["image"], torch.from_numpy(np.stack(expected)))
        key = "mask" if segmentation else "label"
        assert torch.equal(sample[key], torch.from_numpy(samples[name]["label"].astype(np.int64)))
    fraction = GeoBenchDataModule(root=str(tmp_path / ("segmentation_v1.0" if segmentation else "classification_v1.0")),
                                  task="m-task", partition="0.50x_train")
    assert [f.stem for f in fraction.split_files["train"]] == ["id_1"] and fraction.bands[1] == "GREEN"


def test_geobench_bad_layouts(tmp_path: Path) -> None:
    geobench_task(tmp_path, "m-task", segmentation=False)
    folder = tmp_path / "classification_v1.0" / "m-task"
    with pytest.raises(UserInputError, match=r"0.01x_train_partition.json does not exist.*'0.50x_train', 'default'"):
        GeoBenchDataModule(root=str(tmp_path), task="m-task", partition="0.01x_train").split_files
    with pytest.raises(UserInputError, match=r"unknown band\(s\) \['SWIR_1'\]"):
        GeoBenchDataModule(root=str(tmp_path), task="m-task", bands=["SWIR_1"])
    with h5py.File(folder / "id_2.hdf5", "a") as sample:
        del sample["03 - Green"]
    with pytest.raises(UserInputError, match=r"id_2.hdf5 has no band '03 - Green'"):
        GeoBenchDataModule(root=str(tmp_path), task="m-task").dataset("val")[0]
    with pytest.raises(UserInputError, match="no folder m-nothing .* the tasks there: classification_v1.0/m-task"):
        GeoBenchDataModule(root=str(tmp_path), task="m-nothing")


# --- workbench fit on each layout --------------------------------------------------------------

def segmentation_model(num_frames: int) -> dict:
    return {"class_path": "workbench.tasks.SegmentationTask", "init_args": {
        "backbone": "prithvi_eo_v2_tiny_tl",
        "backbone_kwargs": {**TINY_BACKBONE, "img_size": SIZE, "patch_size": 8, "num_frames": num_frames},
        "decoder": "unet", "decoder_channels": 16,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}}


def test_fit_crop_classification(tmp_path: Path) -> None:
    crop_tree(tmp_path / "data")
    data = {"class_path": "datamodules.GeoSegmentationDataModule", "init_args": {
        "root": str(tmp_path / "data"), "layout": "crop_classification", "num_frames": 3, "num_classes": 13,
        "mean": CROP_MEAN, "std": CROP_STD, "batch_size": 2}}
    config = write_task_config(tmp_path, segmentation_model(3), data, "val/mIoU", "max", max_epochs=1)
    _, results = fit_run(config)
    assert results["test"]["test/mIoU"] == pytest.approx(
        reference_miou(results["best_checkpoint"], config, num_classes=13), abs=1e-5)


def test_fit_geobench_segmentation_and_classification(tmp_path: Path) -> None:
    geobench_task(tmp_path / "data", "m-seg", segmentation=True)
    geobench_task(tmp_path / "data", "m-cls", segmentation=False)
    data = {"class_path": "datamodules.GeoBenchDataModule",
            "init_args": {"root": str(tmp_path / "data"), "task": "m-seg", "batch_size": 2}}
    config = write_task_config(tmp_path / "seg", segmentation_model(1), data, "val/mIoU", "max", max_epochs=1)
    _, results = fit_run(config)
    assert results["test"]["test/mIoU"] == pytest.approx(
        reference_miou(results["best_checkpoint"], config, num_classes=3), abs=1e-5)

    model = segmentation_model(1)
    model["class_path"] = "workbench.tasks.ClassificationTask"
    model["init_args"] = {k: v for k, v in model["init_args"].items() if not k.startswith("decoder")}
    data["init_args"]["task"] = "m-cls"
    config = write_task_config(tmp_path / "cls", model, data, "val/F1", "max", max_epochs=1)
    _, results = fit_run(config)
    logits, labels = direct_outputs(results["best_checkpoint"], config)
    accuracy = MulticlassAccuracy(3, average="micro")(logits.argmax(1), labels).item()
    assert results["test"]["test/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert yaml.safe_load(config.read_text())["data"]["init_args"]["task"] == "m-cls"
