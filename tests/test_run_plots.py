"""Pictures of every fit: curves.png from the values a callback collects (any logger, resumable)
and samples.png from each task's panels of the best checkpoint's first test samples."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import default_collate

from tests.conftest import TINY_BACKBONE, fit_run, split_samples, write_config
from workbench.cli import main
from workbench.merge.checkpoints import load_task
from workbench.run_plots import PanelKind, RunPlots, plot_samples
from workbench.tasks import (
    ClassificationTask, ForecastingTask, ImputationTask, PointSegmentationTask, RegressionTask, WeatherForecastTask,
)

CURVES = {"train/loss": "train/loss_epoch", "val/loss": "val/loss", "val/mIoU": "val/mIoU"}  # curve → CSV column


def run_folder(config: Path) -> Path:
    logger = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]
    return Path(logger["save_dir"]) / logger["name"] / "version_0"


def csv_epochs(run: Path) -> dict[str, dict[int, float]]:
    """Per-epoch values of the curves' metrics as the CSV logger wrote them during fit (the
    validation and test of the best checkpoint after fit left out: rows with no training step after)."""
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    fit_rows = [r for r in rows if not any(k.startswith("test/") and r[k] for k in r)]
    values: dict[str, dict[int, float]] = {}
    for curve, column in CURVES.items():
        logged = [(int(r["epoch"]), float(r[column])) for r in fit_rows if r.get(column)]
        values[curve] = dict(logged[:-1] if curve.startswith("val/") else logged)  # last val row: post-fit validate
    return values


def curves_history(run: Path) -> dict[str, dict[int, float]]:
    history = json.loads((run / "curves.json").read_text())["history"]
    return {name: {int(epoch): value for epoch, value in values.items()} for name, values in history.items()}


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


@pytest.mark.timeout(300)
def test_fit_writes_curves_of_the_logged_values_and_samples_of_the_best_model(tmp_path: Path) -> None:
    config = write_config(tmp_path, trainer={"max_epochs": 3})
    _, results = fit_run(config)
    run = run_folder(config)
    assert_png(run / "curves.png")
    assert_png(run / "samples.png")
    history, logged = curves_history(run), csv_epochs(run)
    assert sorted(logged["val/loss"]) == [0, 1, 2]
    for name in CURVES:
        assert history[name] == pytest.approx(logged[name], rel=1e-6), name
    assert max(history["val/mIoU"].values()) == pytest.approx(results["val"]["val/mIoU"], rel=1e-6)

    # the samples: the callback's panels of a test pass of the best checkpoint against its outputs computed here
    task = load_task(results["best_checkpoint"]).eval()
    data = yaml.safe_load(config.read_text())["data"]
    module, name = data["class_path"].rsplit(".", 1)
    datamodule = getattr(importlib.import_module(module), name)(**data["init_args"])
    plots = RunPlots(max_samples=4)
    Trainer(accelerator="cpu", logger=False, callbacks=[plots], enable_progress_bar=False).test(task, datamodule)
    chips = default_collate(split_samples(config)[:4])
    with torch.no_grad():
        predicted = task.forward_batch(chips).argmax(1)
    assert len(plots.samples) == 4
    for i, (image, label, prediction) in enumerate(plots.samples):
        assert (image.kind, label.kind, prediction.kind) == (PanelKind.RGB, PanelKind.CLASSES, PanelKind.CLASSES)
        np.testing.assert_array_equal(label.values, chips["mask"][i].numpy())
        np.testing.assert_array_equal(prediction.values, predicted[i].numpy())


@pytest.mark.timeout(300)
def test_resumed_fit_continues_its_curves(tmp_path: Path) -> None:
    config = write_config(tmp_path, trainer={"max_epochs": 2})
    fit_run(config, "--test_after_fit=false")
    run = run_folder(config)
    assert_png(run / "curves.png")  # curves only: no test, no samples
    assert not (run / "samples.png").exists() and not (run / "results.json").exists()
    before = curves_history(run)
    fit_run(config, "--trainer.max_epochs=4", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    after = curves_history(run)
    for name in CURVES:
        assert sorted(after[name]) == [0, 1, 2, 3]
        assert {e: after[name][e] for e in (0, 1)} == before[name]  # kept from the checkpoint, not re-logged
        assert after[name] == pytest.approx(csv_epochs(run)[name], rel=1e-6)


@pytest.mark.timeout(300)
def test_tensorboard_logger_gets_results_and_curves(tmp_path: Path) -> None:
    config = write_config(tmp_path, trainer={"max_epochs": 2})
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"]["class_path"] = "lightning.pytorch.loggers.TensorBoardLogger"
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 0
    run = run_folder(config)
    assert_png(run / "curves.png")
    assert_png(run / "samples.png")
    results = json.loads((run / "results.json").read_text())
    events = EventAccumulator(str(run))
    events.Reload()
    logged = [e.value for e in events.Scalars("val/mIoU")]  # every fit epoch, then the best checkpoint's validate
    history = curves_history(run)
    assert logged[:-1] == pytest.approx([history["val/mIoU"][e] for e in sorted(history["val/mIoU"])], rel=1e-6)
    assert logged[-1] == pytest.approx(results["val"]["val/mIoU"], rel=1e-6)
    assert not (run / "metrics.csv").exists()


def test_panels_of_regression_forecasting_audio_and_point_tasks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rows = []

    regression = RegressionTask(backbone="prithvi_eo_v2_tiny_tl", backbone_kwargs=TINY_BACKBONE, decoder="fcn",
                                decoder_channels=16, target_mean=50.0, target_std=20.0).eval()
    batch = {"image": torch.randn(2, 6, 32, 32), "target": torch.full((2, 32, 32), 55.0)}
    batch["target"][:, :8] = float("nan")
    with torch.no_grad():
        panels = regression.sample_panels(batch, regression.compute_step(batch, "test"), 1)
        expected = regression(batch["image"])[1, 0] * 20.0 + 50.0
    np.testing.assert_array_equal(panels[1].values, batch["target"][1].numpy())  # NaN where unlabelled
    np.testing.assert_allclose(panels[2].values, expected.numpy(), rtol=1e-5)
    rows.append(panels)

    forecaster = ForecastingTask(backbone="patchtst_tiny", backbone_kwargs={"context_length": 48, "patch_len": 8,
                                 "stride": 4}, context_length=48, horizon=12).eval()
    batch = {"series": torch.randn(2, 1, 48), "target": torch.randn(2, 1, 12)}
    with torch.no_grad():
        (panel,) = forecaster.sample_panels(batch, forecaster.compute_step(batch, "test"), 0)
        expected = forecaster.forward_batch(batch)[0, 0]
    x, y = panel.curves["forecast"]
    np.testing.assert_array_equal(x, np.arange(48, 60))
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(panel.curves["context"][1], batch["series"][0, 0].numpy())
    rows.append([panel])

    audio = ClassificationTask(backbone="ast_tiny", backbone_kwargs={"n_mels": 32, "num_frames": 51, "embed_dim": 32,
                               "depth": 2, "num_heads": 2}, num_classes=3, class_names=["low", "mid", "high"],
                               bands=["log_mel"]).eval()
    batch = {"image": torch.randn(2, 1, 32, 51), "label": torch.tensor([2, 0])}
    with torch.no_grad():
        (panel,) = audio.sample_panels(batch, audio.compute_step(batch, "test"), 0)
        predicted = audio.class_names[int(audio.forward_batch(batch)[0].argmax())]
    assert panel.kind is PanelKind.FIELD and panel.title == f"true: high / predicted: {predicted} (log_mel)"
    np.testing.assert_array_equal(panel.values, batch["image"][0, 0].numpy())  # the spectrogram
    rows.append([panel])

    points = PointSegmentationTask(backbone="point_mae_tiny", backbone_kwargs={"num_groups": 16, "group_size": 16,
                                   "embed_dim": 32, "depth": 2, "num_heads": 2}, num_classes=2,
                                   class_names=["ground", "roof"]).eval()
    batch = {"points": torch.randn(2, 256, 3), "mask": torch.randint(-1, 2, (2, 256))}
    with torch.no_grad():
        label, prediction = points.sample_panels(batch, points.compute_step(batch, "test"), 1)
        expected = points.forward_batch(batch)[1].argmax(0)
    np.testing.assert_array_equal(label.coords, batch["points"][1, :, :2].numpy())
    np.testing.assert_array_equal(label.values, batch["mask"][1].numpy())
    np.testing.assert_array_equal(prediction.values, expected.numpy())
    rows.append([label, prediction])

    assert_png(plot_samples(rows, tmp_path / "samples.png"))


def test_panels_of_gap_imputation_and_weather_forecasting() -> None:
    torch.manual_seed(0)
    imputation = ImputationTask(backbone="prithvi_eo_v2_tiny_tl", backbone_kwargs={**TINY_BACKBONE, "num_frames": 2},
                                decoder_dim=32, decoder_depth=1, decoder_heads=2, gaps="mask").eval()
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    mask[:, :16, :16] = 1  # a gap in the top-left quarter of both frames
    batch = {"image": torch.randn(2, 6, 2, 32, 32), "mask": mask}
    with torch.no_grad():
        gappy, truth, filled = imputation.sample_panels(batch, imputation.compute_step(batch, "test"), 1)
    gap = mask[1].bool().numpy()
    assert (gappy.values[gap] == 0).all() and np.array_equal(gappy.values[~gap], truth.values[~gap])
    np.testing.assert_array_equal(filled.values[~gap], truth.values[~gap])  # observed pixels kept, one stretch
    assert not np.array_equal(filled.values[gap], truth.values[gap])

    weather = WeatherForecastTask(backbone="prithvi_wxc_tiny", bands=["z500", "t850"], backbone_kwargs={
        "in_channels_static": 4, "patch_size_px": [2, 2], "mask_unit_size_px": [4, 4], "embed_dim": 32,
        "n_blocks_encoder": 1, "n_blocks_decoder": 1, "n_heads": 2, "input_size_time": 2, "n_lats_px": 8,
        "n_lons_px": 16, "residual": "temporal"}).eval()  # a new model outputs its residual: the last input
    weather.field_mean.copy_(torch.tensor([5000.0, 270.0])), weather.field_std.copy_(torch.tensor([50.0, 5.0]))
    lat = torch.linspace(1.2, -1.2, 8)[:, None].expand(8, 16)
    lon = torch.linspace(0, 6.0, 16)[None].expand(8, 16)
    static = torch.stack([lat, lon, lat.sin(), lat.cos(), lon.sin(), lon.cos()])[None].expand(2, -1, -1, -1)
    batch = {"x": torch.randn(2, 2, 2, 8, 16), "target": torch.randn(2, 2, 8, 16), "climate": torch.zeros(2, 2, 8, 16),
             "static": static, "input_time": torch.zeros(2), "lead_time": torch.full((2,), 6.0)}
    with torch.no_grad():
        last, target, forecast = weather.sample_panels(batch, weather.compute_step(batch, "test"), 0)
    assert [p.title for p in (last, target, forecast)] == ["last input: z500", "target: z500", "forecast: z500"]
    np.testing.assert_allclose(last.values, (batch["x"][0, -1, 0] * 50 + 5000).numpy(), rtol=1e-6)
    np.testing.assert_allclose(target.values, (batch["target"][0, 0] * 50 + 5000).numpy(), rtol=1e-6)
    np.testing.assert_allclose(forecast.values, last.values, rtol=1e-5)
