"""AdaptFormer: a bottleneck adapter in parallel with every block's MLP of a frozen backbone."""

from __future__ import annotations

from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import Strategy
from workbench.strategies.blocks import block_linears, transformer_blocks


def bottleneck_projections(dim: int, bottleneck: int) -> tuple[nn.Linear, nn.Linear]:
    """The two Linears of a bottleneck adapter: ``down`` ``D → m`` (default init) and ``up``
    ``m → D``, all zeros, so that the adapter branch starts as zero."""
    down, up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return down, up


class ParallelAdapter(nn.Module):
    """``mlp(x) + scale * up(dropout(relu(down(x))))``; ``up`` starts at zero, so the adapted
    block initially computes exactly what the pretrained block did."""

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter_down, self.adapter_up = bottleneck_projections(dim, bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x) + self.scale * self.adapter_up(self.dropout(self.act(self.adapter_down(x))))


class AdaptFormer(Strategy):
    """Frozen backbone plus a parallel bottleneck adapter beside each block's MLP."""

    name = "adaptformer"
    mergeable = False

    def __init__(self, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.0) -> None:
        """
        Args:
            bottleneck: hidden width of each adapter.
            scale: factor on the adapter branch.
            dropout: dropout inside the adapter.
        """
        self.bottleneck = bottleneck
        self.scale = scale
        self.dropout = dropout

    def prepare(self, model: BackboneModel) -> None:
        model.backbone.requires_grad_(False)
        for block in transformer_blocks(model.backbone):
            linears = block_linears(block, "mlp")
            if not linears:
                raise UserInputError(
                    f"adaptformer needs blocks with a Linear `mlp`; {type(block).__name__} has none: use lora, ssf "
                    "or bitfit for this backbone."
                )
            dim = linears[0][1].in_features
            block.mlp = ParallelAdapter(block.mlp, dim, self.bottleneck, self.scale, self.dropout)
