"""torchgeo data as Workbench batches: a torchgeo ``LightningDataModule``, ``NonGeoDataset`` or
``GeoDataset`` (with a sampler) as the ``data`` section of a fit config."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.error import URLError

import numpy as np
import pandas as pd
import torch
from geopandas import GeoDataFrame
from kornia.enhance import normalize
from lightning.pytorch import LightningDataModule
from pyproj import Transformer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchgeo.datasets import (
    DatasetNotFoundError,
    GeoDataset,
    Landsat8,
    Landsat9,
    random_bbox_assignment,
    random_grid_cell_assignment,
)

from datamodules.augment import class_spec
from datamodules.bands import LANDSAT_OLI_TO_HLS, SENTINEL2_TO_HLS, canonical_band
from datamodules.normalize import load_band_stats, write_band_stats
from datamodules.splits import SPLITS, SplitDataModule, ratio_split, seeded_fraction
from workbench.errors import UserInputError

log = logging.getLogger(__name__)
T = TypeVar("T")
FIELD = "data.init_args"


@contextmanager
def dataset_files(field: str) -> Iterator[None]:
    """torchgeo's ``DatasetNotFoundError`` (files missing) and a failed download as one line naming
    the config field."""
    try:
        yield
    except DatasetNotFoundError as err:
        raise UserInputError(f"{field}: {err} In the config: set {field}.init_args.root (or paths) to the "
                             f"folder holding the dataset, or {field}.init_args.download: true") from None
    except URLError as err:
        raise UserInputError(f"{field}: downloading the dataset failed ({err.reason}): check the network, or "
                             f"put the dataset's files in {field}.init_args.root yourself and set download: false") from None


def workbench_sample(sample: dict[str, Any]) -> dict[str, Tensor]:
    """A torchgeo sample ``image`` ``([B,] C, H, W)`` or batch → Workbench keys: ``image`` float32,
    ``mask`` int64 ``([B,] H, W)`` (a channel axis of one dropped), ``label`` int64; the other
    entries (``crs``, ``bounds``, ...) are dropped."""
    if "image" not in sample:
        raise UserInputError(f"the torchgeo samples have no 'image' (keys: {sorted(sample)}): Workbench tasks "
                             "read image + mask (segmentation) or image + label (classification)")
    image = sample["image"]
    out = {"image": image.float()}
    if "mask" in sample:
        mask = sample["mask"]
        out["mask"] = (mask.squeeze(-3) if mask.ndim == image.ndim and mask.shape[-3] == 1 else mask).long()
    if "label" in sample:
        out["label"] = torch.as_tensor(sample["label"]).long()
    return out


def grid_cell_split(dataset: GeoDataset, fractions: Sequence[float], grid: int, generator: torch.Generator) -> list[GeoDataset]:
    """torchgeo's ``random_grid_cell_assignment`` (each file cut into ``grid``×``grid`` cells dealt to
    the splits), with the index columns (``filepath``) and CRS that torchgeo 0.8.1 drops put back
    (its parts could not be read; the CRS fix is torchgeo PR #4101)."""
    parts = random_grid_cell_assignment(dataset, fractions, grid, generator)
    columns = [c for c in dataset.index.columns if c != "geometry"]
    positions = [dataset.index.columns.get_loc(c) for c in columns]
    for part in parts:
        index = part.index
        if not set(columns) <= set(index.columns):  # numbered columns, in the original order
            data = pd.DataFrame(index.iloc[:, positions].to_numpy(), columns=columns, index=index.index)
            index = GeoDataFrame(data, geometry=index.geometry.to_numpy())
        part.index = index if index.crs is not None else index.set_crs(dataset.index.crs)
    return parts


@lru_cache(maxsize=8)
def lonlat_transformer(crs_wkt: str) -> Transformer:
    """From the coordinates of ``crs_wkt`` to longitude/latitude."""
    return Transformer.from_crs(crs_wkt, "EPSG:4326", always_xy=True)


def geo_coords(sample: dict[str, Any]) -> dict[str, Tensor]:
    """``location_coords`` ``(2,)`` (latitude, longitude of the centre) and ``temporal_coords``
    ``(1, 2)`` (year, day of year of the middle of the time span) of a torchgeo GeoDataset sample."""
    x, y, t = sample["bounds"]
    if t.start == pd.Timestamp.min or t.stop == pd.Timestamp.max:
        raise UserInputError(f"{FIELD}.coords: the dataset's files carry no dates: give its class a filename_regex "
                             "with a (?P<date>...) group and date_format, or set coords: false")
    lon, lat = lonlat_transformer(sample["crs"].to_wkt()).transform((x.start + x.stop) / 2, (y.start + y.stop) / 2)
    middle = t.start + (t.stop - t.start) / 2
    return {"location_coords": torch.tensor([lat, lon], dtype=torch.float32),
            "temporal_coords": torch.tensor([[middle.year, middle.dayofyear]], dtype=torch.float32)}


class WorkbenchSamples(Dataset):
    """A torchgeo dataset's samples at ``queries`` (a GeoDataset's sampled boxes; None: indices
    ``0..len-1``) in Workbench keys, the image ``(C, H, W)`` normalised by ``mean``/``std`` ``(C,)``
    (None: raw, as ``workbench stats`` reads them); with ``coords``, also the sample's
    ``location_coords`` and ``temporal_coords`` (:func:`geo_coords`)."""

    def __init__(self, dataset: Dataset, queries: list[Any] | None, mean: Tensor | None = None,
                 std: Tensor | None = None, coords: bool = False) -> None:
        self.dataset, self.queries, self.mean, self.std, self.coords = dataset, queries, mean, std, coords

    def __len__(self) -> int:
        return len(self.queries) if self.queries is not None else len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        raw = self.dataset[self.queries[index] if self.queries is not None else index]
        sample = workbench_sample(raw) | (geo_coords(raw) if self.coords else {})
        if self.mean is None:
            return sample
        if sample["image"].shape[0] != len(self.mean):
            raise UserInputError(f"{FIELD}.mean/std have {len(self.mean)} values but the torchgeo images have "
                                 f"{sample['image'].shape[0]} bands: give one value per band")
        sample["image"] = normalize(sample["image"][None], self.mean, self.std)[0]
        return sample

    def read_layers(self, index: int) -> tuple[np.ndarray, float | None]:
        """Raw image ``(C, H, W)`` of sample ``index`` (torchgeo has masked nodata already)."""
        return self[index]["image"].numpy(), None

    def first_readable(self, index: int, read: Callable[[int], T]) -> T:
        """``read(index)``: torchgeo names unreadable files itself."""
        return read(index)


class TorchGeoDataModule(SplitDataModule):
    """torchgeo data → batches of ``image`` ``(B, C, H, W)`` float with ``mask`` ``(B, H, W)`` int64
    (segmentation) or ``label`` ``(B,)`` int64 (classification). Give one of:

    - ``datamodule``: a torchgeo ``LightningDataModule`` (``torchgeo.datamodules.EuroSAT100DataModule``,
      ...): its datasets, loaders, normalisation and its own ``aug`` (run on the device after the
      transfer, as torchgeo does) are used as they are.
    - ``dataset``: a torchgeo ``NonGeoDataset`` or ``GeoDataset``. A class with a ``split``
      argument is built once per split (``train``/``val``/``test``); otherwise the one dataset is
      split by ``split_ratios`` (a GeoDataset spatially, by whole files or ``split_grid`` cells).
      A GeoDataset is read at the boxes a torchgeo ``sampler`` draws, once (seeded by ``seed``),
      as fixed chips. Images are normalised by ``mean``/``std`` or ``stats_file`` (written by
      ``workbench stats``, or on the first fit when it does not exist yet).

    ``num_classes``, ``class_names`` and ``bands`` reach the model as from every datamodule: given
    here, or read from the torchgeo dataset (its ``classes``, its ``bands``, else ``band_<i>`` per
    channel of the first training sample).
    """

    def __init__(
        self,
        datamodule: dict[str, Any] | None = None,
        dataset: dict[str, Any] | None = None,
        sampler: dict[str, Any] | None = None,
        split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_grid: int = 1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        stats_file: str | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        bands: list[str] | None = None,
        ignore_index: int = 255,
        coords: bool = False,
        augmentations: list[dict[str, Any]] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        train_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            datamodule: ``{class_path, init_args}`` of a torchgeo datamodule (its own ``batch_size``,
                ``num_workers``, ``root``, ``download``, ... go in its init_args).
            dataset: ``{class_path, init_args}`` of a torchgeo dataset (``root``/``paths``, ...).
            sampler: GeoDataset only: ``{class_path, init_args}`` of a torchgeo sampler without its
                dataset, e.g. ``torchgeo.samplers.RandomGeoSampler`` with ``{size: 64, length: 200}``.
            split_ratios: train/val/test fractions for a dataset without a ``split`` argument.
            split_grid: GeoDataset split: 1 assigns whole files to splits; ``n`` > 1 cuts each file
                into ``n``×``n`` cells first (torchgeo's ``random_grid_cell_assignment``).
            mean: ``dataset`` only: per band, in the dataset's units; with ``std``.
            std: ``dataset`` only: per band.
            stats_file: ``dataset`` only: band statistics JSON used without mean/std; computed from
                the training samples once when it does not exist yet.
            num_classes: classes of the masks / labels; default: the dataset's ``classes``.
            class_names: one name per class; default: the dataset's ``classes``.
            bands: names of the image bands; default: the dataset's ``bands``.
            ignore_index: mask value excluded from loss and metrics (and given to pixels the
                ``augmentations`` bring in from outside the chip).
            coords: GeoDataset only: give the model each chip's ``location_coords`` (latitude, longitude
                of its centre) and ``temporal_coords`` (year, day of year), for backbones that
                embed them (``prithvi_*_tl``); the files must carry dates.
            augmentations: kornia / torchgeo transforms for training batches (``class_path``/``init_args``),
                applied to image and mask together after torchgeo's own ``aug``.
            batch_size: ``dataset`` only: chips per batch.
            num_workers: ``dataset`` only: DataLoader worker processes.
            pin_memory: ``dataset`` only: pin batches for faster host-to-GPU copies; None: when the trainer runs on a GPU.
            train_fraction: train on this seeded fraction of the training samples.
            seed: seed of the split, the sampler and the ``train_fraction`` subset.
        """
        super().__init__(batch_size, num_workers, pin_memory, train_fraction, seed, augmentations)
        if (datamodule is None) == (dataset is None):
            raise UserInputError(f"{FIELD}: give either datamodule (a torchgeo datamodule) or dataset (a torchgeo dataset)")
        if datamodule is not None and (coords or any(v is not None for v in (mean, std, stats_file, sampler))):
            raise UserInputError(f"{FIELD}.mean/std/stats_file/sampler/coords are for `dataset`: a torchgeo datamodule "
                                 "normalises and samples itself (set them in its init_args)")
        if dataset is not None and (mean is None) != (std is None):
            raise UserInputError(f"{FIELD}.mean and {FIELD}.std go together: set both, or use stats_file")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise UserInputError(f"{FIELD}.class_names has {len(class_names)} names for num_classes={num_classes}")
        self.wrapped: LightningDataModule | None = None
        if datamodule is not None:
            module_class, init_args = class_spec(datamodule, f"{FIELD}.datamodule")
            try:
                self.wrapped = module_class(**init_args)
            except TypeError as err:
                raise UserInputError(f"{FIELD}.datamodule {module_class.__name__}: {err}") from None
        self.dataset_spec, self.sampler_spec = dataset, sampler
        self.split_ratios, self.split_grid = split_ratios, split_grid
        self.mean, self.std, self.stats_file = mean, std, stats_file
        self.augment = bool(augmentations) or getattr(self.wrapped, "train_aug", None) is not None
        self.given_num_classes, self.given_class_names, self.given_bands = num_classes, class_names, bands
        self.ignore_index = ignore_index
        self.coords = coords

    # --- dataset mode: torchgeo datasets, split and sampled ----------------------------------

    @cached_property
    def split_datasets(self) -> dict[str, Dataset]:
        """The torchgeo dataset of each split (``train``, ``val``, ``test``), as torchgeo builds it."""
        field = f"{FIELD}.dataset"
        dataset_class, init_args = class_spec(self.dataset_spec, field)
        with dataset_files(field):
            try:
                if "split" in inspect.signature(dataset_class).parameters and "split" not in init_args:
                    return {split: dataset_class(split=split, **init_args) for split in SPLITS}
                whole = dataset_class(**init_args)
            except (TypeError, AssertionError, ValueError) as err:
                raise UserInputError(f"{field} {dataset_class.__name__}: {err}") from None
        if isinstance(whole, GeoDataset):
            generator = torch.Generator().manual_seed(self.seed)
            try:
                parts = (random_bbox_assignment(whole, self.split_ratios, generator) if self.split_grid == 1 else
                         grid_cell_split(whole, self.split_ratios, self.split_grid, generator))
            except ValueError as err:
                raise UserInputError(f"{FIELD}.split_ratios / split_grid: {err}") from None
            empty = [split for split, part in zip(SPLITS, parts) if len(part) == 0]
            if empty:
                raise UserInputError(f"{FIELD}.split_grid: the {' and '.join(empty)} split(s) got no part of the "
                                     f"dataset's {len(whole)} file(s) (split_grid {self.split_grid}: each file dealt "
                                     f"as {self.split_grid}x{self.split_grid} cells): raise split_grid, e.g. to 8, or "
                                     "change split_ratios")
            return dict(zip(SPLITS, parts))
        indices = ratio_split(len(whole), self.split_ratios, self.seed)
        return {split: Subset(whole, indices[split]) for split in SPLITS}

    def sampled_queries(self, split: str, dataset: GeoDataset) -> list[Any]:
        """The boxes the configured torchgeo sampler draws from ``dataset`` (seeded per split)."""
        field = f"{FIELD}.sampler"
        if self.sampler_spec is None:
            raise UserInputError(f"{field}: a GeoDataset is read at sampled boxes: set e.g. {{class_path: "
                                 "torchgeo.samplers.RandomGeoSampler, init_args: {size: 64, length: 200}}")
        sampler_class, init_args = class_spec(self.sampler_spec, field)
        with torch.random.fork_rng(devices=[]):  # torchgeo's samplers draw from the global generator
            torch.manual_seed(self.seed + SPLITS.index(split))
            try:
                return list(sampler_class(dataset, **init_args))
            except (TypeError, ValueError) as err:
                raise UserInputError(f"{field} {sampler_class.__name__}: {err}") from None

    def normalisation(self) -> tuple[Tensor, Tensor]:
        """Per-band ``(mean, std)`` ``(C,)``: given, or read from ``stats_file``."""
        if self.mean is None and self.stats_file is None:
            raise UserInputError(f"{FIELD}.mean/std: no band statistics: set them (one value per band, 0s and 1s "
                                 "for normalised data) or set stats_file (computed from the training samples)")
        mean, std = (self.mean, self.std) if self.mean is not None else load_band_stats(self.stats_file, self.bands)
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def dataset(self, split: str, normalize: bool = True) -> WorkbenchSamples:
        """``dataset`` mode: the samples of ``split`` in Workbench keys, normalised (or raw)."""
        if self.wrapped is not None:
            raise UserInputError(f"{FIELD}.datamodule: a torchgeo datamodule normalises with its own statistics")
        source = self.split_datasets[split]
        queries = self.sampled_queries(split, source) if isinstance(source, GeoDataset) else None
        if self.coords and queries is None:
            raise UserInputError(f"{FIELD}.coords: {type(source).__name__} is not a GeoDataset: it has no coordinates")
        items = queries if queries is not None else list(range(len(source)))
        if not items:
            raise UserInputError(f"the {split} split of {FIELD}.dataset is empty: check split_ratios, the "
                                 "sampler's size against the files, or the dataset's files")
        if split == "train":
            items = seeded_fraction(items, self.train_fraction, self.seed)
        if queries is None:
            source = Subset(source, items)
        mean, std = self.normalisation() if normalize else (None, None)
        return WorkbenchSamples(source, items if queries is not None else None, mean, std, self.coords)

    @property
    def num_bands(self) -> int:
        """Bands of the image."""
        return len(self.bands)

    # --- datamodule mode: the torchgeo datamodule's own loaders and aug ----------------------

    def prepare_data(self) -> None:
        """torchgeo's download, or the band statistics into a ``stats_file`` that does not exist yet."""
        if self.wrapped is not None:
            with dataset_files(f"{FIELD}.datamodule"):
                self.wrapped.prepare_data()
        elif self.mean is None and self.stats_file is not None and not Path(self.stats_file).is_file():
            log.warning("computing band statistics of the training samples once into %s", self.stats_file)
            write_band_stats(self, self.stats_file)

    def setup(self, stage: str | None = None) -> None:
        if self.wrapped is None:
            return super().setup(stage)
        self.wrapped.trainer = self.trainer  # torchgeo's aug picks train/val/test aug by the trainer's state
        with dataset_files(f"{FIELD}.datamodule"):
            self.wrapped.setup(stage or "fit")
        train = getattr(self.wrapped, "train_dataset", None)
        if self.train_fraction < 1.0 and train is not None:
            if isinstance(train, GeoDataset):
                raise UserInputError(f"{FIELD}.train_fraction: {type(self.wrapped).__name__} samples a GeoDataset; "
                                     "use `dataset` with a sampler for training fractions")
            self.wrapped.train_dataset = Subset(train, seeded_fraction(range(len(train)), self.train_fraction, self.seed))

    def train_dataloader(self) -> DataLoader:
        return self.wrapped.train_dataloader() if self.wrapped is not None else super().train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.wrapped.val_dataloader() if self.wrapped is not None else super().val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.wrapped.test_dataloader() if self.wrapped is not None else super().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.wrapped.test_dataloader() if self.wrapped is not None else super().predict_dataloader()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self.wrapped is not None:  # torchgeo's GeoDataModule drops crs/bounds here
            return self.wrapped.transfer_batch_to_device(batch, device, dataloader_idx)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """torchgeo's ``aug`` (normalisation, its augmentations), Workbench keys, then ``augmentations``."""
        if self.wrapped is not None:
            batch = workbench_sample(self.wrapped.on_after_batch_transfer(batch, dataloader_idx))
        return super().on_after_batch_transfer(batch, dataloader_idx)

    # --- what the model is built with --------------------------------------------------------

    @cached_property
    def source_dataset(self) -> Dataset:
        """The torchgeo training dataset itself (subsets unwrapped): its classes and bands are read."""
        if self.wrapped is not None:
            with dataset_files(f"{FIELD}.datamodule"):
                self.wrapped.setup("fit")
            dataset = getattr(self.wrapped, "train_dataset", None) or getattr(self.wrapped, "dataset", None)
        else:
            dataset = self.split_datasets["train"]
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        return dataset

    @cached_property
    def dataset_classes(self) -> list[str] | None:
        """The torchgeo dataset's class names (its ``classes``), if it has them."""
        classes = getattr(self.source_dataset, "classes", None)
        if isinstance(classes, dict):
            classes = [classes[k] for k in sorted(classes)]
        return [str(c) for c in classes] if classes else None

    @cached_property
    def first_sample(self) -> dict[str, Any]:
        """The first training sample (or batch, of a torchgeo datamodule) as torchgeo gives it."""
        if self.wrapped is not None:
            return next(iter(self.wrapped.train_dataloader()))
        return self.dataset("train", normalize=False)[0]

    @property
    def num_classes(self) -> int:
        """Classes in the masks / labels (linked to the model); 0 for images without either (e.g.
        for masked-autoencoder pretraining)."""
        if self.given_num_classes is not None:
            return self.given_num_classes
        if self.given_class_names or self.dataset_classes:
            return len(self.given_class_names or self.dataset_classes)
        if not {"mask", "label"} & set(self.first_sample):
            return 0
        raise UserInputError(f"{FIELD}.num_classes: {type(self.source_dataset).__name__} does not list its "
                             "classes: set the number of classes")

    @property
    def class_names(self) -> list[str]:
        """One name per class (metric names; linked to the model)."""
        names = self.given_class_names or self.dataset_classes or [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise UserInputError(f"{FIELD}.num_classes {self.num_classes} does not match the dataset's "
                                 f"{len(names)} classes {names}: set class_names too")
        return names

    @cached_property
    def bands(self) -> list[str]:
        """Names of the image bands (canonical spellings; linked to the model). ``B<n>`` names follow
        Landsat OLI's numbering for a torchgeo ``Landsat8`` / ``Landsat9`` dataset, else Sentinel-2's."""
        landsat = self.wrapped is None and isinstance(self.source_dataset, Landsat8 | Landsat9)
        sensor = LANDSAT_OLI_TO_HLS if landsat else SENTINEL2_TO_HLS
        if self.given_bands:
            return [canonical_band(b, sensor) for b in self.given_bands]
        names = getattr(self.source_dataset, "bands", None)
        if isinstance(names, Sequence) and names and all(isinstance(b, str) for b in names):
            return [canonical_band(b, sensor) for b in names]
        image = self.first_sample["image"]
        count = image.shape[1] if self.wrapped is not None else image.shape[0]  # a batch, or one sample
        log.warning("%s has no band names: calling its %d bands band_0.. (set data.init_args.bands to name them)",
                    type(self.source_dataset).__name__, count)
        return [f"band_{i}" for i in range(count)]
