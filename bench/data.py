"""Data-pipeline throughput: chips/s of the GeoTIFF datamodules' training loaders.

Two sources: the embedded Sentinel-2 water data (one 1933×1947 6-band scene cut into 128-px
windows read lazily with rasterio) and a generated large tiled GeoTIFF (``--scene_size``², 6
bands uint16, 224-px windows). Every case reads ``--batches`` batches after one warm-up batch
and prints one JSON line; compare chips/s with a training run's samples/s (``results.json``).

    python bench/data.py
    python bench/data.py --workers 0 2 4 --batch_size 16

``--mode scenes`` compares, on the generated scene, today's chip loader
(``GeoSegmentationDataModule``: a grid of rasterio windows, chip cache off) with the torchgeo scene
loader (``GeoSceneDataModule``: ``RasterDataset`` ∩ label raster, ``RandomGeoSampler`` chips) at the
same chip size, batch size and bands:

    python bench/data.py --mode scenes --scene_size 2048 --workers 0 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_scene(path: Path, size: int) -> None:
    """A 6-band uint16 tiled GeoTIFF of smooth noise and its 2-class mask."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    profile = {"driver": "GTiff", "width": size, "height": size, "crs": "EPSG:32618", "tiled": True,
               "blockxsize": 256, "blockysize": 256, "transform": from_origin(400000, 4200000, 10, 10)}
    with rasterio.open(path / "scene.tif", "w", count=6, dtype="uint16", **profile) as img, \
            rasterio.open(path / "mask.tif", "w", count=1, dtype="uint8", **profile) as mask:
        for _, window in img.block_windows(1):
            shape = (window.height, window.width)
            img.write(rng.integers(0, 10000, (6, *shape), dtype=np.uint16), window=window)
            mask.write(rng.integers(0, 2, (1, *shape), dtype=np.uint8), window=window)


def throughput(datamodule: object, batches: int) -> dict:
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # warm-up: worker start, first reads
    start, chips = time.perf_counter(), 0
    for _ in range(batches):
        try:
            chips += len(next(iterator)["image"])
        except StopIteration:
            iterator = iter(loader)
    seconds = time.perf_counter() - start
    return {"chips": chips, "seconds": round(seconds, 3), "chips_per_s": round(chips / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--scene_size", type=int, default=4096)
    parser.add_argument("--mode", choices=["loaders", "scenes"], default="loaders",
                        help="loaders: the datamodules' training loaders; scenes: chip loader vs torchgeo scenes")
    args = parser.parse_args()
    from datamodules import GeoSceneDataModule, GeoSegmentationDataModule, Sentinel2WaterDataModule

    with tempfile.TemporaryDirectory() as tmp:
        write_scene(Path(tmp), args.scene_size)
        for workers in args.workers:
            same = {"chip_size": 224, "mean": [5000.0] * 6, "std": [2900.0] * 6, "split_block": 4,
                    "batch_size": args.batch_size, "num_workers": workers}
            cases = {
                "chips: GeoSegmentationDataModule (rasterio windows)": GeoSegmentationDataModule(
                    root=tmp, images="scene.tif", masks="mask.tif", cache_mb=0, augment=False, **same),
                "scenes: GeoSceneDataModule (torchgeo RandomGeoSampler)": GeoSceneDataModule(
                    root=tmp, images="scene.tif", labels="mask.tif", **same),
            } if args.mode == "scenes" else {
                "sentinel2_water (128 px windows)": Sentinel2WaterDataModule(
                    batch_size=args.batch_size, num_workers=workers),
                f"generated {args.scene_size}x{args.scene_size} scene (224 px windows)": GeoSegmentationDataModule(
                    root=tmp, images="scene.tif", masks="mask.tif", **same),
            }
            for name, datamodule in cases.items():
                result = throughput(datamodule, args.batches)
                print(json.dumps({"data": name, "workers": workers, "batch_size": args.batch_size, **result}),
                      flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
