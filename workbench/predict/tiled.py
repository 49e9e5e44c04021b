"""Whole-scene prediction by sliding windows: read windows, predict in batches, blend overlaps,
and hand finished rows to a :class:`SceneWriter` — memory bounded by one row of windows."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioError
from rasterio.windows import Window
from tqdm import tqdm

from datamodules.normalize import Preprocessor
from datamodules.scenes import SceneSpec
from workbench.errors import UnreadableFile, UserInputError, first_line
from workbench.model import BackboneModel
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
        self.sources = [stack.enter_context(open_scene(f)) for f in files]
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
        if src.crs is None or src.transform.is_identity:
            raise UserInputError(
                f"{src.name} has no {'CRS' if src.crs is None else 'geotransform'}, so the outputs could not be "
                "georeferenced: assign it before predicting (e.g. gdal_edit.py -a_srs EPSG:<code> -a_ullr ...)"
            )
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
        parts = []
        for src, layers in zip(self.sources, self.layers):
            try:
                parts.append(src.read([i + 1 for i in layers], window=window, boundless=True, fill_value=fill))
            except RasterioError as err:
                raise UnreadableFile(
                    f"{src.name}: reading rows {window.row_off}-{window.row_off + window.height} failed "
                    f"({first_line(err)}): the file is truncated or corrupt; re-download or re-export it"
                ) from None
        return np.concatenate(parts, axis=0)


def open_scene(path: Path) -> rasterio.DatasetReader:
    """``rasterio.open(path)`` with an unreadable file (not a raster, zero bytes, cut header) named."""
    try:
        return rasterio.open(path)
    except RasterioError as err:
        raise UnreadableFile(
            f"{path} is not a readable raster ({first_line(err)}): give a complete GeoTIFF (re-download or re-export it)"
        ) from None


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
        bf16: run the model under bfloat16 autocast (outputs still float32).
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
        bf16: bool = False,
    ) -> None:
        self.task = task.eval()
        self.bf16 = bf16
        if isinstance(getattr(task, "model", None), BackboneModel):
            task.model.set_channels_last(bf16)
        self.preprocess = preprocess
        self.spec = spec
        self.window = window
        self.overlap = overlap
        self.batch_size = batch_size
        self.nodata = nodata
        self.weights = blend_weights(window, overlap)
        self.device = task.device if hasattr(task, "device") else next(task.parameters()).device

    @torch.inference_mode()
    def _predict(self, arrays: list[np.ndarray], nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Raw windows → outputs ``(N, K, s, s)`` and valid masks ``(N, s, s)``; windows without a
        valid pixel (nodata or NaN everywhere) are not run through the model (zeros: written as nodata)."""
        images, valids = zip(*(self.preprocess(a, nodata) for a in arrays))
        valid = torch.stack(valids).numpy()
        run = valid.any((1, 2))
        out = np.zeros((len(arrays), len(self.task.output_names), *valid.shape[1:]), np.float32)
        if run.any():
            batch = {"image": torch.stack([image for image, keep in zip(images, run) if keep]).to(self.device)}
            with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
                out[run] = self.task.predict_step(batch, 0).float().cpu().numpy()
        return out, valid

    def predict_scene(
        self, files: list[Path], out_dir: Path, stem: str, probabilities: bool = False, quicklook: bool = True,
        resume_key: str | None = None,
    ) -> dict[str, Path]:
        """Predict one scene into ``out_dir``; returns the written paths by kind. With a
        ``resume_key`` (naming the model, scene and settings) a run killed part-way and started
        again continues after the block rows it finished, with the same result."""
        with ExitStack() as stack:
            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))  # bounded block cache
            reader = SceneReader(files, self.spec, self.preprocess.num_frames, stack)
            nodata = self.nodata if self.nodata is not None else reader.nodata
            height, width = reader.profile["height"], reader.profile["width"]
            plan = WindowPlan(height, width, self.window, self.overlap)
            names = self.task.output_names
            writer = stack.enter_context(SceneWriter(
                out_dir, stem, reader.profile, names, probabilities, quicklook, kind=self.task.output_kind,
                resume_key=resume_key,
            ))
            done = writer.row  # rows a killed run left on disk
            if done:
                print(f"workbench: resuming {stem} after row {done} of {height}")
            progress = stack.enter_context(tqdm(total=len(plan), desc=stem, unit="window"))
            band = min(self.window, height)
            acc = np.zeros((len(names), band, width), np.float32)
            wsum = np.zeros((band, width), np.float32)
            valid = np.zeros((band, width), bool)
            rgb = np.zeros((3, band, width), np.float32) if self.spec.rgb else None
            start, done_px = time.perf_counter(), 0
            for r, top in enumerate(plan.rows):
                if top + self.window <= done:  # its windows touch finished rows only
                    progress.update(len(plan.cols))
                    continue
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
                skip = min(final, max(0, done - top))  # rows on disk already (incomplete sums here)
                if final > skip:
                    writer.write(acc[:, skip:final] / wsum[skip:final], valid[skip:final],
                                 None if rgb is None else rgb[:, skip:final])
                done_px += (final - skip) * width
                progress.set_postfix_str(f"{done_px / (time.perf_counter() - start):,.0f} px/s")
                for buffer in (acc, wsum, valid, rgb):  # carry the unfinished rows up, clear the rest
                    if buffer is not None:
                        buffer[..., : band - final, :] = buffer[..., final:, :].copy()
                        buffer[..., band - final:, :] = 0
        return writer.paths
