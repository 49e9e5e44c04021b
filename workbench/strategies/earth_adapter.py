"""Earth-Adapter (Hu et al. 2025, "Earth-Adapter: Bridge the Geospatial Domain Gaps with Mixture
of Frequency Adaptation", arXiv:2504.06220): a mixture of frequency adapters after the blocks of a
frozen backbone whose tokens lie on a spatial grid.

Each adapted block's output is split by a 2-D DFT over its spatial grid into a low-frequency and a
high-frequency part; three bottleneck experts (spatial on the whole output, one per frequency part)
are mixed per token by a softmax router and added to the output.

The grid of a block comes from the tensors at run time, so any input size works:

- Swin blocks (timm ``SwinTransformerBlock`` / ``SwinTransformerV2Block``: SatVision-TOA, timm
  ``swin*``) output channels-last maps ``(B, H, W, C)``: the grid is the output's shape.
- ViT blocks (Prithvi, AST, timm ``vit_*``) output tokens ``(B, prefix + T*h*w, D)``: a forward
  hook on the Conv of the ViT's ``patch_embed`` records the grid ``([T,] h, w)`` of every input
  (its output ``(B, D, [T,] h, w)``), and the ``num_prefix_tokens`` leading tokens (cls,
  distillation, registers) pass through unchanged. Multi-frame inputs are split frame by frame.

Backbones without such a grid (the point transformer, PatchTST, ConvNeXt) are refused.
"""

from __future__ import annotations

import math

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.swin_transformer_v2 import SwinTransformerV2Block
from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.adapters import bottleneck_projections
from workbench.strategies.base import Strategy
from workbench.strategies.bottleneck import SequentialAdapter, adapted_blocks

SWIN_BLOCKS = (SwinTransformerBlock, SwinTransformerV2Block)
"""Blocks whose output is a channels-last map ``(B, H, W, C)``."""


