"""Pixel-wise regression: sparse/nodata targets, masked loss, CLI fit and float32 prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from datamodules import GeoRegressionDataModule
from tests.conftest import TINY_BACKBONE, direct_outputs, fit_run, make_regression_chips, write_config, write_geotiff
from workbench.cli import main
from workbench.tasks import RegressionTask


def regression_config(tmp_path: Path, epochs: int = 6) -> Path:
    """The tiny segmentation config turned into a regression one."""
    path = write_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    chips = make_regression_chips(tmp_path / "reg", n=24, size=32)
    config["trainer"]["max_epochs"] = epochs
    config["trainer"]["callbacks"][0]["init_args"] = {"monitor": "val/RMSE", "mode": "min"}
    model = config["model"]
    model["class_path"] = "workbench.tasks.RegressionTask"
    model["init_args"].update(target_name="index", target_mean=50.0, target_std=20.0)
    data = config["data"]
    data["class_path"] = "datamodules.GeoRegressionDataModule"
    data["init_args"].update(root=chips["root"], images=chips["images"], masks=chips["masks"])
    path.write_text(yaml.safe_dump(config))
    return path


def test_targets_are_nan_where_unlabelled(tmp_path: Path) -> None:
    chips = make_regression_chips(tmp_path, n=4, size=32)
    data = GeoRegressionDataModule(root=chips["root"], images=chips["images"], masks=chips["masks"],
                                   mean=[0.5] * 6, std=[0.25] * 6, split_ratios=(0.5, 0.25, 0.25), augment=False)
    data.setup("fit")
    target = data.datasets["train"][0]["target"]
    assert target.dtype == torch.float32 and target.shape == (32, 32)
    assert target[:16, :16].isnan().all() and target[16:, 16:].isfinite().all()


def test_loss_and_metrics_ignore_unlabelled_pixels() -> None:
    torch.manual_seed(0)
    task = RegressionTask(backbone="prithvi_eo_v2_tiny_tl", backbone_kwargs=TINY_BACKBONE, decoder="fcn",
                          decoder_channels=16, target_mean=50.0, target_std=20.0)
    task.eval()
    image = torch.randn(2, 6, 32, 32)
    target = torch.full((2, 32, 32), 55.0)
    target[:, :8] = float("nan")
    loss = task._step({"image": image, "target": target}, "val")
    pred = task(image)[:, 0]
    expected = ((pred[:, 8:] - (55.0 - 50.0) / 20.0) ** 2).mean()
    assert torch.isfinite(loss) and torch.allclose(loss, expected)
    rmse = task.val_metrics.compute()["val/RMSE"]
    assert torch.allclose(rmse, ((pred[:, 8:] * 20 + 50 - 55.0) ** 2).mean().sqrt(), rtol=1e-4)


def test_regression_fit_learns_and_predicts_float32(tmp_path: Path) -> None:
    config = regression_config(tmp_path)
    losses, results = fit_run(config)
    assert losses[-1] < losses[0]
    run = tmp_path / "runs" / "tiny" / "version_0"
    values, targets = direct_outputs(results["best_checkpoint"], config)  # the checkpoint run here
    assert results["test"]["test/RMSE"] == pytest.approx((values - targets).square().mean().sqrt().item(), rel=1e-4)
    constant = (targets - 50.0).square().mean().sqrt().item()  # predicting target_mean everywhere
    assert results["test"]["test/RMSE"] < constant and results["test"]["test/R2"] > 0

    scene = np.random.default_rng(1).random((6, 40, 72)).astype(np.float32)
    write_geotiff(tmp_path / "scene.tif", scene)
    ckpt = next((run / "checkpoints").glob("epoch=*.ckpt"))
    assert main(["predict", "--config", str(config), "--ckpt_path", str(ckpt), "--inputs",
                 str(tmp_path / "scene.tif"), "--output_dir", str(tmp_path / "out")]) == 0
    with rasterio.open(tmp_path / "out" / "scene_values.tif") as out, rasterio.open(tmp_path / "scene.tif") as src:
        assert out.dtypes == ("float32",) and out.descriptions == ("index",)
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        values = out.read(1)
    assert np.isfinite(values).all() and values.std() > 0
