"""Visual prompt tuning (VPT): learned tokens prepended to the token sequence of a frozen ViT."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import Strategy

CARRIED_PROMPTS = "vpt_prompt_outputs"
"""Attribute of a shallow-VPT block's output tokens holding its prompt outputs ``(B, P, D)``."""


class PromptedBlock(nn.Module):
    """A transformer block run with ``P`` prompt tokens before its input ``(B, N, D)`` and without
    them in its output ``(B, N, D)``, so every block output keeps the backbone's own layout.

    With its own ``prompts`` ``(P, D)`` (VPT-deep, or the first block of VPT-shallow) the block
    depends on nothing but its arguments. Without (the later blocks of VPT-shallow) it takes the
    prompt outputs that the previous block attached to the very tensor it returned; ``carry``
    attaches this block's prompt outputs to its own output the same way. The prompts thus travel
    with the tokens: activation checkpointing, which re-runs a block on its saved input during
    backward, sees the same prompts by construction, however many forwards came in between.
    """

    def __init__(self, block: nn.Module, prompts: nn.Parameter | None, num_tokens: int, carry: bool) -> None:
        super().__init__()
        self.block = block
        self.prompts = prompts
        self.num_tokens = num_tokens
        self.carry = carry

    def forward(self, tokens: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.prompts is not None:
            prompts = self.prompts.expand(tokens.shape[0], -1, -1)
        elif (prompts := getattr(tokens, CARRIED_PROMPTS, None)) is None:
            raise UserInputError(
                "vpt deep: false carries the prompts from block to block, but this backbone changes the tokens "
                "between its blocks (e.g. adds position embeddings to every block input): use deep: true."
            )
        output = self.block(torch.cat([prompts.to(tokens.dtype), tokens], dim=1), *args, **kwargs)
        image_tokens = output[:, self.num_tokens :]
        if self.carry:
            setattr(image_tokens, CARRIED_PROMPTS, output[:, : self.num_tokens])
        return image_tokens


def load_single_tensor_prompts(state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
    """Load-state-dict pre-hook: checkpoints of the earlier layout (all prompts in one
    ``prompt_tokens.tokens`` ``(blocks or 1, P, D)``, block weights at ``blocks.<i>.*``) → each
    :class:`PromptedBlock`'s ``blocks.<i>.prompts`` ``(P, D)`` and ``blocks.<i>.block.*``, in place."""
    tokens = state_dict.pop(prefix + "prompt_tokens.tokens", None)
    if tokens is None:
        return
    for key in [k for k in state_dict if k.startswith(prefix + "blocks.")]:
        index, _, rest = key[len(prefix + "blocks.") :].partition(".")
        state_dict[f"{prefix}blocks.{index}.block.{rest}"] = state_dict.pop(key)
    for index, prompts in enumerate(tokens):
        state_dict[f"{prefix}blocks.{index}.prompts"] = prompts


class VPT(Strategy):
    """Visual prompt tuning: the backbone is frozen; ``num_tokens`` prompts per block (deep) or
    at the input (shallow) train, with neck, decoder and head. Cannot be merged away.

    Each of ``backbone.blocks`` becomes a :class:`PromptedBlock` (keys ``blocks.<i>.block.*``,
    prompts ``blocks.<i>.prompts``); checkpoints of the earlier single-tensor layout still load.
    """

    name = "vpt"
    mergeable = False

    def __init__(self, num_tokens: int = 8, deep: bool = True) -> None:
        """
        Args:
            num_tokens: prompt tokens per block (deep) or in all (shallow).
            deep: VPT-deep (new prompts at every block) or VPT-shallow (input prompts only,
                their outputs carried from block to block).
        """
        self.num_tokens = num_tokens
        self.deep = deep

    def prepare(self, model: BackboneModel) -> None:
        backbone = model.backbone
        blocks = getattr(backbone, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise UserInputError(
                f"vpt needs a plain ViT (token sequences in `backbone.blocks`); {type(backbone).__name__} "
                "is not one: use lora, ssf or adaptformer for it."
            )
        backbone.requires_grad_(False)
        dim = next(p for p in blocks[0].parameters()).shape[-1]
        for index, block in enumerate(blocks):
            prompts = None
            if self.deep or index == 0:
                prompts = nn.Parameter(nn.init.trunc_normal_(torch.empty(self.num_tokens, dim), std=0.02))
            blocks[index] = PromptedBlock(block, prompts, self.num_tokens, carry=not self.deep)
        backbone._register_load_state_dict_pre_hook(load_single_tensor_prompts)
