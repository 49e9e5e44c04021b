"""Point-PEFT (Tang et al., AAAI 2024, arXiv:2310.03059) for the point transformer: a Point-prior
Prompt and Geometry-aware Adapters on a frozen Point-BERT/MAE-style encoder.

Layout (the pretrained state-dict keys stay as they are, e.g. ``blocks.0.attn.qkv.weight``):

* ``point_peft.prompt.prompts`` ``(P, D)`` — learned prompt tokens, prepended to the group tokens
  before the first block (no position embedding) and carried from block to block; they are cut
  off every block's output, so the features the backbone returns keep their shapes ``(B, G, D)``
  / ``(B, D, 1, G)``. ``point_peft.prompt.bank`` ``(K, D)`` — a buffer of frozen-backbone token
  features (the memory bank) that enhances the prompts by parameter-free attention.
* ``blocks.<i>.geo_adapter.*`` — a geometry-aware bottleneck adapter on the output of block ``i``:
  each group token aggregates its ``k`` nearest group tokens in 3-D centre space.

How the centres reach the adapters: the backbone feeds its group centres ``(B, G, 3)`` through
``pos_embed`` exactly once per forward, before the blocks; a forward pre-hook on ``pos_embed``
(:meth:`PointPEFTContext.observe_centers`) computes the kNN neighbourhood of every centre once and
keeps it on the shared :class:`PointPEFTContext` (``backbone.point_peft``) for the adapters of
that forward. The blocks' hooks read it; nothing of it is saved in state dicts.

The prompts take part in every block's attention, so they change the group tokens' features even
at initialisation (only with ``num_prompts=0`` does the adapted model start exactly as the
pretrained one: the adapters' up-projections start at zero).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from backbones.layers import farthest_point_sample, gather_points
from backbones.point_transformer import PointTransformer
from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies.adapters import bottleneck_projections
from workbench.strategies.base import InitBatches, Strategy


@dataclass(frozen=True)
class Neighborhood:
    """The kNN neighbourhood of every group centre of one forward.

    ``index`` ``(B, G, k)``: the ``k`` nearest centres of each centre (itself included);
    ``weights`` ``(B, G, k)``: ``softmax_j(-d_ij² / mean_j d_ij²)`` (nearer neighbours weigh more;
    scale-free); ``offsets`` ``(B, G, 3)``: ``Σ_j weights_ij (c_j - c_i)``, the weighted mean
    relative position of the neighbours.
    """

    index: Tensor
    weights: Tensor
    offsets: Tensor

    @classmethod
    def of(cls, centers: Tensor, k: int) -> Neighborhood:
        """From centres ``(B, G, 3)``; ``k`` is capped at ``G``."""
        k = min(k, centers.shape[1])
        distance, index = torch.cdist(centers, centers).topk(k, dim=-1, largest=False)
        squared = distance.square()
        weights = torch.softmax(-squared / squared.mean(-1, keepdim=True).clamp_min(1e-12), dim=-1)
        offsets = (weights.unsqueeze(-1) * (gather_points(centers, index) - centers.unsqueeze(2))).sum(2)
        return cls(index, weights, offsets)


class PointPrompt(nn.Module):
    """Point-prior prompt: ``P`` learned tokens ``prompts`` ``(P, D)`` and a memory ``bank``
    ``(K, D)`` of frozen-backbone token features.

    :meth:`enhanced` → ``prompts + scale · softmax(prompts · bankᵀ / √D) · bank`` ``(P, D)``
    (parameter-free attention of each prompt over the bank). The bank is empty (``K = 0``) until
    :meth:`PointPEFT.initialize` fills it; with an empty bank the prompts pass through unenhanced.
    The bank is a saved buffer: a checkpoint's bank replaces this one, whatever its ``K``.
    """

    def __init__(self, num_prompts: int, dim: int, scale: float) -> None:
        super().__init__()
        self.prompts = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_prompts, dim), std=0.02))
        self.register_buffer("bank", torch.empty(0, dim))
        self.scale = scale

    def enhanced(self) -> Tensor:
        """The prompts as fed to the first block ``(P, D)``."""
        if self.bank.shape[0] == 0:
            return self.prompts
        bank = self.bank.to(self.prompts.dtype)
        attention = torch.softmax(self.prompts @ bank.t() / math.sqrt(bank.shape[1]), dim=-1)  # (P, K)
        return self.prompts + self.scale * attention @ bank

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        bank = state_dict.get(prefix + "bank")
        if isinstance(bank, Tensor) and bank.ndim == 2 and bank.shape != self.bank.shape:
            self.bank = self.bank.new_empty(bank.shape)  # a filled (or empty) bank of another size
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PointPEFTContext(nn.Module):
    """Shared state of one adapted backbone (``backbone.point_peft``): the optional
    :class:`PointPrompt` (``prompt``) and, per forward, the centres' :class:`Neighborhood` and the
    prompt outputs carried from block to block (not saved).

    The carried prompt outputs are kept per block index, so the non-reentrant activation
    checkpointing timm uses (a block re-run in backward) finds the same prompts as in the forward.
    """

    def __init__(self, prompt: PointPrompt | None, k: int) -> None:
        super().__init__()
        self.prompt = prompt
        self.k = k
        self.enabled = True
        self.neighborhood: Neighborhood | None = None
        self.carried: dict[int, Tensor] = {}

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompt is None else self.prompt.prompts.shape[0]

    def observe_centers(self, _pos_embed: nn.Module, args: tuple[Tensor, ...]) -> None:
        """Forward pre-hook on ``backbone.pos_embed`` (called once per forward with the centres
        ``(B, G, 3)``, before the blocks): a new forward starts."""
        self.carried = {}
        self.neighborhood = Neighborhood.of(args[0].detach().float(), self.k) if self.enabled else None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the per-forward state behind (it may hold autograd graphs)."""
        return {**super().__getstate__(), "neighborhood": None, "carried": {}}

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The backbone runs as the pretrained one: no prompts, no adapters."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def prepend(self, index: int, tokens: Tensor) -> Tensor:
        """Block ``index``'s input ``(B, G, D)`` → ``(B, P + G, D)``: the (enhanced) prompts before
        the first block, the previous block's prompt outputs before the others."""
        if self.prompt is None or not self.enabled:
            return tokens
        if index == 0:
            prompts = self.prompt.enhanced().expand(tokens.shape[0], -1, -1)
        elif (prompts := self.carried.get(index - 1)) is None:
            raise RuntimeError("point_peft: block inputs without the previous block's prompts (blocks run out of order)")
        return torch.cat([prompts.to(tokens.dtype), tokens], dim=1)

    def strip(self, index: int, output: Tensor) -> Tensor:
        """Block ``index``'s output ``(B, P + G, D)`` → ``(B, G, D)``; keeps the prompt outputs."""
        if self.prompt is None or not self.enabled:
            return output
        self.carried[index] = output[:, : self.num_prompts]
        return output[:, self.num_prompts :]


