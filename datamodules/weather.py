"""Gridded weather fields (NetCDF, GRIB, Zarr) for forecasting and downscaling.

- :func:`open_fields` — chosen variables and pressure levels of one or more files as one
  ``(member, time, channel, latitude, longitude)`` DataArray; channels are named ``t850``,
  ``z500`` (variable + level) or by the variable name for single-level fields.
- :class:`GriddedWeatherDataModule` — the base: channels, units, grid (cropped to a multiple of
  ``grid_multiple``), latitude weights, lat/lon encodings and per-channel statistics of the
  training samples (cached in a JSON ``stats_file``).
- :class:`WeatherForecastDataModule` — inputs at consecutive times → the field ``lead_steps``
  later, split by time or by ensemble member; :class:`ERA5EnsembleForecastDataModule` trains on
  the ERA5 ensemble sample shipped in cfgrib's source archive.
- :class:`DownscalingDataModule` — (coarse, fine) patch pairs, the coarse field being the fine
  one area-averaged (perfect-model setup), split spatially by blocks;
  :class:`EuropeT2mDownscalingDataModule` uses cfgrib's 0.1° European 2 m temperature sample.

xarray (and cfgrib/eccodes for GRIB, netCDF4 for NetCDF, zarr for Zarr) is imported only when
files are read: ``pip install -e ".[weather]"``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.normalize import compute_band_stats
from datamodules.registry import registry_folder
from datamodules.splits import SPLITS, SplitDataModule, ratio_split, seeded_fraction
from workbench.atomic import default_cache_dir, write_json
from workbench.errors import UserInputError

if TYPE_CHECKING:
    import xarray as xr

log = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[weather]"'
GRIB_SUFFIXES = (".grib", ".grib2", ".grb", ".grb2")
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf")
FIELD_DIMS = ("member", "time", "latitude", "longitude")
DIM_ALIASES: dict[str, tuple[str, ...]] = {
    "latitude": ("latitude", "lat"),
    "longitude": ("longitude", "lon"),
    "time": ("time", "valid_time"),
    "member": ("member", "number", "realization", "ensemble_member", "ens"),
    "level": ("level", "isobaricInhPa", "pressure_level", "plev", "lev"),
}
STATIC_CHANNELS = ("latitude", "longitude", "sin_latitude", "cos_latitude", "sin_longitude", "cos_longitude")
"""The ``static`` channels, in Prithvi WxC's layout: latitude and longitude in radians first (its
Fourier position encoding reads them), then the static inputs proper (here their sines and cosines)."""
CHANNEL_NAME = re.compile(r"(.+?)(\d+(?:\.\d+)?)")
CFGRIB = "cfgrib==0.9.15.1"
CFGRIB_DATA = "cfgrib-0.9.15.1/tests/sample-data"


# --- reading -----------------------------------------------------------------------------------


def xarray() -> ModuleType:
    """The ``xarray`` module, or a clear error naming the extra to install."""
    try:
        import xarray
    except ImportError:
        raise UserInputError(f"reading gridded weather data needs xarray (and cfgrib, netCDF4): {INSTALL}") from None
    return xarray


def expand_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files of ``paths`` (a file, a glob pattern, or a list of either), each pattern sorted."""
    files = []
    for item in [paths] if isinstance(paths, (str, Path)) else paths:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        if not matches:
            raise UserInputError(f"data.path {str(item)!r} matches no files")
        missing = [m for m in matches if not Path(m).exists()]
        if missing:
            raise UserInputError(f"data.path: {missing[0]} does not exist")
        files += [Path(m) for m in matches]
    return files


def open_file(path: Path) -> xr.Dataset:
    """One NetCDF, GRIB (cfgrib, no index files written beside it) or Zarr store, opened lazily."""
    xr = xarray()
    suffix = path.suffix.lower()
    if suffix in GRIB_SUFFIXES:
        if importlib.util.find_spec("cfgrib") is None:
            raise UserInputError(f"{path}: reading GRIB needs cfgrib and eccodes: {INSTALL}")
        kind, kwargs = "GRIB", {"engine": "cfgrib", "backend_kwargs": {"indexpath": ""}}
    elif suffix in NETCDF_SUFFIXES:
        kind, kwargs = "NetCDF", {}  # xarray picks netCDF4, h5netcdf or scipy, whichever is installed
    elif suffix == ".zarr":
        if importlib.util.find_spec("zarr") is None:
            raise UserInputError(f"{path}: reading Zarr needs the zarr package: pip install zarr")
        kind, kwargs = "Zarr", {"engine": "zarr"}
    else:
        raise UserInputError(f"{path}: unknown weather file type {suffix!r}; use NetCDF (.nc), GRIB (.grib, .grib2) "
                             "or Zarr (.zarr)")
    try:
        return xr.open_dataset(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"{path} could not be read as {kind} ({reason}); if a reader is missing: {INSTALL}") from None


def canonical_dims(dataset: xr.Dataset) -> xr.Dataset:
    """Rename known dimension aliases (``lat``, ``number``, ``isobaricInhPa``, ...) to
    ``latitude``, ``longitude``, ``time``, ``member`` and ``level``."""
    renames = {}
    for name, aliases in DIM_ALIASES.items():
        if name in dataset.dims:
            continue
        alias = next((a for a in aliases if a in dataset.dims), None)
        if alias is not None:
            renames[alias] = name
    if "time" in renames.values() and "time" in dataset.coords:  # a scalar time beside valid_time
        dataset = dataset.drop_vars("time")
    return dataset.rename(renames)


