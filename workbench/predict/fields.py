"""Gridded predictions (forecasts, downscaled fields) of a datamodule's test split, written as
CF-convention NetCDF (one variable per channel in physical units, latitude / longitude coordinates)
with a PNG map per variable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.atomic import atomic_path
from workbench.errors import UserInputError
from workbench.tasks.weather import DownscalingTask, FieldUnits, WeatherForecastTask

LATITUDE = {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude"}
LONGITUDE = {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude"}


def collect(task: FieldUnits, loader: Any, device: str, rollout_steps: int) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Predictions in physical units over the loader (forecasts ``(N, steps, C, H, W)``, downscaled
    fields ``(N, C, H, W)``) and the batches' non-field entries (time, member, patch coordinates)."""
    outputs, meta = [], []
    task.eval().to(device)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            if isinstance(task, WeatherForecastTask):
                outputs.append(task.rollout(batch, rollout_steps).cpu())
            else:
                outputs.append(task.predict_step(batch, len(outputs)).cpu())
            meta.append({k: v.cpu() for k, v in batch.items() if v.ndim <= 2})
    return torch.cat(outputs), meta


def forecast_dataset(task: WeatherForecastTask, data: Any, forecasts: Tensor, meta: list[dict[str, Tensor]]) -> Any:
    """``(sample, lead_time, latitude, longitude)`` variables with the forecast's reference and
    valid times; ``lead_time`` in hours, one step per rollout step."""
    import xarray as xr

    entry = {key: torch.cat([m[key] for m in meta]).numpy() for key in ("input_time", "lead_time", "member")}
    steps = np.arange(1, forecasts.shape[1] + 1)
    lead = entry["lead_time"][0] * steps
    first = data.fields["time"].values[0] if "time" in data.fields.coords else np.datetime64("1970-01-01T00")
    reference = first + (entry["input_time"] * 3600).astype("timedelta64[s]")
    coords = {
        "sample": np.arange(len(forecasts)),
        "lead_time": ("lead_time", lead, {"units": "hours", "long_name": "forecast lead time"}),
        "latitude": ("latitude", data.latitudes, LATITUDE),
        "longitude": ("longitude", data.longitudes, LONGITUDE),
        "member": ("sample", entry["member"], {"long_name": "ensemble member"}),
        "forecast_reference_time": ("sample", reference, {"standard_name": "forecast_reference_time"}),
        "valid_time": (("sample", "lead_time"), reference[:, None] + (lead * 3600).astype("timedelta64[s]")[None],
                       {"standard_name": "time"}),
    }
    variables = {name: (("sample", "lead_time", "latitude", "longitude"), forecasts[:, :, c].numpy(),
                        {"units": unit, "long_name": f"{name} forecast"})
                 for c, (name, unit) in enumerate(zip(task.channel_names, data.units))}
    return xr.Dataset(variables, coords)


def downscaled_dataset(task: DownscalingTask, data: Any, fields: Tensor, meta: list[dict[str, Tensor]]) -> Any:
    """``(sample, y, x)`` variables, each patch with its own ``latitude(sample, y)`` and
    ``longitude(sample, x)`` auxiliary coordinates."""
    import xarray as xr

    latitude = torch.cat([m["latitude"] for m in meta]).numpy()
    longitude = torch.cat([m["longitude"] for m in meta]).numpy()
    coords = {"latitude": (("sample", "y"), latitude, LATITUDE), "longitude": (("sample", "x"), longitude, LONGITUDE)}
    variables = {name: (("sample", "y", "x"), fields[:, c].numpy(),
                        {"units": unit, "long_name": f"{name} downscaled ×{task.hparams.factor}"})
                 for c, (name, unit) in enumerate(zip(task.channel_names, data.units))}
    return xr.Dataset(variables, coords)


def write_maps(dataset: Any, out_dir: Path, stem: str) -> dict[str, Path]:
    """A PNG map of each variable's first field (first sample, first lead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for name, variable in dataset.data_vars.items():
        field = variable.isel({dim: 0 for dim in variable.dims if dim in ("sample", "lead_time")})
        lat = field["latitude"].values
        lon = field["longitude"].values
        figure, axes = plt.subplots(figsize=(7, 3.6))
        mesh = axes.pcolormesh(lon, lat, field.values, shading="nearest")
        figure.colorbar(mesh, ax=axes, label=f"{name} ({variable.attrs['units']})")
        axes.set(xlabel="longitude (°E)", ylabel="latitude (°N)", title=variable.attrs["long_name"])
        paths[name] = out_dir / f"{stem}_{name}.png"
        with atomic_path(paths[name]) as tmp:
            figure.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(figure)
    return paths


def predict_fields(task: FieldUnits, data: Any, out_dir: Path, rollout_steps: int = 1,
                   device: str = "cpu") -> dict[str, Path]:
    """Predict the datamodule's test split; write ``forecast.nc`` / ``downscaled.nc`` and a PNG per
    variable into ``out_dir``; returns ``{name: path}``."""
    if rollout_steps < 1:
        raise UserInputError(f"--rollout_steps {rollout_steps} must be at least 1")
    data.setup("test")
    outputs, meta = collect(task, data.test_dataloader(), device, rollout_steps)
    if isinstance(task, WeatherForecastTask):
        dataset, stem = forecast_dataset(task, data, outputs, meta), "forecast"
    else:
        dataset, stem = downscaled_dataset(task, data, outputs, meta), "downscaled"
    dataset.attrs.update(Conventions="CF-1.8", source=f"workbench {type(task).__name__}",
                         history="workbench predict")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"netcdf": out_dir / f"{stem}.nc"}
    with atomic_path(paths["netcdf"]) as tmp:
        dataset.to_netcdf(tmp)
    return {**paths, **write_maps(dataset, out_dir, stem)}
