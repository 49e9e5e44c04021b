"""Point clouds: LAS/LAZ (laspy), PLY (plyfile) and NPY files → fixed-size point sets.

- :class:`PointSegmentationDataModule` — per-point labels. Large clouds are cut into square
  ``tile_size`` tiles in x/y; tiles are split into train/val/test by seeded ratios (whole tiles,
  so splits never share points); each sample is ``num_points`` points of one tile (random in
  training, a fixed seeded draw otherwise): ``points`` ``(B, N, 3 + F)`` and ``mask`` ``(B, N)``.
- :class:`PointClassificationDataModule` — one label per cloud from ``<root>/<class>/`` folders.

xyz are centred on the tile (or cloud) and scaled to about [-1, 1]; per-point features
(``features``: ``intensity``, ``red``, ...) are standardized with training statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.registry import registry_folder, registry_path
from datamodules.splits import SplitDataModule, class_folder_files, ratio_split, seeded_fraction
from workbench.atomic import default_cache_dir
from workbench.errors import UserInputError

POINT_SUFFIXES = (".las", ".laz", ".ply", ".npy")
ASPRS_CLASSES = {0: "never_classified", 1: "unclassified", 2: "ground", 3: "low_vegetation",
                 4: "medium_vegetation", 5: "high_vegetation", 6: "building", 7: "noise", 8: "model_key_point",
                 9: "water", 10: "rail", 11: "road_surface", 13: "wire_guard", 14: "wire_conductor",
                 15: "transmission_tower", 17: "bridge_deck", 18: "high_noise"}
PLY_LABEL_FIELDS = ("classification", "class", "label", "scalar_Classification")


@dataclass
class Cloud:
    """Points of one file: ``xyz`` ``(N, 3)`` float64, ``features`` ``(N, F)`` float32 and
    ``codes`` ``(N,)`` int64 per-point class codes (None without labels)."""

    xyz: np.ndarray
    features: np.ndarray
    codes: np.ndarray | None


def read_cloud(path: Path, features: list[str]) -> Cloud:
    """Read a ``.las``/``.laz``, ``.ply`` or ``.npy`` file (NPY: columns x, y, z, then one column
    per name in ``features``, then an optional label column)."""
    if not path.is_file():
        raise UserInputError(f"point cloud {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".las", ".laz"):
            import laspy

            las = laspy.read(path)
            names = set(las.point_format.dimension_names)
            fields = {n: np.asarray(las[n], dtype=np.float32) for n in features if n in names}
            xyz = np.stack([las.x, las.y, las.z], 1).astype(np.float64)
            codes = np.asarray(las.classification, dtype=np.int64)
        elif suffix == ".ply":
            from plyfile import PlyData

            vertex = PlyData.read(str(path))["vertex"]
            names = set(vertex.data.dtype.names)
            fields = {n: np.asarray(vertex[n], dtype=np.float32) for n in features if n in names}
            xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], 1).astype(np.float64)
            label = next((n for n in PLY_LABEL_FIELDS if n in names), None)
            codes = np.asarray(vertex[label], dtype=np.int64) if label else None
        elif suffix == ".npy":
            array = np.load(path)
            if array.ndim != 2 or array.shape[1] not in (3 + len(features), 4 + len(features)):
                raise UserInputError(
                    f"{path}: NPY clouds are (N, 3 + {len(features)} features [+ label]) arrays, got {array.shape}"
                )
            names = set(features)
            fields = {n: array[:, 3 + i].astype(np.float32) for i, n in enumerate(features)}
            xyz = array[:, :3].astype(np.float64)
            codes = array[:, -1].astype(np.int64) if array.shape[1] == 4 + len(features) else None
        else:
            raise UserInputError(f"{path}: point clouds must be {'/'.join(POINT_SUFFIXES)}")
    except UserInputError:
        raise
    except Exception as err:  # laspy/plyfile raise their own error types for broken files
        raise UserInputError(f"point cloud {path} could not be read ({type(err).__name__}: {err})") from None
    missing = [n for n in features if n not in fields]
    if missing:
        raise UserInputError(f"{path} has no per-point field(s) {missing}; it has {sorted(names)}")
    feature_array = np.stack([fields[n] for n in features], 1) if features else np.zeros((len(xyz), 0), np.float32)
    return Cloud(xyz, feature_array, codes)


def sample_indices(count: int, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """``num_points`` indices of ``count`` points: without replacement when there are enough."""
    return rng.choice(count, num_points, replace=count < num_points)


class PointSamples(Dataset):
    """``points`` ``(N, 3 + F)`` (+ ``mask`` ``(N,)`` per-point classes or ``label``) per item.

    Each item is a point set (a tile or a whole cloud): ``xyz`` centred on ``centers[i]`` and
    divided by ``scale``; features standardized by ``mean``/``std``. ``train`` draws a new random
    sample each time; otherwise the draw is fixed by the item index.
    """

    def __init__(self, sets: list[Cloud], centers: np.ndarray, scale: float | np.ndarray, num_points: int,
                 mean: np.ndarray, std: np.ndarray, train: bool, labels: list[int] | None = None) -> None:
        self.sets, self.centers, self.scale = sets, centers, scale
        self.num_points, self.mean, self.std, self.train, self.labels = num_points, mean, std, train, labels

    def __len__(self) -> int:
        return len(self.sets)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        cloud = self.sets[index]
        # training draws follow torch's generator (seeded by the run's seed, per loader worker), so runs repeat
        rng = np.random.default_rng(int(torch.randint(2**62, ())) if self.train else index)
        pick = sample_indices(len(cloud.xyz), self.num_points, rng)
        scale = self.scale[index] if isinstance(self.scale, np.ndarray) else self.scale
        xyz = (cloud.xyz[pick] - self.centers[index]) / scale
        features = (cloud.features[pick] - self.mean) / self.std
        sample = {"points": torch.from_numpy(np.concatenate([xyz, features], 1).astype(np.float32))}
        if self.labels is not None:
            sample["label"] = torch.tensor(self.labels[index])
        elif cloud.codes is not None:
            sample["mask"] = torch.from_numpy(cloud.codes[pick])
        return sample


class PointDataModule(SplitDataModule):
    """What both point datamodules share: files, features, the ``bands`` fed to the backbone."""

    def __init__(self, root: str, num_points: int = 1024, features: list[str] | None = None,
                 split_ratios: tuple[float, float, float] = (0.6, 0.2, 0.2), train_repeats: int = 1,
                 batch_size: int = 8, num_workers: int = 0, train_fraction: float = 1.0, seed: int = 0) -> None:
        """
        Args:
            root: folder of point-cloud files.
            num_points: points per sample (drawn with replacement from smaller sets).
            features: per-point fields after xyz (``intensity``, ``red``, ...; NPY: column names).
            split_ratios: train/val/test shares of the tiles (or clouds).
            train_repeats: random draws of each training set per epoch.
            batch_size, num_workers, train_fraction, seed: as every datamodule.
        """
        super().__init__(batch_size, num_workers, False, train_fraction, seed)
        self.root, self.num_points = Path(root), num_points
        self.features = list(features or [])
        self.split_ratios = split_ratios
        self.train_repeats = train_repeats
        self.bands = ["x", "y", "z", *self.features]

    def samples(self, split: str, sets: list[Cloud], centers: np.ndarray, scale: float | np.ndarray,
                train_sets: list[Cloud], labels: list[int] | None = None) -> PointSamples:
        """The dataset of ``split`` (training sets repeated ``train_repeats`` times)."""
        mean, std = self.feature_stats(train_sets)
        repeats = self.train_repeats if split == "train" else 1
        if isinstance(scale, np.ndarray):
            scale = np.tile(scale, repeats)
        return PointSamples(sets * repeats, np.tile(centers, (repeats, 1)), scale, self.num_points, mean, std,
                            split == "train", labels * repeats if labels is not None else None)

    def split_indices(self, count: int, groups: list[str] | None = None) -> dict[str, list[int]]:
        """Seeded train/val/test indices of ``count`` point sets (per class with ``groups``),
        the training fraction applied."""
        parts = ratio_split(count, self.split_ratios, self.seed, groups)
        empty = [s for s, p in parts.items() if not p]
        if empty:
            raise UserInputError(f"{count} point sets leave split(s) {empty} empty: add data or change split_ratios")
        parts["train"] = seeded_fraction(parts["train"], self.train_fraction, self.seed)
        return parts

    def feature_stats(self, clouds: list[Cloud]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the per-point features over ``clouds`` (training sets)."""
        values = np.concatenate([c.features for c in clouds]) if clouds else np.zeros((0, len(self.features)))
        return values.mean(0) if len(values) else 0.0, (values.std(0) + 1e-6) if len(values) else 1.0