def frequency_split(x: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """Channels-last maps ``x`` ``(..., H, W, D)`` → ``(low, high)``, both ``(..., H, W, D)``,
    ``low + high = x``.

    ``low`` keeps the spatial frequencies ``(f_y, f_x)`` (cycles per token) inside the centred disk
    ``|f| <= cutoff * 0.5`` (``cutoff`` a fraction of the Nyquist frequency 0.5; the constant is
    always kept), ``high`` is the rest. The DFT runs in at least float32.
    """
    h, w = x.shape[-3], x.shape[-2]
    spectrum = torch.fft.rfft2(x.to(torch.promote_types(x.dtype, torch.float32)), dim=(-3, -2))
    fy, fx = torch.fft.fftfreq(h, device=x.device), torch.fft.rfftfreq(w, device=x.device)
    inside = torch.hypot(fy[:, None], fx[None, :]) <= 0.5 * cutoff  # (H, W // 2 + 1)
    low = torch.fft.irfft2(spectrum * inside.unsqueeze(-1), s=(h, w), dim=(-3, -2)).to(x.dtype)
    return low, x - low


class PatchGrid:
    """The patch grids of a ViT's inputs, recorded by a forward hook on its patch embedding's Conv
    (output ``(B, D, [T,] h, w)``), keyed by token count ``T*h*w``: gradient checkpointing
    recomputes blocks after later forwards, which may have had other sizes."""

    def __init__(self, backbone: str, prefix: int) -> None:
        self.backbone, self.prefix = backbone, prefix
        self.shapes: dict[int, tuple[int, ...]] = {}

    def record(self, _module: nn.Module, _args: tuple, output: Tensor) -> None:
        """Forward hook on the patch embedding's Conv."""
        grid = tuple(output.shape[2:])
        self.shapes[math.prod(grid)] = grid

    def apply(self, tokens: Tensor, adapter: nn.Module) -> Tensor:
        """``tokens`` ``(B, prefix + T*h*w, D)``: the patch tokens go through ``adapter`` as a map
        ``(B, [T,] h, w, D)``, the prefix tokens pass unchanged."""
        b, n, d = tokens.shape
        grid = self.shapes.get(n - self.prefix)
        if grid is None:
            raise UserInputError(
                f"earth_adapter: {n - self.prefix} patch tokens of {self.backbone} do not fill a patch grid it "
                f"embedded ({', '.join(map(str, self.shapes.values())) or 'none'}); dropped or masked tokens (MAE) "
                "have no spatial grid: use bottleneck or lora there."
            )
        patches = adapter(tokens[:, self.prefix:].reshape(b, *grid, d)).reshape(b, -1, d)
        return torch.cat([tokens[:, : self.prefix], patches], dim=1)


class FrequencyMixtureAdapter(nn.Module):
    """Earth-Adapter's mixture of frequency adapters on a block output ``x`` ``(..., H, W, D)``:

    ``x + scale * Σ_k w_k · expert_k(c_k)`` with ``c = (x, low, high)`` from
    :func:`frequency_split`, experts ``up(GELU(down(c)))`` (``D → m → D``, ``up`` zero-initialised,
    so the adapted block starts as the pretrained one) and ``w = softmax(router(x))`` ``(..., 3)``
    per token. ``patch_grid`` set: the hooked block outputs ViT tokens laid out by it.
    """

    def __init__(self, dim: int, bottleneck: int, cutoff: float, scale: float,
                 patch_grid: PatchGrid | None = None) -> None:
        super().__init__()
        self.spatial_expert, self.low_expert, self.high_expert = (
            SequentialAdapter(*bottleneck_projections(dim, bottleneck), nn.GELU(), 1.0, residual=False)
            for _ in range(3)
        )
        self.router = nn.Linear(dim, 3)
        self.cutoff, self.scale = cutoff, scale
        self.patch_grid = patch_grid

    def forward(self, x: Tensor) -> Tensor:
        low, high = frequency_split(x, self.cutoff)
        weights = self.router(x).softmax(-1)
        experts = (self.spatial_expert(x), self.low_expert(low), self.high_expert(high))
        return x + self.scale * sum(weights[..., k, None] * out for k, out in enumerate(experts))

    def hook(self, _module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        """Forward hook on the adapted block: its output goes through the adapter."""
        return self(output) if self.patch_grid is None else self.patch_grid.apply(output, self)


def patch_grids(backbone: nn.Module) -> dict[nn.Module, tuple[nn.Module, PatchGrid]]:
    """Block → (patch-embedding Conv, :class:`PatchGrid`) for the ``blocks`` of every ViT in
    ``backbone`` with a Conv ``patch_embed.proj`` (its ``num_prefix_tokens`` leading tokens, 0 if
    it does not say, are not on the grid)."""
    grids: dict[nn.Module, tuple[nn.Module, PatchGrid]] = {}
    for vit in backbone.modules():
        proj, blocks = getattr(getattr(vit, "patch_embed", None), "proj", None), getattr(vit, "blocks", None)
        if isinstance(proj, (nn.Conv2d, nn.Conv3d)) and isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            grid = PatchGrid(type(backbone).__name__, getattr(vit, "num_prefix_tokens", 0))
            grids.update(dict.fromkeys(blocks, (proj, grid)))
    return grids


class EarthAdapter(Strategy):
    """Frozen backbone plus an Earth-Adapter (:class:`FrequencyMixtureAdapter`) after every
    ``every``-th block (``block.earth_adapter``, a forward hook on the block, so the pretrained
    weights keep their keys); ViT backbones with a patch grid and Swin backbones (see the module
    docstring). Neck, decoder and head train. Not mergeable (the adapters are nonlinear)."""

    name = "earth_adapter"
    mergeable = False

    def __init__(self, bottleneck: int = 16, cutoff: float = 0.25, scale: float = 1.0, every: int = 1) -> None:
        """
        Args:
            bottleneck: hidden width ``m`` of each of the three experts.
            cutoff: radius of the low-frequency disk, a fraction of the Nyquist frequency (0, 1].
            scale: factor on the mixed expert outputs.
            every: adapt blocks ``every - 1``, ``2 every - 1``, ... of the backbone's blocks in
                forward order (1: all).
        """
        if bottleneck < 1 or every < 1:
            raise UserInputError(f"{self.name} bottleneck={bottleneck} and every={every} must be >= 1")
        if not 0 < cutoff <= 1:
            raise UserInputError(f"{self.name} cutoff={cutoff} must lie in (0, 1] (a fraction of Nyquist)")
        self.bottleneck = bottleneck
        self.cutoff = cutoff
        self.scale = scale
        self.every = every

    def prepare(self, model: BackboneModel) -> None:
        backbone = model.backbone
        blocks = adapted_blocks(backbone, self.name)
        grids = patch_grids(backbone)
        off_grid = sorted({type(b).__name__ for b, _ in blocks if not isinstance(b, SWIN_BLOCKS) and b not in grids})
        if off_grid:
            raise UserInputError(
                f"{self.name} splits block outputs into spatial frequencies, but the {', '.join(off_grid)} blocks of "
                f"backbone {type(backbone).__name__} are not on a 2-D patch grid (a ViT with a Conv patch_embed, or "
                "Swin): use lora or bottleneck for it."
            )
        chosen = blocks[self.every - 1:: self.every]
        if not chosen:
            raise UserInputError(f"{self.name} every={self.every} adapts none of the {len(blocks)} blocks of "
                                 f"{type(backbone).__name__}: lower it")
        backbone.requires_grad_(False)
        recording: set[PatchGrid] = set()
        for block, dim in chosen:
            proj, grid = grids.get(block, (None, None))
            if grid is not None and grid not in recording:
                proj.register_forward_hook(grid.record)
                recording.add(grid)
            adapter = FrequencyMixtureAdapter(dim, self.bottleneck, self.cutoff, self.scale, grid)
            block.add_module("earth_adapter", adapter)
            block.register_forward_hook(adapter.hook)
