"""GEO-Bench (ServiceNow/geo-bench) classification and segmentation tasks, read from their HDF5 layout.

A task folder (e.g. ``classification_v1.0/m-eurosat``) holds one ``<sample>.hdf5`` per sample
with one 2-D dataset per band, named by the band (``02 - Blue``; bands of dated samples carry a
``_<date>`` suffix) and, for segmentation, a ``label`` dataset; classification labels sit in the
file's ``pickle`` attribute (the repr of a pickled dict with key ``label``: a class index, or a
multi-hot vector for multi-label tasks). Beside the samples: ``task_specs.pkl`` (bands, label type,
classes), ``band_stats.json`` ({band: {mean, std, ...}}) and ``<name>_partition.json``
({train, valid, test: [sample names]}): ``default`` and the training-fraction partitions
(``0.01x_train`` ... ``1.00x_train``). Both pickles are decoded without the ``geobench`` package.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.normalize import Preprocessor
from datamodules.raster import check_classes, random_flip_rotate
from datamodules.splits import SPLITS, SplitDataModule, seeded_fraction
from workbench.errors import UserInputError

# GEO-Bench band name → the canonical name models know (Sentinel-2 and Landsat-8 optical bands);
# other bands (Sentinel-1, cloud probability, elevation, hyperspectral) keep their GEO-Bench name.
GEOBENCH_BAND_NAMES = {
    "01 - Coastal aerosol": "B1", "02 - Blue": "BLUE", "03 - Green": "GREEN", "04 - Red": "RED",
    "05 - Vegetation Red Edge": "B5", "06 - Vegetation Red Edge": "B6", "07 - Vegetation Red Edge": "B7",
    "08 - NIR": "B8", "08A - Vegetation Red Edge": "NIR_NARROW", "09 - Water vapour": "B9",
    "10 - SWIR - Cirrus": "B10", "11 - SWIR": "SWIR_1", "12 - SWIR": "SWIR_2",
    "05 - NIR": "NIR_NARROW", "06 - SWIR1": "SWIR_1", "07 - SWIR2": "SWIR_2",  # Landsat-8
    "Blue": "BLUE", "Green": "GREEN", "Red": "RED",
}
PARTITION_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # ours → GEO-Bench's
LABEL_KINDS = {"SemanticSegmentation": "segmentation", "Classification": "classification",
               "MultiLabelClassification": "multi_label"}
SAFE_GLOBALS = {
    ("builtins", name) for name in ("set", "frozenset", "slice", "complex", "range", "bytearray", "object")
} | {("datetime", name) for name in ("date", "datetime", "time", "timedelta", "timezone")} | {
    ("collections", "OrderedDict"), ("copyreg", "_reconstructor"),
} | {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}


def _h5py() -> Any:
    """h5py, imported when first needed (the ``benchmarks`` extra)."""
    try:
        import h5py
    except ImportError:
        raise UserInputError("GEO-Bench data needs h5py: pip install 'workbench[benchmarks]'") from None
    return h5py


class Opaque:
    """Stands in for a class of a pickle that is not importable here (``geobench``, rasterio,
    affine objects): keeps its constructor arguments and state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        instance = super().__new__(cls)
        instance.args = args
        return instance

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | None):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__) state
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class OpaqueUnpickler(pickle.Unpickler):
    """Unpickles plain data, dates and numpy arrays; every other class becomes an :class:`Opaque`
    subclass of the same name, so no code of the pickle's origin is imported or run."""

    stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        key = (module, name)
        if key not in self.stand_ins:
            self.stand_ins[key] = type(name.rsplit(".", 1)[-1], (Opaque,), {"__module__": module})
        return self.stand_ins[key]


def read_pickle(data: bytes, source: Path) -> Any:
    """``data`` unpickled by :class:`OpaqueUnpickler`; a broken pickle names ``source``."""
    try:
        return OpaqueUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise UserInputError(f"{source}: could not decode its pickled metadata ({err}); re-download the task") from None


@dataclass(frozen=True)
class TaskSpec:
    """What ``task_specs.pkl`` says about a task: its bands (in order), label kind and classes."""

    band_names: list[str]
    label_kind: str
    num_classes: int
    class_names: list[str] | None


