"""What the per-pixel tasks share: encoder → neck → decoder → head at the input size, batches
as dicts, and what they tell whole-scene prediction about their outputs."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import build_encoder_decoder
from workbench.tasks.base import BaseTask


class PixelOutput(StrEnum):
    """What a per-pixel model's ``K`` output channels are."""

    CLASSES = "classes"  # class probabilities: written as a class map (+ optional probabilities)
    VALUES = "values"  # values in target units: written as they are


@runtime_checkable
class PixelPredictor(Protocol):
    """A model ``workbench predict`` can map scenes with: ``predict_step`` maps
    ``{"image": (B, C, [T,] h, w)}`` to ``(B, K, h, w)`` outputs of kind ``output_kind``,
    the ``K`` channels named by ``output_names``."""

    output_kind: PixelOutput
    output_names: list[str]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor: ...


class DenseTask(BaseTask):
    """Base of per-pixel tasks (each a :class:`PixelPredictor`). Subclasses set ``output_kind``,
    ``output_names`` and implement ``compute_step`` and ``metrics``.

    Batches are dicts with ``image`` ``(B, C, [T,] H, W)`` and optionally ``temporal_coords``
    ``(B, T, 2)`` and ``location_coords`` ``(B, 2)``; outputs are ``(B, num_outputs, H, W)``.
    """

    output_kind: ClassVar[PixelOutput]
    output_names: list[str]

    def __init__(
        self,
        num_outputs: int,
        decoder: Literal["uper", "fcn", "unet"] = "uper",
        decoder_channels: int = 256,
        head_dropout: float = 0.1,
        neck: Literal["wide", "lean"] = "lean",
        **kwargs: Any,
    ) -> None:
        self.num_outputs = num_outputs
        super().__init__(**kwargs)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        hp = self.hparams
        class_names = self.output_names if self.output_kind is PixelOutput.CLASSES else None
        return build_encoder_decoder(backbone, hp.decoder, hp.decoder_channels, self.num_outputs, hp.head_dropout,
                                     class_names, hp.neck)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint whose ViT pyramid neck has the other widths (trained with the other ``neck``:
        ``wide`` was the default before 2026-12-04) is named in one line, not a size-mismatch traceback."""
        super().on_load_checkpoint(checkpoint)
        own = self.state_dict()
        for key, saved in checkpoint["state_dict"].items():
            if ".neck." in key and key in own and own[key].shape != saved.shape:
                other = "wide" if self.hparams.neck == "lean" else "lean"
                raise UserInputError(
                    f"the checkpoint's neck does not match the model's neck: {self.hparams.neck} ({key}: "
                    f"{tuple(saved.shape)} in the checkpoint, {tuple(own[key].shape)} in the model); it was "
                    f"trained with neck: {other} (the default before 2026-12-04): set model.init_args.neck: {other}"
                )
