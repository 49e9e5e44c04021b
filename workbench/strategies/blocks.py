"""Finding the transformer blocks of a backbone, for strategies that act per block."""

from __future__ import annotations

from torch import nn

from workbench.errors import UserInputError


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's transformer blocks in forward order.

    ViTs keep them in ``backbone.blocks``; hierarchical (Swin-style) backbones in
    ``backbone.layers[i].blocks``.
    """
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return list(blocks)
    layers = getattr(backbone, "layers", None)
    if isinstance(layers, (nn.ModuleList, nn.Sequential)) and all(hasattr(layer, "blocks") for layer in layers):
        return [block for layer in layers for block in layer.blocks]
    raise UserInputError(
        f"this strategy acts per transformer block, but backbone {type(backbone).__name__} has no "
        "`blocks` (ViT) or `layers[i].blocks` (Swin): choose another strategy for it."
    )


def block_linears(block: nn.Module, part: str) -> list[tuple[str, nn.Linear]]:
    """``(name, Linear)`` pairs of a block whose name contains ``part`` (``attn`` or ``mlp``)."""
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and part in n.split(".")[0]]