def describe_contents(dataset: xr.Dataset) -> str:
    """``z (levels 850, 500 hPa), t2m`` — the variables of a file, for error messages."""
    parts = []
    for name, var in dataset.data_vars.items():
        if "level" in var.dims:
            units = dataset["level"].attrs.get("units", "")
            parts.append(f"{name} (levels {', '.join(f'{v:g}' for v in dataset['level'].values)} {units})".replace(" )", ")"))
        else:
            parts.append(str(name))
    return ", ".join(parts) or "no data variables"


def select_channels(dataset: xr.Dataset, variables: Sequence[str], levels: Sequence[float] | None,
                    source: str) -> list[tuple[str, xr.DataArray, float]]:
    """``(channel name, field, level or NaN)`` per channel: each of ``variables`` at each of
    ``levels`` (all the file's levels when None; single-level variables once), or a channel name
    such as ``t850`` for one variable at one level."""
    channels = []
    for name in variables:
        if name in dataset.data_vars:
            var, wanted = dataset[name], levels
        elif (match := CHANNEL_NAME.fullmatch(name)) and match[1] in dataset.data_vars and "level" in dataset[match[1]].dims:
            var, wanted = dataset[match[1]], [float(match[2])]
        else:
            raise UserInputError(f"{source} has no variable {name!r}; it has {describe_contents(dataset)}: "
                                 "choose data.variables from those")
        if "level" not in var.dims:
            channels.append((str(var.name), var, float("nan")))
            continue
        have = np.asarray(var["level"].values, dtype=float)
        for level in have if wanted is None else wanted:
            hit = np.flatnonzero(np.isclose(have, float(level)))
            if not hit.size:
                raise UserInputError(f"{source}: variable {var.name!r} has no level {float(level):g}; it has levels "
                                     f"{', '.join(f'{v:g}' for v in have)}: choose data.levels from those")
            channels.append((f"{var.name}{float(level):g}", var.isel(level=int(hit[0]), drop=True), float(level)))
    return channels


def as_field(var: xr.DataArray, name: str, source: str) -> xr.DataArray:
    """One channel as ``(member, time, latitude, longitude)``: missing member/time dims added
    (size 1), further size-1 dims (``step``, ``heightAboveGround``) dropped."""
    missing = [d for d in ("latitude", "longitude") if d not in var.dims]
    if missing:
        raise UserInputError(f"{source}: channel {name} has no {'/'.join(missing)} dimension (it has {list(var.dims)}): "
                             "only regular latitude/longitude grids are read")
    extra = {d: var.sizes[d] for d in var.dims if d not in FIELD_DIMS}
    if any(size > 1 for size in extra.values()):
        raise UserInputError(f"{source}: channel {name} has further dimensions {extra}; only member, time, level, "
                             "latitude and longitude are read: subset the file to one value of the others")
    var = var.isel({d: 0 for d in extra}, drop=True)
    for dim in ("member", "time"):
        if dim not in var.dims:
            var = var.expand_dims(dim)  # a scalar time coordinate becomes the dim's one value
    return var.transpose(*FIELD_DIMS)


def open_fields(paths: str | Path | Sequence[str | Path], variables: Sequence[str],
                levels: Sequence[float] | None = None) -> xr.DataArray:
    """Read chosen channels of weather files into one DataArray.

    Args:
        paths: NetCDF (``.nc``), GRIB (``.grib``/``.grib2``) or Zarr (``.zarr``) files, glob
            patterns, or a list of either; several files are combined by their coordinates.
        variables: variable names (``z``, ``t``, ``t2m``) or single channels (``t850``).
        levels: pressure levels by value (file units, e.g. hPa); None: all levels in the file.

    Returns:
        ``(member, time, channel, latitude, longitude)`` fields (lazy where the reader is) with
        coordinates ``channel`` (names), ``variable`` and ``level`` per channel (NaN: single
        level); ``attrs``: ``units`` (one per channel), ``level_units``, ``source``.
    """
    xr = xarray()
    files = expand_paths(paths)
    source = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} files)"
    datasets = [canonical_dims(open_file(f)) for f in files]
    try:
        dataset = datasets[0] if len(datasets) == 1 else xr.combine_by_coords(datasets, combine_attrs="drop_conflicts")
    except ValueError as err:
        raise UserInputError(f"{source}: the files do not combine into one grid ({err})") from None
    if not variables:
        raise UserInputError(f"data.variables is empty; {source} has {describe_contents(dataset)}")
    channels = select_channels(dataset, variables, levels, source)
    fields = [as_field(var, name, source).reset_coords(drop=True) for name, var, _ in channels]
    try:
        stacked = xr.concat(fields, dim="channel", join="exact", coords="minimal", compat="override")
    except ValueError as err:
        raise UserInputError(f"{source}: the chosen variables are not on one grid/time axis ({err})") from None
    names = [name for name, _, _ in channels]
    stacked = stacked.assign_coords(channel=names, variable=("channel", [str(v.name) for _, v, _ in channels]),
                                    level=("channel", [level for _, _, level in channels]))
    stacked = stacked.transpose("member", "time", "channel", "latitude", "longitude")
    stacked.attrs = {"units": [str(v.attrs.get("units", "")) for _, v, _ in channels],
                     "level_units": str(dataset["level"].attrs.get("units", "")) if "level" in dataset.coords else "",
                     "source": source}
    return stacked


