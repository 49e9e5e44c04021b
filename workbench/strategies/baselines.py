"""The two baselines every comparison needs: full fine-tuning and a frozen encoder."""

from __future__ import annotations

from workbench.model import BackboneModel
from workbench.strategies.base import Strategy


class Full(Strategy):
    """Every parameter trains."""

    name = "full"

    def prepare(self, model: BackboneModel) -> None:
        model.requires_grad_(True)


class Frozen(Strategy):
    """The encoder is frozen and kept in eval mode; neck, decoder and head train."""

    name = "frozen"

    def __init__(self, cache_features: bool = False, cache_mib: float = 4096) -> None:
        """
        Args:
            cache_features: remember the encoder's features per chip, so epochs after the first
                run at decoder cost; results are the same as without. Needs ``augment: false``
                in the data (augmented chips never repeat).
            cache_mib: memory cap of the cache in MiB; beyond it features are recomputed.
        """
        self.cache_features = cache_features
        self.cache_mib = cache_mib

    def prepare(self, model: BackboneModel) -> None:
        model.freeze_backbone(self.cache_features, self.cache_mib)
