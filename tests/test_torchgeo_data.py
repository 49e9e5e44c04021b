"""torchgeo data through `workbench fit` (a GeoDataset with a sampler, a torchgeo datamodule) and
YAML batch augmentations: the pixels the model sees against torchgeo's own samples."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from pyproj import Transformer
from rasterio.transform import from_origin
from torchgeo.datamodules import EuroSAT100DataModule
from torchgeo.datasets import EuroSAT100, IntersectionDataset, Landsat8, RasterDataset

from datamodules import TorchGeoDataModule
from datamodules.augment import BatchAugmentation
from tests.conftest import TINY_BACKBONE, write_geotiff, write_task_config
from workbench.cli import main
from workbench.errors import UserInputError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
HFLIP = {"class_path": "kornia.augmentation.RandomHorizontalFlip", "init_args": {"p": 1.0}}


class ImageChips(RasterDataset):
    filename_glob = "image_*.tif"


class MaskChips(RasterDataset):
    filename_glob = "mask_*.tif"
    is_image = False


class ChipsWithMasks(IntersectionDataset):
    """Image and mask GeoTIFFs of ``paths`` as one torchgeo GeoDataset (how a user combines them)."""

    def __init__(self, paths: str) -> None:
        super().__init__(ImageChips(paths), MaskChips(paths))


class DatedImages(RasterDataset):
    filename_glob = "image_*.tif"
    filename_regex = r"^image_(?P<date>\d{8})_\d+\.tif$"
    date_format = "%Y%m%d"


class DatedMasks(DatedImages):
    filename_glob = "mask_*.tif"
    filename_regex = r"^mask_(?P<date>\d{8})_\d+\.tif$"
    is_image = False


class DatedChipsWithMasks(IntersectionDataset):
    """As :class:`ChipsWithMasks`, the acquisition date read from the file names."""

    def __init__(self, paths: str) -> None:
        super().__init__(DatedImages(paths), DatedMasks(paths))


class BatchRecorder(Callback):
    """Keeps every batch the model is given, by stage, as the training step receives it."""

    batches: ClassVar[dict[str, list[dict[str, torch.Tensor]]]] = {"train": [], "val": []}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches["train"].append({k: v.clone() for k, v in batch.items()})

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self.batches["val"].append({k: v.clone() for k, v in batch.items()})


def write_scenes(root: Path, files: int = 4, size: int = 48, date: str = "") -> None:
    """``files`` image (3 bands, float32) + mask (0/1, 255 unlabelled) GeoTIFFs, each at its own place
    (``date``: ``YYYYMMDD`` in the names)."""
    rng = np.random.default_rng(0)
    for i in range(files):
        transform = from_origin(435730.0 + 1000.0 * i, 4179460.0, 10.0, 10.0)
        image = rng.random((3, size, size), dtype=np.float32)
        mask = (image[0] > image[1]).astype(np.uint8)
        mask[:4] = 255
        stem = f"{date}_{i}" if date else str(i)
        write_geotiff(root / f"image_{stem}.tif", image, transform=transform)
        write_geotiff(root / f"mask_{stem}.tif", mask[None], transform=transform)


def scene_data(root: Path, **changes: Any) -> dict:
    return {"class_path": "datamodules.TorchGeoDataModule", "init_args": {
        "dataset": {"class_path": "tests.test_torchgeo_data.ChipsWithMasks", "init_args": {"paths": str(root)}},
        "sampler": {"class_path": "torchgeo.samplers.RandomGeoSampler", "init_args": {"size": 32, "length": 8}},
        "split_ratios": [0.5, 0.25, 0.25], "mean": MEAN, "std": STD, "num_classes": 2, "batch_size": 4, **changes}}


def tiny_model(task: str = "SegmentationTask", **extra: Any) -> dict:
    return {"class_path": f"workbench.tasks.{task}", "init_args": {
        "backbone": "prithvi_eo_v2_tiny_tl", "backbone_kwargs": dict(TINY_BACKBONE), **extra,
        "strategy": {"class_path": "workbench.strategies.Full"}}}


def recorded_fit(tmp_path: Path, model: dict, data: dict, monitor: str) -> None:
    """``workbench fit`` for one epoch with :class:`BatchRecorder` (its batches reset first)."""
    config = write_task_config(tmp_path, model, data, monitor, max_epochs=1)
    text = config.read_text().replace("callbacks:", "callbacks:\n  - class_path: tests.test_torchgeo_data.BatchRecorder", 1)
    config.write_text(text)
    for batches in BatchRecorder.batches.values():
        batches.clear()
    assert main(["fit", "--config", str(config), "--test_after_fit", "false"]) == 0


def assert_batches_are_samples(batches: list[dict], references: list[dict], keys: tuple[str, ...]) -> None:
    """Every batch item equals one reference sample in every key (exactly), and every reference is seen."""
    seen = set()
    for batch in batches:
        for i in range(len(batch["image"])):
            matches = [j for j, ref in enumerate(references) if all(torch.equal(batch[k][i], ref[k]) for k in keys)]
            assert matches, "a batch item is none of the dataset's samples"
            seen.add(matches[0])
    assert seen == set(range(len(references)))


@pytest.mark.parametrize("augment", [False, True])
def test_geodataset_fit_sees_torchgeo_samples(tmp_path: Path, augment: bool) -> None:
    write_scenes(tmp_path / "scenes")
    data = scene_data(tmp_path / "scenes", **({"augmentations": [HFLIP]} if augment else {}))
    recorded_fit(tmp_path, tiny_model(decoder="unet", decoder_channels=16), data, "val/mIoU")
    module = TorchGeoDataModule(**data["init_args"])
    raw = ChipsWithMasks(str(tmp_path / "scenes"))  # torchgeo's own samples at the module's boxes
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    for split in ("train", "val"):
        flip = augment and split == "train"  # validation batches are never augmented
        references = []
        for query in module.dataset(split).queries:
            sample = raw[query]
            image, mask = (sample["image"] - mean) / std, sample["mask"].squeeze(0).long()
            references.append({"image": image.flip(-1) if flip else image, "mask": mask.flip(-1) if flip else mask})
        batches = BatchRecorder.batches[split]
        assert all(b["mask"].dtype == torch.int64 and b["image"].dtype == torch.float32 for b in batches)
        assert any((b["mask"] == 255).any() for b in batches)  # unlabelled pixels keep the ignore value
        assert_batches_are_samples(batches, references, ("image", "mask"))


def write_eurosat100(root: Path, classes: tuple[str, ...] = ("Forest", "River"), size: int = 32) -> None:
    """The on-disk layout of torchgeo's EuroSAT100 (split files + class folders of 13-band GeoTIFFs)."""
    rng = np.random.default_rng(1)
    folder = root.joinpath(*EuroSAT100.base_dir.split("/"))
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        names = []
        for name in classes:
            for i in range(count):
                file = f"{name}_{split}{i}.tif"
                write_geotiff(folder / name / file, rng.integers(0, 3000, (13, size, size)).astype(np.uint16))
                names.append(file.replace(".tif", ".jpg"))
        (root / EuroSAT100.split_filenames[split]).write_text("\n".join(names) + "\n")


