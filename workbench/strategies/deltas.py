"""Trainable updates of frozen weights: a wrapper computes its layer with ``W + update()`` and folds
back into the plain layer; a strategy base wraps the targeted layers of a backbone.

Used by the methods peft does not have (SVFit, LoLDU, FLoRA, S2FT, SPT): each only says what its
``update()`` is made of.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import Strategy
from workbench.strategies.blocks import fold_wrappers, replace_module

ATTENTION = ["attn.qkv", "attn.proj"]


class WeightDelta(nn.Module):
    """A frozen layer with a weight (Linear, Conv1d/2d/3d, also padding subclasses such as
    smp's ``Conv2dStaticSamePadding``) computed with weight ``W + update()``; ``update()`` has
    ``W``'s shape. Subclasses own the trainable parameters the update is made of."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def update(self) -> Tensor:
        """The change of the base weight, shaped like it."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        weight = self.base_layer.weight + self.update()
        return functional_call(self.base_layer, {"weight": weight}, (x,))

    @torch.no_grad()
    def merged_layer(self) -> nn.Module:
        """A copy of the base layer with the update added to its weight."""
        layer = copy.deepcopy(self.base_layer)
        layer.weight.add_(self.update())
        return layer


class WrappedLayers(Strategy):
    """Freeze the backbone and wrap each layer of :attr:`layer_types` whose name ends with one of
    ``target_modules`` in :meth:`wrap`; merged export folds every wrapper back into the plain layer."""

    target_modules: list[str]
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    wrapper_types: tuple[type[nn.Module], ...] = (WeightDelta,)

    def wrap(self, name: str, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def targets(self, backbone: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, layer)`` of the targeted layers; a clear error naming the candidates if none."""
        found = [(n, m) for n, m in backbone.named_modules()
                 if isinstance(m, self.layer_types) and n.endswith(tuple(self.target_modules))]
        if not found:
            kinds = "/".join(t.__name__ for t in self.layer_types)
            names = sorted({".".join(n.split(".")[-2:]) for n, m in backbone.named_modules()
                            if isinstance(m, self.layer_types)})
            raise UserInputError(f"{self.name} target_modules {self.target_modules} match no {kinds} layer of "
                                 f"{type(backbone).__name__}; it has: {', '.join(names) or 'none (use ssf or bitfit)'}")
        return found

    def prepare(self, model: BackboneModel) -> None:
        backbone = model.backbone
        targets = self.targets(backbone)
        backbone.requires_grad_(False)
        for name, layer in targets:
            replace_module(backbone, name, self.wrap(name, layer))

    def merged(self, model: BackboneModel) -> BackboneModel:
        return fold_wrappers(model, self.wrapper_types)
