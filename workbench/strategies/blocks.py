"""Finding and replacing modules of a backbone: its transformer blocks, Linears by name, wrapper layers."""

from __future__ import annotations

import copy

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


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` inside ``root``."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def fold_wrappers(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> nn.Module:
    """A copy of ``model`` whose backbone layers of ``kinds`` (wrappers with a ``merged_layer()``:
    SSF, Hydra, SVFit) are replaced by the plain layers they fold into."""
    plain = copy.deepcopy(model)
    for name, layer in list(plain.backbone.named_modules()):
        if isinstance(layer, kinds):
            replace_module(plain.backbone, name, layer.merged_layer())
    return plain
