"""The two baselines every comparison needs: full fine-tuning and a frozen encoder."""

from __future__ import annotations

from workbench.model import EncoderDecoder
from workbench.strategies.base import Strategy


class Full(Strategy):
    """Every parameter trains."""

    name = "full"

    def prepare(self, model: EncoderDecoder) -> None:
        model.requires_grad_(True)


class Frozen(Strategy):
    """The encoder is frozen and kept in eval mode; neck, decoder and head train."""

    name = "frozen"

    def prepare(self, model: EncoderDecoder) -> None:
        model.freeze_backbone()
