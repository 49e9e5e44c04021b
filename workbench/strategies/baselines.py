"""The two baselines every comparison needs: full fine-tuning and a frozen encoder."""

from __future__ import annotations

from workbench.errors import UserInputError
from workbench.feature_cache import FeatureCache
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

    def __init__(self, cache_features: bool | None = None, cache_mib: float = 4096) -> None:
        """
        Args:
            cache_features: remember the encoder's features per chip while fitting, so epochs
                after the first (and validation) run at decoder cost, with the same results.
                None (default): on when the datamodule says its training chips are not augmented
                (``augment: false``, no ``augmentations``); true: required (augmented data is an
                error, since augmented chips never repeat); false: off.
            cache_mib: memory cap of the cache in MiB; beyond it features are recomputed.
        """
        self.cache_features = cache_features
        self.cache_mib = cache_mib

    def prepare(self, model: BackboneModel) -> None:
        model.freeze_backbone()

    def on_fit_start(self, model: BackboneModel, augmented: bool | None) -> str | None:
        if self.cache_features is False:
            return None
        if augmented is not False:
            if self.cache_features:
                raise UserInputError(
                    "strategy.cache_features needs un-augmented chips (augmented ones never repeat): "
                    "set data.init_args.augment: false and remove data.init_args.augmentations, or cache_features: false.")
            reason = "augmented" if augmented else "not known to be un-augmented"
            return f"feature cache off: the training chips are {reason} (data.init_args.augment: false turns it on)"
        model.feature_cache = FeatureCache(self.cache_mib)
        return f"feature cache on: encoder features kept per chip (up to {self.cache_mib:g} MiB) while fitting"

    def on_fit_end(self, model: BackboneModel) -> str | None:
        cache, model.feature_cache = model.feature_cache, None
        if cache is None:
            return None
        return (f"feature cache served {cache.hits} of {cache.hits + cache.misses} encoder passes "
                f"({cache.bytes / 2**20:.1f} MiB)")