def read_task_specs(folder: Path) -> TaskSpec:
    """The :class:`TaskSpec` of the task in ``folder``."""
    path = folder / "task_specs.pkl"
    if not path.is_file():
        raise UserInputError(f"{path} does not exist: data.root / data.task must name a GEO-Bench task folder")
    specs = read_pickle(path.read_bytes(), path)
    label_type = getattr(specs, "label_type", None)
    kind = LABEL_KINDS.get(type(label_type).__name__)
    if kind is None:
        raise UserInputError(f"{path}: label type {type(label_type).__name__} is not supported "
                             f"(supported: {', '.join(LABEL_KINDS)})")
    names = getattr(label_type, "_class_names", None)
    return TaskSpec([info.name for info in specs.bands_info], kind, int(label_type.n_classes),
                    list(names) if names is not None else None)


def task_folder(root: Path, task: str) -> Path:
    """``root/task`` or ``root/<benchmark>/task`` (e.g. ``root/classification_v1.0/m-eurosat``)."""
    if not root.is_dir():
        raise UserInputError(f"data.root {root} is not a folder")
    found = [root / task] if (root / task).is_dir() else sorted(p for p in root.glob(f"*/{task}") if p.is_dir())
    if not found:
        tasks = sorted(str(p.parent.relative_to(root)) for pattern in ("*/task_specs.pkl", "*/*/task_specs.pkl")
                       for p in root.glob(pattern))
        raise UserInputError(f"data.task: no folder {task} in {root} or its benchmark folders; the tasks there: "
                             f"{', '.join(tasks) or 'none (no task_specs.pkl found)'}")
    return found[0]


def read_partition(folder: Path, partition: str) -> dict[str, list[str]]:
    """Sample names of each of our splits from ``<partition>_partition.json``."""
    path = folder / f"{partition}_partition.json"
    if not path.is_file():
        available = sorted(p.name.removesuffix("_partition.json") for p in folder.glob("*_partition.json"))
        raise UserInputError(f"data.partition: {path} does not exist; partitions in {folder}: {available}")
    names = json.loads(path.read_text())
    missing = [theirs for theirs in PARTITION_SPLITS.values() if theirs not in names]
    if missing:
        raise UserInputError(f"{path} has no {missing} list(s): expected keys train, valid, test")
    return {ours: list(names[theirs]) for ours, theirs in PARTITION_SPLITS.items()}


def read_band_stats(folder: Path, band_names: list[str]) -> tuple[list[float], list[float]]:
    """Per-band ``(mean, std)`` of ``band_names`` from the task's ``band_stats.json``."""
    path = folder / "band_stats.json"
    if not path.is_file():
        raise UserInputError(f"{path} does not exist: set data.mean and data.std (one value per band)")
    stats = json.loads(path.read_text())
    missing = [band for band in band_names if band not in stats]
    if missing:
        raise UserInputError(f"{path} has no statistics for band(s) {missing}: set data.mean and data.std")
    return [float(stats[b]["mean"]) for b in band_names], [float(stats[b]["std"]) for b in band_names]


def resolve_bands(requested: list[str] | None, available: list[str]) -> list[str]:
    """GEO-Bench names of the ``requested`` bands, given by GEO-Bench or canonical name (``02 - Blue``
    or ``BLUE``); None: all ``available`` bands."""
    if requested is None:
        return list(available)
    by_name = {name: name for name in available} | {GEOBENCH_BAND_NAMES.get(n, n): n for n in available}
    unknown = [band for band in requested if band not in by_name]
    if unknown:
        raise UserInputError(f"data.bands: unknown band(s) {unknown}; the task has {available}")
    return [by_name[band] for band in requested]