class PointSegmentationDataModule(PointDataModule):
    """Per-point classes from tiled clouds (see the module docstring). Classes are the codes
    found in the files (``classes`` restricts them; other points are ignored, label -1), named
    with the ASPRS LAS standard names unless ``class_names`` are given. Without ``classes`` the
    files are read on first use of ``num_classes``/``class_names``."""

    def __init__(self, root: str, files: str = "*.las", tile_size: float = 10.0, min_points: int = 64,
                 classes: list[int] | None = None, class_names: list[str] | None = None, **kwargs: Any) -> None:
        """
        Args:
            root: folder of point-cloud files.
            files: glob pattern of the files in ``root`` (``*.las``, ``**/*.ply``, ...).
            tile_size: tile edge in the files' x/y units (metres, feet).
            min_points: tiles with fewer points are dropped.
            classes: class codes to learn (default: every code in the files).
            class_names: one name per class (default: ASPRS names).
            **kwargs: :class:`PointDataModule` arguments (num_points, features, split_ratios, ...).
        """
        super().__init__(root, **kwargs)
        self.pattern, self.tile_size, self.min_points = files, tile_size, min_points
        self.classes = list(classes) if classes is not None else None
        self.given_class_names = list(class_names) if class_names else None

    @cached_property
    def codes(self) -> list[int]:
        """The class codes learnt: ``classes``, else every code in the files."""
        if self.classes is not None:
            return self.classes
        return sorted({int(c) for cloud in self.clouds for c in np.unique(cloud.codes)})

    @cached_property
    def class_names(self) -> list[str]:
        """One name per code: ``class_names``, else the ASPRS names."""
        names = self.given_class_names or [ASPRS_CLASSES.get(c, f"class_{c}") for c in self.codes]
        if len(names) != len(self.codes):
            raise UserInputError(f"data.class_names has {len(names)} names for {len(self.codes)} classes")
        return names

    @property
    def num_classes(self) -> int:
        """One class per code."""
        return len(self.codes)

    @cached_property
    def clouds(self) -> list[Cloud]:
        paths = sorted(self.root.glob(self.pattern))
        if not paths:
            raise UserInputError(f"data.files: no {self.pattern} files in {self.root}")
        clouds = [read_cloud(p, self.features) for p in paths]
        unlabelled = [str(p) for p, c in zip(paths, clouds) if c.codes is None]
        if unlabelled:
            raise UserInputError(f"point segmentation needs per-point labels; none in {unlabelled[:3]}")
        return clouds

    @cached_property
    def tiles(self) -> list[Cloud]:
        """Tiles of at least ``min_points`` points; codes mapped to class indices (-1: ignored)."""
        lookup = {code: i for i, code in enumerate(self.codes)}
        tiles = []
        for cloud in self.clouds:
            cell = np.floor(cloud.xyz[:, :2] / self.tile_size).astype(np.int64)
            keys, inverse = np.unique(cell, axis=0, return_inverse=True)
            for k in range(len(keys)):
                idx = np.flatnonzero(inverse.ravel() == k)
                if len(idx) >= self.min_points:
                    classes = np.array([lookup.get(int(c), -1) for c in cloud.codes[idx]], dtype=np.int64)
                    tiles.append(Cloud(cloud.xyz[idx], cloud.features[idx], classes))
        if not tiles:
            raise UserInputError(f"no {self.tile_size}-unit tile holds {self.min_points} points: change tile_size")
        return tiles

    @cached_property
    def split_tiles(self) -> dict[str, list[int]]:
        return self.split_indices(len(self.tiles))

    def dataset(self, split: str) -> PointSamples:
        tiles = [self.tiles[i] for i in self.split_tiles[split]]
        centers = np.stack([np.r_[(np.floor(t.xyz[0, :2] / self.tile_size) + 0.5) * self.tile_size,
                                  t.xyz[:, 2].min()] for t in tiles])
        return self.samples(split, tiles, centers, self.tile_size / 2, [self.tiles[i] for i in self.split_tiles["train"]])


