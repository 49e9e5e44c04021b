"""segmentation-models-pytorch encoders (ResNet, EfficientNet, MiT, ...) as backbones, by name:
``backbone: smp:efficientnet-b4`` — the CNN baselines of remote-sensing segmentation, under the
same decoders, strategies and reports as the foundation models.

Weights: a local file with the encoder's keys, bare or as a whole smp model's ``encoder.*``
(e.g. a U-Net checkpoint); the first convolution is adapted to the data's band count by smp.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from backbones.factory import load_checked, read_state_dict
from workbench.errors import UserInputError

PREFIX = "smp:"


class SmpEncoder(nn.Module):
    """``segmentation_models_pytorch.encoders.get_encoder(name)`` behind the backbone interface:
    :meth:`forward_features` ``(B, C, H, W)`` → one map per stage (strides 2 … 32; the identity
    stage and empty stages are dropped) and ``feature_info`` with ``num_chs`` / ``reduction``."""

    def __init__(self, name: str, in_chans: int = 3, depth: int = 5, pretrained: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        from segmentation_models_pytorch.encoders import encoders, get_encoder

        if name not in encoders:
            close = difflib.get_close_matches(name, list(encoders), n=8, cutoff=0.5)
            raise UserInputError(f"model.backbone: unknown smp encoder {name!r}. Similar: {close or 'none'}")
        self.name = name
        self.model = get_encoder(name, in_channels=in_chans, depth=depth, weights=None, **kwargs)
        self.stages = [i for i, c in enumerate(self.model.out_channels) if i > 0 and c > 0]
        with torch.no_grad():
            probe = self.model.eval()(torch.zeros(1, in_chans, 64, 64))
        self.model.train()
        self.feature_info = [{"num_chs": self.model.out_channels[i], "reduction": 64 // probe[i].shape[-1],
                              "module": f"stage{i}"} for i in self.stages]
        if pretrained:
            load_smp_encoder(self, pretrained)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        features = self.model(x)
        return [features[i] for i in self.stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)


def load_smp_encoder(model: SmpEncoder, path: str | Path) -> dict[str, Any]:
    """Load encoder weights (bare keys or a whole smp model's ``encoder.*``) into ``model``."""
    state = read_state_dict(Path(path))
    for prefix in ("model.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return load_checked(model.model, state, path, f"is it a {model.name} encoder with the same in_chans?")


def create_smp_encoder(name: str, bands: list[str] | None, pretrained: str | None,
                       backbone_kwargs: dict[str, Any] | None) -> SmpEncoder:
    """``create_backbone`` for ``smp:<encoder>`` names."""
    kwargs = dict(backbone_kwargs or {})
    kwargs.setdefault("in_chans", len(bands) if bands else 3)
    return SmpEncoder(name[len(PREFIX):], pretrained=pretrained, **kwargs)
