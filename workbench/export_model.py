"""``workbench export``: a fine-tuned checkpoint, adapters merged, as an ONNX file or a
``torch.export`` program (``.pt2``) that runs without Workbench, with what a runtime needs to
feed it (bands, statistics, outputs, window size) in its metadata.

Exporter: ``torch.onnx.export(..., dynamo=True)``. It exports both the Prithvi ViT + UPerNet and
the csmask U-Net with dynamic batch and H/W; the legacy TorchScript exporter refuses UPerNet's
``adaptive_avg_pool2d`` on dynamic sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from workbench.atomic import atomic_path, write_json
from workbench.errors import UserInputError, first_line
from workbench.tasks.base import BaseTask

log = logging.getLogger(__name__)
FORMATS = {".onnx": "onnx", ".pt2": "torch_export"}  # output suffix → format
Save = Callable[[nn.Module, Tensor, Path, bool], None]  # (model, example input, file, dynamic H/W)
Load = Callable[[Path], Callable[[Tensor], Tensor]]  # file → a function running it

DESCRIPTION = """\
Export a fine-tuned checkpoint (adapters merged) for runtimes without PyTorch or Workbench.

  onnx          an ONNX file: input `image` (B, C, H, W) normalised as in training ((raw - mean) / std,
                invalid pixels 0; (B, C, T, H, W) for multi-frame models), output (B, K, H, W): class
                probabilities or values, as `workbench predict` writes them. Its metadata_props hold
                bands, mean, std, num_frames, output_kind, output_names, chip_size, dynamic_hw and the
                workbench version (JSON values). `workbench predict --ckpt_path model.onnx` maps scenes with it.
  torch_export  a torch.export program (.pt2, load with torch.export.load), metadata in <output>.json

Batch and H/W are dynamic where the model allows; a model whose size is fixed (a ViT's position
embedding) is exported for --chip_size windows, said in the log and in dynamic_hw.
"""


def parse_args(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="workbench export", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by `workbench fit` (.ckpt)")
    parser.add_argument("--output", required=True, help="file to write: model.onnx or model.pt2")
    parser.add_argument("--format", choices=sorted(FORMATS.values()),
                        help="onnx or torch_export (default: from the --output suffix, .onnx or .pt2)")
    parser.add_argument("--config", help="the fit config (its data section gives bands and statistics); "
                                         "default: config.yaml of the checkpoint's run folder")
    parser.add_argument("--chip_size", type=int, help="side of the example input and, for models of fixed size, "
                                                      "the only window size (default: the config's data.chip_size)")
    parser.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    opts = parser.parse_args(args)
    opts.format = opts.format or FORMATS.get(Path(opts.output).suffix)
    if opts.format is None:
        raise UserInputError(f"--output {opts.output}: end it in .onnx or .pt2, or pass --format onnx|torch_export")
    return opts


def fit_config(checkpoint: str, config: str | None) -> Path:
    """``config``, or the ``config.yaml`` that ``workbench fit`` saved in the checkpoint's run folder."""
    path = Path(config) if config else Path(checkpoint).resolve().parent.parent / "config.yaml"
    if not path.is_file():
        raise UserInputError(f"--config {path} does not exist: pass the fit config of {checkpoint} with --config")
    return path


def fit_data(config: Path) -> Any:
    """The datamodule of a fit config, built from its ``data`` section alone (a run folder's
    ``config.yaml`` also holds the fit command's own keys, such as ``auto_precision``)."""
    import yaml

    from workbench.config import config_parser

    section = (yaml.safe_load(config.read_text()) or {}).get("data")
    if not section:
        raise UserInputError(f"--config {config} has no data section: pass the fit config of the checkpoint")
    parser = config_parser("workbench export", "", ("data",))
    return parser.instantiate_classes(parser.parse_object({"data": section})).data


class PredictStep(nn.Module):
    """A per-pixel task's ``predict_step`` as a module: ``image`` ``(B, C, [T,] H, W)`` → ``(B, K, H, W)``."""

    def __init__(self, task: BaseTask) -> None:
        super().__init__()
        self.task = task

    def forward(self, image: Tensor) -> Tensor:
        return self.task.predict_step({"image": image}, 0)