class GeoBenchDataset(Dataset):
    """GEO-Bench samples → ``image`` ``(C, H, W)`` float32 normalised, ``valid`` ``(H, W)`` bool and
    ``mask`` ``(H, W)`` int64 (segmentation) or ``label``: ``()`` int64 class / ``(K,)`` multi-hot."""

    def __init__(self, files: list[Path], band_names: list[str], preprocess: Preprocessor, label_kind: str,
                 num_classes: int, ignore_index: int = 255, augment: bool = False) -> None:
        """
        Args:
            files: the samples' ``.hdf5`` files.
            band_names: GEO-Bench names of the bands to read, in model order.
            preprocess: per-band normalisation.
            label_kind: ``segmentation``, ``classification`` or ``multi_label``.
            num_classes: mask values must lie in ``[0, num_classes)`` or equal ``ignore_index``.
            ignore_index: mask value excluded from loss and metrics.
            augment: random flips and 90° rotations of image, valid and mask.
        """
        self.files = files
        self.band_names = band_names
        self.preprocess = preprocess
        self.label_kind = label_kind
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    def band_key(self, sample: Any, band: str, path: Path) -> str:
        """The dataset name of ``band`` in ``sample``: the band name, or it with a ``_<date>`` suffix."""
        if band in sample:
            return band
        dated = [key for key in sample if key.startswith(f"{band}_")]
        if len(dated) != 1:
            raise UserInputError(f"{path} has {'no' if not dated else 'several dated'} band {band!r} "
                                 f"(its datasets: {sorted(sample)}); check data.bands")
        return dated[0]

    def read_layers(self, sample: Any, path: Path) -> np.ndarray:
        """The selected bands of an open sample, ``(L, H, W)``."""
        layers = [np.asarray(sample[self.band_key(sample, band, path)]) for band in self.band_names]
        shapes = {layer.shape for layer in layers}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise UserInputError(f"{path}: bands {self.band_names} have shapes {sorted(shapes)}, not one (H, W)")
        return np.stack(layers)

    def read_mask(self, sample: Any, path: Path) -> Tensor:
        """The ``label`` dataset ``(H, W)`` int64; values outside the classes name the file."""
        mask = torch.from_numpy(np.asarray(sample[self.band_key(sample, "label", path)]).astype(np.int64))
        check_classes(mask, self.num_classes, self.ignore_index, f"the label of {path}",
                      "data.num_classes or data.ignore_index")
        return mask

    def read_label(self, sample: Any, path: Path) -> Tensor:
        """The class index ``()`` or multi-hot vector ``(K,)`` in the sample's pickled attributes."""
        if "pickle" not in sample.attrs:
            raise UserInputError(f"{path} has no 'pickle' attribute holding its label")
        raw = sample.attrs["pickle"]  # str(pickle.dumps(attributes)): the repr of the bytes
        try:
            data = ast.literal_eval(raw.decode() if isinstance(raw, bytes) else raw)
        except (ValueError, SyntaxError):
            raise UserInputError(f"{path}: its 'pickle' attribute is not the repr of pickled bytes") from None
        attributes = read_pickle(data, path)
        if not isinstance(attributes, dict) or "label" not in attributes:
            raise UserInputError(f"{path}: its pickled attributes have no 'label'")
        label = np.asarray(attributes["label"])
        if self.label_kind == "multi_label":
            if label.shape != (self.num_classes,):
                raise UserInputError(f"{path}: label has shape {label.shape}, expected ({self.num_classes},) multi-hot")
            return torch.from_numpy(label.astype(np.float32))
        if label.ndim or not 0 <= int(label) < self.num_classes:
            raise UserInputError(f"{path}: label {label.tolist()} is not a class index in 0..{self.num_classes - 1}")
        return torch.tensor(int(label))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        path = self.files[index]
        try:
            with _h5py().File(path, "r") as sample:
                image, valid = self.preprocess(self.read_layers(sample, path), None)
                out = {"image": image, "valid": valid}
                if self.label_kind == "segmentation":
                    out["mask"] = self.read_mask(sample, path).masked_fill(~valid, self.ignore_index)
                else:
                    label = self.read_label(sample, path)
        except OSError as err:
            raise UserInputError(f"{path} could not be read ({err}): the file is missing or corrupt") from None
        out = random_flip_rotate(out) if self.augment else out
        if self.label_kind != "segmentation":
            out["label"] = label
        return out