def test_torchgeo_datamodule_fit_applies_its_normalisation(tmp_path: Path) -> None:
    write_eurosat100(tmp_path / "eurosat")
    data = {"class_path": "datamodules.TorchGeoDataModule", "init_args": {"datamodule": {
        "class_path": "torchgeo.datamodules.EuroSAT100DataModule",
        "init_args": {"root": str(tmp_path / "eurosat"), "batch_size": 2}}}}
    recorded_fit(tmp_path, tiny_model("ClassificationTask"), data, "val/F1")
    module = TorchGeoDataModule(**data["init_args"])
    assert (module.num_classes, module.class_names) == (2, ["Forest", "River"])
    assert module.bands[1:4] == ["BLUE", "GREEN", "RED"]  # B02..B04 under their canonical names
    stats = EuroSAT100DataModule()  # torchgeo's own normalisation constants
    mean, std = stats.mean[:, None, None], stats.std[:, None, None]
    for split in ("train", "val"):
        dataset = EuroSAT100(str(tmp_path / "eurosat"), split=split)
        references = [{"image": (s["image"] - mean) / std, "label": s["label"]} for s in dataset]
        assert_batches_are_samples(BatchRecorder.batches[split], references, ("image", "label"))


def test_missing_torchgeo_dataset_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = {"class_path": "datamodules.TorchGeoDataModule", "init_args": {"datamodule": {
        "class_path": "torchgeo.datamodules.EuroSAT100DataModule", "init_args": {"root": str(tmp_path / "none")}}}}
    config = write_task_config(tmp_path, tiny_model("ClassificationTask"), data, "val/F1", max_epochs=1)
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "none") in err and "download: true" in err


