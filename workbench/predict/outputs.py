"""Per-scene outputs written as rows finish: a uint8 class map (optional float32 probabilities)
or float32 values for regression, and a PNG quicklook. Files appear under their final names only
when complete."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import TracebackType

import numpy as np
import rasterio
import rasterio.shutil
from PIL import Image
from rasterio.windows import Window

from workbench.atomic import atomic_path, take_lock, write_json
from workbench.tasks.dense import PixelOutput

CLASS_NODATA = 255
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
QUICKLOOK_SIZE = 512


def class_colors(class_names: list[str]) -> dict[int, tuple[int, int, int]]:
    """A colour per class; ``water`` is blue and ``land`` is green when so named."""
    named = {"water": (31, 119, 180), "land": (44, 160, 44), "background": (0, 0, 0)}
    return {i: named.get(n.lower(), PALETTE[i % len(PALETTE)]) for i, n in enumerate(class_names)}


def stretch(bands: np.ndarray) -> np.ndarray:
    """``(K, H, W)`` → values in [0, 1] by each band's 2–98 percentile range; NaN → 0."""
    bands = bands.astype(np.float64)
    low, high = np.nanpercentile(bands, 2, axis=(1, 2)), np.nanpercentile(bands, 98, axis=(1, 2))
    scaled = (bands - low[:, None, None]) / np.maximum(high - low, 1e-9)[:, None, None]
    return np.nan_to_num(np.clip(scaled, 0, 1))


def _hidden(path: Path, stage: str) -> Path:
    """A hidden working name beside ``path``: ``.<stem>.<stage><suffix>``."""
    return path.with_name(f".{path.stem}.{stage}{path.suffix}")


class _BlockRows:
    """A tiled GeoTIFF fed with row strips, written in whole block rows; ``start_row`` > 0 continues
    a file whose first ``start_row`` rows are written."""

    def __init__(self, path: Path, profile: dict, count: int, dtype: str, nodata: float, block: int,
                 start_row: int = 0) -> None:
        self.path, self.block = path, block
        self.dataset = rasterio.open(path, "r+") if start_row else rasterio.open(
            path, "w", driver="GTiff", height=profile["height"], width=profile["width"], count=count,
            dtype=dtype, crs=profile["crs"], transform=profile["transform"], nodata=nodata,
            tiled=True, blockxsize=block, blockysize=block, compress="deflate",
        )
        self.pending: list[np.ndarray] = []
        self.next_row = start_row

    def write(self, rows: np.ndarray, final: bool = False) -> bool:
        """Append ``(count, r, W)`` rows; write whole block rows (and the rest when ``final``) to
        the file. True when rows were written."""
        self.pending.append(rows)
        buffered = sum(p.shape[1] for p in self.pending)
        if buffered < self.block and not final:
            return False
        data = np.concatenate(self.pending, axis=1)
        keep = data.shape[1] if final else data.shape[1] // self.block * self.block
        self.dataset.write(data[:, :keep], window=Window(0, self.next_row, data.shape[2], keep))
        self.next_row += keep
        self.pending = [data[:, keep:]] if keep < data.shape[1] else []
        return keep > 0

    def persist(self) -> None:
        """Put the written rows on disk (GDAL writes its block cache and the TIFF directory on close)."""
        self.dataset.close()
        self.dataset = rasterio.open(self.path, "r+")


