"""Selective fine-tuning: the backbone keeps its layout and only a chosen subset of it trains.

BitFit (biases), norm-only, HFT half fine-tuning and "last k blocks". Nothing is added, so the
fine-tuned model is already in the plain layout.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from torch import nn

from backbones.smp_encoders import SmpEncoder
from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import Strategy
from workbench.strategies.blocks import block_linears, transformer_blocks

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class SelectiveStrategy(Strategy):
    """Freeze the backbone, then unfreeze the parameters :meth:`select` yields."""

    def select(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def prepare(self, model: BackboneModel) -> None:
        model.backbone.requires_grad_(False)
        for param in self.select(model.backbone):
            param.requires_grad_(True)


class BitFit(SelectiveStrategy):
    """BitFit: only the backbone's bias terms train (plus neck, decoder and head)."""

    name = "bitfit"

    def select(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        return (p for n, p in backbone.named_parameters() if n.rsplit(".", 1)[-1] == "bias")


class NormOnly(SelectiveStrategy):
    """Only the backbone's normalization layers (LayerNorm/GroupNorm/BatchNorm affine) train."""

    name = "norm"

    def select(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        return (p for m in backbone.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False))


class LastBlocks(SelectiveStrategy):
    """Partial fine-tuning: the last ``k`` transformer blocks and the final norm train — or, on a
    CNN encoder with feature stages (smp encoders: EfficientNet, ResNet), the last ``k`` stages."""

    name = "last_k"

    def __init__(self, k: int = 2) -> None:
        """
        Args:
            k: number of trailing transformer blocks (CNN: stages) that train (1 ≤ k ≤ depth).
        """
        self.k = k

    def select(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        units = [nn.ModuleList(s) for s in backbone.stages()] if isinstance(backbone, SmpEncoder) else None
        blocks = units or transformer_blocks(backbone)
        kind = "stages" if units else "blocks"
        if not 1 <= self.k <= len(blocks):
            raise UserInputError(f"last_k: k={self.k} but the backbone has {len(blocks)} {kind}; use 1..{len(blocks)}.")
        for block in blocks[-self.k :]:
            yield from block.parameters()
        for name in ("norm", "fc_norm"):
            final = getattr(backbone, name, None)
            if isinstance(final, nn.Module):
                yield from final.parameters()


class HalfFineTuning(SelectiveStrategy):
    """HFT: in every block, a seeded random half of the attention matrices and half of the MLP
    matrices train (weights and biases); the other half, norms and embeddings stay frozen.

    With timm's fused ``attn.qkv`` a block's attention matrices are ``qkv`` and ``proj``, its MLP
    matrices ``fc1`` and ``fc2``: one of each trains. Odd counts round down (at least one).
    """

    name = "hft"

    def __init__(self, seed: int = 0) -> None:
        """
        Args:
            seed: seed of the per-block choice of matrices; the same seed picks the same half.
        """
        self.seed = seed

    def select(self, backbone: nn.Module) -> Iterator[nn.Parameter]:
        rng = random.Random(self.seed)
        for block in transformer_blocks(backbone):
            for part in ("attn", "mlp"):
                linears = block_linears(block, part)
                for _, linear in rng.sample(linears, max(1, len(linears) // 2)) if linears else []:
                    yield from linear.parameters()


class LISA(Strategy):
    """LISA, layerwise importance sampling (Pan et al. 2024, arXiv:2403.17919): the backbone's
    parameters outside its blocks (embeddings, final norm) always train; of its transformer
    blocks, a seeded random ``layers`` train at a time, drawn anew every ``interval`` optimizer
    steps. Every backbone parameter is in the optimizer, but inactive blocks get no gradient, so
    AdamW neither moves them nor keeps state for blocks never drawn. The strategy report counts
    all parameters that may train; at any step only the drawn blocks do.
    """

    name = "lisa"

    def __init__(self, layers: int = 2, interval: int = 20, seed: int = 0) -> None:
        """
        Args:
            layers: blocks that train at a time.
            interval: optimizer steps between two draws.
            seed: seed of the draws (the same on every rank, so data-parallel ranks agree).
        """
        if layers < 1 or interval < 1:
            raise UserInputError(f"lisa layers ({layers}) and interval ({interval}) must be at least 1")
        self.layers, self.interval, self.seed = layers, interval, seed

    def prepare(self, model: BackboneModel) -> None:
        blocks = transformer_blocks(model.backbone)
        if self.layers > len(blocks):
            raise UserInputError(f"lisa layers {self.layers} exceeds the backbone's {len(blocks)} blocks")
        model.backbone.requires_grad_(True)

    def active_blocks(self, step: int, count: int) -> list[int]:
        """Indices of the blocks that train at optimizer ``step`` (of ``count`` blocks)."""
        return sorted(random.Random(f"{self.seed}:{step // self.interval}").sample(range(count), self.layers))

    def on_train_step(self, model: BackboneModel, step: int) -> None:
        blocks = transformer_blocks(model.backbone)
        active = set(self.active_blocks(step, len(blocks)))
        for index, block in enumerate(blocks):
            block.requires_grad_(index in active)
