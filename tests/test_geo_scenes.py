"""GeoSceneDataModule: torchgeo scenes in mixed CRSs, vector / raster labels, spatial splits, fit."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
import yaml
from rasterio.features import rasterize
from rasterio.transform import from_bounds, from_origin
from rasterio.warp import transform_bounds
from rasterio.windows import from_bounds as from_bounds_window
from torchgeo.samplers import GridGeoSampler

from datamodules import GeoSceneDataModule
from datamodules.bands import HLS_BANDS
from tests.conftest import TINY_BACKBONE, tiny_trainer, write_geotiff
from workbench.cli import main
from workbench.errors import UserInputError

SIZE = 96  # pixels per scene side
LEFT, TOP = 435730.0, 4179460.0  # scene A's upper-left corner, EPSG:32618, 10 m pixels
B_LEFT = LEFT + SIZE * 10 + 200  # scene B lies 200 m east of A (in EPSG:4326 on disk)


def make_scenes(root: Path) -> dict[str, Path]:
    """Scene A (EPSG:32618, 10 m, values in [0.01, 1.01), nodata 0 on a block) and scene B
    (EPSG:4326, values in [2, 3)),
    6 bands each; a geopackage with a class-1 rectangle on A and a class-2 one on B; a label
    raster on A's grid (class 1 on the left half, nodata 99 on the bottom rows)."""
    rng = np.random.default_rng(0)
    image_a = 0.01 + rng.random((6, SIZE, SIZE), dtype=np.float32)
    image_a[:, 20:30, 20:40] = 0  # nodata inside the class-1 polygon
    write_geotiff(root / "scenes" / "a.tif", image_a, transform=from_origin(LEFT, TOP, 10.0, 10.0), nodata=0)
    lonlat = transform_bounds("EPSG:32618", "EPSG:4326", B_LEFT, TOP - SIZE * 10, B_LEFT + SIZE * 10, TOP)
    write_geotiff(root / "scenes" / "b.tif", 2 + rng.random((6, SIZE, SIZE), dtype=np.float32), crs="EPSG:4326",
                  transform=from_bounds(*lonlat, SIZE, SIZE))
    polygons = gpd.GeoDataFrame(
        {"landcover": [1, 2]},
        geometry=[shapely.box(LEFT + 103, TOP - 817, LEFT + 701, TOP - 88),
                  shapely.box(B_LEFT + 250, TOP - 700, B_LEFT + 600, TOP - 300)],
        crs="EPSG:32618",
    )
    polygons.to_file(root / "labels.gpkg", driver="GPKG")
    label = np.zeros((1, SIZE, SIZE), np.uint8)
    label[:, :, : SIZE // 2] = 1
    label[:, -8:] = 99
    write_geotiff(root / "label_rasters" / "a.tif", label, transform=from_origin(LEFT, TOP, 10.0, 10.0), nodata=99)
    return {"root": root, "polygons": root / "labels.gpkg"}


def scene_datamodule(root: Path, **changes: object) -> GeoSceneDataModule:
    args = {"root": str(root), "images": "scenes/*.tif", "vector_labels": "labels.gpkg", "label_field": "landcover",
            "num_classes": 3, "mean": [0.0] * 6, "std": [1.0] * 6, "chip_size": 16, "split_block": 1,
            "split_ratios": (0.5, 0.25, 0.25), "batch_size": 4, **changes}
    return GeoSceneDataModule(**args)


def box_of(query: tuple[slice, slice, slice]) -> shapely.Polygon:
    x, y, _ = query
    return shapely.box(x.start, y.start, x.stop, y.stop)


def scene_a_pixels(path: Path, query: tuple[slice, slice, slice], bands: list[int]) -> np.ndarray:
    """Bands ``(L, H, W)`` of the chip ``query`` read with rasterio from a file on scene A's grid."""
    x, y, _ = query
    with rasterio.open(path) as src:
        return src.read(bands, window=from_bounds_window(x.start, y.start, x.stop, y.stop, src.transform))


def test_split_rois_bound_each_split(scenes: dict[str, Path]) -> None:
    rois = {"train": [LEFT, TOP - 960, LEFT + 480, TOP], "val": [LEFT + 480, TOP - 960, LEFT + 960, TOP],
            "test": [B_LEFT, TOP - 960, B_LEFT + 960, TOP]}
    datamodule = scene_datamodule(scenes["root"], split_rois=rois)
    for split, roi in rois.items():
        chips = [box_of(q) for q in datamodule.sampler(split)]
        assert chips and all(shapely.box(*roi).contains(c) for c in chips)
    overlapping = {**rois, "val": [LEFT + 400, TOP - 960, LEFT + 960, TOP]}
    with pytest.raises(UserInputError, match="data.split_rois: ROIs in input rois can't overlap"):
        scene_datamodule(scenes["root"], split_rois=overlapping).split_scenes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_scenes(tmp_path_factory.mktemp("geo_scenes"))


def test_batch_mask_is_the_rasterised_polygons(scenes: dict[str, Path]) -> None:
    datamodule = scene_datamodule(scenes["root"])
    polygons = gpd.read_file(scenes["polygons"])
    scene_a = shapely.box(LEFT, TOP - SIZE * 10, LEFT + SIZE * 10, TOP)
    compared = labelled = 0
    for stage, split in (("validate", "val"), ("test", "test")):
        datamodule.setup(stage)
        loader = datamodule._loader(split)
        queries = list(loader.sampler)
        batches = list(loader)
        masks = torch.cat([b["mask"] for b in batches])
        assert batches[0]["image"].shape == (4, 6, 16, 16) and batches[0]["image"].dtype == torch.float32
        assert masks.dtype == torch.int64 and len(masks) == len(queries)
        for query, mask in zip(queries, masks):
            if not scene_a.contains(box_of(query)):  # axis-aligned chips of the scene in the dataset CRS
                continue
            x, y, _ = query
            expected = rasterize(zip(polygons.geometry, polygons.landcover), out_shape=(16, 16),
                                 transform=from_bounds(x.start, y.start, x.stop, y.stop, 16, 16))
            expected[(scene_a_pixels(scenes["root"] / "scenes" / "a.tif", query, [1]) == 0)[0]] = 255
            assert torch.equal(mask, torch.from_numpy(expected).long())
            compared += 1
            labelled += int((expected == 1).sum())
    assert compared > 0 and 0 < labelled < compared * 16 * 16


def test_mixed_crs_scenes_are_both_sampled_and_nodata_is_ignored(scenes: dict[str, Path]) -> None:
    datamodule = scene_datamodule(scenes["root"])
    assert datamodule.scenes.crs == rasterio.crs.CRS.from_epsg(32618)  # the first file's
    footprints = datamodule.scenes.datasets[0].index
    seen, nodata_pixels = set(), 0
    for split in ("train", "val", "test"):
        dataset, sampler = datamodule.dataset(split), datamodule.sampler(split)
        for query in sampler:
            sample = dataset[query]
            valid = sample["image"].ne(0).any(0)
            assert (sample["mask"][~valid] == 255).all()  # nodata pixels are ignored
            nodata_pixels += int((~valid).sum())
            centre = box_of(query).centroid
            scene = Path(footprints.filepath[footprints.contains(centre).to_numpy()].iloc[0]).name
            if valid.any():
                raw = sample["image"][:, valid]
                # scene B's values (2..3) come through the warp from EPSG:4326; scene A's stay in 0..1
                assert bool(((raw >= 1.9) & (raw <= 3.1)).all()) if scene == "b.tif" else bool((raw < 1.1).all())
                seen.add(scene)
    assert seen == {"a.tif", "b.tif"} and nodata_pixels > 0


def test_split_regions_and_chips_do_not_overlap(scenes: dict[str, Path]) -> None:
    datamodule = scene_datamodule(scenes["root"], chips_per_epoch=200)
    datamodule.setup("fit")
    regions = {s: shapely.union_all(datamodule.split_scenes[s].index.geometry) for s in ("train", "val", "test")}
    chips = {s: shapely.union_all([box_of(q) for q in datamodule.sampler(s)]) for s in ("train", "val", "test")}
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        assert regions[first].intersection(regions[second]).area == pytest.approx(0.0, abs=1e-6)
        assert chips[first].intersection(chips[second]).area == pytest.approx(0.0, abs=1e-6)
        assert chips[first].area > 0 and chips[second].area > 0
    for split in ("train", "val", "test"):  # every chip lies inside its split's region
        assert chips[split].difference(regions[split]).area == pytest.approx(0.0, abs=1e-6)


def test_label_rasters_with_nodata(scenes: dict[str, Path]) -> None:
    datamodule = scene_datamodule(scenes["root"], images="scenes/a.tif", labels="label_rasters/*.tif",
                                  vector_labels=None, label_field=None)
    datamodule.setup("test")
    queries = list(datamodule.sampler("test"))
    assert queries
    for query in queries:
        expected = scene_a_pixels(scenes["root"] / "label_rasters" / "a.tif", query, [1])[0].astype(np.int64)
        expected[expected == 99] = 255  # the label raster's nodata
        expected[(scene_a_pixels(scenes["root"] / "scenes" / "a.tif", query, [1]) == 0)[0]] = 255  # the image's
        assert torch.equal(datamodule.datasets["test"][query]["mask"], torch.from_numpy(expected))


def test_stats_file_is_computed_from_the_training_chips(scenes: dict[str, Path], tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    datamodule = scene_datamodule(scenes["root"], images="scenes/a.tif", mean=None, std=None,
                                  stats_file=str(stats_file), file_bands=list(HLS_BANDS), bands=["RED", "BLUE"])
    datamodule.setup("fit")
    chips = GridGeoSampler(datamodule.split_scenes["train"], 16, 16)  # the grid chips the statistics read
    reference = np.concatenate([scene_a_pixels(scenes["root"] / "scenes" / "a.tif", q, [3, 1]).reshape(2, -1)
                                for q in chips], axis=1)
    reference = reference[:, (reference != 0).all(0)]  # without scene A's nodata pixels
    stats = yaml.safe_load(stats_file.read_text())
    assert stats["bands"] == ["RED", "BLUE"] and stats["pixels"] == reference.shape[1]
    np.testing.assert_allclose(stats["mean"], reference.mean(1), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], reference.std(1), rtol=1e-4)


def test_bad_inputs_are_named(scenes: dict[str, Path]) -> None:
    with pytest.raises(UserInputError, match=r"data.images: no files match .*nothing/\*.tif"):
        scene_datamodule(scenes["root"], images="nothing/*.tif")
    with pytest.raises(UserInputError, match=r"labels.gpkg has no column 'class'; its columns are \['landcover'\]"):
        scene_datamodule(scenes["root"], label_field="class").scenes
    with pytest.raises(UserInputError, match=r"data.labels: no files match .*missing/\*.tif"):
        scene_datamodule(scenes["root"], labels="missing/*.tif", vector_labels=None, label_field=None).scenes
    with pytest.raises(UserInputError, match="set one of data.labels"):
        scene_datamodule(scenes["root"], vector_labels=None)
    with pytest.raises(UserInputError, match=r"values \['2'\] that are not classes 0..1"):
        scene_datamodule(scenes["root"], num_classes=2).scenes


def test_unreadable_and_unreferenced_scenes_are_named(tmp_path: Path) -> None:
    write_geotiff(tmp_path / "no_crs.tif", np.ones((1, 8, 8), np.float32), crs=None)
    (tmp_path / "broken.tif").write_text("not a GeoTIFF")
    with pytest.raises(UserInputError, match=r"data.images: .*no_crs.tif has no CRS"):
        scene_datamodule(tmp_path, images="no_crs.tif")
    with pytest.raises(UserInputError, match=r"data.images: .*broken.tif could not be opened as a raster"):
        scene_datamodule(tmp_path, images="*.tif")


def test_fit_runs_end_to_end(scenes: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "seed_everything": 0,
        "trainer": tiny_trainer(tmp_path, "val/mIoU", "max", max_epochs=1),
        "model": {"class_path": "workbench.tasks.SegmentationTask",
                  "init_args": {"backbone": "prithvi_eo_v2_tiny_tl", "backbone_kwargs": dict(TINY_BACKBONE),
                                "decoder": "unet", "decoder_channels": 16}},
        "data": {"class_path": "datamodules.GeoSceneDataModule",
                 "init_args": {"root": str(scenes["root"]), "images": "scenes/*.tif", "vector_labels": "labels.gpkg",
                               "label_field": "landcover", "file_bands": list(HLS_BANDS), "num_classes": 3,
                               "class_names": ["other", "field", "forest"], "mean": [1.0] * 6, "std": [1.0] * 6,
                               "chip_size": 32, "split_block": 1, "chips_per_epoch": 8, "batch_size": 4}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    results = yaml.safe_load((tmp_path / "runs" / "tiny" / "version_0" / "results.json").read_text())
    assert "test/mIoU" in results["test"] and "val/IoU_forest" in results["val"]