# --- grids ------------------------------------------------------------------------------------


def hours_since_first(times: np.ndarray) -> np.ndarray:
    """``(T,)`` float64 hours of each time since the first (datetime64 or cftime dates)."""
    if np.issubdtype(times.dtype, np.datetime64):
        return (times - times[0]) / np.timedelta64(1, "h")
    try:
        return np.array([(t - times[0]).total_seconds() / 3600.0 for t in times])
    except (TypeError, AttributeError):
        raise UserInputError(f"the time coordinate ({times.dtype}) is not decoded as dates: give it CF units "
                             "such as 'hours since 2000-01-01'") from None


def dropped(values: np.ndarray, count: int) -> str:
    """The last ``count`` coordinate values, for logs: ``-90°`` or ``-87° .. -90°``."""
    tail = values[len(values) - count:]
    return f"{tail[0]:g}°" if count == 1 else f"{tail[0]:g}° .. {tail[-1]:g}°"


@dataclass
class Grid:
    """Fields in memory: ``values`` ``(M, T, C, H, W)`` float32 in physical units, their
    ``latitudes`` ``(H,)``, ``longitudes`` ``(W,)`` (degrees) and ``hours`` ``(T,)`` since the
    first time."""

    values: np.ndarray
    latitudes: np.ndarray
    longitudes: np.ndarray
    hours: np.ndarray


def crop_grid(grid: Grid, multiple: int, source: str) -> Grid:
    """Drop trailing latitude rows / longitude columns so H and W are multiples of ``multiple``."""
    height, width = grid.values.shape[-2:]
    rows, cols = height % multiple, width % multiple
    if rows or cols:
        what = [f"the last {n} {axis} ({dropped(coords, n)})" for n, axis, coords in
                ((rows, "latitude row" + "s" * (rows > 1), grid.latitudes),
                 (cols, "longitude column" + "s" * (cols > 1), grid.longitudes)) if n]
        log.warning("%s: dropping %s so the %d×%d grid becomes %d×%d, a multiple of grid_multiple=%d",
                    source, " and ".join(what), height, width, height - rows, width - cols, multiple)
    return Grid(grid.values[..., : height - rows, : width - cols], grid.latitudes[: height - rows],
                grid.longitudes[: width - cols], grid.hours)


def latlon_encoding(latitudes: np.ndarray, longitudes: np.ndarray) -> Tensor:
    """``(6, H, W)`` float32: lat, lon (radians), sin lat, cos lat, sin lon, cos lon (``STATIC_CHANNELS``)."""
    lat = torch.deg2rad(torch.as_tensor(latitudes, dtype=torch.float64))[:, None].expand(-1, len(longitudes))
    lon = torch.deg2rad(torch.as_tensor(longitudes, dtype=torch.float64))[None, :].expand(len(latitudes), -1)
    return torch.stack([lat, lon, lat.sin(), lat.cos(), lon.sin(), lon.cos()]).float()


