"""Weather tasks: WeatherBench scores against hand computations, forecasting and downscaling fits
from the CLI scored beside their baselines, rollout, and predict's CF NetCDF georeferencing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.nn import functional as F
from torch.utils.data import default_collate

from tests.conftest import fit_run, split_samples, tiny_trainer
from workbench.cli import main
from workbench.merge.checkpoints import load_task
from workbench.tasks.field_scores import AnomalyCorrelation, LatitudeWeightedRMSE, latitude_weights

xr = pytest.importorskip("xarray", reason="xarray is not installed (pip install -e '.[weather]')")
pd = pytest.importorskip("pandas")

LATS = np.linspace(70.0, -70.0, 8)
LONS = np.arange(16) * 22.5
TINY_WXC = {"in_channels_static": 4, "patch_size_px": [2, 2], "mask_unit_size_px": [4, 4], "embed_dim": 32,
            "n_blocks_encoder": 1, "n_blocks_decoder": 1, "n_heads": 2}


def weighted_rmse(preds: np.ndarray, target: np.ndarray, lats: np.ndarray) -> np.ndarray:
    """WeatherBench RMSE by hand: per field sqrt of the cos(lat)-weighted mean square, averaged
    over fields; ``(N, C, H, W)`` → ``(C,)``."""
    weights = np.cos(np.deg2rad(lats)) / np.cos(np.deg2rad(lats)).mean()
    return np.sqrt(((preds - target) ** 2 * weights[:, None]).mean(axis=(-2, -1))).mean(axis=0)


def write_weather(path: Path, lats: np.ndarray = LATS, lons: np.ndarray = LONS, times: int = 8) -> Path:
    """A NetCDF file of 2 members × ``times`` 6-hourly fields: ``t`` and ``z`` at 500 hPa and
    ``t2m``, smooth waves that move with time plus seeded noise."""
    rng = np.random.default_rng(0)
    step = np.arange(times)[None, :, None, None]
    lat, lon = np.deg2rad(lats)[None, None, :, None], np.deg2rad(lons)[None, None, None, :]
    wave = np.sin(2 * lon - 0.3 * step) * np.cos(lat) + 0.1 * rng.standard_normal((2, times, len(lats), len(lons)))
    fields = {"t": 250 + 10 * wave, "z": 5.5e4 + 800 * wave, "t2m": 280 + 5 * wave + 3 * np.cos(3 * lat)}
    levelled = ("member", "time", "level", "lat", "lon")
    dataset = xr.Dataset(
        {"t": (levelled, fields["t"][:, :, None].astype(np.float32), {"units": "K"}),
         "z": (levelled, fields["z"][:, :, None].astype(np.float32), {"units": "m2 s-2"}),
         "t2m": (("member", "time", "lat", "lon"), fields["t2m"].astype(np.float32), {"units": "K"})},
        coords={"member": np.arange(2), "time": pd.Timestamp("2020-01-01") + pd.to_timedelta(6 * np.arange(times), "h"),
                "level": ("level", [500.0], {"units": "hPa"}), "lat": lats, "lon": lons},
    )
    dataset.to_netcdf(path)
    return path


def weather_config(tmp_path: Path, task: str, backbone_kwargs: dict, model: dict, data: dict, epochs: int = 3) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": tiny_trainer(tmp_path, "val/loss", "min", epochs),
        "model": {"class_path": f"workbench.tasks.{task}", "init_args": {
            "backbone": "prithvi_wxc_tiny", "backbone_kwargs": TINY_WXC | backbone_kwargs,
            "strategy": {"class_path": "workbench.strategies.Full"},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-3}}, **model}},
        "data": data,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_scores_match_weatherbench_by_hand() -> None:
    rng = np.random.default_rng(1)
    preds, target, climate = (rng.standard_normal((3, 2, 5, 4)).astype(np.float32) for _ in range(3))
    lats = np.array([80.0, 40.0, 0.0, -40.0, -80.0])
    weights = latitude_weights(torch.from_numpy(np.cos(np.deg2rad(lats))).float().expand(3, -1))
    rmse = LatitudeWeightedRMSE(["a", "b"])
    rmse.update(*map(torch.from_numpy, (preds, target)), weights)
    np.testing.assert_allclose([v.item() for v in rmse.compute().values()], weighted_rmse(preds, target, lats),
                               rtol=1e-5)
    w = (np.cos(np.deg2rad(lats)) / np.cos(np.deg2rad(lats)).mean())[:, None]
    f, o = preds - climate, target - climate
    by_hand = ((w * f * o).sum((-2, -1)) / np.sqrt((w * f * f).sum((-2, -1)) * (w * o * o).sum((-2, -1)))).mean(0)
    acc = AnomalyCorrelation(["a", "b"])
    acc.update(*map(torch.from_numpy, (preds, target, climate)), weights)
    np.testing.assert_allclose([v.item() for v in acc.compute().values()], by_hand, rtol=1e-5)
    perfect, constant = AnomalyCorrelation(["a", "b"]), AnomalyCorrelation(["a", "b"])
    perfect.update(torch.from_numpy(target), torch.from_numpy(target), torch.from_numpy(climate), weights)
    constant.update(torch.from_numpy(climate), torch.from_numpy(target), torch.from_numpy(climate), weights)
    assert all(v.item() == pytest.approx(1.0) for v in perfect.compute().values())
    assert all(v.item() == 0.0 for v in constant.compute().values())  # climatology itself has no anomaly


def test_forecast_fit_scores_baselines_and_predicts_cf_netcdf(tmp_path: Path) -> None:
    data = {"class_path": "datamodules.WeatherForecastDataModule", "init_args": {
        "path": str(write_weather(tmp_path / "fields.nc")), "variables": ["t", "z"], "levels": [500],
        "input_steps": 1, "split_ratios": [0.5, 0.25, 0.25], "batch_size": 2}}
    config = weather_config(tmp_path, "WeatherForecastTask", {"input_size_time": 1, "n_lats_px": 8, "n_lons_px": 16,
                                                              "residual": "temporal"}, {}, data)
    losses, results = fit_run(config)
    assert len(losses) == 3
    test, samples = results["test"], split_samples(config)
    task = load_task(results["best_checkpoint"]).eval()  # the checkpoint run here: its scores are the reported ones
    batch = default_collate(samples)
    with torch.no_grad():
        forecast = task.predict_step(batch, 0).numpy()
    truth, last = (task.physical(batch[key]).numpy() for key in ("target", "x"))
    for c, name in enumerate(["t500", "z500"]):
        assert test[f"test/RMSE_{name}"] == pytest.approx(weighted_rmse(forecast, truth, LATS)[c], rel=1e-4)
        assert test[f"test/persistence_RMSE_{name}"] == pytest.approx(
            weighted_rmse(last[:, -1], truth, LATS)[c], rel=1e-4)
    assert "test/ACC_t500" in test and "test/climatology_RMSE_z500" in test

    out = tmp_path / "out"
    assert main(["predict", "--config", str(config), "--ckpt_path", results["best_checkpoint"],
                 "--output_dir", str(out), "--rollout_steps", "2"]) == 0
    written = xr.open_dataset(out / "forecast.nc")
    assert written.attrs["Conventions"].startswith("CF-") and set(written.data_vars) == {"t500", "z500"}
    assert written["t500"].dims == ("sample", "lead_time", "latitude", "longitude")
    np.testing.assert_allclose(written["latitude"].values, LATS)
    np.testing.assert_allclose(written["longitude"].values, LONS)
    assert written["latitude"].attrs["units"] == "degrees_north" and written["z500"].attrs["units"] == "m2 s-2"
    assert written["lead_time"].values.tolist() == [6.0, 12.0]
    np.testing.assert_allclose(written["t500"].values[:, 0], forecast[:, 0], rtol=1e-5)
    second = {**batch, "x": torch.from_numpy(forecast[:, None]), "input_time": batch["input_time"] + 6}
    with torch.no_grad():  # step 2 is the model run on step 1's forecast (normalized back)
        normalized = (second["x"] - task.field_mean[:, None, None]) / task.field_std[:, None, None]
        again = task.predict_step({**second, "x": normalized}, 0).numpy()
    np.testing.assert_allclose(written["z500"].values[:, 1], again[:, 1], rtol=1e-4)
    valid = written["valid_time"].values[0] - written["forecast_reference_time"].values[0]
    assert (valid / np.timedelta64(1, "h")).tolist() == [6.0, 12.0]
    assert (out / "forecast_t500.png").is_file() and (out / "forecast_z500.png").is_file()


def test_rollout_of_a_persistence_model_repeats_the_input() -> None:
    from workbench.tasks import WeatherForecastTask

    task = WeatherForecastTask(backbone="prithvi_wxc_tiny", bands=["a", "b"], backbone_kwargs=TINY_WXC | {
        "input_size_time": 2, "n_lats_px": 8, "n_lons_px": 16, "residual": "temporal"})
    task.field_mean.copy_(torch.tensor([1.0, 2.0])), task.field_std.copy_(torch.tensor([2.0, 3.0]))
    torch.nn.init.zeros_(task.model.backbone.unembed.weight), torch.nn.init.zeros_(task.model.backbone.unembed.bias)
    lat = torch.deg2rad(torch.from_numpy(LATS)).float()[:, None].expand(8, 16)
    lon = torch.deg2rad(torch.from_numpy(LONS)).float()[None].expand(8, 16)
    static = torch.stack([lat, lon, lat.sin(), lat.cos(), lon.sin(), lon.cos()])[None].expand(3, -1, -1, -1)
    x = torch.randn(3, 2, 2, 8, 16)
    batch = {"x": x, "static": static, "input_time": torch.zeros(3), "lead_time": torch.full((3,), 6.0)}
    rolled = task.rollout(batch, 3)
    assert rolled.shape == (3, 3, 2, 8, 16)
    for step in range(3):  # zero network output + temporal residual: the last input, carried forward
        torch.testing.assert_close(rolled[:, step], task.physical(x[:, -1]))


def test_downscaling_fit_scores_interpolation_baselines_and_georeferences_patches(tmp_path: Path) -> None:
    lats, lons = np.linspace(60.0, 44.5, 32), np.linspace(-10.0, 21.0, 32)
    data = {"class_path": "datamodules.DownscalingDataModule", "init_args": {
        "path": str(write_weather(tmp_path / "fields.nc", lats, lons, times=1)), "variables": ["t2m"],
        "factor": 2, "patch_size": 8, "split_ratios": [0.5, 0.25, 0.25], "batch_size": 4}}
    config = weather_config(tmp_path, "DownscalingTask", {"input_size_time": 1, "n_lats_px": 8, "n_lons_px": 8,
                                                          "residual": "none"}, {"factor": 2}, data)
    _, results = fit_run(config)
    task = load_task(results["best_checkpoint"]).eval()
    samples = split_samples(config)
    batch = default_collate(samples)
    fine = task.physical(batch["fine"])
    bicubic = task.physical(F.interpolate(batch["coarse"], scale_factor=2, mode="bicubic", align_corners=False))
    with torch.no_grad():
        downscaled = task.predict_step(batch, 0)
    for name, fields in (("RMSE_t2m", downscaled), ("bicubic_RMSE_t2m", bicubic)):
        by_hand = (fields - fine).square().mean(dim=(-2, -1)).sqrt().mean().item()  # per patch, then averaged
        assert results["test"][f"test/{name}"] == pytest.approx(by_hand, rel=1e-4)
    assert results["test"]["test/bilinear_RMSE_t2m"] != pytest.approx(results["test"]["test/bicubic_RMSE_t2m"])

    torch.nn.init.zeros_(task.model.backbone.unembed.weight), torch.nn.init.zeros_(task.model.backbone.unembed.bias)
    with torch.no_grad():  # no correction from the network: exactly the bicubic interpolation
        torch.testing.assert_close(task.predict_step(batch, 0), bicubic)

    out = tmp_path / "out"
    assert main(["predict", "--config", str(config), "--ckpt_path", results["best_checkpoint"],
                 "--output_dir", str(out)]) == 0
    written = xr.open_dataset(out / "downscaled.nc")
    assert written["t2m"].dims == ("sample", "y", "x") and written["t2m"].attrs["units"] == "K"
    np.testing.assert_allclose(written["latitude"].values, batch["latitude"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(written["longitude"].values, batch["longitude"].numpy(), rtol=1e-6)
    assert set(np.round(written["latitude"].values[:, 0], 3)) <= set(np.round(lats, 3))
    np.testing.assert_allclose(written["t2m"].values, downscaled[:, 0].numpy(), rtol=1e-5)
    assert math.isclose(written["latitude"].values[0, 0] - written["latitude"].values[0, 1], lats[0] - lats[1],
                        rel_tol=1e-5)


@pytest.mark.parametrize("strategy", [
    {"class_path": "workbench.strategies.Full"}, {"class_path": "workbench.strategies.BitFit"},
    {"class_path": "workbench.strategies.NormOnly"}, {"class_path": "workbench.strategies.SSF"},
    {"class_path": "workbench.strategies.LastBlocks", "init_args": {"k": 1}},
    {"class_path": "workbench.strategies.LoRA", "init_args": {"rank": 4, "target_modules": ["qkv_layer", "w_layer"]}},
    {"class_path": "workbench.strategies.IA3", "init_args": {"target_modules": ["qkv_layer", "net.3"],
                                                             "feedforward_modules": ["net.3"]}},
], ids=lambda s: s["class_path"].rsplit(".", 1)[1])
def test_strategies_train_the_wxc_forecaster(strategy: dict) -> None:
    from jsonargparse import ArgumentParser

    from workbench.strategies import Strategy
    from workbench.tasks import WeatherForecastTask

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    chosen = parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy
    task = WeatherForecastTask(backbone="prithvi_wxc_tiny", bands=["a", "b"], strategy=chosen,
                               backbone_kwargs=TINY_WXC | {"input_size_time": 1, "n_lats_px": 8, "n_lons_px": 16})
    batch = {"x": torch.randn(2, 1, 2, 8, 16), "static": torch.randn(2, 6, 8, 16), "input_time": torch.zeros(2),
             "lead_time": torch.full((2,), 6.0), "climate": torch.randn(2, 2, 8, 16)}
    task.forward_batch(batch).square().mean().backward()
    trainable = {n: p for n, p in task.named_parameters() if p.requires_grad and not n.endswith("mask_token")}
    assert trainable and all(p.grad is not None for p in trainable.values())  # mask_token: used when masking
    assert task.strategy_report.backbone_trainable < task.strategy_report.backbone_total or chosen.name == "full"


def test_a_strategy_that_trains_nothing_is_refused() -> None:
    from workbench.errors import UserInputError
    from workbench.strategies import Frozen
    from workbench.tasks import WeatherForecastTask

    with pytest.raises(UserInputError, match="frozen leaves nothing to train in FieldForecaster"):
        WeatherForecastTask(backbone="prithvi_wxc_tiny", bands=["a", "b"], strategy=Frozen(),
                            backbone_kwargs=TINY_WXC | {"input_size_time": 1, "n_lats_px": 8, "n_lons_px": 16})


def test_gridded_predict_refuses_scene_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = {"class_path": "datamodules.WeatherForecastDataModule", "init_args": {
        "path": str(write_weather(tmp_path / "fields.nc")), "variables": ["t"], "levels": [500], "input_steps": 1}}
    config = weather_config(tmp_path, "WeatherForecastTask", {"input_size_time": 1, "n_lats_px": 8, "n_lons_px": 16,
                                                              "residual": "temporal"}, {}, data)
    assert main(["predict", "--config", str(config), "--inputs", "scene.tif", "--output_dir", str(tmp_path / "o")]) == 2
    assert "gridded weather tasks predict the test split of the config's datamodule" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
