"""Whole-scene prediction by sliding windows: read windows, predict in batches, blend overlaps,
and hand finished rows to a :class:`SceneWriter` — memory bounded by one row of windows."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from tqdm import tqdm

from datamodules.normalize import Preprocessor
from datamodules.scenes import SceneSpec
from workbench.errors import UserInputError
from workbench.predict.outputs import SceneWriter
from workbench.predict.windows import WindowPlan, blend_weights
from workbench.tasks.dense import PixelPredictor

GDAL_CACHE_MB = 64


class SceneReader:
    """One scene: a single file (frames as frame-major layers) or one file per frame."""

    def __init__(self, files: list[Path], spec: SceneSpec, num_frames: int, stack: ExitStack) -> None:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserInputError(f"input file(s) not found: {missing}")
        self.sources = [stack.enter_context(rasterio.open(f)) for f in files]
        first = self.sources[0]
        for src in self.sources:
            self._check(src, spec, len(files), num_frames)
            if (src.height, src.width, src.transform) != (first.height, first.width, first.transform):
                raise UserInputError(f"{src.name} does not share the grid of {first.name}: frames must align")
        per_file = len(spec.layers) // len(files)
        self.layers = [spec.layers[i * per_file:(i + 1) * per_file] for i in range(len(files))]
        if len(files) > 1:  # each file holds one frame: read the first frame's layers from each
            self.layers = [spec.layers[:per_file]] * len(files)
        self.profile = first.profile
        self.nodata = first.nodata

    @staticmethod
    def _check(src: rasterio.DatasetReader, spec: SceneSpec, files: int, num_frames: int) -> None:
        expected = spec.bands_per_file * (num_frames if files == 1 else 1) if spec.bands_per_file else None
        if files > 1 and files != num_frames:
            raise UserInputError(f"{files} files given for one scene but the model takes {num_frames} frames")
        if expected is not None and src.count != expected:
            raise UserInputError(
                f"{src.name} has {src.count} bands but the model was trained on files with {expected} "
                "bands: give scenes with the training data's band layout"
            )
        needed = max(spec.layers) + 1 if files == 1 else max(spec.layers[: len(spec.layers) // num_frames]) + 1
        if src.count < needed:
            raise UserInputError(f"{src.name} has {src.count} bands; the model reads band index {needed - 1}")
        if spec.dtype is not None and src.dtypes[0] != spec.dtype:
            raise UserInputError(
                f"{src.name} has dtype {src.dtypes[0]} but the training data was {spec.dtype}: "
                "convert the scene (same units and scaling as training) before predicting"
            )

    def read(self, window: Window) -> np.ndarray:
        """``(L, size, size)`` raw layers; outside the scene filled with nodata (or 0)."""
        fill = self.nodata if self.nodata is not None else 0
        parts = [
            src.read([i + 1 for i in layers], window=window, boundless=True, fill_value=fill)
            for src, layers in zip(self.sources, self.layers)
        ]
        return np.concatenate(parts, axis=0)


class TiledPredictor:
    """Predict scenes of any size window by window.

    Args:
        task: a trained per-pixel task: its ``predict_step`` maps ``{"image": (B, C, [T,] h, w)}``
            to outputs ``(B, K, h, w)`` of kind ``output_kind`` (class probabilities or values),
            named by ``output_names``.
        preprocess: the training normalisation.
        spec: the layers to read and the checks a scene must pass.
        window: window side in pixels (a multiple of the backbone's patch size).
        overlap: pixels shared by neighbouring windows, blended with tapered weights.
        batch_size: windows per forward pass.
        nodata: overrides the scenes' own nodata value.
    """

    def __init__(
        self,
        task: PixelPredictor,
        preprocess: Preprocessor,
        spec: SceneSpec,
        window: int = 224,
        overlap: int = 32,
        batch_size: int = 8,
        nodata: float | None = None,
    ) -> None:
        self.task = task.eval()
        self.preprocess = preprocess
        self.spec = spec
        self.window = window
        self.overlap = overlap
        self.batch_size = batch_size
        self.nodata = nodata
        self.weights = blend_weights(window, overlap)
        self.device = next(task.parameters()).device

    @torch.inference_mode()
    def _predict(self, arrays: list[np.ndarray], nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Raw windows → outputs ``(N, K, s, s)`` and valid masks ``(N, s, s)``."""
        images, valids = zip(*(self.preprocess(a, nodata) for a in arrays))
        batch = {"image": torch.stack(images).to(self.device)}
        out = self.task.predict_step(batch, 0).float().cpu().numpy()
        return out, torch.stack(valids).numpy()

    def predict_scene(
        self, files: list[Path], out_dir: Path, stem: str, probabilities: bool = False, quicklook: bool = True,
    ) -> dict[str, Path]:
        """Predict one scene into ``out_dir``; returns the written paths by kind."""
        with ExitStack() as stack:
            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))  # bounded block cache
            reader = SceneReader(files, self.spec, self.preprocess.num_frames, stack)
            nodata = self.nodata if self.nodata is not None else reader.nodata
            height, width = reader.profile["height"], reader.profile["width"]
            plan = WindowPlan(height, width, self.window, self.overlap)
            names = self.task.output_names
            writer = stack.enter_context(
                SceneWriter(out_dir, stem, reader.profile, names, probabilities, quicklook, kind=self.task.output_kind)
            )
            progress = stack.enter_context(tqdm(total=len(plan), desc=stem, unit="window"))
            band = min(self.window, height)
            acc = np.zeros((len(names), band, width), np.float32)
            wsum = np.zeros((band, width), np.float32)
            valid = np.zeros((band, width), bool)
            rgb = np.zeros((3, band, width), np.float32) if self.spec.rgb else None
            start, done_px = time.perf_counter(), 0
            for r, top in enumerate(plan.rows):
                h = min(self.window, height - top)
                for i in range(0, len(plan.cols), self.batch_size):
                    cols = plan.cols[i:i + self.batch_size]
                    raw = [reader.read(Window(c, top, self.window, self.window)) for c in cols]
                    out, ok = self._predict(raw, nodata)
                    for j, c in enumerate(cols):
                        w = min(self.window, width - c)
                        weight = self.weights[:h, :w]
                        acc[:, :h, c:c + w] += out[j, :, :h, :w] * weight
                        wsum[:h, c:c + w] += weight
                        valid[:h, c:c + w] = ok[j, :h, :w]
                        if rgb is not None:
                            rgb[:, :h, c:c + w] = raw[j][self.spec.rgb, :h, :w]
                    progress.update(len(cols))
                final = plan.final_rows(r) - top
                writer.write(
                    acc[:, :final] / wsum[:final], valid[:final], None if rgb is None else rgb[:, :final]
                )
                done_px += final * width
                progress.set_postfix_str(f"{done_px / (time.perf_counter() - start):,.0f} px/s")
                for buffer in (acc, wsum, valid, rgb):  # carry the unfinished rows up, clear the rest
                    if buffer is not None:
                        buffer[..., : band - final, :] = buffer[..., final:, :].copy()
                        buffer[..., band - final:, :] = 0
        return writer.paths
