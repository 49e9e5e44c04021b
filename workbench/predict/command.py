"""``workbench predict``: map whole scenes with a trained checkpoint and its fit config."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from rasterio.errors import RasterioError

from datamodules.scenes import SceneSource
from workbench.checkpoints import load_lightning_weights, read_lightning_checkpoint
from workbench.config import config_parser
from workbench.errors import UnreadableFile, UserInputError, first_line
from workbench.predict.fields import predict_fields
from workbench.predict.onnx import OnnxPixelModel
from workbench.predict.tiled import TiledPredictor
from workbench.tasks.dense import PixelPredictor
from workbench.tasks.weather import FieldUnits

RASTER_SUFFIXES = (".tif", ".tiff")
log = logging.getLogger(__name__)


def expand_inputs(inputs: list[str]) -> list[list[Path]]:
    """Files, globs and folders → scenes; ``a.tif,b.tif`` is one scene with one file per frame."""
    scenes: list[list[Path]] = []
    for item in inputs:
        if "," in item:
            scenes.append([Path(p.strip()) for p in item.split(",") if p.strip()])
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).iterdir() if p.suffix.lower() in RASTER_SUFFIXES)
            if not found:
                raise UserInputError(f"--inputs: folder {item} has no .tif/.tiff files")
            scenes.extend([p] for p in found)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item))
            if not found:
                raise UserInputError(f"--inputs: pattern {item!r} matches no file")
            scenes.extend([p] for p in found)
        elif not Path(item).is_file():
            raise UserInputError(f"--inputs: {item} does not exist")
        else:
            scenes.append([Path(item)])
    return scenes


def scene_stems(scenes: list[list[Path]]) -> list[str]:
    """A distinct output name per scene: the file stem, made unique with the folder or a counter."""
    stems: list[str] = []
    for files in scenes:
        stem = files[0].stem
        if stem in stems:
            stem = f"{files[0].parent.name}_{stem}"
        base, n = stem, 1
        while stem in stems:
            stem, n = f"{base}_{n}", n + 1
        stems.append(stem)
    return stems


def scene_source(data: Any) -> SceneSource:
    """The config's datamodule as a :class:`SceneSource`; other datamodules are an error."""
    if not isinstance(data, SceneSource):
        raise UserInputError(
            f"workbench predict reads scenes the way the config's datamodule reads its raster chips, but "
            f"data.class_path {type(data).__name__} does not read raster scenes: use a GeoTIFF datamodule "
            "(datamodules.GeoSegmentationDataModule, GeoRegressionDataModule or one of their subclasses)"
        )
    return data


def resume_key(files: list[Path], settings: dict[str, Any]) -> str:
    """What a resumed scene must share with the killed run: the input and checkpoint files (path,
    size, modification time) and the settings that shape the outputs."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    text = json.dumps({"files": stats, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def process_rank() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` of this process under ``torchrun`` (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM ``srun`` (``SLURM_PROCID``, ...); ``(0, 1, 0)`` alone."""
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world]), int(os.environ.get(local, "0"))
    return 0, 1, 0


