"""Finding the transformer blocks of a backbone, for strategies that act per block."""

from __future__ import annotations

from torch import nn

from workbench.errors import UserInputError


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order: the members of every ``blocks`` list in it —
    ``blocks`` of a ViT, ``layers[i].blocks`` of a Swin, ``stages[i].blocks`` of a ConvNeXt,
    also inside wrappers of timm models."""
    blocks = [
        block
        for module in backbone.modules()
        if isinstance(getattr(module, "blocks", None), (nn.ModuleList, nn.Sequential))
        for block in module.blocks
    ]
    if not blocks:
        raise UserInputError(
            f"this strategy acts per block, but backbone {type(backbone).__name__} has no `blocks` lists "
            "(ViT `blocks`, Swin `layers[i].blocks`, ConvNeXt `stages[i].blocks`): choose another strategy."
        )
    return blocks


def block_linears(block: nn.Module, part: str) -> list[tuple[str, nn.Linear]]:
    """``(name, Linear)`` pairs of a block whose name contains ``part`` (``attn`` or ``mlp``)."""
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and part in n.split(".")[0]]