def inference_module(task: BaseTask) -> tuple[PredictStep, bool]:
    """The task in eval mode with its adapters merged (where the strategy can: else as trained)
    as a :class:`PredictStep`, and whether it was merged."""
    merged = task.strategy.mergeable
    if merged:
        task.model = task.strategy.merged(task.model)
    return PredictStep(task).eval(), merged


def dynamic_shapes(example: Tensor, dynamic_hw: bool) -> dict[str, dict[int, Any]]:
    """``torch.export`` dims of the ``image`` input: batch, and H/W (the last two) when ``dynamic_hw``."""
    dims = [0, example.ndim - 2, example.ndim - 1] if dynamic_hw else [0]
    return {"image": dict.fromkeys(dims, torch.export.Dim.DYNAMIC)}


def save_onnx(model: nn.Module, example: Tensor, path: Path, dynamic_hw: bool, metadata: dict[str, Any],
              opset: int | None) -> None:
    """Export ``model`` to ONNX at ``path`` (one file) with ``metadata`` (and ``dynamic_hw``) as
    JSON-encoded ``metadata_props``."""
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"], output_names=["outputs"],
                                dynamic_shapes=dynamic_shapes(example, dynamic_hw), opset_version=opset, verbose=False)
    values = {**metadata, "dynamic_hw": dynamic_hw, "opset": program.model.opset_imports[""]}
    program.model.metadata_props.update({key: json.dumps(value) for key, value in values.items()})
    program.save(path, external_data=False)


