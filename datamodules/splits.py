"""What every workbench datamodule shares: train/val/test datasets, loaders, a training fraction."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from workbench.errors import UserInputError

SPLITS = ("train", "val", "test")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
T = TypeVar("T")


def seeded_fraction(items: Sequence[T], fraction: float, seed: int) -> list[T]:
    """A seeded random ``fraction`` of ``items`` (at least one), in their original order."""
    if fraction >= 1.0:
        return list(items)
    count = max(1, round(len(items) * fraction))
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), count))]


class EpochShuffleSampler(DistributedSampler):
    """Indices ``0 .. size-1`` in an order seeded by ``(seed, epoch)``, so any epoch's order can
    be replayed; ``skip`` drops this rank's first indices of the next pass only (resuming mid-epoch).

    Under data parallelism each of ``num_replicas`` ranks takes every ``num_replicas``-th index of
    that one order (padded to a multiple of the ranks, as :class:`DistributedSampler` pads), so the
    ranks' batches of one step together are the batch one process would draw: a run on two
    processes with half the batch size trains on the same global batches. Being a
    ``DistributedSampler``, it is not wrapped and re-shuffled by Lightning.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0, skip: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size, self.epoch, self.skip = size, epoch, skip

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[: self.total_size - self.size]
        mine = order[self.rank :: self.num_replicas]
        skip, self.skip = self.skip, 0
        return iter(mine[skip:])


class SplitDataModule(LightningDataModule):
    """Loaders over ``self.dataset(split)`` for ``train``, ``val`` and ``test`` (``predict`` reads
    ``test``). Subclasses implement :meth:`dataset` and apply ``train_fraction`` with
    :func:`seeded_fraction` to their training items. ``augmentations`` (kornia / torchgeo transforms
    as ``class_path``/``init_args``, see :mod:`datamodules.augment`) transform training batches on
    the device, image and mask together; a subclass offers them by passing its own argument on."""

    def __init__(self, batch_size: int = 8, num_workers: int = 0, pin_memory: bool | None = None,
                 train_fraction: float = 1.0, seed: int = 0,
                 augmentations: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        if not 0.0 < train_fraction <= 1.0:
            raise UserInputError(f"data.train_fraction {train_fraction} must be in (0, 1]")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_fraction = train_fraction
        self.seed = seed
        self.batch_augmentation = None
        if augmentations:
            from datamodules.augment import BatchAugmentation  # kornia: imported only when used

            self.batch_augmentation = BatchAugmentation(augmentations)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches (not val/test/predict) through ``augmentations``, on the device."""
        if self.batch_augmentation is not None and self.trainer is not None and self.trainer.training:
            return self.batch_augmentation(batch, getattr(self, "ignore_index", 255))
        return batch

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``)."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Fetch or build files the datamodule needs (once per node; a no-op once they exist)."""

    def setup(self, stage: str | None = None) -> None:
        """Read the splits of ``stage`` (per process); :meth:`prepare_data` first, so ``setup``
        alone works too (Lightning has run it already: then the files are there)."""
        self.prepare_data()
        self.datasets = {s: self.dataset(s) for s in STAGE_SPLITS.get(stage or "fit", SPLITS)}

    def resume_position(self, batches_per_epoch: int) -> tuple[int, int]:
        """``(epoch, batches already trained in it)`` of the attached trainer: ``(0, 0)`` for a
        new run, where the checkpoint left off for a resumed one."""
        trainer = self.trainer
        if trainer is None or batches_per_epoch == 0:
            return 0, 0
        consumed = trainer.global_step * trainer.accumulate_grad_batches
        return trainer.current_epoch, consumed % batches_per_epoch

    @property
    def pin_batches(self) -> bool:
        """``pin_memory`` as set, or where it is None (the default) whether the attached trainer
        runs on a CUDA device (host-to-GPU copies are faster from pinned memory)."""
        if self.pin_memory is not None:
            return self.pin_memory
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """Training batches are shuffled per epoch by :class:`EpochShuffleSampler` (a resumed
        run continues the interrupted epoch's order); loaders draw no global random numbers.
        Order and augmentation follow the run's seed (``seed_everything``), the split and the
        ``train_fraction`` subset ``data.seed``: runs with other seeds see the same chips."""
        dataset = self.datasets[split]
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))  # set by seed_everything
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        per_rank = -(-len(dataset) // world) if shuffle else len(dataset)
        drop_last = shuffle and per_rank > self.batch_size
        sampler = None
        if shuffle:
            batches = per_rank // self.batch_size if drop_last else -(-per_rank // self.batch_size)
            epoch, done = self.resume_position(batches)
            sampler = EpochShuffleSampler(len(dataset), seed, epoch, done * self.batch_size, world, rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_batches,
            generator=torch.Generator().manual_seed(seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


def ratio_split(count: int, ratios: Sequence[float], seed: int, groups: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Seeded train/val/test indices of ``count`` items by ``ratios`` (summing to 1), within each
    group (class) when ``groups`` are given, so every split gets its share of every class."""
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise UserInputError(f"data.split_ratios {list(ratios)} must sum to 1")
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    members: dict[str, list[int]] = {}
    for index in range(count):
        members.setdefault(groups[index] if groups is not None else "", []).append(index)
    rng = random.Random(seed)
    for indices in members.values():
        rng.shuffle(indices)
        bounds = [round(sum(ratios[: i + 1]) * len(indices)) for i in range(len(SPLITS))]
        for split, lo, hi in zip(SPLITS, [0, *bounds[:-1]], bounds):
            out[split] += indices[lo:hi]
    return {s: sorted(v) for s, v in out.items()}


def class_folder_files(folder: Path, suffixes: Sequence[str]) -> list[tuple[Path, str]]:
    """``(file, class name)`` for the files with ``suffixes`` in the class folders of ``folder``."""
    if not folder.is_dir():
        raise UserInputError(f"data.root: folder {folder} does not exist")
    pairs = [(f, d.name) for d in sorted(folder.iterdir()) if d.is_dir()
             for f in sorted(d.iterdir()) if f.suffix.lower() in suffixes]
    if not pairs:
        raise UserInputError(f"{folder} has no class folders with {'/'.join(suffixes)} files")
    return pairs
