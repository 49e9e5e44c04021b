"""Cost of a training run: time per step, throughput and peak memory, for comparisons."""

from __future__ import annotations

import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from workbench.tasks.base import model_input


def peak_host_mib() -> float:
    """Peak resident memory of this process in MiB (``VmHWM``; ``ru_maxrss`` where no /proc)."""
    status = Path("/proc/self/status")
    if status.is_file():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunStats(Callback):
    """Times every training step and records peak memory. The first ``warmup`` steps are left
    out of the averages when there are more steps than that.

    ``summary()``: ``step_time_s`` (median), ``samples_per_s`` (median batch size / median step
    time: robust to a machine busy with other work now and then), ``peak_memory_mib`` (CUDA
    allocated on a GPU, else host RSS, taken when training ends: the validation and test of the
    best checkpoint afterwards do not count) and ``device``.
    """

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.samples: list[int] = []
        self._start = 0.0
        self.device = "cpu"
        self.peak_mib: float | None = None  # at the end of training

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sync(pl_module)
        self.device = str(pl_module.device)
        self.times.append(time.perf_counter() - self._start)
        self.samples.append(len(model_input(batch)) if isinstance(batch, dict) else len(batch[0]))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.peak_mib = self.peak_now()

    def peak_now(self) -> float:
        """The process's peak memory so far in MiB: CUDA allocated on a GPU, else host RSS."""
        return torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else peak_host_mib()

    def summary(self) -> dict[str, Any]:
        cuda = self.device.startswith("cuda")
        skip = self.warmup if len(self.times) > self.warmup else 0
        times, samples = self.times[skip:], self.samples[skip:]
        return {
            "step_time_s": round(statistics.median(times), 4) if times else None,
            "samples_per_s": round(statistics.median(samples) / statistics.median(times), 2) if times else None,
            "peak_memory_mib": round(self.peak_now() if self.peak_mib is None else self.peak_mib, 1),
            "peak_memory_kind": "cuda_allocated" if cuda else "host_rss",
            "device": self.device,
        }