def test_augmentation_moves_image_and_mask_together() -> None:
    torch.manual_seed(0)
    image = torch.rand(2, 3, 2, 16, 16)  # (B, C, T, H, W): frames share the draw
    mask = torch.randint(0, 3, (2, 16, 16))
    mask[:, :3] = 255
    batch = {"image": image, "mask": mask, "label": torch.tensor([0, 1])}
    flipped = BatchAugmentation([HFLIP])(batch)
    assert torch.equal(flipped["image"], image.flip(-1)) and torch.equal(flipped["mask"], mask.flip(-1))
    assert flipped["mask"].dtype == torch.int64 and torch.equal(flipped["label"], batch["label"])
    rotate = {"class_path": "kornia.augmentation.RandomRotation", "init_args": {"degrees": [45.0, 45.0], "p": 1.0}}
    rotated = BatchAugmentation([rotate])({"image": image[:, :, 0], "mask": torch.zeros_like(mask)}, ignore_index=99)
    assert rotated["mask"][:, 0, 0].tolist() == [99, 99]  # corners come from outside the chip: ignored
    assert rotated["mask"][:, 8, 8].tolist() == [0, 0] and set(rotated["mask"].unique().tolist()) == {0, 99}


def test_augmentations_only_on_training_batches(tmp_path: Path) -> None:
    write_scenes(tmp_path)
    module = TorchGeoDataModule(**scene_data(tmp_path, augmentations=[HFLIP])["init_args"])
    batch = {"image": torch.rand(2, 3, 8, 8), "mask": torch.randint(0, 2, (2, 8, 8))}
    for training in (True, False):
        module.trainer = SimpleNamespace(training=training)
        out = module.on_after_batch_transfer(dict(batch), 0)
        assert torch.equal(out["image"], batch["image"].flip(-1) if training else batch["image"])


def test_bad_augmentation_and_missing_sampler_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"augmentations\[0\].class_path .kornia.augmentation.NoSuchFlip"):
        BatchAugmentation([{"class_path": "kornia.augmentation.NoSuchFlip"}])
    write_scenes(tmp_path)
    module = TorchGeoDataModule(**scene_data(tmp_path, sampler=None)["init_args"])
    with pytest.raises(UserInputError, match="data.init_args.sampler"):
        module.dataset("train")


def test_stats_of_a_torchgeo_dataset_feed_its_normalisation(tmp_path: Path) -> None:
    write_scenes(tmp_path / "scenes")
    data = scene_data(tmp_path / "scenes", mean=None, std=None, stats_file=str(tmp_path / "stats.json"))
    config = write_task_config(tmp_path, tiny_model(), data, "val/mIoU", max_epochs=1)
    assert main(["stats", "--config", str(config), "--out", str(tmp_path / "stats.json")]) == 0
    module = TorchGeoDataModule(**data["init_args"])
    raw = ChipsWithMasks(str(tmp_path / "scenes"))
    pixels = torch.stack([raw[q]["image"] for q in module.dataset("train", normalize=False).queries]).double()
    mean, std = pixels.mean((0, 2, 3)), pixels.std((0, 2, 3), correction=0)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["bands"] == ["band_0", "band_1", "band_2"]
    assert np.allclose(stats["mean"], mean.numpy()) and np.allclose(stats["std"], std.numpy())
    sample, query = module.dataset("train")[0], module.dataset("train").queries[0]
    expected = (raw[query]["image"] - mean.float()[:, None, None]) / std.float()[:, None, None]
    assert torch.allclose(sample["image"], expected, atol=1e-5)


def test_geodataset_coordinates_reach_the_model(tmp_path: Path) -> None:
    write_scenes(tmp_path / "scenes", date="20230615")
    data = scene_data(tmp_path / "scenes", coords=True)
    data["init_args"]["dataset"]["class_path"] = "tests.test_torchgeo_data.DatedChipsWithMasks"
    recorded_fit(tmp_path, tiny_model(decoder="unet", decoder_channels=16), data, "val/mIoU")
    to_lonlat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)  # the files' CRS
    day = pd.Timestamp("2023-06-15")
    module = TorchGeoDataModule(**data["init_args"])
    raw = DatedChipsWithMasks(str(tmp_path / "scenes"))
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    references = []
    for x, y, _ in module.dataset("train").queries:
        lon, lat = to_lonlat.transform((x.start + x.stop) / 2, (y.start + y.stop) / 2)
        references.append({"image": (raw[x, y]["image"] - mean) / std,
                           "location_coords": torch.tensor([lat, lon], dtype=torch.float32),
                           "temporal_coords": torch.tensor([[day.year, day.dayofyear]], dtype=torch.float32)})
    assert_batches_are_samples(BatchRecorder.batches["train"], references,
                               ("image", "location_coords", "temporal_coords"))
    undated = TorchGeoDataModule(**scene_data(tmp_path / "scenes", coords=True)["init_args"])
    with pytest.raises(UserInputError, match="carry no dates"):
        undated.dataset("train")[0]


