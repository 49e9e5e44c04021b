"""Visual prompt tuning (VPT): learned tokens prepended to the token sequence of a frozen ViT."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import Strategy
from workbench.strategies.blocks import transformer_blocks


class PromptTokens(nn.Module):
    """Prompt tokens inserted before each block's input and removed from its output.

    ``deep``: every block gets its own ``num_tokens`` prompts (VPT-deep). Shallow: the prompts
    enter the first block and their outputs are carried from block to block (VPT-shallow).
    Removing them after every block leaves each block's output, and so every feature map, in
    the backbone's own layout ``(B, N, D)``. Carried prompts are kept per block (block ``i``
    reads what block ``i - 1`` left), so activation checkpointing, which re-runs a block and its
    hooks during backward after later blocks have run, recomputes the same prompts.
    """

    def __init__(self, blocks: list[nn.Module], num_tokens: int, dim: int, deep: bool) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.deep = deep
        self.tokens = nn.Parameter(torch.empty(len(blocks) if deep else 1, num_tokens, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)
        self._carried: dict[int, Tensor] = {}  # block index → the prompt outputs it left
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(self._insert_hook(index))
            block.register_forward_hook(self._remove_hook(index))

    def _insert_hook(self, index: int):
        def insert(_: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            tokens = args[0]
            if self.deep or index == 0:
                prompts = self.tokens[index if self.deep else 0].expand(tokens.shape[0], -1, -1)
            else:
                prompts = self._carried[index - 1]
            return (torch.cat([prompts.to(tokens.dtype), tokens], dim=1), *args[1:])

        return insert

    def _remove_hook(self, index: int):
        def remove(_: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if not self.deep:
                self._carried[index] = output[:, : self.num_tokens]
            return output[:, self.num_tokens :]

        return remove


class VPT(Strategy):
    """Visual prompt tuning: the backbone is frozen; ``num_tokens`` prompts per block (deep) or
    at the input (shallow) train, with neck, decoder and head. Cannot be merged away."""

    name = "vpt"
    mergeable = False

    def __init__(self, num_tokens: int = 8, deep: bool = True) -> None:
        """
        Args:
            num_tokens: prompt tokens per block (deep) or in all (shallow).
            deep: VPT-deep (new prompts at every block) or VPT-shallow (input prompts only).
        """
        self.num_tokens = num_tokens
        self.deep = deep

    def prepare(self, model: BackboneModel) -> None:
        backbone = model.backbone
        if not isinstance(getattr(backbone, "blocks", None), nn.ModuleList):
            raise UserInputError(
                f"vpt needs a plain ViT (token sequences in `backbone.blocks`); {type(backbone).__name__} "
                "is not one: use lora, ssf or adaptformer for it."
            )
        backbone.requires_grad_(False)
        blocks = transformer_blocks(backbone)
        dim = next(p for p in blocks[0].parameters()).shape[-1]
        backbone.prompt_tokens = PromptTokens(blocks, self.num_tokens, dim, self.deep)