def load_onnx(path: Path) -> Callable[[Tensor], Tensor]:
    """A function running the ONNX file at ``path`` with onnxruntime on the CPU."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # a size the export refuses: said by max_abs_difference, not logged too
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda image: torch.from_numpy(session.run(None, {"image": image.numpy()})[0])


def save_program(model: nn.Module, example: Tensor, path: Path, dynamic_hw: bool) -> None:
    """``torch.export`` ``model`` and save the program at ``path``."""
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(example, dynamic_hw))
    torch.export.save(program, path)


def load_program(path: Path) -> Callable[[Tensor], Tensor]:
    """A function running the saved ``torch.export`` program at ``path``."""
    return torch.export.load(path).module()


def compare_to_pytorch(run: Callable[[Tensor], Tensor], model: nn.Module, image: Tensor) -> tuple[float, bool]:
    """``max |run(image) - model(image)|`` and whether it is within float32 tolerance (1e-4 + 1e-3 of
    the largest output); infinite where ``run`` refuses the input or the shapes differ."""
    with torch.no_grad():
        expected = model(image)
        try:
            got = run(image)
        except Exception as err:  # noqa: BLE001  (onnxruntime / guard errors: a size the export does not take)
            log.info("the export refuses input %s: %s", tuple(image.shape), first_line(err))
            return float("inf"), False
    difference = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    return difference, difference <= 1e-4 + 1e-3 * float(expected.abs().max())


def export_checked(save: Save, load: Load, model: nn.Module, example: Tensor, path: Path) -> tuple[bool, float]:
    """Export ``model`` to ``path`` with dynamic batch and H/W, checked on a batch of one at twice
    the size against PyTorch; where that export fails or differs (a size baked in, e.g. a ViT's
    position embedding), export with H/W fixed to ``example``'s. Returns ``(dynamic_hw, max abs
    difference to PyTorch on example)``; an export that does not reproduce PyTorch on ``example``
    is an error."""
    larger = torch.randn(1, *example.shape[1:-2], 2 * example.shape[-2], 2 * example.shape[-1],
                         generator=torch.Generator().manual_seed(1))
    try:
        save(model, example, path, True)
        dynamic_hw = compare_to_pytorch(load(path), model, larger)[1]
    except Exception as err:  # noqa: BLE001  (the exporter refuses dynamic H/W: try the fixed size)
        log.info("dynamic H/W export failed: %s", first_line(err))
        dynamic_hw = False
    if not dynamic_hw:
        print(f"workbench: the model's input size is fixed (e.g. a ViT position embedding): exported for "
              f"{example.shape[-2]}x{example.shape[-1]} windows only, dynamic batch (metadata dynamic_hw: false)")
        save(model, example, path, False)
    difference, close = compare_to_pytorch(load(path), model, example)
    if not close:
        raise RuntimeError(f"the export differs from PyTorch by {difference:.2e} on the example input")
    return dynamic_hw, difference


def example_input(channels: int, num_frames: int, chip_size: int, batch: int = 2) -> Tensor:
    """A seeded normalised input ``(batch, C, [T,] chip, chip)`` (no T axis for one frame)."""
    frames = [num_frames] if num_frames > 1 else []
    return torch.randn(batch, channels, *frames, chip_size, chip_size, generator=torch.Generator().manual_seed(0))


def export_metadata(task: BaseTask, data: Any, chip_size: int, merged: bool) -> dict[str, Any]:
    """What a runtime needs to feed the exported model and read its outputs (JSON values)."""
    from workbench import __version__

    preprocess = data.preprocessor()
    return {
        "bands": getattr(data, "bands", None),
        "mean": [float(v) for v in preprocess.mean],
        "std": [float(v) for v in preprocess.std],
        "num_frames": preprocess.num_frames,
        "output_kind": str(task.output_kind),
        "output_names": list(task.output_names),
        "chip_size": chip_size,
        "backbone": task.hparams.backbone,
        "strategy": task.strategy.name,
        "merged": merged,
        "workbench_version": __version__,
    }


def run_export(args: list[str]) -> Path:
    """Run ``workbench export``; returns the written file."""
    from workbench.merge.checkpoints import load_task
    from workbench.predict.command import scene_source
    from workbench.tasks.dense import PixelPredictor

    opts = parse_args(args)
    task = load_task(opts.checkpoint)
    if not isinstance(task, PixelPredictor):
        raise UserInputError(f"workbench export writes per-pixel tasks (SegmentationTask, RegressionTask); "
                             f"{opts.checkpoint} holds a {type(task).__name__}")
    data = scene_source(fit_data(fit_config(opts.checkpoint, opts.config)))
    data.prepare_data()
    chip_size = opts.chip_size or data.chip_size
    if not chip_size:
        raise UserInputError("--chip_size: the config's data has no chip_size; give the window side to export for")
    model, merged = inference_module(task)
    metadata = export_metadata(task, data, chip_size, merged)
    example = example_input(len(metadata["mean"]), metadata["num_frames"], chip_size)
    if opts.format == "onnx":
        save, load = partial(save_onnx, metadata=metadata, opset=opts.opset), load_onnx
    else:
        save, load = save_program, load_program
    out = Path(opts.output)
    try:
        with atomic_path(out) as tmp:
            dynamic_hw, difference = export_checked(save, load, model, example, tmp)
    except OSError:  # a full disk or read-only folder: named by the CLI
        raise
    except Exception as err:  # noqa: BLE001  (what the exporter cannot trace, in one line)
        state = "merged" if merged else "un-merged (its added modules cannot be merged)"
        raise UserInputError(f"{opts.checkpoint}: the {task.strategy.name} model, {state}, could not be exported "
                             f"to {opts.format} ({type(err).__name__}: {first_line(err)})") from None
    if opts.format == "torch_export":
        write_json(out.with_name(out.name + ".json"), {**metadata, "dynamic_hw": dynamic_hw})
    sizes = "dynamic batch and H/W" if dynamic_hw else f"dynamic batch, {chip_size}x{chip_size} only"
    print(f"workbench: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {opts.format}, {task.strategy.name} "
          f"{'merged' if merged else 'un-merged'}, {sizes}); max |export - PyTorch| on 2 random "
          f"{chip_size}x{chip_size} chips: {difference:.2e}")
    return out
