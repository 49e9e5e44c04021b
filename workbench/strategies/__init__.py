"""Adaptation strategies: what trains. One ``strategy:`` block in the YAML, any backbone.

Each strategy acts on a built :class:`~workbench.model.BackboneModel` (a ``backbone`` plus task
layers), reports exactly what it left trainable, and can export adapter-only and (where the
method allows) merged weights.

==============  ===========================================================================
baselines       :class:`Full`, :class:`Frozen`
peft library    :class:`LoRA` (DoRA, PiSSA, EVA, CorDA), :class:`LoHa`, :class:`LoKr`, :class:`IA3`,
                :class:`VeRA`, :class:`OFT`, :class:`BOFT`
low-rank, ours  :class:`HydraStrategy` (Hydra), :class:`SVFit`, :class:`LoLDU`, :class:`FLoRA` (N-d convs)
selective       :class:`BitFit`, :class:`NormOnly`, :class:`HalfFineTuning`, :class:`LastBlocks`, :class:`LISA`
sparse          :class:`S2FT` (heads and channels), :class:`SPT` (sensitivity-aware)
additive        :class:`SSF`, :class:`VPT`, :class:`AdaptFormer`, :class:`BottleneckAdapter` (Houlsby,
                Pfeiffer), :class:`Compacter`
domain          :class:`PointPEFT` (point clouds), :class:`EarthAdapter` (remote sensing)
==============  ===========================================================================
"""

from workbench.strategies.adapters import AdaptFormer
from workbench.strategies.base import InitBatches, Strategy, StrategyReport, count_parameters
from workbench.strategies.bottleneck import BottleneckAdapter, Compacter
from workbench.strategies.earth_adapter import EarthAdapter
from workbench.strategies.lowrank import FLoRA, HydraStrategy, LoLDU, SVFit
from workbench.strategies.baselines import Frozen, Full
from workbench.strategies.peft_methods import BOFT, IA3, OFT, LoHa, LoKr, LoRA, PeftStrategy, VeRA
from workbench.strategies.point_peft import PointPEFT
from workbench.strategies.prompts import VPT
from workbench.strategies.sparse import S2FT, SPT
from workbench.strategies.selective import LISA, BitFit, HalfFineTuning, LastBlocks, NormOnly
from workbench.strategies.ssf import SSF

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        Full, Frozen, LoRA, LoHa, LoKr, IA3, VeRA, OFT, BOFT, HydraStrategy, SVFit, LoLDU, FLoRA,
        BitFit, NormOnly, HalfFineTuning, LastBlocks, LISA, S2FT, SPT, SSF, VPT, AdaptFormer, BottleneckAdapter, Compacter,
        PointPEFT, EarthAdapter,
    )
}  # fmt: skip
"""Short names (as in ``workbench compare --strategies lora ssf``) → strategy classes."""

__all__ = [
    "BOFT", "IA3", "OFT", "S2FT", "SPT", "SSF", "STRATEGIES", "VPT", "AdaptFormer", "BitFit", "BottleneckAdapter", "Compacter",
    "EarthAdapter", "FLoRA", "Frozen", "Full", "InitBatches", "LoLDU",
    "LISA", "HalfFineTuning", "HydraStrategy", "SVFit", "LastBlocks", "LoHa", "LoKr", "LoRA", "NormOnly", "PeftStrategy", "PointPEFT", "Strategy",
    "StrategyReport", "VeRA", "count_parameters",
]  # fmt: skip
