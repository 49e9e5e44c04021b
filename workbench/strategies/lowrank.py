"""Low-rank updates peft does not have: Hydra (parallel and sequential branches), SVFit
(trained singular values), LoLDU (a trained diagonal between frozen LDU factors) and FLoRA (a
Tucker-form update of N-d weights: Linears and convs). Each wraps the targeted layers of the
backbone and folds back into the plain layer for the merged export."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.strategies.deltas import ATTENTION, WeightDelta, WrappedLayers


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


class SingularValues(WeightDelta):
    """``(W + U_r diag(Δσ) V_rᵀ) x + b``: the top-``rank`` singular vectors of the pretrained
    ``W`` (buffers) and trainable changes ``Δσ`` of their singular values, starting at zero
    (SVFit, Sun et al. 2024, arXiv:2409.05926)."""

    def __init__(self, base_layer: nn.Linear, rank: int) -> None:
        super().__init__(base_layer)
        u, _, vh = torch.linalg.svd(base_layer.weight.detach().float(), full_matrices=False)
        self.register_buffer("left", u[:, :rank].to(base_layer.weight.dtype))
        self.register_buffer("right", vh[:rank].to(base_layer.weight.dtype))
        self.delta = nn.Parameter(torch.zeros(min(rank, len(vh)), dtype=base_layer.weight.dtype))

    def update(self) -> Tensor:
        """``U_r diag(Δσ) V_rᵀ`` ``(out, in)``."""
        return (self.left * self.delta) @ self.right

    def forward(self, x: Tensor) -> Tensor:  # the rank-r path, without forming the (out, in) update
        return self.base_layer(x) + (x @ self.right.T * self.delta) @ self.left.T


class HydraStrategy(WrappedLayers):
    """Hydra: parallel (LoRA) and sequential low-rank branches on every targeted Linear (see
    :class:`Hydra`): ``rank · (in + out) + 2 · rank · out`` trainable per layer. Mergeable."""

    name = "hydra"
    wrapper_types = (Hydra,)

    def __init__(self, rank: int = 8, alpha: float = 16, target_modules: list[str] | None = None) -> None:
        """
        Args:
            rank: rank of each branch.
            alpha: scaling numerator of both branches (``alpha / rank``).
            target_modules: Linear layers to adapt, by name suffix (default the attention's).
        """
        self.rank, self.alpha, self.target_modules = rank, alpha, list(target_modules or ATTENTION)

    def wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        return Hydra(layer, self.rank, self.alpha)


class SVFit(WrappedLayers):
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

    def wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        return SingularValues(layer, self.rank)


# --- LoLDU and FLoRA -------------------------------------------------------------------------------

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def ldu(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``P, L, d, U`` with ``matrix = P L diag(d) U``: LU with partial pivoting
    (``torch.linalg.lu``), the pivots ``d`` taken out of U so that U has a unit diagonal.
    Shapes for ``matrix`` ``(m, n)``, ``k = min(m, n)``: P ``(m, m)``, L ``(m, k)`` (unit lower),
    d ``(k,)``, U ``(k, n)`` (unit upper). A zero pivot (a singular leading block) leaves its U row
    as the LU gives it (no division by zero); the reconstruction then misses that row's part."""
    p, lower, upper = torch.linalg.lu(matrix)
    pivots = torch.diagonal(upper)
    safe = torch.where(pivots == 0, torch.ones_like(pivots), pivots)
    return p, lower, pivots, upper / safe[:, None]


class LowerDiagUpper(WeightDelta):
    """LoLDU (Shi et al. 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition",
    arXiv:2410.13618) on a Linear ``(out, in)`` or a 1×1 conv ``(out, in/groups, 1[, 1, 1])``
    (seen as the matrix ``(out, in/groups)``).

    From the LDU decomposition ``W = P L diag(d) U`` of the pretrained weight (:func:`ldu`) the
    leading ``r = min(rank, out, in)`` components are kept frozen: ``lower = P L[:, :r]`` ``(out, r)``
    (the permutation applied once) and ``upper = U[:r]`` ``(r, in)``. Trained, as in the paper and
    its official code: the diagonal ``z`` ``(r,)``, initialised to the pivots ``d[:r]``, and a scalar
    scale ``σ`` (initialised to 1; frozen with ``train_scale=False``). The paper's layer is the
    residual ``W − σ₀ P L_r diag(z₀) U_r`` plus ``σ P L_r diag(z) U_r``; here ``W`` stays untouched and
    the update is the difference

        ``ΔW = P L_r diag(σ z − σ₀ z₀) U_r``   (``σ₀ z₀`` a frozen buffer ``initial``),

    which is exactly zero at the start: the layer starts as the pretrained one. Note that Adam moves
    every ``z_i`` by about the learning rate whatever ``|d_i|``, i.e. the ``i``-th component by
    ``~lr / |d_i|`` of itself: keep the learning rate small (≤ 1e-3) on layers with small pivots."""

    def __init__(self, base_layer: nn.Module, rank: int, train_scale: bool = True) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight.detach()
        p, lower, pivots, upper = ldu(weight.reshape(len(weight), -1).float())
        r = min(rank, len(pivots))
        dtype = weight.dtype
        self.register_buffer("lower", (p @ lower[:, :r]).to(dtype))
        self.register_buffer("upper", upper[:r].to(dtype))
        self.diagonal = nn.Parameter(pivots[:r].to(dtype))
        self.scale = nn.Parameter(torch.ones((), dtype=dtype), requires_grad=train_scale)
        self.register_buffer("initial", (self.scale * self.diagonal).detach().clone())

    def coefficients(self) -> Tensor:
        """``σ z − σ₀ z₀`` ``(r,)``: zero at the start."""
        return self.scale * self.diagonal - self.initial

    def update(self) -> Tensor:
        """``P L_r diag(σ z − σ₀ z₀) U_r``, shaped like the base weight."""
        return ((self.lower * self.coefficients()) @ self.upper).reshape(self.base_layer.weight.shape)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.base_layer, nn.Linear):  # the rank-r path, without forming the (out, in) update
            return self.base_layer(x) + (x @ self.upper.T * self.coefficients()) @ self.lower.T
        return super().forward(x)