def standardize(fields: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(..., C, H, W)`` physical → normalized with per-channel ``mean``/``std`` ``(C,)``."""
    return (fields - mean[:, None, None]) / std[:, None, None]


def coarsen(fields: Tensor, factor: int) -> Tensor:
    """Area mean over ``factor``×``factor`` blocks: ``(..., C, H, W)`` → ``(..., C, H/f, W/f)``."""
    *lead, channels, height, width = fields.shape
    blocks = fields.reshape(*lead, channels, height // factor, factor, width // factor, factor)
    return blocks.mean(dim=(-3, -1))


def contiguous_split(count: int, ratios: Sequence[float]) -> dict[str, list[int]]:
    """``0 .. count-1`` cut in order into train/val/test by ``ratios`` (summing to 1)."""
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise UserInputError(f"data.split_ratios {list(ratios)} must sum to 1")
    bounds = [0, *(round(sum(ratios[: i + 1]) * count) for i in range(len(SPLITS)))]
    return {s: list(range(lo, hi)) for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:])}


def cfgrib_sample(name: str) -> Path:
    """A file of cfgrib's test data (from its source archive on PyPI, fetched once and cached)."""
    return registry_folder(CFGRIB, CFGRIB_DATA, default_cache_dir(), source=True) / name


# --- the base datamodule ----------------------------------------------------------------------


class GriddedWeatherDataModule(SplitDataModule):
    """Gridded fields of chosen variables/levels, normalized per channel.

    Fields are read into memory once, on first use (``channel_names`` reads only the headers),
    and cropped so H and W are multiples of ``grid_multiple``. ``channel_stats()`` are the
    per-channel mean/std of the TRAINING samples (given as ``mean``/``std``, read from
    ``stats_file``, or computed once and written there). Subclasses define the samples, their
    splits and :meth:`training_fields`.
    """

    SOURCE = ""
    """What embedded data is (grid, origin, licence), appended to the sample description."""

    def __init__(
        self,
        path: str | list[str] | None,
        variables: list[str],
        levels: list[float] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        stats_file: str | None = None,
        grid_multiple: int = 1,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        train_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            path: NetCDF/GRIB/Zarr file, glob pattern or list of them (see :func:`open_fields`).
            variables: variables (``z``, ``t2m``) or channels (``t850``) to read.
            levels: pressure levels (file units) of the multi-level variables; None: all.
            mean: per channel, physical units; with ``std``, or leave both to the training data.
            std: per channel.
            stats_file: JSON of per-channel mean/std: read when it exists, else computed once
                from the training samples and written there.
            grid_multiple: crop trailing rows/columns so H and W are multiples of this.
            batch_size, num_workers, pin_memory, train_fraction, seed: as every datamodule.
        """
        super().__init__(batch_size, num_workers, pin_memory, train_fraction, seed)
        if (mean is None) != (std is None):
            raise UserInputError("data.mean and data.std go together: set both, or neither (computed from training)")
        if grid_multiple < 1:
            raise UserInputError(f"data.grid_multiple {grid_multiple} must be at least 1")
        self.path, self.variables, self.levels = path, list(variables), levels
        self.mean, self.std, self.stats_file = mean, std, stats_file
        self.grid_multiple = grid_multiple
        self.num_classes, self.class_names = 1, []

    # --- files and fields ---

    def files(self) -> list[Path]:
        """The files to read."""
        if self.path is None:
            raise UserInputError("data.path: set a NetCDF, GRIB or Zarr file (or a glob pattern)")
        return expand_paths(self.path)

    def prepare_data(self) -> None:
        """Fetch embedded files; compute the statistics into ``stats_file`` when it is used and missing."""
        self.files()
        if self.mean is None and self.stats_file is not None and not Path(self.stats_file).is_file():
            self.channel_stats()

    @cached_property
    def fields(self) -> xr.DataArray:
        """The uncropped ``(member, time, channel, latitude, longitude)`` DataArray (lazy)."""
        return open_fields(self.files(), self.variables, self.levels)

    @cached_property
    def grid(self) -> Grid:
        """The fields in memory, cropped to multiples of ``grid_multiple``."""
        fields, source = self.fields, self.fields.attrs["source"]
        values = np.asarray(fields.values, dtype=np.float32)
        gaps = {name: int(n) for name, n in zip(self.channel_names, np.isnan(values).sum(axis=(0, 1, 3, 4))) if n}
        if gaps:
            raise UserInputError(f"{source}: channels have missing (NaN) values {gaps}: choose variables without "
                                 "gaps or fill them first")
        times = fields["time"].values if "time" in fields.coords else None
        if times is None and fields.sizes["time"] > 1:
            raise UserInputError(f"{source}: the time dimension has no coordinate: add dates to the file")
        hours = hours_since_first(times) if times is not None else np.zeros(1)
        log.info("%s: %d channels %s, %d members, %d times, %d×%d grid", source, len(self.channel_names),
                 self.channel_names, *values.shape[:2], *values.shape[-2:])
        grid = Grid(values, fields["latitude"].values.astype(float), fields["longitude"].values.astype(float), hours)
        return crop_grid(grid, self.grid_multiple, source)

    @property
    def channel_names(self) -> list[str]:
        """One name per channel: ``z850``, ``z500``, ..., or the variable for single-level fields."""
        return [str(c) for c in self.fields["channel"].values]

    @property
    def bands(self) -> list[str]:
        """:attr:`channel_names` (the CLI links ``bands`` to the model)."""
        return self.channel_names

    @property
    def units(self) -> list[str]:
        """Physical units per channel, from the file's attributes (``""`` when it names none)."""
        return list(self.fields.attrs["units"])

    @property
    def latitudes(self) -> np.ndarray:
        """``(H,)`` latitudes of the (cropped) grid rows, degrees, in file order."""
        return self.grid.latitudes

    @property
    def longitudes(self) -> np.ndarray:
        """``(W,)`` longitudes of the (cropped) grid columns, degrees."""
        return self.grid.longitudes

    def latitude_weights(self) -> Tensor:
        """``(H,)`` float32 weights ∝ cos(latitude), mean 1 (WeatherBench's area weighting)."""
        weights = np.clip(np.cos(np.deg2rad(self.latitudes)), 0.0, None)
        return torch.from_numpy(weights / weights.mean()).float()

    @cached_property
    def static(self) -> Tensor:
        """``(6, H, W)`` float32 static inputs of the grid (:data:`STATIC_CHANNELS`)."""
        return latlon_encoding(self.latitudes, self.longitudes)

    @cached_property
    def values(self) -> Tensor:
        """``(M, T, C, H, W)`` float32 fields in physical units (shares the grid's memory)."""
        return torch.from_numpy(self.grid.values)

    # --- normalisation ---

    def training_fields(self) -> Iterator[np.ndarray]:
        """Each distinct ``(C, h, w)`` physical field the training samples contain, once."""
        raise NotImplementedError

    def stats_scope(self) -> str:
        """What the statistics were computed on, for logs and the stats file."""
        return f"the training samples of {type(self).__name__}"

    @cached_property
    def _stats(self) -> tuple[Tensor, Tensor]:
        names = self.channel_names
        if self.mean is not None and self.std is not None:
            mean, std = list(self.mean), list(self.std)
            for field, given in (("mean", mean), ("std", std)):
                if len(given) != len(names):
                    raise UserInputError(f"data.{field} has {len(given)} values for {len(names)} channels {names}")
            if any(s <= 0 for s in std):
                raise UserInputError(f"data.std must be positive, got {std}")
        elif self.stats_file is not None and Path(self.stats_file).is_file():
            mean, std = self.read_stats(Path(self.stats_file))
        else:
            log.warning("computing per-channel mean/std of %s once%s", self.stats_scope(),
                        f" into {self.stats_file}" if self.stats_file else "")
            stats = compute_band_stats(((f, None) for f in self.training_fields()), len(names))
            mean, std = stats["mean"], stats["std"]
            if self.stats_file is not None:
                write_json(self.stats_file, {"bands": names, **stats, "computed_on": self.stats_scope()})
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def read_stats(self, path: Path) -> tuple[list[float], list[float]]:
        """mean/std of :attr:`channel_names` from a stats JSON (it may cover more channels)."""
        stats = json.loads(path.read_text())
        named = list(stats.get("bands") or [])
        missing = [n for n in self.channel_names if n not in named]
        if missing:
            raise UserInputError(f"data.stats_file {path} has statistics for {named}, not for {missing}: delete it "
                                 "to recompute it from the training samples, or set another data.stats_file")
        index = [named.index(n) for n in self.channel_names]
        return [stats["mean"][i] for i in index], [stats["std"][i] for i in index]

    def channel_stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``mean`` and ``std`` ``(C,)`` float32, physical units, of the training samples."""
        return self._stats

    def denormalize(self, tensor: Tensor) -> Tensor:
        """``(..., C, H, W)`` normalized → physical units (:attr:`units`)."""
        mean, std = (s.to(tensor.device) for s in self.channel_stats())
        return tensor * std[:, None, None] + mean[:, None, None]


# --- forecasting ------------------------------------------------------------------------------


class ForecastWindows(Dataset):
    """Forecast samples ``(member, target time index)`` over fields ``(M, T, C, H, W)``.

    A sample: ``x`` ``(T_in, C, H, W)``, ``target``, ``climate`` ``(C, H, W)``, ``static``
    ``(6, H, W)`` (float32; fields normalized), ``input_time``/``lead_time`` (float32 hours),
    ``member`` (int64).
    """

    def __init__(self, values: Tensor, samples: list[tuple[int, int]], input_steps: int, lead_steps: int,
                 hours: Tensor, stats: tuple[Tensor, Tensor], climate: Tensor, static: Tensor) -> None:
        self.values, self.samples, self.hours, self.stats = values, samples, hours, stats
        self.input_steps, self.lead_steps = input_steps, lead_steps
        self.climate, self.static = climate, static

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        member, target = self.samples[index]
        last = target - self.lead_steps
        return {
            "x": standardize(self.values[member, last - self.input_steps + 1: last + 1], *self.stats),
            "target": standardize(self.values[member, target], *self.stats),
            "climate": self.climate,
            "static": self.static,
            "input_time": self.hours[last],
            "lead_time": self.hours[target] - self.hours[last],
            "member": torch.tensor(member),
        }


def channel_summary(fields: xr.DataArray) -> str:
    """``z/t at 850/500 hPa`` when every variable has the same levels, else the channel names."""
    variables = list(dict.fromkeys(str(v) for v in fields["variable"].values))
    levels = [float(v) for v in fields["level"].values]
    per_variable = {v: [lv for var, lv in zip(fields["variable"].values, levels) if var == v] for v in variables}
    first = per_variable[variables[0]]
    if all(not np.isnan(lv) for lv in levels) and all(lv == first for lv in per_variable.values()):
        return f"{'/'.join(variables)} at {'/'.join(f'{lv:g}' for lv in first)} {fields.attrs['level_units']}".rstrip()
    return ", ".join(str(c) for c in fields["channel"].values)


class WeatherForecastDataModule(GriddedWeatherDataModule):
    """Forecast samples: fields at ``input_steps`` consecutive times → the field ``lead_steps``
    steps after the last input (times must be evenly spaced).

    A sample (fields normalized with the training statistics, float32):

    - ``x`` ``(T_in, C, H, W)``: inputs at times ``t − (T_in − 1)·Δ .. t``;
    - ``target`` ``(C, H, W)``: the field at ``t + lead_steps·Δ``;
    - ``climate`` ``(C, H, W)``: :attr:`climatology`, the mean of the TRAINING targets per channel
      and grid point (with few times a training-mean "climatology", not a multi-year one);
    - ``static`` ``(6, H, W)``: :data:`STATIC_CHANNELS` (lat, lon in radians, their sines and cosines);
    - ``input_time`` (hours of the last input since the file's first time) and ``lead_time``
      (hours), float32; ``member`` (int64 ensemble member index, 0 without members).

    Splits: ``split_by="time"`` cuts the target times in time order by ``split_ratios`` (every
    member in every split); ``split_by="member"`` gives each split the members (0-based indices)
    of ``split_members``. ``train_fraction`` keeps a seeded share of the training samples.
    """

    def __init__(
        self,
        path: str | list[str] | None,
        variables: list[str],
        levels: list[float] | None = None,
        input_steps: int = 2,
        lead_steps: int = 1,
        split_by: Literal["time", "member"] = "time",
        split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_members: dict[str, list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            path, variables, levels: see :class:`GriddedWeatherDataModule`.
            input_steps: consecutive input times ``T_in``.
            lead_steps: time steps from the last input to the target (0: reconstruct the last input).
            split_by: ``time`` (by ``split_ratios``) or ``member`` (by ``split_members``).
            split_ratios: train/val/test shares of the target times, in time order.
            split_members: ``{"train": [...], "val": [...], "test": [...]}`` member indices.
            **kwargs: other :class:`GriddedWeatherDataModule` arguments (mean, std, stats_file,
                grid_multiple, batch_size, num_workers, pin_memory, train_fraction, seed).
        """
        super().__init__(path, variables, levels, **kwargs)
        if input_steps < 1 or lead_steps < 0:
            raise UserInputError(f"data.input_steps ({input_steps}) must be >= 1 and data.lead_steps ({lead_steps}) >= 0")
        if split_by not in ("time", "member"):
            raise UserInputError(f"data.split_by {split_by!r} must be 'time' or 'member'")
        if split_by == "member" and split_members is None:
            raise UserInputError('data.split_members: split_by member needs e.g. {"train": [0, 1], "val": [2], "test": [3]}')
        self.input_steps, self.lead_steps = input_steps, lead_steps
        self.split_by, self.split_ratios, self.split_members = split_by, split_ratios, split_members

    @property
    def step_hours(self) -> float:
        """Hours between consecutive times (checked to be even)."""
        hours = self.grid.hours
        steps = np.diff(hours)
        if len(steps) and not np.allclose(steps, steps[0]):
            raise UserInputError(f"{self.fields.attrs['source']}: times are not evenly spaced (steps of "
                                 f"{sorted(set(steps.round(3).tolist()))} h): forecast windows need a regular time axis")
        return float(steps[0]) if len(steps) else 0.0

    def target_times(self) -> list[int]:
        """Time indices that can be targets (enough earlier times for the inputs)."""
        count, first = len(self.grid.hours), self.input_steps - 1 + self.lead_steps
        if count <= first:
            raise UserInputError(f"{self.fields.attrs['source']} has {count} times; input_steps={self.input_steps} "
                                 f"and lead_steps={self.lead_steps} need at least {first + 1}")
        return list(range(first, count))

    def member_splits(self) -> dict[str, list[int]]:
        """Member indices of each split (all members in every split when splitting by time)."""
        members = self.grid.values.shape[0]
        if self.split_by == "time":
            return {s: list(range(members)) for s in SPLITS}
        given = self.split_members or {}
        if set(given) != set(SPLITS):
            raise UserInputError(f"data.split_members needs exactly the keys {list(SPLITS)}, got {sorted(given)}")
        bad = sorted({m for ms in given.values() for m in ms if not 0 <= m < members})
        if bad:
            raise UserInputError(f"data.split_members: members {bad} are not in {self.fields.attrs['source']} "
                                 f"(it has members 0..{members - 1})")
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1:]:
                if shared := sorted(set(given[a]) & set(given[b])):
                    raise UserInputError(f"data.split_members: members {shared} are in both {a} and {b}")
        return {s: sorted(given[s]) for s in SPLITS}

    @cached_property
    def split_samples(self) -> dict[str, list[tuple[int, int]]]:
        """``(member, target time index)`` samples of each split (train: ``train_fraction`` applied)."""
        targets = self.target_times()
        description = self.sample_description()  # checks that the times are evenly spaced
        if self.split_by == "time":
            times = {s: [targets[i] for i in idx] for s, idx in contiguous_split(len(targets), self.split_ratios).items()}
        else:
            times = {s: targets for s in SPLITS}
        members = self.member_splits()
        samples = {s: [(m, t) for m in members[s] for t in times[s]] for s in SPLITS}
        empty = [s for s, v in samples.items() if not v]
        if empty:
            raise UserInputError(f"the {'/'.join(empty)} split is empty ({len(targets)} target times, "
                                 f"{self.grid.values.shape[0]} members): check data.split_ratios / data.split_members")
        samples["train"] = seeded_fraction(samples["train"], self.train_fraction, self.seed)
        log.info("%s: a sample is %s; %s", type(self).__name__, description,
                 ", ".join(f"{s} {len(v)}" for s, v in samples.items()))
        return samples

    def sample_description(self) -> str:
        """``member m, inputs at t−12 h and t, target t+12 h, z/t at 850/500 hPa[, SOURCE]``."""
        step = self.step_hours
        inputs = [f"t−{(self.input_steps - 1 - i) * step:g} h" for i in range(self.input_steps - 1)] + ["t"]
        inputs_text = inputs[0] if len(inputs) == 1 else f"{', '.join(inputs[:-1])} and t"
        parts = [f"member m, input{'s' * (len(inputs) > 1)} at {inputs_text}",
                 f"target t+{self.lead_steps * step:g} h", channel_summary(self.fields)]
        return ", ".join(parts + ([self.SOURCE] if self.SOURCE else []))

    def training_fields(self) -> Iterator[np.ndarray]:
        """Each ``(member, time)`` field the training samples use as input or target, once."""
        used = sorted({(m, t - self.lead_steps - k) for m, t in self.split_samples["train"] for k in range(self.input_steps)}
                      | set(self.split_samples["train"]))
        return (self.grid.values[m, t] for m, t in used)

    def stats_scope(self) -> str:
        return f"the {len(self.split_samples['train'])} training samples (inputs and targets) of {type(self).__name__}"

    @cached_property
    def climatology(self) -> Tensor:
        """``(C, H, W)`` float32, physical units: the mean of the TRAINING targets per channel and
        grid point (with few times this is a training-mean "climatology")."""
        train = self.split_samples["train"]
        members, times = zip(*train)
        climate = self.values[list(members), list(times)].double().mean(0).float()
        log.info("climatology = mean of the %d training targets per channel and grid point (a training-mean "
                 "'climatology' when the file spans few times)", len(train))
        return climate

    def dataset(self, split: str) -> ForecastWindows:
        stats = self.channel_stats()
        return ForecastWindows(self.values, self.split_samples[split], self.input_steps, self.lead_steps,
                               torch.from_numpy(self.grid.hours).float(), stats, standardize(self.climatology, *stats),
                               self.static)


class ERA5EnsembleForecastDataModule(WeatherForecastDataModule):
    """The ERA5 ensemble sample of cfgrib's source archive (10 members, 4 times 12-hourly from
    2017-01-01 00 UTC, z and t at 850/500 hPa, 3° global grid), fetched once and cached.

    By default a sample is member m, input at t, target t+12 h, and the split is by time: targets
    at 12 h (train), 24 h (val) and 36 h (test), every member in each (10 samples per split), so the
    test day is never a training target. ``split_by="member"`` instead splits the members
    (default train 0–5, val 6–7, test 8–9) — then every split shares the same dates and the
    training members' mean is nearly the test members' weather (an ensemble, not a forecast test).
    The 61×120 grid is cropped to a multiple of ``grid_multiple`` (default 4 → 60×120, dropping
    the south-pole row).
    """

    SOURCE = "3° global grid, ERA5 ensemble (Copernicus licence)"
    FILE = "era5-levels-members.grib"

    def __init__(
        self,
        variables: list[str] | None = None,
        levels: list[float] | None = None,
        input_steps: int = 1,
        split_by: Literal["time", "member"] = "time",
        split_ratios: tuple[float, float, float] = (0.34, 0.33, 0.33),
        split_members: dict[str, list[int]] | None = None,
        grid_multiple: int = 4,
        batch_size: int = 4,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            variables: default ``["z", "t"]``.
            levels: default ``[850, 500]`` (hPa).
            input_steps: fields at consecutive times the model sees (default 1: the field at t).
            split_by: ``time`` (default) or ``member``.
            split_ratios: with ``split_by="time"``, shares of the target times in time order
                (default one time each: 12 h / 24 h / 36 h).
            split_members: with ``split_by="member"``, default ``{"train": [0..5], "val": [6, 7], "test": [8, 9]}``.
            grid_multiple: default 4 (60×120).
            batch_size: default 4.
            **kwargs: other :class:`WeatherForecastDataModule` arguments (lead_steps, mean, std, ...).
        """
        if split_by == "member":
            split_members = split_members or {"train": list(range(6)), "val": [6, 7], "test": [8, 9]}
        super().__init__(path=None, variables=variables or ["z", "t"], levels=levels or [850, 500],
                         input_steps=input_steps, split_by=split_by, split_ratios=split_ratios,
                         split_members=split_members, grid_multiple=grid_multiple, batch_size=batch_size, **kwargs)

    def files(self) -> list[Path]:
        return [cfgrib_sample(self.FILE)]


# --- downscaling ------------------------------------------------------------------------------


class PatchPairs(Dataset):
    """(coarse, fine) samples ``(member, time, row, col)`` (patch origin) over ``(M, T, C, H, W)``.

    A sample: ``fine`` ``(C, P, P)`` and ``coarse`` ``(C, P/f, P/f)`` (its ``f``×``f`` block
    means), both normalized with the fine training statistics; ``static`` ``(6, P, P)``;
    ``latitude`` ``(P,)`` and ``longitude`` ``(P,)`` degrees (all float32).
    """

    def __init__(self, values: Tensor, samples: list[tuple[int, int, int, int]], patch_size: int, factor: int,
                 stats: tuple[Tensor, Tensor], static: Tensor, latitudes: Tensor, longitudes: Tensor) -> None:
        self.values, self.samples, self.patch, self.factor, self.stats = values, samples, patch_size, factor, stats
        self.static, self.latitudes, self.longitudes = static, latitudes, longitudes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        member, time, row, col = self.samples[index]
        rows, cols = slice(row, row + self.patch), slice(col, col + self.patch)
        fine = standardize(self.values[member, time, :, rows, cols], *self.stats)
        return {"coarse": coarsen(fine, self.factor), "fine": fine, "static": self.static[:, rows, cols],
                "latitude": self.latitudes[rows], "longitude": self.longitudes[cols]}


class DownscalingDataModule(GriddedWeatherDataModule):
    """Perfect-model downscaling: fine patches and their coarse version.

    The coarse field is the real fine field area-averaged over ``factor``×``factor`` blocks (the
    standard perfect-model setup: the model learns to undo the averaging). Every member and time
    is cut into non-overlapping ``patch_size`` patches; patches are split into train/val/test by
    seeded ``split_ratios`` over blocks of ``split_block``×``split_block`` patches, so the splits
    never share grid cells. Rows/columns left over by the patches are not used.

    A sample: ``fine`` ``(C, P, P)`` and ``coarse`` ``(C, P/factor, P/factor)`` (float32, both
    normalized with the FINE training statistics), ``static`` ``(6, P, P)`` (:data:`STATIC_CHANNELS`)
    and the patch's ``latitude`` ``(P,)`` / ``longitude`` ``(P,)`` in degrees.
    """

    def __init__(
        self,
        path: str | list[str] | None,
        variables: list[str],
        levels: list[float] | None = None,
        factor: int = 4,
        patch_size: int = 32,
        split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_block: int = 1,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            path, variables, levels: see :class:`GriddedWeatherDataModule`.
            factor: fine cells per coarse cell along each axis.
            patch_size: fine patch side in grid cells (a multiple of ``factor``).
            split_ratios: train/val/test shares of the blocks of patches (split seeded by ``seed``).
            split_block: patches per block side for the split.
            **kwargs: other :class:`GriddedWeatherDataModule` arguments (mean, std, stats_file,
                grid_multiple, batch_size, num_workers, pin_memory, train_fraction, seed).
        """
        super().__init__(path, variables, levels, **kwargs)
        if factor < 2 or patch_size % factor:
            raise UserInputError(f"data.patch_size {patch_size} must be a multiple of data.factor {factor} (>= 2)")
        if split_block < 1:
            raise UserInputError(f"data.split_block {split_block} must be at least 1")
        self.factor, self.patch_size = factor, patch_size
        self.split_ratios, self.split_block = split_ratios, split_block

    @cached_property
    def split_samples(self) -> dict[str, list[tuple[int, int, int, int]]]:
        """``(member, time, row, col)`` samples of each split (train: ``train_fraction`` applied)."""
        members, times, _, height, width = self.grid.values.shape
        size = self.patch_size
        if size > min(height, width):
            raise UserInputError(f"data.patch_size {size} exceeds the {height}×{width} grid of {self.fields.attrs['source']}")
        patches = [(r, c) for r in range(height // size) for c in range(width // size)]
        blocks = sorted({(r // self.split_block, c // self.split_block) for r, c in patches})
        split_of = {blocks[i]: s for s, idx in ratio_split(len(blocks), self.split_ratios, self.seed).items() for i in idx}
        samples = {s: [(m, t, r * size, c * size) for r, c in patches if split_of[(r // self.split_block, c // self.split_block)] == s
                       for m in range(members) for t in range(times)] for s in SPLITS}
        empty = [s for s, v in samples.items() if not v]
        if empty:
            raise UserInputError(f"the {'/'.join(empty)} split is empty ({len(blocks)} blocks of patches): use a smaller "
                                 "data.patch_size or data.split_block")
        samples["train"] = seeded_fraction(samples["train"], self.train_fraction, self.seed)
        used_h, used_w = height // size * size, width // size * size
        log.info("%s: perfect-model downscaling, a sample is a %d px fine patch of %s and its %d×%d coarse version "
                 "(the fine field area-averaged over %d×%d blocks)%s; patches cover %d×%d of the %d×%d grid "
                 "(the last %d rows and %d columns are not used); %s", type(self).__name__, size,
                 channel_summary(self.fields), size // self.factor, size // self.factor, self.factor, self.factor,
                 f", {self.SOURCE}" if self.SOURCE else "", used_h, used_w, height, width, height - used_h,
                 width - used_w, ", ".join(f"{s} {len(v)}" for s, v in samples.items()))
        return samples

    def training_fields(self) -> Iterator[np.ndarray]:
        """The fine ``(C, P, P)`` field of every training sample (patches do not overlap)."""
        size = self.patch_size
        return (self.grid.values[m, t, :, r:r + size, c:c + size] for m, t, r, c in self.split_samples["train"])

    def stats_scope(self) -> str:
        return f"the {len(self.split_samples['train'])} training fine patches of {type(self).__name__}"

    def dataset(self, split: str) -> PatchPairs:
        return PatchPairs(self.values, self.split_samples[split], self.patch_size, self.factor, self.channel_stats(),
                          self.static, torch.from_numpy(self.latitudes).float(), torch.from_numpy(self.longitudes).float())


class EuropeT2mDownscalingDataModule(DownscalingDataModule):
    """2 m temperature at 0.1° over Europe (171×291 cells, 51–34° N, 10° W–19° E, one time) from
    cfgrib's test data, fetched once and cached: 32 px fine patches and their 8×8 coarse
    (0.4°) versions (factor 4, perfect-model), split by patch blocks."""

    SOURCE = "ECMWF t2m, 0.1° over Europe (cfgrib test data)"
    FILE = "alternate-scanning.grib"

    def __init__(self, **kwargs: Any) -> None:
        """Args: see :class:`DownscalingDataModule` (the file and ``t2m`` are fixed)."""
        super().__init__(path=None, variables=["t2m"], **kwargs)

    def files(self) -> list[Path]:
        return [cfgrib_sample(self.FILE)]