LANDSAT_BANDS = ["B2", "B3", "B4", "B5", "B6", "B7"]


def write_landsat_scene(root: Path, size: int = 64) -> None:
    """One Landsat-8 L1TP scene as six band files named as USGS names them (uint16 DN)."""
    rng = np.random.default_rng(2)
    for band in LANDSAT_BANDS:
        write_geotiff(root / f"LC08_L1TP_224078_20200518_20200518_01_RT_{band}.TIF",
                      rng.integers(5000, 15000, (1, size, size)).astype(np.uint16), crs="EPSG:32621",
                      transform=from_origin(717345.0, -2776995.0, 30.0, 30.0))


def landsat_args(root: Path, size: int = 16, **changes: Any) -> dict[str, Any]:
    return {"dataset": {"class_path": "torchgeo.datasets.Landsat8", "init_args": {"paths": str(root), "bands": LANDSAT_BANDS}},
            "sampler": {"class_path": "torchgeo.samplers.RandomGeoSampler", "init_args": {"size": size, "length": 6}},
            "mean": [1.0e4] * 6, "std": [3.0e3] * 6, "split_grid": 4, **changes}


def landsat_data(root: Path, **changes: Any) -> TorchGeoDataModule:
    return TorchGeoDataModule(**landsat_args(root, **changes))


def test_torchgeo_landsat_bands_take_hls_names_and_images_alone_have_no_classes(tmp_path: Path) -> None:
    """torchgeo's Landsat8 numbers bands as OLI does (B5 is NIR, not Sentinel-2's red edge); images
    without masks or labels (masked-autoencoder data) have no classes instead of an error."""
    write_landsat_scene(tmp_path)
    data = landsat_data(tmp_path)
    assert data.bands == ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
    assert landsat_data(tmp_path, bands=["B5", "B6"]).bands == ["NIR_NARROW", "SWIR_1"]
    assert (data.num_classes, data.class_names) == (0, [])
    write_scenes(tmp_path / "s2")  # not a Landsat dataset: Sentinel-2 numbering
    assert TorchGeoDataModule(**scene_data(tmp_path / "s2", bands=["B5", "B11"])["init_args"]).bands == ["B5", "SWIR_1"]


def test_grid_cell_split_reads_every_split(tmp_path: Path) -> None:
    """``split_grid`` cuts each file into cells dealt to the splits: every split reads its boxes
    (torchgeo 0.8.1's grid split loses the file paths and the CRS; they are put back), and the
    splits' cells do not overlap."""
    write_landsat_scene(tmp_path)
    data = landsat_data(tmp_path)
    whole = data.split_datasets["train"]
    cells = {}
    for split, dataset in data.split_datasets.items():
        assert dataset.index.crs == whole.index.crs is not None
        sample = data.dataset(split)[0]
        assert sample["image"].shape == (6, 16, 16) and torch.isfinite(sample["image"]).all()
        cells[split] = dataset.index.geometry.union_all()
    assert cells["train"].intersection(cells["val"]).area == 0 == cells["val"].intersection(cells["test"]).area
    with pytest.raises(UserInputError, match="split_grid: the val and test split.* 1 file.*split_grid 1"):
        landsat_data(tmp_path, split_grid=1).split_datasets


def test_mae_pretraining_on_torchgeo_landsat_sees_its_samples(tmp_path: Path) -> None:
    """Images alone (no mask, no label) through ``workbench fit`` with the masked-autoencoder task:
    the batches are torchgeo's Landsat8 samples at the module's boxes, normalised, pixel for pixel."""
    write_landsat_scene(tmp_path / "landsat", size=192)
    data = {"class_path": "datamodules.TorchGeoDataModule", "init_args": {**landsat_args(tmp_path / "landsat", size=32),
                                                                           "coords": True, "batch_size": 3}}
    model = {"class_path": "workbench.tasks.MAEPretrainTask", "init_args": {
        "backbone": "prithvi_eo_v2_tiny_tl", "backbone_kwargs": dict(TINY_BACKBONE),
        "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}}
    recorded_fit(tmp_path, model, data, "val/loss")
    module = TorchGeoDataModule(**data["init_args"])
    raw = Landsat8(paths=str(tmp_path / "landsat"), bands=LANDSAT_BANDS)
    for split in ("train", "val"):
        references = [{"image": (raw[query]["image"] - 1.0e4) / 3.0e3} for query in module.dataset(split).queries]
        batches = BatchRecorder.batches[split]
        assert all(set(b) == {"image", "location_coords", "temporal_coords"} for b in batches)
        assert_batches_are_samples(batches, references, ("image",))
