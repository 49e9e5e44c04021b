"""The Prithvi masked autoencoder that MAE pretraining and gap imputation both train."""

from __future__ import annotations

from typing import Any

from torch import nn

from backbones.prithvi import PrithviViT
from backbones.prithvi_mae import PrithviMAE
from workbench.errors import UserInputError


def build_mae(backbone: nn.Module, hparams: Any, purpose: str) -> PrithviMAE:
    """The Prithvi MAE around ``backbone`` with the decoder sizes in ``hparams``
    (``decoder_dim``, ``decoder_depth``, ``decoder_heads``); ``purpose`` names the task in errors."""
    if not isinstance(backbone, PrithviViT):
        raise UserInputError(f"{purpose} needs a Prithvi backbone, not {type(backbone).__name__}")
    return PrithviMAE(backbone, hparams.decoder_dim, hparams.decoder_depth, hparams.decoder_heads)