def predict_device(requested: str, local_rank: int) -> str:
    """The device ``--device`` means in a process of local rank ``local_rank``: ``auto`` and a bare
    ``cuda`` are this process's GPU (``cuda:<local rank>``, so processes launched by torchrun or
    srun do not share one), ``auto`` is the CPU without a GPU; anything else as given. A name
    torch does not know, or a GPU this machine does not have, is a one-line error."""
    if requested == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if requested == "cuda" else requested)
    except RuntimeError:
        raise UserInputError(f"--device {requested}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        found = torch.cuda.device_count()
        if (device.index or 0) >= found:
            raise UserInputError(f"--device {requested}: torch sees {found} CUDA GPU(s) on this machine "
                                 f"({'no driver or no GPU' if not found else f'cuda:0 to cuda:{found - 1}'}); "
                                 "use --device auto or cpu")
    return str(device)


def predict_in_bf16(precision: str, device: str, onnx: bool, trained: str | None = None) -> bool:
    """Whether ``--precision`` (``32``, ``bf16``, ``auto``, ``trained``) means bfloat16 autocast on
    ``device``. ``trained``: bfloat16 when the checkpoint trained in it (``trained``, its Lightning
    precision, e.g. ``bf16-mixed``; None: not recorded) and ``device`` computes it natively, so the
    maps are computed as the fit's val/test scores were. An ONNX model runs in the precision it was
    exported in."""
    if precision == "32" or (onnx and precision in ("auto", "trained")):
        return False
    if onnx:
        raise UserInputError("--precision bf16 applies to checkpoints; an .onnx model runs in the precision it was "
                             "exported in (drop --precision)")
    if precision == "bf16":
        return True
    from workbench.precision import auto_precision

    choice, reason = auto_precision(torch.device(device).type)
    native = choice == "bf16-mixed"
    if precision == "trained":
        in_bf16 = (trained or "").startswith("bf16")
        reason = (f"the checkpoint trained in {trained}" if trained else "the checkpoint records no precision") + (
            f"; {reason}" if in_bf16 else "")
        native = native and in_bf16
    print(f"workbench: predicting in {'bfloat16' if native else 'float32'} ({reason})")
    return native


def run_predict(args: list[str]) -> dict[str, dict[str, Path]]:
    """``workbench predict --config fit.yaml [--ckpt_path X.ckpt] --inputs ... --output_dir DIR``."""
    parser = config_parser(
        "workbench predict",
        "Predict whole GeoTIFF scenes (any size) with the model and preprocessing of a fit config.",
        ("data", "model", "ckpt_path"),
    )
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="checkpoint written by `workbench fit`, or its .onnx from `workbench export` (run with "
                             "onnxruntime); omitted: the model as the config builds it, which needs "
                             "model.pretrained weights that include the task layers (zero-shot)")
    parser.add_argument("--inputs", type=str | None, nargs="+", default=None,
                        help="GeoTIFF files, globs or folders; `a.tif,b.tif` = one scene, one file per frame "
                             "(gridded weather tasks predict their datamodule's test split instead)")
    parser.add_argument("--rollout_steps", type=int, default=1,
                        help="weather forecasts: autoregressive steps (each lead_time long) written per sample")
    parser.add_argument("--output_dir", type=str, default="predictions", help="folder for the outputs")
    parser.add_argument("--window", type=int | None, default=None, help="window size (default: chip size or 224)")
    parser.add_argument("--overlap", type=int | None, default=None, help="overlap in pixels (default: window/4)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--probabilities", type=bool, default=False, help="also write class probabilities")
    parser.add_argument("--quicklook", type=bool, default=True, help="write a PNG quicklook per scene")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (the GPU, else the CPU), cpu, cuda, cuda:1, ...; under torchrun / srun, auto "
                             "and cuda mean each process's own GPU")
    parser.add_argument("--precision", type=Literal["trained", "32", "bf16", "auto"], default="trained",
                        help="trained: bfloat16 autocast if the checkpoint trained in bf16 (fit's auto_precision) and "
                             "the device computes it natively, else float32; 32: float32; bf16: bfloat16 autocast "
                             "(about 2x faster on CPUs with AVX512-BF16; a model trained in float32 may change some "
                             "pixels: 0.9 percent with the csmask U-Net); auto: bf16 where the device computes it "
                             "natively")
    parser.add_argument("--bad_files", type=Literal["fail", "skip"], default="fail",
                        help="a scene that cannot be read (truncated, corrupt, not a raster): stop with its name "
                             "(fail) or warn and map the others (skip)")
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    data, task = init.data, init.model
    gridded = isinstance(task, FieldUnits)
    if gridded and cfg.inputs:
        raise UserInputError("--inputs: gridded weather tasks predict the test split of the config's datamodule; "
                             "point data.path at the files to predict instead")
    if not gridded and not cfg.inputs:
        raise UserInputError("--inputs: give the GeoTIFF scenes to map (files, globs or folders)")
    if not (gridded or isinstance(task, PixelPredictor)):
        raise UserInputError(
            f"workbench predict maps per-pixel tasks (SegmentationTask, RegressionTask); the config's model is "
            f"{type(task).__name__}: evaluate it with `workbench test --config ... --ckpt_path ...` instead."
        )
    data.prepare_data()
    trained = None  # the precision the checkpoint trained in, where it says
    if cfg.ckpt_path is not None and Path(cfg.ckpt_path).suffix == ".onnx":
        task = OnnxPixelModel(cfg.ckpt_path)
    elif cfg.ckpt_path is not None:
        ckpt = read_lightning_checkpoint(cfg.ckpt_path, "--ckpt_path")
        trained = ckpt.get("workbench", {}).get("precision")
        load_lightning_weights(task, ckpt, cfg.ckpt_path, "--ckpt_path")
        del ckpt  # a copy of the weights: not kept while mapping
    elif not getattr(task.model, "task_layers_pretrained", False):
        raise UserInputError("--ckpt_path: give a checkpoint written by `workbench fit` (without one the config's "
                             "decoder and head have random weights; only a model pretrained with them, such as "
                             "csmask_unet_effb4_s2 with decoder: unet, can predict zero-shot)")
    else:
        print("workbench: no --ckpt_path: predicting with the model's pretrained weights as shipped (zero-shot)")
    rank, world, local_rank = process_rank()
    device = predict_device(cfg.device, local_rank)
    if gridded:
        written = predict_fields(task, data, Path(cfg.output_dir), cfg.rollout_steps, device)
        print(f"workbench: {', '.join(str(p) for p in written.values())}")
        return {"fields": written}
    scenes = expand_inputs(cfg.inputs)
    source = scene_source(data)
    window = cfg.window or source.chip_size or 224
    overlap = cfg.overlap if cfg.overlap is not None else window // 4
    if isinstance(task, OnnxPixelModel):
        task.check_scenes(source, window)
    bf16 = predict_in_bf16(cfg.precision, device, isinstance(task, OnnxPixelModel), trained)
    predictor = TiledPredictor(
        task.to(device), source.preprocessor(), source.scene_spec(), window, overlap, cfg.batch_size, source.nodata,
        bf16,
    )
    out_dir = Path(cfg.output_dir)
    written = {}
    mine = list(zip(scenes, scene_stems(scenes)))[rank::world]  # several processes: scenes split round-robin
    if world > 1:
        print(f"workbench: rank {rank} of {world} maps {len(mine)} of {len(scenes)} scenes on {device}")
    settings = {k: cfg.get(k) for k in ("data", "model", "ckpt_path", "probabilities", "quicklook", "precision")}
    for files, stem in mine:
        try:
            key = resume_key([*files, *([Path(cfg.ckpt_path)] if cfg.ckpt_path else [])],
                             {**settings, "window": window, "overlap": overlap})
            written[stem] = predictor.predict_scene(files, out_dir, stem, cfg.probabilities, cfg.quicklook, key)
        except UnreadableFile as err:
            if cfg.bad_files == "fail":
                raise UnreadableFile(f"{err}; or pass --bad_files skip to map the other scenes") from None
            log.warning("skipping scene %s: %s", stem, err)
            continue
        except (OSError, RasterioError) as err:  # reading errors are named by the reader; these are writes
            raise UserInputError(
                f"writing the outputs of {stem} to {out_dir} failed ({first_line(err)}): free disk space or choose a "
                f"writable --output_dir; scenes finished before it ({len(written)}) and earlier outputs are intact"
            ) from None
        print(f"workbench: {stem} → {', '.join(str(p) for p in written[stem].values())}")
    return written
