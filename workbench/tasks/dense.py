"""What the per-pixel tasks share: encoder → neck → decoder → head at the input size, batches
as dicts, a torchmetrics collection per stage."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from workbench.model import build_encoder_decoder
from workbench.tasks.base import BaseTask


class DenseTask(BaseTask):
    """Base of per-pixel tasks. Subclasses implement ``_step`` and ``metrics``.

    Batches are dicts with ``image`` ``(B, C, [T,] H, W)`` and optionally ``temporal_coords``
    ``(B, T, 2)`` and ``location_coords`` ``(B, 2)``; outputs are ``(B, num_outputs, H, W)``.
    """

    def __init__(
        self,
        num_outputs: int,
        decoder: Literal["uper", "fcn", "unet"] = "uper",
        decoder_channels: int = 256,
        head_dropout: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_outputs = num_outputs
        self.setup_model()

    def build_model(self, backbone: nn.Module) -> nn.Module:
        hp = self.hparams
        return build_encoder_decoder(backbone, hp.decoder, hp.decoder_channels, self.num_outputs, hp.head_dropout,
                                     getattr(self, "class_names", None))
