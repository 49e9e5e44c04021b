"""Pictures of every fit: ``curves.png`` (train and val loss and the monitored metric per epoch,
numbers in ``curves.json``) and ``samples.png`` (a few test samples of the best checkpoint: input,
target and prediction as each task draws them, see :meth:`~workbench.tasks.BaseTask.sample_panels`).

The values come from ``trainer.callback_metrics`` (any logger) and travel in checkpoints, so a
resumed run's curves continue. matplotlib is imported (Agg backend) only when a picture is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from workbench.atomic import atomic_path, write_json

if TYPE_CHECKING:
    from matplotlib.axes import Axes

RGB_BANDS = ("red", "green", "blue")
STRETCH_PERCENTILES = (2.0, 98.0)


class PanelKind(StrEnum):
    """How a panel is drawn."""

    RGB = "rgb"  # an image (H, W, 3) in [0, 1]
    CLASSES = "classes"  # a class map (H, W), class colours shared by all panels
    FIELD = "field"  # a value map (H, W); the FIELD panels of one sample share a colour range
    LINES = "lines"  # curves
    POINTS = "points"  # points seen from above, coloured by class or value


@dataclass
class Panel:
    """One picture of a test sample in ``samples.png``.

    ``values``: RGB ``(H, W, 3)``; CLASSES ``(H, W)`` class ids (-1: unlabelled); FIELD ``(H, W)``
    (NaN: no value); POINTS ``(N,)`` class ids or values. ``coords``: POINTS ``(N, 2)`` positions.
    ``curves``: LINES, label → ``(x, y)`` arrays. ``class_names``: CLASSES and POINTS with classes.
    """

    title: str
    kind: PanelKind
    values: np.ndarray | None = None
    coords: np.ndarray | None = None
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)


def as_numpy(x: Tensor) -> np.ndarray:
    """A tensor of any dtype and device as a float32 (or int64) NumPy array."""
    x = x.detach().cpu()
    return (x if x.dtype in (torch.int64, torch.bool) else x.float()).numpy()


def last_frame(image: Tensor) -> Tensor:
    """``(C, [T,] H, W)`` → ``(C, H, W)``: the last time step of a multi-temporal image."""
    return image[:, -1] if image.ndim == 4 else image


def rgb_composite(image: Tensor, bands: list[str] | None, reference: Tensor | None = None) -> np.ndarray:
    """``(C, [T,] H, W)`` → ``(H, W, 3)`` in [0, 1]: the bands named red, green and blue when
    ``bands`` has them, else the first three; the last time step; each channel stretched between
    the 2nd and 98th percentiles of ``reference`` (default: ``image``); NaN → black."""
    names = [b.lower() for b in bands or []]
    picked = [names.index(b) for b in RGB_BANDS] if set(RGB_BANDS) <= set(names) else [0, 1, 2]
    rgb = as_numpy(last_frame(image)[picked])
    ref = rgb if reference is None else as_numpy(last_frame(reference)[picked])
    low, high = np.nanpercentile(ref.reshape(3, -1), STRETCH_PERCENTILES, axis=1)[..., None, None]
    stretched = (rgb - low) / np.maximum(high - low, 1e-12)
    return np.nan_to_num(stretched.clip(0, 1)).transpose(1, 2, 0)


def image_panel(image: Tensor, bands: list[str] | None, title: str, reference: Tensor | None = None) -> Panel:
    """A raster ``(C, [T,] H, W)``: RGB with three bands or more, else a map of its first band."""
    if len(image) >= 3:
        return Panel(title, PanelKind.RGB, rgb_composite(image, bands, reference))
    return field_panel(last_frame(image)[0], f"{title} ({bands[0]})" if bands else title)


def field_panel(values: Tensor, title: str) -> Panel:
    """A value map ``(H, W)``."""
    return Panel(title, PanelKind.FIELD, as_numpy(values))


def class_panel(classes: Tensor, class_names: list[str], title: str, ignore_index: int | None = None) -> Panel:
    """A class map ``(H, W)``; ``ignore_index`` pixels left blank."""
    values = as_numpy(classes.long())
    if ignore_index is not None:
        values = np.where(values == ignore_index, -1, values)
    return Panel(title, PanelKind.CLASSES, values, class_names=list(class_names))


def points_panel(xyz: Tensor, values: Tensor, title: str, class_names: list[str] | None = None,
                 ignore_index: int | None = None) -> Panel:
    """Points ``(N, >=2)`` seen from above, coloured by ``values`` ``(N,)``: class ids when
    ``class_names`` are given (``ignore_index`` left out), else values."""
    coords, colour = as_numpy(xyz[:, :2]), as_numpy(values.long() if class_names else values)
    if class_names and ignore_index is not None:
        colour = np.where(colour == ignore_index, -1, colour)
    return Panel(title, PanelKind.POINTS, colour, coords, class_names=list(class_names or []))


def curve(y: Tensor, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A series ``(L,)`` as ``(x, y)`` arrays, its steps numbered from ``start``."""
    return np.arange(start, start + len(y)), as_numpy(y)