class LoLDU(WrappedLayers):
    """LoLDU: on every targeted Linear or 1×1 conv only a diagonal of ``r`` values (and one scalar
    scale) trains between frozen LDU factors of the pretrained weight (see :class:`LowerDiagUpper`):
    ``min(rank, out, in/groups) + 1`` parameters per layer (without the ``+ 1`` when
    ``train_scale=False``).
    Mergeable; other conv kernels are refused (use ``flora`` for those)."""

    name = "loldu"
    layer_types = (nn.Linear, *CONVS)
    wrapper_types = (LowerDiagUpper,)

    def __init__(self, rank: int = 16, target_modules: list[str] | None = None, train_scale: bool = True) -> None:
        """
        Args:
            rank: leading LDU components per layer (the trained diagonal's length).
            target_modules: Linear layers or 1×1 convs to adapt, by name suffix (default the attention's).
            train_scale: also train the paper's scalar scale ``σ`` (one parameter per layer).
        """
        self.rank, self.target_modules, self.train_scale = rank, list(target_modules or ATTENTION), train_scale

    def targets(self, backbone: nn.Module) -> list[tuple[str, nn.Module]]:
        found = super().targets(backbone)
        wide = [(n, m) for n, m in found if isinstance(m, CONVS) and any(k != 1 for k in m.kernel_size)]
        if wide:
            name, conv = wide[0]
            more = f" (and {len(wide) - 1} more)" if len(wide) > 1 else ""
            raise UserInputError(
                f"loldu adapts Linear layers and 1×1 convs only, but {name}{more} is a {type(conv).__name__} with a "
                f"{'×'.join(map(str, conv.kernel_size))} kernel: target pointwise convs or use flora")
        return found

    def wrap(self, name: str, layer: nn.Module) -> nn.Module:
        return LowerDiagUpper(layer, self.rank, self.train_scale)


