"""Shared test fixtures: tiny GeoTIFFs written by the tests themselves."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import rasterio
import torch
import yaml
from rasterio.transform import from_origin
from torch.utils.data import default_collate
from torchmetrics.classification import MulticlassJaccardIndex

from workbench.merge.checkpoints import load_task


def write_geotiff(
    path: Path,
    array: np.ndarray,
    *,
    crs: str = "EPSG:32618",
    transform: rasterio.Affine | None = None,
    nodata: float | None = None,
) -> Path:
    """Write ``array`` ``(C, H, W)`` as a GeoTIFF (10 m pixels by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    transform = transform or from_origin(435730.0, 4179460.0, 10.0, 10.0)
    with rasterio.open(
        path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
        dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata,
    ) as dst:
        dst.write(array)
    return path


def smooth_field(rng: np.random.Generator, size: int, cells: int = 2) -> np.ndarray:
    """A smooth random field ``(size, size)`` in [0, 1]: coarse noise upsampled."""
    coarse = rng.random((cells, cells))
    reps = -(-size // cells)
    return np.kron(coarse, np.ones((reps, reps)))[:size, :size]


def make_segmentation_chips(root: Path, n: int = 8, size: int = 32, bands: int = 6, seed: int = 0) -> dict[str, str]:
    """A tiny glob-layout dataset whose mask is learnable: water where band 1 > band 3.

    Bands are smooth fields in [0, 1] (float32) plus a little noise; returns the root and the
    ``images``/``masks`` patterns.
    """
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = np.stack([smooth_field(rng, size) for _ in range(bands)]).astype(np.float32)
        image += rng.normal(0, 0.02, image.shape).astype(np.float32)
        mask = (image[1] > image[3]).astype(np.uint8)[None]
        write_geotiff(root / "images" / f"chip_{i:03d}.tif", image)
        write_geotiff(root / "masks" / f"chip_{i:03d}.tif", mask)
    return {"root": str(root), "images": "images/*.tif", "masks": "masks/*.tif"}


def make_regression_chips(root: Path, n: int = 24, size: int = 32, seed: int = 0) -> dict[str, str]:
    """Images as :func:`make_segmentation_chips`; targets ``100 * (band1 - band3) + 50`` (float32)
    with nodata (-9999) on each chip's top-left quarter: sparse labels."""
    chips = make_segmentation_chips(root, n=n, size=size, seed=seed)
    for i in range(n):
        with rasterio.open(root / "images" / f"chip_{i:03d}.tif") as src:
            image = src.read()
        target = (100 * (image[1] - image[3]) + 50).astype(np.float32)
        target[: size // 2, : size // 2] = -9999
        write_geotiff(root / "targets" / f"chip_{i:03d}.tif", target[None], nodata=-9999)
    return {**chips, "masks": "targets/*.tif"}


TINY_BACKBONE = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32, "num_frames": 1}


def tiny_trainer(tmp_path: Path, monitor: str, mode: str, max_epochs: int = 6) -> dict:
    """The trainer section of the tiny test configs: CPU, CSV logs under ``tmp_path/runs/tiny``,
    best (by ``monitor``) and last checkpoints, weight export."""
    return {
        "max_epochs": max_epochs,
        "accelerator": "cpu",
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"},
        },
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": monitor, "mode": mode}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"filename": "last"}},
            {"class_path": "workbench.export.ExportWeights"},
        ],
    }


