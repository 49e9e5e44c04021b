"""Whole-scene prediction with a model exported by ``workbench export`` to ONNX: an onnxruntime
session behind the :class:`~workbench.tasks.dense.PixelPredictor` interface, its outputs and
preprocessing read from the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.scenes import SceneSource
from workbench.errors import UserInputError, first_line
from workbench.tasks.dense import PixelOutput

# what `workbench export` writes into the ONNX metadata_props (each value JSON-encoded) and predict reads
EXPORT_METADATA = ("bands", "mean", "std", "num_frames", "output_kind", "output_names", "chip_size", "dynamic_hw")


def onnx_providers(device: str) -> list[str]:
    """onnxruntime execution providers for a torch-style ``device`` (``cpu``, ``cuda``, ``cuda:1``),
    CPU last as the fallback; CUDA only where the installed onnxruntime has it."""
    import onnxruntime as ort

    wanted = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
    return [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]


class OnnxPixelModel:
    """A :class:`~workbench.tasks.dense.PixelPredictor` running an exported ONNX file:
    ``predict_step({"image": (B, C, [T,] h, w)})`` → ``(B, K, h, w)`` outputs of kind
    ``output_kind`` named ``output_names``, as the task it was exported from computes them.

    Args:
        path: ONNX file written by ``workbench export``.
    """

    device = torch.device("cpu")  # windows reach onnxruntime as host arrays; it moves them itself

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise UserInputError(f"--ckpt_path {self.path} does not exist: give the .onnx file `workbench export` wrote")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=onnx_providers("cpu"))
        except Exception as err:  # noqa: BLE001  (truncated, corrupt or not ONNX at all: one message)
            raise UserInputError(f"--ckpt_path {self.path} is not a readable ONNX model ({first_line(err)}): "
                                 "export it again with `workbench export`") from None
        stored = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in EXPORT_METADATA if key not in stored]
        if missing:
            raise UserInputError(f"--ckpt_path {self.path} lacks the metadata {missing} that `workbench export` "
                                 f"writes: export the fit checkpoint with `workbench export --checkpoint <best.ckpt> "
                                 f"--output {self.path.name}`")
        self.metadata: dict[str, Any] = {key: json.loads(stored[key]) for key in EXPORT_METADATA}
        self.output_kind = PixelOutput(self.metadata["output_kind"])
        self.output_names: list[str] = list(self.metadata["output_names"])
        self.input_name = self.session.get_inputs()[0].name

    def to(self, device: str | torch.device) -> OnnxPixelModel:
        """Run on ``device`` (CUDA where onnxruntime has it, else the CPU)."""
        self.session.set_providers(onnx_providers(str(device)))
        return self

    def eval(self) -> OnnxPixelModel:
        """An exported model is in inference mode already."""
        return self

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """``{"image": (B, C, [T,] h, w)}`` → outputs ``(B, K, h, w)`` float32."""
        image = batch["image"].float().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: image})[0])

    def check_scenes(self, source: SceneSource, window: int) -> None:
        """The config's data reads the bands and statistics the model was exported with, and
        ``window`` fits a model exported for one window size; else one line naming the mismatch."""
        meta = self.metadata
        preprocess = source.preprocessor()
        config = {"bands": getattr(source, "bands", None), "num_frames": preprocess.num_frames,
                  "mean": list(preprocess.mean), "std": list(preprocess.std)}
        for key, value in config.items():
            same = (value == meta[key] if key in ("bands", "num_frames")
                    else len(value) == len(meta[key]) and np.allclose(value, meta[key], rtol=1e-6, atol=0))
            if not same:
                raise UserInputError(
                    f"the config's data.{key} {value} differs from the {key} {meta[key]} {self.path.name} was "
                    "exported with: predict with the fit config of the exported checkpoint"
                )
        if not meta["dynamic_hw"] and window != meta["chip_size"]:
            raise UserInputError(
                f"{self.path.name} takes {meta['chip_size']}x{meta['chip_size']} windows only (its backbone fixes the "
                f"input size, e.g. a ViT's position embedding): pass --window {meta['chip_size']}"
            )
