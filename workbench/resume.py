"""Exact resumption: random-number-generator states travel with every checkpoint.

Lightning restores weights, optimizer, schedulers and loop progress; the datamodules replay the
interrupted epoch's order (:class:`datamodules.splits.EpochShuffleSampler`). This callback adds
the global random generators (torch, NumPy, Python), restored just before the first training
batch after a resume, so dropout and other draws continue as in an uninterrupted run. A resumed
run continues the run folder its checkpoint came from (so best-checkpoint tracking carries on)
and keeps the metrics logged before the checkpoint.
"""

from __future__ import annotations

import csv
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger

from workbench.atomic import atomic_path


def rng_state() -> dict[str, Any]:
    """The global generators' states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeRNG(Callback):
    """Save the global RNG states in checkpoints; restore them when training resumes."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.pending is not None:
            set_rng_state(self.pending)
            self.pending = None


def run_version(ckpt_path: str | Path, save_dir: str | Path, name: str) -> int | str | None:
    """The logger version of the run ``ckpt_path`` belongs to, when it lies in
    ``<save_dir>/<name>/<version>/checkpoints/`` (so a resumed run continues that folder)."""
    ckpt = Path(ckpt_path).resolve()
    run = Path(save_dir).resolve() / name
    if ckpt.parent.name != "checkpoints" or ckpt.parent.parent.parent != run:
        return None
    version = ckpt.parent.parent.name
    return int(version[len("version_"):]) if re.fullmatch(r"version_\d+", version) else version


def continue_metrics(logger: CSVLogger, step: int) -> None:
    """Keep a resumed run's ``metrics.csv``: Lightning's CSV logger empties an existing run folder's
    file, so the rows logged before the checkpoint's ``step`` are written back (those after it
    are logged again by the resumed run) and the whole old file is kept beside it."""
    old = Path(logger.log_dir) / "metrics.csv"
    if not old.is_file():
        return
    with old.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), [r for r in reader if r.get("step") and float(r["step"]) < step]
    backup = old.with_name(f"metrics.before-resume-step{step}.csv")
    os.replace(old, backup)
    with warnings.catch_warnings():  # Lightning's "logs will be deleted": they are kept, as above
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        writer = logger.experiment  # creating it would have deleted metrics.csv
    writer.metrics_keys = sorted(header)
    with atomic_path(old) as tmp, tmp.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=writer.metrics_keys)
        out.writeheader()
        out.writerows(rows)