def write_task_config(tmp_path: Path, model: dict, data: dict, monitor: str, mode: str = "min",
                      max_epochs: int = 6) -> Path:
    """A tiny fit config of ``model`` and ``data`` sections (class_path + init_args)."""
    config = {"seed_everything": 0, "trainer": tiny_trainer(tmp_path, monitor, mode, max_epochs),
              "model": model, "data": data}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_config(tmp_path: Path, **changes: dict) -> Path:
    """A tiny fit config over generated chips; ``changes`` update sections (deep for init_args)."""
    chips = make_segmentation_chips(tmp_path / "chips", n=24, size=32)
    config = {
        "seed_everything": 0,
        "trainer": tiny_trainer(tmp_path, "val/mIoU", "max"),
        "model": {
            "class_path": "workbench.tasks.SegmentationTask",
            "init_args": {
                "backbone": "prithvi_eo_v2_tiny_tl",
                "backbone_kwargs": dict(TINY_BACKBONE),
                "decoder": "unet",  # all four levels: fcn reads only the stride-32 map (1x1 on a 32 px chip)
                "decoder_channels": 16,
                "strategy": {
                    "class_path": "workbench.strategies.LoRA",
                    "init_args": {"rank": 4, "alpha": 8},
                },
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
            },
        },
        "data": {
            "class_path": "datamodules.GeoSegmentationDataModule",
            "init_args": {
                "layout": "glob",
                "root": chips["root"],
                "images": chips["images"],
                "masks": chips["masks"],
                "num_classes": 2,
                "mean": [0.5] * 6,
                "std": [0.25] * 6,
                "batch_size": 4,
                "num_workers": 0,
            },
        },
    }
    for section, update in changes.items():
        target = config[section]["init_args"] if "init_args" in config[section] else config[section]
        target.update(update)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_classification_config(tmp_path: Path, multi_label: bool = False, **changes: dict) -> Path:
    """:func:`write_config` turned into scene classification: a chip is ``water`` when over half
    its mask is water, else ``land`` (multi-label: plus ``any`` on every chip); ``changes``
    update the model/data init_args and the trainer afterwards."""
    path = write_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    chips = Path(config["data"]["init_args"]["root"])
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        for mask_file in sorted((chips / "masks").glob("*.tif")):
            with rasterio.open(mask_file) as src:
                water = src.read(1).mean() > 0.5
            csv.writer(f).writerow([mask_file.name, ("water" if water else "land") + (";any" if multi_label else "")])
    classes = ["land", "water", "any"] if multi_label else ["land", "water"]
    config["trainer"]["callbacks"][0]["init_args"] = {"monitor": "val/F1", "mode": "max"}
    model, data = config["model"], config["data"]
    model["class_path"] = "workbench.tasks.ClassificationTask"
    model["init_args"] = {k: v for k, v in model["init_args"].items() if k not in ("decoder", "decoder_channels")} | {
        "multi_label": multi_label, **changes.get("model", {})}
    data["class_path"] = "datamodules.GeoClassificationDataModule"
    data["init_args"] = {k: v for k, v in data["init_args"].items() if k != "masks"} | {
        "labels": str(labels), "multi_label": multi_label, "num_classes": len(classes), "class_names": classes,
        **changes.get("data", {})}
    config["trainer"].update(changes.get("trainer", {}))
    path.write_text(yaml.safe_dump(config))
    return path


def fit_run(config: Path, *args: str) -> tuple[list[float], dict]:
    """``workbench fit --config config *args`` (must succeed) → per-epoch training losses and
    ``results.json`` ({} without one) of the run it wrote (the config's newest ``version_N``)."""
    from workbench.cli import main

    assert main(["fit", "--config", str(config), *args]) == 0
    logger = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]
    run = sorted((Path(logger["save_dir"]) / logger["name"]).glob("version_*"), key=lambda p: int(p.name[8:]))[-1]
    with open(run / "metrics.csv") as f:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    results = run / "results.json"
    return losses, json.loads(results.read_text()) if results.is_file() else {}


def split_samples(config: Path, split: str = "test") -> list[dict[str, torch.Tensor]]:
    """The samples of ``split`` as the config's datamodule serves them (same files, split and
    normalisation; augmentation is training-only), for baselines computed in the tests."""
    data = yaml.safe_load(config.read_text())["data"]
    module, name = data["class_path"].rsplit(".", 1)
    dataset = getattr(importlib.import_module(module), name)(**data["init_args"]).dataset(split)
    return [dataset[i] for i in range(len(dataset))]


def direct_outputs(checkpoint: str | Path, config: Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, targets)`` of a checkpoint's model on the config's ``split``, computed here
    outside Lightning, to score as a reference for the numbers a run reports: the task rebuilt
    from the checkpoint alone, all samples in one batch; outputs are logits against ``mask`` or
    ``label``, or values in target units against the labelled (finite) pixels of ``target``."""
    task = load_task(checkpoint).eval()
    batch = default_collate(split_samples(config, split))
    with torch.no_grad():
        out = task.forward_batch(batch)
    if "target" in batch:
        labelled = batch["target"].isfinite()
        return task.in_target_units(out[:, 0])[labelled], batch["target"][labelled]
    return out, batch["mask"] if "mask" in batch else batch["label"]


def reference_miou(checkpoint: str | Path, config: Path, num_classes: int = 2) -> float:
    """Test mIoU of a segmentation checkpoint, computed by :func:`direct_outputs`."""
    logits, masks = direct_outputs(checkpoint, config)
    return MulticlassJaccardIndex(num_classes, ignore_index=255)(logits.argmax(1), masks).item()


def majority_class_miou(config: Path) -> float:
    """Test mIoU of the best constant prediction (every pixel one class) on the config's test split:
    what a model that learnt nothing from the bands scores at most."""
    init = yaml.safe_load(config.read_text())["data"]["init_args"]
    masks = torch.stack([s["mask"] for s in split_samples(config)])
    metric = MulticlassJaccardIndex(init["num_classes"], ignore_index=init.get("ignore_index", 255))
    return max(metric(torch.full_like(masks, c), masks).item() for c in range(init["num_classes"]))