class GeometryAdapter(nn.Module):
    """Geometry-aware adapter on block ``index``'s output tokens ``h`` ``(B, G, D)``:

    ``a = down(h)`` ``(B, G, m)``; ``agg_i = Σ_j w_ij a_j + pos(Σ_j w_ij (c_j − c_i))`` over the
    ``k`` nearest centres ``j`` of centre ``i`` (:class:`Neighborhood`: ``w`` parameter-free, by
    distance; ``pos``: a learned ``3 → m`` map of the relative positions, no bias — linear, so it
    is applied to the weighted mean offset); output ``h + up(gelu(agg))``. ``up`` starts at zero.

    Its forward hooks on the block also put the prompts in and take them out (see
    :class:`PointPEFTContext`); ``context`` is referenced, not registered (no duplicate keys).
    """

    def __init__(self, context: PointPEFTContext, index: int, dim: int, bottleneck: int) -> None:
        super().__init__()
        object.__setattr__(self, "context", context)
        self.index = index
        self.down, self.up = bottleneck_projections(dim, bottleneck)
        self.pos = nn.Linear(3, bottleneck, bias=False)
        self.act = nn.GELU()

    def aggregate(self, features: Tensor, neighborhood: Neighborhood) -> Tensor:
        """``(B, G, m)`` → the distance-weighted neighbour sum ``(B, G, m)`` plus the position term."""
        gathered = gather_points(features, neighborhood.index)  # (B, G, k, m)
        weights = neighborhood.weights.to(features.dtype).unsqueeze(-1)
        return (weights * gathered).sum(2) + self.pos(neighborhood.offsets.to(features.dtype))

    def forward(self, tokens: Tensor, neighborhood: Neighborhood) -> Tensor:
        """``(B, G, D)`` → ``(B, G, D)``."""
        return tokens + self.up(self.act(self.aggregate(self.down(tokens), neighborhood)))

    def before_block(self, _block: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Forward pre-hook on the block: prepend the prompts to its input."""
        return (self.context.prepend(self.index, args[0]), *args[1:])

    def after_block(self, _block: nn.Module, _args: tuple[Any, ...], output: Tensor) -> Tensor:
        """Forward hook on the block: cut off the prompts, then adapt the group tokens."""
        tokens = self.context.strip(self.index, output)
        neighborhood = self.context.neighborhood
        if not self.context.enabled or neighborhood is None:
            return tokens
        return self(tokens, neighborhood)


class PointPEFT(Strategy):
    """Point-PEFT: frozen point transformer, learned point-prior prompts enhanced from a memory
    bank of the frozen backbone's token features, and a geometry-aware adapter after every block
    (:class:`PointPrompt`, :class:`GeometryAdapter`). The head trains. Not mergeable.

    Per block of width ``D`` the adapter has ``2·D·m + 4·m + D`` parameters (``down`` ``D·m + m``,
    ``pos`` ``3·m``, ``up`` ``m·D + D``); the prompts add ``P·D``.

    The bank (label-free, unlike the paper's per-class bank): the frozen backbone's final normed
    group tokens (``forward_features``, prompts and adapters off) of the first ``bank_batches``
    training batches, reduced to ``bank_size`` tokens by farthest point sampling in feature space
    (deterministic: it starts from the first token; no randomness) — a spread-out sample of the
    domain's token features. ``bank_batches: 0`` keeps the bank empty (plain prompts). Until
    :meth:`initialize` runs the bank is empty and the prompts pass through unenhanced; the bank is
    a buffer, so checkpoints and the adapter export carry it (a resumed run's checkpoint bank
    replaces the one just built).

    The prompts join every block's attention, so the adapted model starts as the pretrained one
    only with ``num_prompts=0`` (the adapters start at zero either way).
    """

    name = "point_peft"
    mergeable = False

    def __init__(self, num_prompts: int = 8, bottleneck: int = 16, k: int = 8, bank_batches: int = 4,
                 bank_size: int = 32, prompt_scale: float = 1.0) -> None:
        """
        Args:
            num_prompts: prompt tokens ``P`` (0: adapters only).
            bottleneck: hidden width ``m`` of each geometry adapter.
            k: neighbours (group centres, itself included) each token aggregates; capped at the
                number of groups.
            bank_batches: training batches whose features build the memory bank (0: no bank).
            bank_size: tokens ``K`` kept in the bank.
            prompt_scale: ``λ``, the factor on the bank attention added to the prompts.
        """
        for knob, value, low in (("num_prompts", num_prompts, 0), ("bottleneck", bottleneck, 1), ("k", k, 1),
                                 ("bank_batches", bank_batches, 0), ("bank_size", bank_size, 1)):
            if value < low:
                raise UserInputError(f"{self.name} {knob}={value} must be >= {low}")
        self.num_prompts = num_prompts
        self.bottleneck = bottleneck
        self.k = k
        self.bank_batches = bank_batches
        self.bank_size = bank_size
        self.prompt_scale = prompt_scale

    @property
    def init_batches(self) -> int:  # type: ignore[override]
        """Training batches for the bank; none without prompts."""
        return self.bank_batches if self.num_prompts else 0

    def prepare(self, model: BackboneModel) -> None:
        backbone = model.backbone
        if not isinstance(backbone, PointTransformer):
            raise UserInputError(f"{self.name} adapts the point transformer (point_mae_*) only, not "
                                 f"{type(backbone).__name__}: use bottleneck, lora or vpt for it.")
        backbone.requires_grad_(False)
        dim = backbone.embed_dim
        prompt = PointPrompt(self.num_prompts, dim, self.prompt_scale) if self.num_prompts else None
        context = PointPEFTContext(prompt, self.k)
        backbone.point_peft = context
        backbone.pos_embed.register_forward_pre_hook(context.observe_centers)
        for index, block in enumerate(backbone.blocks):
            adapter = GeometryAdapter(context, index, dim, self.bottleneck)
            block.geo_adapter = adapter
            block.register_forward_pre_hook(adapter.before_block)
            block.register_forward_hook(adapter.after_block)

    @torch.no_grad()
    def initialize(self, model: BackboneModel, data: InitBatches) -> None:
        """Fill the memory bank from ``data.inputs`` (clouds ``(B, N, 3 + F)``); see the class docstring."""
        context: PointPEFTContext = model.backbone.point_peft
        if context.prompt is None or not data.inputs:
            return
        context.prompt.bank = self.build_bank(model.backbone, data.inputs).to(context.prompt.bank)

    def build_bank(self, backbone: PointTransformer, inputs: list[Tensor]) -> Tensor:
        """``bank_size`` frozen-backbone token features ``(K, D)`` of ``inputs`` (fewer if they hold fewer)."""
        context: PointPEFTContext = backbone.point_peft
        modes = {module: module.training for module in backbone.modules()}
        backbone.eval()  # no dropout / drop-path: the same inputs give the same bank
        try:
            with context.disabled():
                tokens = torch.cat([backbone.forward_features(points).flatten(0, 1).float() for points in inputs])
        finally:
            for module, mode in modes.items():
                module.training = mode
        if tokens.shape[0] <= self.bank_size:
            return tokens
        return tokens[farthest_point_sample(tokens.unsqueeze(0), self.bank_size)[0]]
