"""A callback that kills its own process at a given training step, like `kill -9` (tests only)."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class CrashAtStep(Callback):
    """End the process abruptly (no cleanup, no checkpoint) once ``step`` optimizer steps ran."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os._exit(137)
