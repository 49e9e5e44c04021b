"""Parameter-efficient methods from the ``peft`` library, injected into the backbone only."""

from __future__ import annotations

import copy

from peft import LoraConfig, PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from workbench.errors import UserInputError
from workbench.model import EncoderDecoder
from workbench.strategies.base import Strategy


def linear_names(module: nn.Module) -> list[str]:
    """Distinct ``parent.child`` suffixes of the Linear layers, e.g. ``attn.qkv``, ``mlp.fc1``."""
    names = {".".join(n.split(".")[-2:]) for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


def merge_adapters(module: nn.Module) -> None:
    """Merge every peft adapter layer of ``module`` into its base layer and unwrap it, in place."""
    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer.get_base_layer())


class PeftStrategy(Strategy):
    """Inject the adapters described by :meth:`peft_config` into ``model.backbone``.

    peft freezes the backbone's own weights; neck, decoder and head stay trainable.
    """

    def peft_config(self) -> PeftConfig:
        raise NotImplementedError

    def prepare(self, model: EncoderDecoder) -> None:
        try:
            inject_adapter_in_model(self.peft_config(), model.backbone)
        except ValueError as err:
            if "not found" not in str(err) and "Target module" not in str(err):
                raise
            raise UserInputError(
                f"{self.name} target_modules {getattr(self, 'target_modules', None)} match no layer "
                f"of the backbone. Linear layers it has: {', '.join(linear_names(model.backbone))}."
            ) from None

    def merged(self, model: EncoderDecoder) -> EncoderDecoder:
        plain = copy.deepcopy(model)
        merge_adapters(plain.backbone)
        return plain


class LoRA(PeftStrategy):
    """Low-rank adapters (LoRA), or weight-decomposed DoRA with ``use_dora: true``."""

    name = "lora"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        use_dora: bool = False,
    ) -> None:
        """
        Args:
            rank: rank of the update matrices.
            alpha: scaling numerator (the update is scaled by ``alpha / rank``).
            dropout: dropout on the adapter input.
            target_modules: Linear layers to adapt, by name suffix; default attention
                ``attn.qkv`` and ``attn.proj``.
            use_dora: DoRA (magnitude + direction) instead of plain LoRA.
        """
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.target_modules = list(target_modules or ["attn.qkv", "attn.proj"])
        self.use_dora = use_dora
        if use_dora:
            self.name = "dora"

    def peft_config(self) -> PeftConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_dora=self.use_dora,
        )
