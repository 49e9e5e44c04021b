"""Low-rank updates peft does not have: Hydra (parallel and sequential branches) and SVFit
(trained singular values). Each wraps the targeted Linear layers of the backbone and folds back
into a plain Linear for the merged export."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import Strategy
from workbench.strategies.blocks import fold_wrappers, replace_module

ATTENTION = ["attn.qkv", "attn.proj"]


class Hydra(nn.Module):
    """``W x + b`` plus a parallel branch ``s_p B_p A_p x`` (LoRA) and a sequential one
    ``s_s B_s A_s (W x + b)`` on the pretrained output (Kim et al. 2023, arXiv:2309.06922), for
    ``x`` ``(..., in)``. ``B_p`` and ``B_s`` start at zero: the layer starts as the pretrained one."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        out, inp = base_layer.weight.shape
        self.scaling = alpha / rank
        self.parallel_a, self.parallel_b = nn.Linear(inp, rank, bias=False), nn.Linear(rank, out, bias=False)
        self.sequential_a, self.sequential_b = nn.Linear(out, rank, bias=False), nn.Linear(rank, out, bias=False)
        for up in (self.parallel_b, self.sequential_b):
            nn.init.zeros_(up.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        return y + self.scaling * (self.parallel_b(self.parallel_a(x)) + self.sequential_b(self.sequential_a(y)))

    @torch.no_grad()
    def merged_layer(self) -> nn.Linear:
        """``W' = W + s (B_p A_p + B_s A_s W)``, ``b' = b + s B_s A_s b``."""
        layer = copy.deepcopy(self.base_layer)
        sequential = self.scaling * self.sequential_b.weight @ self.sequential_a.weight  # (out, out)
        layer.weight.add_(self.scaling * self.parallel_b.weight @ self.parallel_a.weight + sequential @ layer.weight)
        if layer.bias is not None:
            layer.bias.add_(sequential @ layer.bias)
        return layer


class SingularValues(nn.Module):
    """``(W + U_r diag(Δσ) V_rᵀ) x + b``: the top-``rank`` singular vectors of the pretrained
    ``W`` (buffers) and trainable changes ``Δσ`` of their singular values, starting at zero
    (SVFit, Sun et al. 2024, arXiv:2409.05926)."""

    def __init__(self, base_layer: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        u, _, vh = torch.linalg.svd(base_layer.weight.detach().float(), full_matrices=False)
        self.register_buffer("left", u[:, :rank].to(base_layer.weight.dtype))
        self.register_buffer("right", vh[:rank].to(base_layer.weight.dtype))
        self.delta = nn.Parameter(torch.zeros(min(rank, len(vh)), dtype=base_layer.weight.dtype))

    def update(self) -> Tensor:
        """``U_r diag(Δσ) V_rᵀ`` ``(out, in)``."""
        return (self.left * self.delta) @ self.right

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + (x @ self.right.T * self.delta) @ self.left.T

    @torch.no_grad()
    def merged_layer(self) -> nn.Linear:
        layer = copy.deepcopy(self.base_layer)
        layer.weight.add_(self.update())
        return layer


class WrappedLinears(Strategy):
    """Freeze the backbone and wrap each Linear whose name ends with one of ``target_modules``
    (default the attention's ``attn.qkv`` and ``attn.proj``) in :meth:`wrap`; merged export
    folds every wrapper back into a plain Linear."""

    target_modules: list[str]

    def wrap(self, layer: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def prepare(self, model: BackboneModel) -> None:
        backbone = model.backbone
        targets = [(n, m) for n, m in backbone.named_modules()
                   if isinstance(m, nn.Linear) and n.endswith(tuple(self.target_modules))]
        if not targets:
            linears = sorted(n for n, m in backbone.named_modules() if isinstance(m, nn.Linear))
            raise UserInputError(f"{self.name} target_modules {self.target_modules} match no Linear layer of "
                                 f"{type(backbone).__name__}; it has: {', '.join(linears) or 'none (use ssf or bitfit)'}")
        backbone.requires_grad_(False)
        for name, layer in targets:
            replace_module(backbone, name, self.wrap(layer))

    def merged(self, model: BackboneModel) -> BackboneModel:
        return fold_wrappers(model, (Hydra, SingularValues))


class HydraStrategy(WrappedLinears):
    """Hydra: parallel (LoRA) and sequential low-rank branches on every targeted Linear (see
    :class:`Hydra`): ``rank · (in + out) + 2 · rank · out`` trainable per layer. Mergeable."""

    name = "hydra"

    def __init__(self, rank: int = 8, alpha: float = 16, target_modules: list[str] | None = None) -> None:
        """
        Args:
            rank: rank of each branch.
            alpha: scaling numerator of both branches (``alpha / rank``).
            target_modules: Linear layers to adapt, by name suffix (default the attention's).
        """
        self.rank, self.alpha, self.target_modules = rank, alpha, list(target_modules or ATTENTION)

    def wrap(self, layer: nn.Linear) -> nn.Module:
        return Hydra(layer, self.rank, self.alpha)


class SVFit(WrappedLinears):
    """SVFit: only the top-``rank`` singular values of every targeted Linear train (see
    :class:`SingularValues`): ``rank`` parameters per layer. Mergeable."""

    name = "svfit"

    def __init__(self, rank: int = 16, target_modules: list[str] | None = None) -> None:
        """
        Args:
            rank: leading singular values trained per layer.
            target_modules: Linear layers to adapt, by name suffix (default the attention's).
        """
        self.rank, self.target_modules = rank, list(target_modules or ATTENTION)

    def wrap(self, layer: nn.Linear) -> nn.Module:
        return SingularValues(layer, self.rank)