def lines_panel(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Panel:
    return Panel(title, PanelKind.LINES, curves=curves)


class RunPlots(Callback):
    """Collects the per-epoch values of ``train/loss``, ``val/loss`` and the monitored metric (the
    first ``ModelCheckpoint`` monitor, else the first of the task's validation metrics that is
    logged) and the panels of the first ``max_samples`` test samples; :meth:`write` draws them.

    A checkpoint's values are taken up when fitting resumes from it, not when the best checkpoint
    is validated and tested after fit (that would drop the epochs after it)."""

    def __init__(self, max_samples: int = 4) -> None:
        self.max_samples = max_samples
        self.history: dict[str, dict[int, float]] = {}  # metric name → epoch → value
        self.monitor: str | None = None
        self.samples: list[list[Panel]] = []
        self.restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "monitor": self.monitor}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.restored is not None:  # resuming: the curves continue
            self.history = {name: dict(values) for name, values in self.restored["history"].items()}
            self.monitor, self.restored = self.restored["monitor"], None
        self.monitor = next((c.monitor for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)),
                            self.monitor)

    def _record(self, trainer: Trainer, names: list[str | None]) -> None:
        for name in filter(None, names):
            value = trainer.callback_metrics.get(name, trainer.callback_metrics.get(f"{name}_epoch"))
            if value is not None:
                self.history.setdefault(name, {})[trainer.current_epoch] = float(value)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        monitored = self.monitor if self.monitor and self.monitor.startswith("train/") else None
        self._record(trainer, ["train/loss", monitored])

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.monitor is None:
            metrics = pl_module.stage_metrics("val") or {}
            self.monitor = next((f"val/{n}" for n in metrics if f"val/{n}" in trainer.callback_metrics), None)
        monitored = None if self.monitor and self.monitor.startswith("train/") else self.monitor
        self._record(trainer, ["val/loss", monitored])

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.samples = []

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """The panels of the batch's first samples, from the task's step on it (a second forward)."""
        wanted = self.max_samples - len(self.samples)
        if wanted <= 0:
            return
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            step = pl_module.compute_step(batch, "test")
        count = min(wanted, len(pl_module.model_input(batch)))
        self.samples += [pl_module.sample_panels(batch, step, i) for i in range(count)]

    def write(self, log_dir: str | Path) -> list[Path]:
        """Write ``curves.png`` and ``curves.json`` (when an epoch was recorded) and ``samples.png``
        (when a test ran) in ``log_dir``; returns the pictures written."""
        written = []
        if self.history:
            write_json(Path(log_dir) / "curves.json", {"monitor": self.monitor, "history": self.history})
            written.append(plot_curves(self.history, self.monitor, Path(log_dir) / "curves.png"))
        if self.samples:
            written.append(plot_samples(self.samples, Path(log_dir) / "samples.png"))
        return written


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    _pyplot().close(figure)
    return path


def plot_curves(history: dict[str, dict[int, float]], monitor: str | None, path: Path) -> Path:
    """Losses (left) and the monitored metric (right) per epoch."""
    plt = _pyplot()
    groups = [("loss", ["train/loss", "val/loss"])]
    if monitor and monitor in history and not monitor.endswith("/loss"):
        groups.append((monitor, [monitor]))
    figure, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (title, names) in zip(axes[0], groups):
        for name in names:
            epochs = sorted(history.get(name, {}))
            if epochs:
                ax.plot(epochs, [history[name][e] for e in epochs], marker="o", label=name)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    return _save(figure, path)


def class_colours(count: int) -> np.ndarray:
    """``(count, 4)`` RGBA colours, class ``k`` always the same."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20" if count <= 20 else "hsv")
    return cmap(np.arange(count) / (max(count, 2) - 1) if count > 20 else np.arange(count))


def draw_panel(ax: Axes, panel: Panel, field_range: tuple[float, float] | None, legend: bool) -> None:
    """Draw ``panel`` on ``ax``; FIELD panels use ``field_range``; ``legend``: class names."""
    ax.set_title(panel.title, fontsize=9)
    if panel.kind is PanelKind.LINES:
        for label, (x, y) in panel.curves.items():
            ax.plot(x, y, label=label, linewidth=1)
        ax.legend(fontsize=7)
        return
    ax.set_xticks([]), ax.set_yticks([])
    colours = class_colours(len(panel.class_names)) if panel.class_names else None
    if panel.kind is PanelKind.RGB:
        ax.imshow(panel.values, interpolation="nearest")
    elif panel.kind is PanelKind.FIELD:
        vmin, vmax = field_range or (None, None)
        image = ax.imshow(panel.values, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    elif panel.kind is PanelKind.CLASSES:
        rgba = np.zeros((*panel.values.shape, 4))
        labelled = panel.values >= 0
        rgba[labelled] = colours[panel.values[labelled]]
        ax.imshow(rgba, interpolation="nearest")
    else:  # POINTS
        labelled = panel.values >= 0 if colours is not None else np.ones(len(panel.values), bool)
        colour = colours[panel.values[labelled]] if colours is not None else panel.values
        ax.scatter(*panel.coords[labelled].T, c=colour, s=4, linewidths=0)
        ax.set_aspect("equal")
    if legend and colours is not None:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colours, panel.class_names)], fontsize=7,
                  loc="lower right")


def plot_samples(samples: list[list[Panel]], path: Path) -> Path:
    """One row per sample, its panels side by side; each set of class names gets one legend."""
    plt = _pyplot()
    columns = max(len(row) for row in samples)
    figure, axes = plt.subplots(len(samples), columns, figsize=(3.3 * columns, 3.0 * len(samples)), squeeze=False)
    legends: set[tuple[str, ...]] = {()}  # class-name sets with a legend drawn (none needed without names)
    for r, row in enumerate(samples):
        fields = [p.values for p in row if p.kind is PanelKind.FIELD and np.isfinite(p.values).any()]
        field_range = (min(np.nanmin(f) for f in fields), max(np.nanmax(f) for f in fields)) if fields else None
        for c in range(columns):
            if c < len(row):
                names = tuple(row[c].class_names)
                draw_panel(axes[r, c], row[c], field_range, legend=names not in legends)
                legends.add(names)
            else:
                axes[r, c].axis("off")
    figure.tight_layout()
    return _save(figure, path)
