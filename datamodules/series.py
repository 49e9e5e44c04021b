"""Time-series data: UCR/UEA ``.ts`` archives and CSV/Parquet tables.

- :class:`UCRDataModule` — labelled series (``series`` ``(B, M, L)`` with ``label`` ``(B,)`` for
  classification or ``target`` ``(B,)`` for regression), from ``<root>/<name>/<name>_TRAIN.ts``
  and ``_TEST.ts``; with no ``root`` the UCR/UEA files shipped inside the ``aeon`` wheel
  (GunPoint, BasicMotions, Covid3Month, ...) are fetched from the registry once and cached.
- :class:`ForecastingDataModule` — sliding windows over a table (rows = time steps, columns =
  channels): ``series`` ``(B, M, context_length)`` and ``target`` ``(B, M, horizon)``, split by
  time (train, then val, then test; no future leaks into training).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.registry import registry_folder
from datamodules.splits import SplitDataModule, seeded_fraction
from workbench.atomic import default_cache_dir
from workbench.errors import UserInputError

AEON = "aeon==1.6.0"
AEON_DATA = "aeon/datasets/data"
EMBEDDED_UCR = ("ACSF1", "ArrowHead", "BasicMotions", "Covid3Month", "GunPoint", "ItalyPowerDemand",
                "JapaneseVowels", "OSULeaf", "PickupGestureWiimoteZ")
EMBEDDED_TABLES = ("Airline", "Lynx", "ShampooSales", "Uschange", "solar")


@dataclass
class LabelledSeries:
    """A ``.ts`` file's contents: ``values`` ``(n, M, L)`` float32 and one class name or one float
    target per series."""

    values: np.ndarray
    classes: list[str] | None
    targets: np.ndarray | None
    class_names: list[str] | None


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """NaN (missing ``?`` values, unequal-length padding) → the previous value along time (leading
    NaN: the first valid value; all-NaN channels: 0)."""
    out = values.copy()
    for index in zip(*np.nonzero(np.isnan(out).any(-1))):
        row = out[index]
        valid = np.flatnonzero(~np.isnan(row))
        if valid.size == 0:
            row[:] = 0.0
            continue
        last = np.maximum.accumulate(np.where(np.isnan(row), 0, np.arange(row.size)))
        row[:] = row[np.maximum(last, valid[0])]
    return out


def read_ts(path: Path) -> LabelledSeries:
    """Parse a UCR/UEA ``.ts`` file (``@classLabel`` or ``@targetLabel`` problems; dimensions
    separated by ``:``, the label last). Unequal lengths are padded with each series' last value."""
    if not path.is_file():
        raise UserInputError(f"time-series file {path} does not exist")
    header: dict[str, list[str]] = {}
    rows: list[list[list[float]]] = []
    labels: list[str] = []
    in_data = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if line.startswith("@"):
                key, *rest = line[1:].split()
                header[key.lower()] = rest
                in_data = key.lower() == "data"
            continue
        *dims, label = line.split(":")
        try:
            rows.append([[float("nan") if v.strip() == "?" else float(v) for v in d.split(",")] for d in dims])
        except ValueError:
            raise UserInputError(f"{path}:{number}: not a comma-separated list of numbers") from None
        labels.append(label.strip())
    if not rows:
        raise UserInputError(f"{path} has no @data rows: is it a UCR/UEA .ts file?")
    channels = {len(r) for r in rows}
    if len(channels) != 1:
        raise UserInputError(f"{path}: series have different numbers of dimensions {sorted(channels)}")
    length = max(len(d) for r in rows for d in r)
    values = np.full((len(rows), channels.pop(), length), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        for j, d in enumerate(r):
            values[i, j, : len(d)] = d
    values = fill_gaps(values)
    class_label = header.get("classlabel", ["false"])
    if class_label[0].lower() == "true":
        names = class_label[1:] or sorted(set(labels))
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise UserInputError(f"{path}: labels {unknown} are not in the @classLabel list {names}")
        return LabelledSeries(values, labels, None, names)
    if header.get("targetlabel", ["false"])[0].lower() == "true":
        return LabelledSeries(values, None, np.asarray(labels, dtype=np.float32), None)
    raise UserInputError(f"{path}: the header declares neither @classLabel true nor @targetLabel true")


class SeriesDataset(Dataset):
    """``series`` ``(M, L)`` float32 with ``label`` (int64) or ``target`` (float32) per item."""

    def __init__(self, series: Tensor, labels: Tensor | None = None, targets: Tensor | None = None) -> None:
        self.series, self.labels, self.targets = series, labels, targets

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = {"series": self.series[index]}
        if self.labels is not None:
            sample["label"] = self.labels[index]
        if self.targets is not None:
            sample["target"] = self.targets[index]
        return sample


def stratified_holdout(classes: list[str] | None, count: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded ``fraction`` held out of ``count`` items, per class when ``classes``."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(np.asarray(classes) == c) for c in sorted(set(classes))] if classes else [np.arange(count)]
    held = [rng.permutation(g)[: max(1, round(len(g) * fraction))] for g in groups if len(g) > 1]
    return np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=int)


class UCRDataModule(SplitDataModule):
    """UCR/UEA problems: TRAIN split into train and val (seeded, stratified), TEST as test.

    ``num_classes``/``class_names``/``bands`` come from the TRAIN file, read (and for embedded
    problems fetched) on first use (regression problems: one output, ``target_stats()`` gives the
    training mean/std). Channels are standardized with the training mean/std per channel
    (``normalize``).
    """

    def __init__(
        self,
        name: str = "GunPoint",
        root: str | None = None,
        val_fraction: float = 0.2,
        normalize: bool = True,
        batch_size: int = 16,
        num_workers: int = 0,
        train_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            name: problem name; files ``<root>/<name>/<name>_TRAIN.ts`` and ``_TEST.ts``.
            root: folder of problems; None: the problems shipped in the ``aeon`` wheel
                (one of ``EMBEDDED_UCR``), fetched from the registry once and cached.
            val_fraction: share of TRAIN held out for validation.
            normalize: standardize each channel with the training mean and std.
            batch_size: series per batch.
            num_workers: loader worker processes.
            train_fraction: train on this seeded share of the training series.
            seed: seed of the val split and of the ``train_fraction`` subset.
        """
        super().__init__(batch_size, num_workers, False, train_fraction, seed)
        if root is None and name not in EMBEDDED_UCR:
            raise UserInputError(f"data.name {name!r} is not shipped in aeon; choose from {EMBEDDED_UCR} or set data.root")
        self.name, self.root = name, root
        self.val_fraction, self.normalize = val_fraction, normalize
        self.parsed: dict[str, LabelledSeries] = {}

    @property
    def class_names(self) -> list[str]:
        """Class names of the TRAIN header; none for regression problems."""
        return self.read("TRAIN").class_names or []

    @property
    def num_classes(self) -> int:
        """Classes, or 1 output for regression problems."""
        return len(self.class_names) or 1

    @property
    def bands(self) -> list[str]:
        """One name per channel: ``dim_0``, ``dim_1``, ..."""
        return [f"dim_{i}" for i in range(self.read("TRAIN").values.shape[1])]

    def prepare_data(self) -> None:
        """Fetch an embedded problem from the registry (once; a no-op with ``root``)."""
        self.folder()

    def folder(self) -> Path:
        """The problem's folder; an embedded problem is fetched when not cached yet."""
        if self.root is not None:
            return Path(self.root) / self.name
        return registry_folder(AEON, f"{AEON_DATA}/{self.name}", default_cache_dir())

    def read(self, part: str) -> LabelledSeries:
        """The ``TRAIN`` or ``TEST`` file, parsed once."""
        if part not in self.parsed:
            self.parsed[part] = read_ts(self.folder() / f"{self.name}_{part}.ts")
        return self.parsed[part]

    @cached_property
    def train_val_indices(self) -> dict[str, np.ndarray]:
        """Indices into TRAIN of the train and val splits (stratified val, train fraction applied)."""
        train = self.read("TRAIN")
        val = stratified_holdout(train.classes, len(train.values), self.val_fraction, self.seed)
        rest = np.setdiff1d(np.arange(len(train.values)), val)
        return {"train": np.asarray(seeded_fraction(rest, self.train_fraction, self.seed), dtype=int), "val": val}

    @cached_property
    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std ``(M, 1)`` of the training series."""
        values = self.read("TRAIN").values[self.train_val_indices["train"]]
        return values.mean((0, 2))[:, None], values.std((0, 2))[:, None] + 1e-6

    def target_stats(self) -> tuple[float, float]:
        """Mean and std of the training targets (regression problems)."""
        targets = self.read("TRAIN").targets
        if targets is None:
            raise UserInputError(f"{self.name} is a classification problem: use ClassificationTask")
        train = targets[self.train_val_indices["train"]]
        return float(train.mean()), float(train.std() + 1e-6)

    def dataset(self, split: str) -> SeriesDataset:
        data = self.read("TEST" if split == "test" else "TRAIN")
        index = np.arange(len(data.values)) if split == "test" else self.train_val_indices[split]
        values = data.values[index]
        if self.normalize:
            mean, std = self.channel_stats
            values = (values - mean) / std
        labels = (torch.tensor([self.class_names.index(data.classes[i]) for i in index])
                  if data.classes is not None else None)
        targets = torch.from_numpy(data.targets[index]) if data.targets is not None else None
        return SeriesDataset(torch.from_numpy(values.astype(np.float32)), labels, targets)


class WindowDataset(Dataset):
    """Windows of a ``(M, T)`` table: ``series`` ``(M, context)`` ending at each of ``ends`` and
    ``target`` ``(M, horizon)`` right after it."""

    def __init__(self, table: Tensor, ends: list[int], context_length: int, horizon: int) -> None:
        self.table, self.ends, self.context, self.horizon = table, ends, context_length, horizon

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        end = self.ends[index]
        return {"series": self.table[:, end - self.context:end], "target": self.table[:, end:end + self.horizon]}


def read_table(path: Path, columns: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """CSV or Parquet → ``(M, T)`` float32 of the chosen (default: all numeric) columns."""
    import pandas as pd

    if not path.is_file():
        raise UserInputError(f"data.path: table {path} does not exist")
    if path.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise UserInputError(f"{path}: reading Parquet needs pyarrow: pip install 'workbench[parquet]'")
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if columns is None:
        columns = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and not str(c).startswith("Unnamed")]
    missing = [c for c in columns if c not in frame.columns]
    if missing or not columns:
        raise UserInputError(f"{path}: columns {missing or columns} not found; it has {list(frame.columns)}")
    values = frame[columns].to_numpy(dtype=np.float32).T.copy()
    if np.isnan(values).any():
        values = fill_gaps(values[None])[0]
    return values, [str(c) for c in columns]


class ForecastingDataModule(SplitDataModule):
    """Forecasting windows over one table, split by time.

    The table's first ``split_ratios[0]`` of time steps train, the next ``split_ratios[1]``
    validate, the rest test; a window belongs to the split that contains its forecast (its
    context may reach back into the previous split, as at forecast time). Values are not scaled
    here: forecasting and imputation tasks normalize each window by its own statistics.
    """

    def __init__(
        self,
        path: str | None = None,
        name: str = "Airline",
        columns: list[str] | None = None,
        context_length: int = 36,
        horizon: int = 12,
        stride: int = 1,
        split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
        batch_size: int = 16,
        num_workers: int = 0,
        train_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            path: CSV or Parquet table (rows = time steps); None: the table ``name`` shipped in
                the ``aeon`` wheel (one of ``EMBEDDED_TABLES``: Airline passengers, ...).
            name: embedded table name (used when ``path`` is None).
            columns: channel columns; default all numeric columns.
            context_length: steps the model sees.
            horizon: steps to forecast.
            stride: steps between consecutive windows.
            split_ratios: train / val / test shares of the time steps.
            batch_size, num_workers, train_fraction, seed: as every datamodule.

        The table is read (and an embedded one fetched) on first use of ``bands``, ``table`` or
        ``ends``.
        """
        super().__init__(batch_size, num_workers, False, train_fraction, seed)
        if path is None and name not in EMBEDDED_TABLES:
            raise UserInputError(f"data.name {name!r} is not shipped in aeon; choose from {EMBEDDED_TABLES} or set data.path")
        self.path, self.name, self.columns = path, name, columns
        self.context_length, self.horizon, self.stride = context_length, horizon, stride
        self.split_ratios = split_ratios
        self.num_classes, self.class_names = 1, []

    def file(self) -> Path:
        """The table file; an embedded one is fetched when not cached yet."""
        if self.path is not None:
            return Path(self.path)
        return registry_folder(AEON, f"{AEON_DATA}/{self.name}", default_cache_dir()) / f"{self.name}.csv"

    def prepare_data(self) -> None:
        """Fetch an embedded table from the registry (once; a no-op with ``path``)."""
        self.file()

    @cached_property
    def channels(self) -> tuple[Tensor, list[str]]:
        """The ``(M, T)`` float32 table and its channel names, read once."""
        values, names = read_table(self.file(), self.columns)
        return torch.from_numpy(values), names

    @property
    def table(self) -> Tensor:
        """``(M, T)`` float32: one row per channel, one column per time step."""
        return self.channels[0]

    @property
    def bands(self) -> list[str]:
        """The channel (column) names."""
        return self.channels[1]

    @cached_property
    def ends(self) -> dict[str, list[int]]:
        """Per split, the time steps where its windows' contexts end (their forecasts start)."""
        steps = self.table.shape[1]
        bounds = np.cumsum([0, *self.split_ratios]) * steps
        ends = {
            split: list(range(max(self.context_length, int(lo)), int(hi) - self.horizon + 1, self.stride))
            for split, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:])
        }
        empty = [s for s, e in ends.items() if not e]
        if empty:
            raise UserInputError(
                f"{self.file()}: {steps} time steps leave no {'/'.join(empty)} window of context "
                f"{self.context_length} + horizon {self.horizon} with split_ratios {list(self.split_ratios)}: "
                "shorten them"
            )
        return ends

    def dataset(self, split: str) -> WindowDataset:
        ends = self.ends[split]
        if split == "train":
            ends = seeded_fraction(ends, self.train_fraction, self.seed)
        return WindowDataset(self.table, ends, self.context_length, self.horizon)