class PointClassificationDataModule(PointDataModule):
    """One class per cloud from ``<root>/<class>/*.{las,laz,ply,npy}``; each cloud centred and
    scaled into the unit sphere (as ModelNet-style benchmarks)."""

    @cached_property
    def files(self) -> list[tuple[Path, str]]:
        return class_folder_files(self.root, POINT_SUFFIXES)

    @cached_property
    def class_names(self) -> list[str]:
        return sorted({name for _, name in self.files})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def clouds(self) -> list[Cloud]:
        return [read_cloud(path, self.features) for path, _ in self.files]

    def dataset(self, split: str) -> PointSamples:
        splits = self.split_indices(len(self.files), [name for _, name in self.files])
        index = splits[split]
        clouds = [self.clouds[i] for i in index]
        centers = np.stack([c.xyz.mean(0) for c in clouds])
        scale = np.array([np.linalg.norm(c.xyz - m, axis=1).max() + 1e-9 for c, m in zip(clouds, centers)])
        labels = [self.class_names.index(self.files[i][1]) for i in index]
        train = [self.clouds[i] for i in splits["train"]]
        return self.samples(split, clouds, centers, scale, train, labels)


LASPY_SAMPLES = ("laspy==2.7.0", "laspy-2.7.0/tests/data")
LASPY_SAMPLE_FILE = "file_with_both_wkt_and_geotiff_vlrs.las"
LASPY_SAMPLE_CODES = (2, 3, 4, 5, 6, 7)  # every class code in the file


class ClassifiedLasDataModule(PointSegmentationDataModule):
    """The classified airborne LiDAR sample shipped in laspy's source archive
    (``file_with_both_wkt_and_geotiff_vlrs.las``: 25,408 points, 60 × 40 ft, classes ground, low /
    medium / high vegetation, building and noise), fetched from PyPI once (:meth:`prepare_data`)
    and cached."""

    def __init__(self, tile_size: float = 10.0, classes: list[int] | None = None, **kwargs: Any) -> None:
        """``tile_size`` in feet (the file's units); ``classes`` default to the file's six codes;
        other arguments as :class:`PointSegmentationDataModule` except ``root`` and ``files``."""
        root = registry_path(*LASPY_SAMPLES, default_cache_dir(), source=True)
        super().__init__(str(root), files=LASPY_SAMPLE_FILE, tile_size=tile_size,
                         classes=list(LASPY_SAMPLE_CODES if classes is None else classes), **kwargs)

    def prepare_data(self) -> None:
        """Fetch laspy's source archive and extract its sample files (once)."""
        registry_folder(*LASPY_SAMPLES, default_cache_dir(), source=True)
