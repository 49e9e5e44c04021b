"""Gridded weather datamodules: reading channels, forecast windows, splits, statistics, downscaling
pairs — on tiny NetCDF files whose values say which member/time/level/cell they are, and on the
real GRIB samples of cfgrib's source archive."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.weather import (
    DownscalingDataModule,
    ERA5EnsembleForecastDataModule,
    EuropeT2mDownscalingDataModule,
    WeatherForecastDataModule,
    coarsen,
    open_fields,
)
from workbench.errors import UserInputError

xr = pytest.importorskip("xarray", reason="xarray is not installed (pip install -e '.[weather]')")
pd = pytest.importorskip("pandas")

LATS = np.array([60.0, 30.0, 0.0, -30.0, -60.0])
LONS = np.array([0.0, 60.0, 120.0, 180.0, 240.0, 300.0])
LEVELS = [850.0, 500.0]
STEP_HOURS = 6
T_BASE = {"t": 200.0, "z": 1200.0, "t2m": 600.0}


def expected(variable: str, member: int, time: int, level: float | None = None,
             lats: np.ndarray = LATS, lons: np.ndarray = LONS) -> np.ndarray:
    """``(H, W)``: the value written for ``variable`` at ``member``, ``time`` (index), ``level``."""
    level_code = 5.0 * LEVELS.index(level) if level is not None else 0.0
    return (T_BASE[variable] + 100.0 * member + 10.0 * time + level_code
            + lats[:, None] / 100.0 + lons[None, :] / 1000.0).astype(np.float32)


def write_fields(path: Path, members: int = 3, times: int = 6, time_index: list[int] | None = None) -> Path:
    """A NetCDF file (dims ``member, time, level, lat, lon``) of ``t``/``z`` at 850/500 hPa and
    single-level ``t2m``, 6-hourly from 2020-01-01, values given by :func:`expected`."""
    time_index = time_index if time_index is not None else list(range(times))
    dates = pd.Timestamp("2020-01-01") + pd.to_timedelta([STEP_HOURS * k for k in time_index], unit="h")
    levelled = {v: np.stack([[[expected(v, m, k, lv) for lv in LEVELS] for k in time_index] for m in range(members)])
                for v in ("t", "z")}
    single = np.stack([[expected("t2m", m, k) for k in time_index] for m in range(members)])
    dims = ("member", "time", "level", "lat", "lon")
    dataset = xr.Dataset(
        {"t": (dims, levelled["t"], {"units": "K"}), "z": (dims, levelled["z"], {"units": "m2 s-2"}),
         "t2m": (("member", "time", "lat", "lon"), single, {"units": "K"})},
        coords={"member": np.arange(members), "time": dates, "level": ("level", LEVELS, {"units": "hPa"}),
                "lat": LATS, "lon": LONS},
    )
    dataset.to_netcdf(path)
    return path


@pytest.fixture
def fields_file(tmp_path: Path) -> Path:
    return write_fields(tmp_path / "fields.nc")


def forecast(path: Path, **kwargs) -> WeatherForecastDataModule:
    """A forecast datamodule over ``path``; channels ``t500, z500`` unless given."""
    args = {"variables": ["t", "z"], "levels": [500], "split_ratios": (0.5, 0.25, 0.25)} | kwargs
    datamodule = WeatherForecastDataModule(str(path), **args)
    datamodule.setup()
    datamodule.datasets["test"] = datamodule.dataset("test")
    return datamodule


def test_channels_by_variable_and_level(fields_file: Path) -> None:
    fields = open_fields(fields_file, ["z", "t2m", "t850"], levels=[500])
    assert fields.dims == ("member", "time", "channel", "latitude", "longitude")
    assert list(fields["channel"].values) == ["z500", "t2m", "t850"]
    assert fields.attrs["units"] == ["m2 s-2", "K", "K"]
    np.testing.assert_allclose(fields.isel(member=2, time=4).sel(channel="z500").values, expected("z", 2, 4, 500.0))
    np.testing.assert_allclose(fields.isel(member=1, time=0).sel(channel="t2m").values, expected("t2m", 1, 0))
    np.testing.assert_allclose(fields.isel(member=0, time=5).sel(channel="t850").values, expected("t", 0, 5, 850.0))
    every_level = open_fields(fields_file, ["t"])
    assert list(every_level["channel"].values) == ["t850", "t500"]


def _touch(path: Path) -> Path:
    path.write_text("a,b\n")
    return path


def test_missing_variable_or_level_names_what_the_file_has(fields_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"no variable 'q'; it has t \(levels 850, 500 hPa\), z .*t2m"):
        open_fields(fields_file, ["q"])
    with pytest.raises(UserInputError, match=r"variable 't' has no level 700; it has levels 850, 500"):
        open_fields(fields_file, ["t"], levels=[700])
    with pytest.raises(UserInputError, match="matches no files"):
        open_fields(tmp_path / "none*.nc", ["t"])
    with pytest.raises(UserInputError, match=r"unknown weather file type '\.csv'"):
        open_fields(_touch(tmp_path / "table.csv"), ["t"])
    try:
        import zarr  # noqa: F401
    except ImportError:
        (tmp_path / "store.zarr").mkdir()
        with pytest.raises(UserInputError, match="pip install zarr"):
            open_fields(tmp_path / "store.zarr", ["t"])


def test_files_combine_by_time_and_need_even_steps(tmp_path: Path) -> None:
    write_fields(tmp_path / "part_a.nc", time_index=[0, 1, 2])
    write_fields(tmp_path / "part_b.nc", time_index=[3, 4, 5])
    fields = open_fields(str(tmp_path / "part_*.nc"), ["t2m"])
    assert fields.sizes["time"] == 6
    np.testing.assert_allclose(fields.isel(member=1, time=4, channel=0).values, expected("t2m", 1, 4))
    write_fields(tmp_path / "gap.nc", time_index=[0, 1, 2, 4, 5, 6])
    with pytest.raises(UserInputError, match="not evenly spaced"):
        forecast(tmp_path / "gap.nc")


def test_forecast_windows_hold_the_right_times(fields_file: Path) -> None:
    datamodule = forecast(fields_file, mean=[0.0, 0.0], std=[1.0, 1.0])  # normalized = physical
    assert datamodule.channel_names == datamodule.bands == ["t500", "z500"]
    assert datamodule.units == ["K", "m2 s-2"]
    # 6 times, 2 inputs, lead 1: targets at times 2..5; split in time order 2/1/1 target times
    target_times = {"train": [2, 3], "val": [4], "test": [5]}
    for split, times in target_times.items():
        dataset = datamodule.datasets[split]
        assert len(dataset) == 3 * len(times)
        for index in range(len(dataset)):
            sample = dataset[index]
            member = int(sample["member"])
            target_time = round(float(sample["input_time"] + sample["lead_time"])) // STEP_HOURS
            assert target_time in times
            assert sample["x"].shape == (2, 2, 5, 6) and sample["x"].dtype == torch.float32
            assert float(sample["lead_time"]) == STEP_HOURS
            assert float(sample["input_time"]) == STEP_HOURS * (target_time - 1)
            for step, time in enumerate((target_time - 2, target_time - 1)):
                np.testing.assert_allclose(sample["x"][step, 1].numpy(), expected("z", member, time, 500.0), atol=1e-3)
            np.testing.assert_allclose(sample["target"][0].numpy(), expected("t", member, target_time, 500.0), atol=1e-3)
    assert sorted(int(s["member"]) for s in datamodule.datasets["val"]) == [0, 1, 2]

    longer = forecast(fields_file, input_steps=3, lead_steps=2, split_by="member", mean=[0.0, 0.0], std=[1.0, 1.0],
                      split_members={"train": [0], "val": [1], "test": [2]})
    sample = longer.datasets["train"][0]  # member 0, first target: time 4 from inputs at 0, 1, 2
    assert float(sample["input_time"]) == 2 * STEP_HOURS and float(sample["lead_time"]) == 2 * STEP_HOURS
    for step in range(3):
        np.testing.assert_allclose(sample["x"][step, 0].numpy(), expected("t", 0, step, 500.0), atol=1e-3)
    np.testing.assert_allclose(sample["target"][0].numpy(), expected("t", 0, 4, 500.0), atol=1e-3)
    batch = next(iter(longer.train_dataloader()))
    assert batch["x"].shape == (2, 3, 2, 5, 6) and batch["member"].dtype == torch.int64
    assert batch["static"].shape == (2, 6, 5, 6) and batch["input_time"].shape == (2,)


def test_split_by_member_is_disjoint(fields_file: Path) -> None:
    members = {"train": [0, 2], "val": [1], "test": [2]}
    with pytest.raises(UserInputError, match=r"members \[2\] are in both train and test"):
        forecast(fields_file, split_by="member", split_members=members)
    with pytest.raises(UserInputError, match=r"members \[5\] are not in"):
        forecast(fields_file, split_by="member", split_members={"train": [0, 5], "val": [1], "test": [2]})
    with pytest.raises(UserInputError, match="split_members needs exactly the keys"):
        forecast(fields_file, split_by="member", split_members={"train": [0], "val": [1]})
    datamodule = forecast(fields_file, split_by="member", split_members={"train": [2], "val": [1], "test": [0]})
    seen = {s: sorted({int(sample["member"]) for sample in d}) for s, d in datamodule.datasets.items()}
    assert seen == {"train": [2], "val": [1], "test": [0]}
    for dataset in datamodule.datasets.values():  # every target time 2..5 in every split
        assert len(dataset) == 4


def test_stats_from_training_samples_only_cached_and_reused(fields_file: Path, tmp_path: Path) -> None:
    stats_file = tmp_path / "stats" / "weather.json"
    split = {"train": [0], "val": [1], "test": [2]}
    datamodule = forecast(fields_file, split_by="member", split_members=split, stats_file=str(stats_file))
    # training samples: member 0, targets 2..5 with inputs from time 0: member 0's fields at times 0..5
    for channel, (variable, level) in enumerate((("t", 500.0), ("z", 500.0))):
        fields = np.stack([expected(variable, 0, k, level) for k in range(6)]).astype(np.float64)
        mean, std = datamodule.channel_stats()
        assert float(mean[channel]) == pytest.approx(fields.mean(), abs=1e-3)
        assert float(std[channel]) == pytest.approx(fields.std(), rel=1e-4)
        climate = np.stack([expected(variable, 0, k, level) for k in range(2, 6)]).mean(0)  # training targets
        np.testing.assert_allclose(datamodule.climatology[channel].numpy(), climate, atol=1e-3)
        sample = datamodule.datasets["val"][0]
        np.testing.assert_allclose(datamodule.denormalize(sample["climate"])[channel].numpy(), climate, atol=1e-3)
        np.testing.assert_allclose(datamodule.denormalize(sample["target"])[channel].numpy(),
                                   expected(variable, 1, 2, level), atol=1e-3)
    written = json.loads(stats_file.read_text())
    assert written["bands"] == ["t500", "z500"] and len(written["mean"]) == 2
    written["mean"], written["std"] = [1.0, 2.0], [3.0, 4.0]  # a second datamodule must read, not recompute
    stats_file.write_text(json.dumps(written))
    again = forecast(fields_file, split_by="member", split_members=split, stats_file=str(stats_file))
    mean, std = again.channel_stats()
    assert mean.tolist() == [1.0, 2.0] and std.tolist() == [3.0, 4.0]
    subset = forecast(fields_file, variables=["z500"], split_by="member", split_members=split, stats_file=str(stats_file))
    assert subset.channel_stats()[0].tolist() == [2.0]
    with pytest.raises(UserInputError, match=r"has statistics for \['t500', 'z500'\], not for \['t2m'\]"):
        forecast(fields_file, variables=["t2m"], split_by="member", split_members=split, stats_file=str(stats_file))


def test_latitude_weights_static_and_crop(fields_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    full = forecast(fields_file, mean=[0.0, 0.0], std=[1.0, 1.0])
    cos = np.cos(np.deg2rad(LATS))
    np.testing.assert_allclose(full.latitude_weights().numpy(), cos / cos.mean(), rtol=1e-6)
    assert full.latitude_weights().shape == (5,)
    static = full.datasets["train"][0]["static"]  # lat, lon (radians), sin lat, cos lat, sin lon, cos lon
    np.testing.assert_allclose(static[0, :, 1].numpy(), np.deg2rad(LATS), atol=1e-6)
    np.testing.assert_allclose(static[1, 2].numpy(), np.deg2rad(LONS), atol=1e-6)
    np.testing.assert_allclose(static[3, :, 3].numpy(), cos, atol=1e-6)
    np.testing.assert_allclose(static[2, :, 0].numpy(), np.sin(np.deg2rad(LATS)), atol=1e-6)
    np.testing.assert_allclose(static[5, 2].numpy(), np.cos(np.deg2rad(LONS)), atol=1e-6)

    with caplog.at_level(logging.WARNING, logger="datamodules.weather"):
        cropped = forecast(fields_file, grid_multiple=4, mean=[0.0, 0.0], std=[1.0, 1.0])
    assert cropped.latitudes.tolist() == [60.0, 30.0, 0.0, -30.0] and cropped.longitudes.tolist() == [0.0, 60.0, 120.0, 180.0]
    assert "dropping the last 1 latitude row (-60°) and the last 2 longitude columns (240° .. 300°)" in caplog.text
    assert "5×6 grid becomes 4×4" in caplog.text
    sample = cropped.datasets["train"][0]
    assert sample["x"].shape == (2, 2, 4, 4) and sample["static"].shape == (6, 4, 4)
    np.testing.assert_allclose(sample["target"][0].numpy(), expected("t", 0, 2, 500.0)[:4, :4], atol=1e-3)
    cos4 = cos[:4]
    np.testing.assert_allclose(cropped.latitude_weights().numpy(), cos4 / cos4.mean(), rtol=1e-6)


def test_downscaling_pairs_are_block_means_split_by_blocks(tmp_path: Path) -> None:
    lats, lons = np.linspace(50.0, 43.0, 8), np.linspace(0.0, 11.0, 12)
    raw = np.random.default_rng(0).normal(280.0, 5.0, (2, 8, 12)).astype(np.float32)  # 2 times, 8×12 cells
    dates = pd.date_range("2020-01-01", periods=2, freq="h")
    xr.Dataset({"t2m": (("time", "latitude", "longitude"), raw, {"units": "K"})},
               coords={"time": dates, "latitude": lats, "longitude": lons}).to_netcdf(tmp_path / "fine.nc")
    with pytest.raises(UserInputError, match="multiple of data.factor 2"):
        DownscalingDataModule(str(tmp_path / "fine.nc"), ["t2m"], factor=2, patch_size=5)
    datamodule = DownscalingDataModule(str(tmp_path / "fine.nc"), ["t2m"], factor=2, patch_size=4,
                                       split_ratios=(0.5, 0.25, 0.25))
    datamodule.setup()
    datamodule.datasets["test"] = datamodule.dataset("test")
    assert datamodule.factor == 2
    patches: dict[str, set[tuple[float, float]]] = {}
    for split, dataset in datamodule.datasets.items():
        patches[split] = set()
        for sample in dataset:
            assert sample["fine"].shape == (1, 4, 4) and sample["coarse"].shape == (1, 2, 2)
            assert sample["static"].shape == (6, 4, 4) and sample["latitude"].shape == (4,)
            row = int(np.argmin(np.abs(lats - float(sample["latitude"][0]))))
            col = int(np.argmin(np.abs(lons - float(sample["longitude"][0]))))
            patches[split].add((row, col))
            fine = sample["fine"][0].numpy()
            for i in range(2):
                for j in range(2):
                    block = fine[2 * i: 2 * i + 2, 2 * j: 2 * j + 2]
                    assert float(sample["coarse"][0, i, j]) == pytest.approx(float(block.mean()), abs=1e-5)
            physical = datamodule.denormalize(sample["fine"])[0].numpy()
            assert any(np.allclose(physical, raw[t, row:row + 4, col:col + 4], atol=1e-3) for t in range(2))
    # 2×3 patches, one per block: 3 train, 1 val, 2 test (×2 times each); never the same cells
    assert [len(patches[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    assert len(datamodule.datasets["train"]) == 6
    assert not (patches["train"] & patches["val"]) and not (patches["train"] & patches["test"])
    assert not (patches["val"] & patches["test"])
    assert set().union(*patches.values()) == {(r, c) for r in (0, 4) for c in (0, 4, 8)}
    train_cells = np.concatenate([raw[:, r:r + 4, c:c + 4].ravel() for r, c in patches["train"]]).astype(np.float64)
    mean, std = datamodule.channel_stats()  # fine statistics of the training patches only
    assert float(mean[0]) == pytest.approx(train_cells.mean(), abs=1e-3)
    assert float(std[0]) == pytest.approx(train_cells.std(), rel=1e-4)


def test_module_imports_without_xarray() -> None:
    code = ("import sys; sys.modules['xarray'] = None\n"
            "import datamodules.weather as w\n"
            "try:\n    w.open_fields('x.nc', ['t'])\nexcept w.UserInputError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1])
    assert 'pip install -e ".[weather]"' in done.stdout


def cfgrib_or_skip() -> None:
    try:
        import cfgrib  # noqa: F401
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"cfgrib (with the ecCodes library) cannot be imported: {err}")


def test_embedded_grib_samples(caplog: pytest.LogCaptureFixture) -> None:
    cfgrib_or_skip()
    with caplog.at_level(logging.INFO, logger="datamodules.weather"):
        era5 = ERA5EnsembleForecastDataModule()
        era5.setup()
    era5.datasets["test"] = era5.dataset("test")
    assert era5.bands == ["z850", "z500", "t850", "t500"]
    assert era5.units == ["m**2 s**-2", "m**2 s**-2", "K", "K"]
    assert ("a sample is member m, input at t, target t+12 h, z/t at 850/500 hPa, 3° global grid, "
            "ERA5 ensemble (Copernicus licence)") in caplog.text
    assert "dropping the last 1 latitude row (-90°)" in caplog.text
    assert era5.latitudes[0] == 90.0 and era5.latitudes[-1] == -87.0 and len(era5.longitudes) == 120
    assert {s: len(d) for s, d in era5.datasets.items()} == {"train": 10, "val": 10, "test": 10}
    assert {s: sorted({float(x["input_time"]) for x in d}) for s, d in era5.datasets.items()} == {
        "train": [0.0], "val": [12.0], "test": [24.0]}  # split by time: targets at 12 h, 24 h, 36 h
    sample = era5.datasets["val"][6]  # member 6, input at 2017-01-01 12 UTC, target 2017-01-02 00 UTC
    assert sample["x"].shape == (1, 4, 60, 120) and sample["climate"].shape == (4, 60, 120)
    assert int(sample["member"]) == 6 and float(sample["input_time"]) == 12.0 and float(sample["lead_time"]) == 12.0
    raw = xr.open_dataset(era5.files()[0], engine="cfgrib", backend_kwargs={"indexpath": ""})
    z500 = raw["z"].isel(number=6, time=2).sel(isobaricInhPa=500).values[:60]
    np.testing.assert_allclose(era5.denormalize(sample["target"])[1].numpy(), z500, rtol=1e-5)
    t850 = raw["t"].isel(number=6, time=1).sel(isobaricInhPa=850).values[:60]
    np.testing.assert_allclose(era5.denormalize(sample["x"][0])[2].numpy(), t850, rtol=1e-5)

    europe = EuropeT2mDownscalingDataModule()
    europe.setup()
    europe.datasets["test"] = europe.dataset("test")
    assert europe.bands == ["t2m"] and europe.units == ["K"] and europe.factor == 4
    assert sum(len(d) for d in europe.datasets.values()) == 5 * 9  # 32 px patches of the 171×291 grid
    pair = europe.datasets["train"][0]
    assert pair["coarse"].shape == (1, 8, 8) and pair["fine"].shape == (1, 32, 32)
    torch.testing.assert_close(pair["coarse"], coarsen(pair["fine"], 4))
    assert pair["latitude"].shape == (32,) and float(pair["latitude"][0] - pair["latitude"][1]) == pytest.approx(0.1, abs=1e-4)