class SceneWriter:
    """Streams one scene's predictions into ``out_dir``: ``<stem>_classes.tif`` (+
    ``_probabilities.tif``) for class probabilities, ``<stem>_values.tif`` (float32, one band per
    name) for values, and ``_quicklook.png``; ``paths`` keys are ``classes`` or ``values``,
    ``probabilities``, ``quicklook``; Cloud-Optimized GeoTIFF layout, same
    CRS/transform/size as the input.

    Use as a context manager. Files appear under their final names only when complete; until then
    they are hidden partial files, and ``.<stem>.lock`` refuses a second writer of the same scene.
    With a ``resume_key`` every finished block row is put on disk with a progress note, so a run
    killed (or interrupted with Ctrl-C) and started again with the same key continues after the
    rows already written (:attr:`row`); on any other error the partial files are removed.
    """

    def __init__(
        self,
        out_dir: Path,
        stem: str,
        profile: dict,
        names: list[str],
        probabilities: bool = False,
        quicklook: bool = True,
        block: int = 256,
        kind: PixelOutput = PixelOutput.CLASSES,
        resume_key: str | None = None,
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.names = names
        self.kind = kind
        self.paths = {kind.value: out_dir / f"{stem}_{kind.value}.tif"}
        if probabilities and kind is PixelOutput.CLASSES:
            self.paths["probabilities"] = out_dir / f"{stem}_probabilities.tif"
        if quicklook:
            self.paths["quicklook"] = out_dir / f"{stem}_quicklook.png"
        self.height, self.width = profile["height"], profile["width"]
        self.step = max(1, math.ceil(max(self.height, self.width) / QUICKLOOK_SIZE))
        self.partial = {key: _hidden(path, "partial") for key, path in self.paths.items()}
        self.cog = {key: _hidden(path, "cog") for key, path in self.paths.items()}
        self.lock, self.progress = out_dir / f".{stem}.lock", out_dir / f".{stem}.progress.json"
        self.small_path = out_dir / f".{stem}.quicklook.npz"
        self.resume_key = resume_key
        take_lock(self.lock, f"workbench predict (pid {{pid}}) is writing {stem} in {out_dir}",
                  "or choose another --output_dir")
        try:
            self.row = self._rows_done()
            layout = {PixelOutput.CLASSES: (1, "uint8", CLASS_NODATA),
                      PixelOutput.VALUES: (len(names), "float32", float("nan"))}[kind]
            self.streams = {kind.value: _BlockRows(self.partial[kind.value], profile, *layout, block, self.row)}
            if "probabilities" in self.paths:
                self.streams["probabilities"] = _BlockRows(
                    self.partial["probabilities"], profile, len(names), "float32", float("nan"), block, self.row
                )
            self.small_out: list[np.ndarray] = []
            self.small_rgb: list[np.ndarray] = []
            if self.row:
                with np.load(self.small_path) as small:
                    self.small_out.append(small["out"])
                    self.small_rgb += [small["rgb"]] if "rgb" in small else []
        except BaseException:
            self.lock.unlink(missing_ok=True)
            raise

    def _rows_done(self) -> int:
        """Rows a killed run with the same ``resume_key`` left on disk (0: start afresh)."""
        if self.resume_key is None or not self.progress.is_file():
            return 0
        note = json.loads(self.progress.read_text())
        files = [self.partial[k] for k in self.paths if k != "quicklook"] + [self.small_path]
        if note.get("key") != self.resume_key or not all(f.is_file() for f in files):
            return 0
        return int(note["rows"])

    def __enter__(self) -> SceneWriter:
        return self

    def write(self, out: np.ndarray, valid: np.ndarray, rgb: np.ndarray | None) -> None:
        """Next finished rows: ``out`` ``(K, r, W)`` (class probabilities or values), ``valid``
        ``(r, W)``, raw ``rgb`` ``(3, r, W)``."""
        final = self.row + out.shape[1] >= self.height
        if self.kind is PixelOutput.CLASSES:
            primary = np.where(valid, out.argmax(0), CLASS_NODATA).astype(np.uint8)[None]
        else:
            primary = np.where(valid, out, np.nan).astype(np.float32)
        wrote = self.streams[self.kind.value].write(primary, final)
        if "probabilities" in self.streams:
            self.streams["probabilities"].write(np.where(valid, out, np.nan).astype(np.float32), final)
        picked = np.arange(-self.row % self.step, out.shape[1], self.step)
        self.small_out.append(primary[0, picked, :: self.step])
        if rgb is not None:
            self.small_rgb.append(np.where(valid, rgb, np.nan)[:, picked, :: self.step])
        self.row += out.shape[1]
        if wrote and not final and self.resume_key is not None:
            self._save_progress()

    def _save_progress(self) -> None:
        """Put the block rows written so far on disk, then note how many (and their quicklook rows)."""
        for stream in self.streams.values():
            stream.persist()
        rows = self.streams[self.kind.value].next_row
        small = {"out": np.concatenate(self.small_out, axis=0)[: len(range(0, rows, self.step))]}
        if self.small_rgb:
            small["rgb"] = np.concatenate(self.small_rgb, axis=1)[:, : len(small["out"])]
        with atomic_path(self.small_path) as tmp:
            np.savez(tmp, **small)
        write_json(self.progress, {"key": self.resume_key, "rows": rows})

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for stream in self.streams.values():
            stream.dataset.close()
        try:
            if exc_type is None:
                self._finish()
        finally:
            interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
            if not (interrupted and self.progress.is_file()):  # Ctrl-C keeps what can be resumed
                for staging in (*self.partial.values(), *self.cog.values(), self.progress, self.small_path):
                    staging.unlink(missing_ok=True)
            self.lock.unlink(missing_ok=True)

    def _finish(self) -> None:
        with rasterio.open(self.partial[self.kind.value], "r+") as dst:
            if self.kind is PixelOutput.CLASSES:
                dst.write_colormap(1, {i: (*c, 255) for i, c in class_colors(self.names).items()})
                dst.update_tags(class_names=json.dumps(self.names))
                dst.set_band_description(1, "class")
            else:
                for i, name in enumerate(self.names, start=1):
                    dst.set_band_description(i, name)
        if "probabilities" in self.paths:
            with rasterio.open(self.partial["probabilities"], "r+") as dst:
                for i, name in enumerate(self.names, start=1):
                    dst.set_band_description(i, f"probability_{name}")
        for key, resampling in ((PixelOutput.CLASSES, "NEAREST"), (PixelOutput.VALUES, "AVERAGE"),
                                ("probabilities", "AVERAGE")):
            if key in self.paths:
                self._to_cog(self.partial[key], self.cog[key], self.paths[key], resampling)
        if "quicklook" in self.paths:
            self._write_quicklook()

    @staticmethod
    def _to_cog(src: Path, staging: Path, dst: Path, resampling: str) -> None:
        rasterio.shutil.copy(
            src, staging, driver="COG", compress="DEFLATE", blocksize=256, overview_resampling=resampling
        )
        staging.replace(dst)

    def _write_quicklook(self) -> None:
        small = np.concatenate(self.small_out, axis=0)
        if self.kind is PixelOutput.CLASSES:
            colors = np.zeros((256, 3), dtype=np.uint8)
            for i, c in class_colors(self.names).items():
                colors[i] = c
            panels = [colors[small]]
        else:  # first value band, 2–98 % stretch, grey; nodata white
            grey = (stretch(small[None])[0] * 255).astype(np.uint8)
            panels = [np.where(np.isnan(small)[..., None], 255, grey[..., None].repeat(3, -1)).astype(np.uint8)]
        if self.small_rgb:
            rgb = np.concatenate(self.small_rgb, axis=1).astype(np.float64)
            panels.insert(0, (stretch(rgb) * 255).astype(np.uint8).transpose(1, 2, 0))
        gap = np.full((small.shape[0], 8, 3), 255, dtype=np.uint8)
        image = np.concatenate([panels[0], gap, panels[1]], axis=1) if len(panels) == 2 else panels[0]
        staging = self.partial["quicklook"]
        Image.fromarray(image).save(staging, format="PNG")
        staging.replace(self.paths["quicklook"])