def tucker(core: Tensor, factors: list[Tensor]) -> Tensor:
    """``G ×_1 A_1 ×_2 A_2 … ×_N A_N``: core ``(r_1, …, r_N)``, factors ``A_n`` ``(d_n, r_n)`` →
    ``(d_1, …, d_N)``, i.e. ``Σ G[i_1…i_N] A_1[:, i_1] ∘ … ∘ A_N[:, i_N]``. The mode products
    commute; they run from the smallest ``d_n`` up (kernel and depthwise modes first), so only the
    last one builds a tensor of the full size (returned as a possibly strided view)."""
    out = core
    for n in sorted(range(len(factors)), key=lambda n: factors[n].shape[0]):
        out = torch.movedim(torch.tensordot(out, factors[n], dims=([n], [1])), -1, n)
    return out


class TuckerDelta(WeightDelta):
    """FLoRA (Si et al. 2024, "FLoRA: Low-Rank Core Space for N-dimension", arXiv:2405.14739) on a
    weight of any order ``N``: Linear ``(out, in)``, Conv1d/2d/3d ``(out, in/groups, k_1[, k_2, k_3])``
    (depthwise: ``in/groups = 1``):

        ``ΔW = s · G ×_1 A_1 ×_2 A_2 … ×_N A_N``,  ``s = alpha / rank``,

    with a trained core ``G`` ``(r_1, …, r_N)`` and trained factors ``A_n`` ``(d_n, r_n)``,
    ``r_n = min(rank, d_n)`` for every mode: the channel modes get rank ``rank``, the kernel modes
    keep their full size (a kernel mode is capped at ``rank`` only when wider than it). As in the
    official code, ``G`` starts at zero (``ΔW = 0``: the layer starts as the pretrained one) and the
    factors are Kaiming-normal (``a = √3``, i.e. std ``1/√(2 r_n)``)."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        ranks = [min(rank, d) for d in weight.shape]
        self.scaling = alpha / rank
        self.core = nn.Parameter(torch.zeros(ranks, dtype=weight.dtype, device=weight.device))
        self.factors = nn.ParameterList()
        for d, r in zip(weight.shape, ranks):
            factor = torch.empty(d, r, dtype=weight.dtype, device=weight.device)
            self.factors.append(nn.Parameter(nn.init.kaiming_normal_(factor, a=math.sqrt(3))))

    def update(self) -> Tensor:
        """``s · G ×_1 A_1 … ×_N A_N``, shaped like the base weight (``s`` applied to the small core)."""
        return tucker(self.scaling * self.core, list(self.factors))


class FLoRA(WrappedLayers):
    """FLoRA: a Tucker-form update (small trained core and one trained factor per mode) of every
    targeted Linear or conv (see :class:`TuckerDelta`), keeping the kernel's spatial structure that
    LoRA's reshaping to a matrix loses: ``Π_n r_n + Σ_n d_n r_n`` parameters per layer of weight
    shape ``(d_1, …, d_N)``, ``r_n = min(rank, d_n)`` — a Linear ``rank² + rank · (in + out)``
    (``in, out ≥ rank``), a depthwise ``k×k`` conv of ``C`` channels ``r_C · k² + C r_C + 1 + 2 k²``
    (``r_C = min(rank, C)``, ``k ≤ rank``).
    Mergeable. For the csmask U-Net: ``target_modules: [_expand_conv, _project_conv, _depthwise_conv]``."""

    name = "flora"
    layer_types = (nn.Linear, *CONVS)
    wrapper_types = (TuckerDelta,)

    def __init__(self, rank: int = 8, alpha: float = 16, target_modules: list[str] | None = None) -> None:
        """
        Args:
            rank: rank of the channel modes (kernel modes keep their size, up to ``rank``).
            alpha: scaling numerator (``alpha / rank``).
            target_modules: Linear / conv layers to adapt, by name suffix (default the attention's).
        """
        self.rank, self.alpha, self.target_modules = rank, alpha, list(target_modules or ATTENTION)

    def wrap(self, name: str, layer: nn.Module) -> nn.Module:
        return TuckerDelta(layer, self.rank, self.alpha)