class GeoBenchDataModule(SplitDataModule):
    """A GEO-Bench task → batches of ``image`` ``(B, C, H, W)`` and ``mask`` ``(B, H, W)``
    (segmentation) or ``label`` ``(B,)`` / ``(B, K)`` (classification / multi-label).

    Bands, classes and the label kind come from the task's ``task_specs.pkl``, splits from a
    partition file, normalisation from ``band_stats.json`` unless ``mean``/``std`` are given.
    """

    def __init__(
        self,
        root: str,
        task: str,
        bands: list[str] | None = None,
        partition: str = "default",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        ignore_index: int = 255,
        train_fraction: float = 1.0,
        seed: int = 0,
        augment: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        """
        Args:
            root: the GEO-Bench folder (holding ``classification_v1.0/``, ``segmentation_v1.0/``) or
                a benchmark folder holding the task folder.
            task: task folder name, e.g. ``m-eurosat``, ``m-cashew-plant``.
            bands: bands fed to the model, by GEO-Bench name (``02 - Blue``) or canonical name
                (``BLUE``); None: all bands of the task, in ``task_specs.pkl`` order.
            partition: partition file ``<partition>_partition.json``: ``default``, or a training
                fraction such as ``0.01x_train`` (its val/test lists are the default ones).
            mean: per selected band, in file units; with ``std``. Default: ``band_stats.json``.
            std: per selected band.
            ignore_index: mask value excluded from loss and metrics (segmentation).
            train_fraction: train on this seeded fraction of the partition's training samples.
            seed: seed of the ``train_fraction`` subset.
            augment: random flips and rotations on the training split.
            batch_size: samples per batch.
            num_workers: DataLoader worker processes.
            pin_memory: pin batches for faster host-to-GPU copies; None: when the trainer runs on a GPU.
        """
        super().__init__(batch_size, num_workers, pin_memory, train_fraction, seed)
        if (mean is None) != (std is None):
            raise UserInputError("data.mean and data.std go together: set both, or neither to use band_stats.json")
        self.folder = task_folder(Path(root), task)
        self.partition = partition
        self.spec = read_task_specs(self.folder)
        self.band_names = resolve_bands(bands, self.spec.band_names)
        self.mean, self.std = mean, std
        self.ignore_index = ignore_index
        self.augment = augment
        self.num_classes = self.spec.num_classes
        self.class_names = self.spec.class_names or [str(i) for i in range(self.num_classes)]
        self.multi_label = self.spec.label_kind == "multi_label"

    @property
    def bands(self) -> list[str]:
        """Canonical names of the selected bands (linked to the model)."""
        return [GEOBENCH_BAND_NAMES.get(name, name) for name in self.band_names]

    @cached_property
    def split_files(self) -> dict[str, list[Path]]:
        """The ``.hdf5`` files of each split; every listed sample must exist."""
        names = read_partition(self.folder, self.partition)
        files = {}
        for split in SPLITS:
            files[split] = [self.folder / f"{name}.hdf5" for name in names[split]]
            missing = [f.name for f in files[split] if not f.is_file()]
            if missing:
                raise UserInputError(f"{self.partition}_partition.json lists {len(missing)} sample(s) of the "
                                     f"{split} split not in {self.folder}, e.g. {missing[0]}")
        files["train"] = seeded_fraction(files["train"], self.train_fraction, self.seed)
        return files

    def preprocessor(self) -> Preprocessor:
        """Per-band normalisation of the selected bands."""
        if self.mean is not None:
            for field, values in (("mean", self.mean), ("std", self.std)):
                if len(values) != len(self.band_names):
                    raise UserInputError(f"data.{field} has {len(values)} values for {len(self.band_names)} bands")
            return Preprocessor(self.mean, self.std)
        return Preprocessor(*read_band_stats(self.folder, self.band_names))

    def dataset(self, split: str) -> GeoBenchDataset:
        """The samples of ``split`` (``train``, ``val`` or ``test``)."""
        files = self.split_files[split]
        if not files:
            raise UserInputError(f"the {split} split of {self.partition}_partition.json is empty")
        return GeoBenchDataset(files, self.band_names, self.preprocessor(), self.spec.label_kind, self.num_classes,
                               self.ignore_index, self.augment and split == "train")
