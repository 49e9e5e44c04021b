"""Sparse updates of frozen weights: S2FT (structured: selected heads and MLP channels) and SPT
(sensitivity-aware: the entries whose loss gradient is largest, low-rank where a matrix has many).
Both add trainable deltas beside the frozen weights and fold back into plain layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.base import InitBatches
from workbench.strategies.blocks import transformer_blocks
from workbench.strategies.deltas import WeightDelta, WrappedLayers

BLOCK_LINEARS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


class ColumnUpdate(WeightDelta):
    """A Linear ``(out, in)`` whose input columns ``columns`` ``(k,)`` get a trainable dense
    update ``delta`` ``(out, k)``, starting at zero: ``y = W x + b + delta x[columns]``."""

    def __init__(self, base_layer: nn.Linear, columns: Tensor) -> None:
        super().__init__(base_layer)
        self.register_buffer("columns", columns)
        self.delta = nn.Parameter(base_layer.weight.new_zeros(base_layer.out_features, len(columns)))

    def update(self) -> Tensor:
        return torch.zeros_like(self.base_layer.weight).index_copy(1, self.columns, self.delta)

    def forward(self, x: Tensor) -> Tensor:  # the k selected inputs only, without forming the update
        return self.base_layer(x) + x.index_select(-1, self.columns) @ self.delta.T


class S2FT(WrappedLayers):
    """S2FT, structured sparse fine-tuning (Yang et al. 2024, arXiv:2412.06289): in every block a
    seeded random choice of ``heads`` attention heads and a ``channel_fraction`` of the MLP's hidden
    channels train. Their weights are dense sub-blocks: the input columns of the attention output
    projection (``attn.proj``, the chosen heads' ``head_dim`` columns each) and of the MLP's second
    layer (``mlp.fc2``, the chosen channels), so each block trains
    ``D · (heads · head_dim + round(channel_fraction · hidden))`` weights (timm ViT and Swin
    blocks). Mergeable: the sub-blocks fold into the base weights."""

    name = "s2ft"

    def __init__(self, heads: int = 1, channel_fraction: float = 0.05, seed: int = 0) -> None:
        """
        Args:
            heads: attention heads per block whose output-projection columns train (0: none).
            channel_fraction: fraction of each block's MLP hidden channels that train (0: none).
            seed: seed of the choice (the same seed picks the same heads and channels).
        """
        if heads < 0 or not 0.0 <= channel_fraction <= 1.0 or (heads == 0 and channel_fraction == 0):
            raise UserInputError(f"s2ft heads ({heads}) must be ≥ 0 and channel_fraction ({channel_fraction}) in "
                                 "[0, 1], not both zero")
        self.heads, self.channel_fraction, self.seed = heads, channel_fraction, seed

    def prepare(self, model: BackboneModel) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        chosen: list[tuple[nn.Module, str, Tensor]] = []
        for block in transformer_blocks(model.backbone):
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            proj, fc2, num_heads = getattr(attn, "proj", None), getattr(mlp, "fc2", None), getattr(attn, "num_heads", 0)
            if not isinstance(proj, nn.Linear) or not isinstance(fc2, nn.Linear) or not num_heads:
                raise UserInputError(f"s2ft needs timm-style blocks (attn.proj with num_heads, mlp.fc2); "
                                     f"{type(block).__name__} has none: use lora, hft or bitfit for this backbone")
            if self.heads > num_heads:
                raise UserInputError(f"s2ft heads {self.heads} exceeds the {num_heads} attention heads per block")
            head_dim = proj.in_features // num_heads
            heads = torch.randperm(num_heads, generator=generator)[: self.heads]
            columns = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten().sort().values
            channels = torch.randperm(fc2.in_features, generator=generator)[: round(self.channel_fraction * fc2.in_features)]
            chosen += [(block.attn, "proj", columns), (block.mlp, "fc2", channels.sort().values)]
        model.backbone.requires_grad_(False)
        for parent, attr, columns in chosen:
            if len(columns):
                setattr(parent, attr, ColumnUpdate(getattr(parent, attr), columns))


class SensitiveUpdate(WeightDelta):
    """A frozen layer's weight ``W`` ``(out, …)`` plus SPT's update: trainable ``values`` ``(k,)`` at
    the flat indices ``index`` ``(k,)`` of ``W`` (unstructured), and/or a low-rank ``up @ down``
    ``(out, r) @ (r, W[0].numel())`` (structured; ``up`` starts at zero). All start empty; SPT's
    :meth:`SPT.initialize` sizes them. A checkpoint's sizes replace them on load, so a model built
    from the config (predict, test, merge) takes the fine-tuned update without re-running SPT."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        self.register_buffer("index", torch.zeros(0, dtype=torch.long, device=weight.device))
        self.values = nn.Parameter(weight.new_zeros(0))
        self.up = nn.Parameter(weight.new_zeros(len(weight), 0))
        self.down = nn.Parameter(weight.new_zeros(0, weight[0].numel()))

    def update(self) -> Tensor:
        weight = self.base_layer.weight
        sparse = torch.zeros_like(weight).flatten().index_put((self.index,), self.values)
        return sparse.view_as(weight) + (self.up @ self.down).view_as(weight)

    def resize(self, index: Tensor, rank: int) -> None:
        """Train the entries at ``index`` (zeros) and a rank-``rank`` update (``up`` zeros, ``down``
        Kaiming-uniform as LoRA's A)."""
        weight = self.base_layer.weight
        self.index = index.to(weight.device)
        self.values = nn.Parameter(weight.new_zeros(len(index)))
        self.up = nn.Parameter(weight.new_zeros(len(weight), rank))
        self.down = nn.Parameter(weight.new_empty(rank, weight[0].numel()))
        nn.init.kaiming_uniform_(self.down, a=5**0.5)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        index, up = state_dict.get(prefix + "index"), state_dict.get(prefix + "up")
        if index is not None and up is not None and (index.shape != self.index.shape or up.shape != self.up.shape):
            self.resize(index, up.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args)


class SPT(WrappedLayers):
    """SPT, sensitivity-aware visual parameter-efficient fine-tuning (He et al. 2023,
    arXiv:2303.08566). From ``batches`` labelled training batches, each targeted weight entry's
    sensitivity is its summed squared loss gradient (the first-order estimate of the loss drop
    one gradient step on it gives); the ``budget`` most sensitive entries of all targeted weights
    (a fraction of them) train. A matrix holding more chosen entries than a rank-``rank`` update
    of it costs gets that low-rank update instead (SPT's structured tuning; our threshold), the
    others train their chosen entries alone (unstructured). Applies to Linear layers and to
    convolutions (``target_modules`` by name suffix, e.g. a U-Net's ``_project_conv``).
    Mergeable. The trainable count is known after :meth:`initialize` (printed by ``fit``)."""

    name = "spt"
    layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, budget: float = 0.01, rank: int = 8, batches: int = 4,
                 target_modules: list[str] | None = None) -> None:
        """
        Args:
            budget: fraction of the targeted weights' entries that train (0 < budget ≤ 1).
            rank: rank of the structured update of matrices with many sensitive entries (0: never).
            batches: training batches the sensitivities are summed over.
            target_modules: layers by name suffix (default the blocks' attention and MLP Linears).
        """
        if not 0.0 < budget <= 1.0 or rank < 0 or batches < 1:
            raise UserInputError(f"spt budget ({budget}) must be in (0, 1], rank ({rank}) ≥ 0, batches ({batches}) ≥ 1")
        self.budget, self.rank, self.batches = budget, rank, batches
        self.target_modules = list(target_modules or BLOCK_LINEARS)
        self.init_batches = batches

    def wrap(self, name: str, layer: nn.Module) -> nn.Module:
        return SensitiveUpdate(layer)

    def initialize(self, model: BackboneModel, data: InitBatches) -> None:
        layers = [m for m in model.backbone.modules() if isinstance(m, SensitiveUpdate)]
        sensitivity = self.sensitivities(layers, data)
        flat = torch.cat([s.flatten() for s in sensitivity])
        threshold = flat.topk(max(1, round(self.budget * len(flat)))).values[-1]
        for layer, scores in zip(layers, sensitivity):
            index = (scores.flatten() >= threshold).nonzero().flatten()
            weight = layer.base_layer.weight
            structured = self.rank > 0 and len(index) > self.rank * (len(weight) + weight[0].numel())
            layer.resize(index[:0] if structured else index, self.rank if structured else 0)

    @staticmethod
    def sensitivities(layers: list[SensitiveUpdate], data: InitBatches) -> list[Tensor]:
        """Per layer, the squared gradients of the loss w.r.t. its base weight, summed over ``data``."""
        weights = [layer.base_layer.weight for layer in layers]
        totals = [torch.zeros_like(w) for w in weights]
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            try:
                for i in range(len(data)):
                    for total, grad in zip(totals, torch.autograd.grad(data.loss(i), weights, allow_unused=True)):
                        if grad is not None:
                            total += grad.square()
            finally:
                for w in weights:
                    w.requires_grad_(False)
        return totals
