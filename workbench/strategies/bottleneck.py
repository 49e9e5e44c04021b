"""Sequential bottleneck adapters after a frozen backbone's sublayers: Houlsby and Pfeiffer
placements, with Linear projections or Compacter's low-rank hypercomplex (PHM) ones.

Each adapter sits on the output of a block's ``attn`` and/or ``mlp`` sublayer (timm ViT-style
blocks: AST, Prithvi, PatchTST, the point transformer, timm ViTs, SwinV2) through a forward hook,
and lives beside it in the block (``blocks.<i>.attn_adapter``, ``blocks.<i>.mlp_adapter``): the
pretrained weights keep their state-dict keys (``blocks.0.mlp.fc1.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.adapters import bottleneck_projections
from workbench.strategies.base import Strategy
from workbench.strategies.blocks import block_linears, transformer_blocks

PLACEMENTS: dict[str, tuple[str, ...]] = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
"""Placement → the sublayers of every block that get an adapter on their output."""

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}

Projections = Callable[[int], tuple[nn.Module, nn.Module]]
"""Block width ``D`` → the adapter's ``down`` (``D → m``) and zero-initialised ``up`` (``m → D``)."""


class SequentialAdapter(nn.Module):
    """Bottleneck adapter on a sublayer output ``h`` ``(..., D)`` (Houlsby et al. 2019,
    arXiv:1902.00751): ``h + scale * up(act(down(h)))`` (``residual``) or ``scale * up(act(down(h)))``.

    ``up`` starts at zero, so with ``residual`` the adapted sublayer starts as the pretrained one.
    """

    def __init__(self, down: nn.Module, up: nn.Module, act: nn.Module, scale: float, residual: bool) -> None:
        super().__init__()
        self.down, self.act, self.up = down, act, up
        self.scale, self.residual = scale, residual

    def forward(self, h: Tensor) -> Tensor:
        out = self.scale * self.up(self.act(self.down(h)))
        return h + out if self.residual else out

    def hook(self, _module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        """Forward hook on the adapted sublayer: its output goes through the adapter."""
        return self(output)


class PHMLinear(nn.Module):
    """Parameterised hypercomplex multiplication layer (Zhang et al. 2021) with Compacter's
    low-rank factors (Mahabadi et al. 2021, arXiv:2106.04647): ``(..., in) → (..., out)`` by
    ``x @ W + b``, ``W = Σ_i A_i ⊗ (s_i @ t_i)`` ``(in, out)``.

    ``rule`` ``A`` ``(n, n, n)`` is shared by all PHM layers of the model: a Parameter registered
    once on the backbone (``compacter_phm_rule``) and only referenced here, so state dicts and
    safetensors exports hold it once;
    ``left`` ``s`` ``(n, in/n, r)`` and ``right`` ``t`` ``(n, r, out/n)`` are this layer's; ``zero``
    starts ``t`` (so ``W``) at zero. Otherwise ``W`` starts with entries of variance ``~1/in``.
    """

    def __init__(self, rule: nn.Parameter, in_features: int, out_features: int, rank: int, zero: bool = False) -> None:
        super().__init__()
        n = rule.shape[0]
        self.in_features, self.out_features = in_features, out_features
        object.__setattr__(self, "phm_rule", rule)  # referenced, not registered: the backbone owns it
        self.left = nn.Parameter(torch.randn(n, in_features // n, rank) / math.sqrt(rank))
        right = torch.zeros(n, rank, out_features // n) if zero else torch.randn(n, rank, out_features // n)
        self.right = nn.Parameter(right / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @property
    def weight(self) -> Tensor:
        """``W`` ``(in, out)``: the sum of Kronecker products ``A_i ⊗ B_i``, ``B_i = s_i t_i``."""
        blocks = self.left @ self.right  # (n, in/n, out/n)
        return torch.einsum("iab,icd->acbd", self.phm_rule, blocks).reshape(self.in_features, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.t(), self.bias)


def adapted_blocks(backbone: nn.Module, strategy: str) -> list[tuple[nn.Module, int]]:
    """``(block, width D)`` of every ViT-style block (``attn`` and a Linear ``mlp``) of ``backbone``;
    refuses backbones without them in one line."""
    try:
        blocks = transformer_blocks(backbone)
    except UserInputError:
        blocks = []
    kinds = sorted({type(b).__name__ for b in blocks if not (hasattr(b, "attn") and block_linears(b, "mlp"))})
    if not blocks or kinds:
        found = f"its {', '.join(kinds)} blocks have no `attn` and `mlp`" if kinds else "it has no `blocks`"
        raise UserInputError(
            f"{strategy} needs ViT-style blocks with `attn` and `mlp` sublayers; backbone {type(backbone).__name__} "
            f"has none ({found}): use lora, ssf or bitfit for it."
        )
    return [(block, block_linears(block, "mlp")[0][1].in_features) for block in blocks]


class BottleneckAdapter(Strategy):
    """Frozen backbone plus sequential bottleneck adapters (Houlsby et al. 2019, as in the AST
    parameter-efficient transfer study of Cappellazzo et al. 2024, arXiv:2312.03694): after the
    attention and the MLP sublayer of every block (``houlsby``) or after the MLP only
    (``pfeiffer``, Pfeiffer et al. 2020, arXiv:2005.00247). Neck, decoder and head train. Not
    mergeable (the adapters are nonlinear)."""

    name = "bottleneck"
    mergeable = False

    def __init__(self, bottleneck: int = 64, placement: str = "houlsby", residual: bool = True, scale: float = 1.0,
                 activation: str = "gelu") -> None:
        """
        Args:
            bottleneck: hidden width ``m`` of each adapter.
            placement: ``houlsby`` (after attention and MLP) or ``pfeiffer`` (after the MLP).
            residual: add the adapter's input to its output (without, the adapted model does not
                start as the pretrained one).
            scale: factor on the adapter branch.
            activation: the nonlinearity between the projections: gelu, relu or silu.
        """
        if placement not in PLACEMENTS:
            raise UserInputError(f"{self.name} placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
        if activation not in ACTIVATIONS:
            raise UserInputError(f"{self.name} activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        self.bottleneck = bottleneck
        self.placement = placement
        self.residual = residual
        self.scale = scale
        self.activation = activation

    def projections(self, model: BackboneModel, widths: set[int]) -> Projections:
        """The projection pair maker for this model's blocks (of these ``widths``)."""
        return lambda dim: bottleneck_projections(dim, self.bottleneck)

    def prepare(self, model: BackboneModel) -> None:
        blocks = adapted_blocks(model.backbone, self.name)
        make = self.projections(model, {dim for _, dim in blocks})
        model.backbone.requires_grad_(False)
        for block, dim in blocks:
            for part in PLACEMENTS[self.placement]:
                adapter = SequentialAdapter(*make(dim), ACTIVATIONS[self.activation](), self.scale, self.residual)
                block.add_module(f"{part}_adapter", adapter)
                getattr(block, part).register_forward_hook(adapter.hook)


class Compacter(BottleneckAdapter):
    """Bottleneck adapters whose projections are low-rank PHM layers (Compacter, Mahabadi et al.
    2021, arXiv:2106.04647): ``W = Σ_{i=1..n} A_i ⊗ B_i``, the ``A_i`` ``(n, n)`` shared by every
    adapter of the model, ``B_i`` of rank ``phm_rank`` per layer. ``pfeiffer`` placement is
    Compacter++."""

    name = "compacter"

    def __init__(self, bottleneck: int = 64, placement: str = "houlsby", residual: bool = True, scale: float = 1.0,
                 activation: str = "gelu", phm_dim: int = 4, phm_rank: int = 1) -> None:
        """
        Args:
            bottleneck, placement, residual, scale, activation: as for :class:`BottleneckAdapter`.
            phm_dim: ``n``, the number of Kronecker products; must divide the bottleneck and the
                block width.
            phm_rank: rank of each ``B_i``.
        """
        super().__init__(bottleneck, placement, residual, scale, activation)
        if phm_dim < 1 or phm_rank < 1 or bottleneck % phm_dim:
            raise UserInputError(f"compacter phm_dim={phm_dim} must divide bottleneck={bottleneck} (phm_rank >= 1)")
        self.phm_dim = phm_dim
        self.phm_rank = phm_rank

    def prepare(self, model: BackboneModel) -> None:
        super().prepare(model)
        model.backbone.compacter_phm_rule.requires_grad_(True)  # registered on the backbone, which was frozen

    def projections(self, model: BackboneModel, widths: set[int]) -> Projections:
        n, rank = self.phm_dim, self.phm_rank
        if bad := sorted(d for d in widths if d % n):
            raise UserInputError(f"compacter phm_dim={n} must divide the block width of {type(model.backbone).__name__}"
                                 f" ({', '.join(map(str, bad))})")
        rule = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))  # A_i, shared by all adapters
        model.backbone.register_parameter("compacter_phm_rule", rule)

        def make(dim: int) -> tuple[nn.Module, nn.Module]:
            return (PHMLinear(rule, dim, self.bottleneck, rank),
                    PHMLinear(rule, self.bottleneck, dim, rank, zero=True))

        return make
