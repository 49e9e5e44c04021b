"""Adaptation strategies: what trains. One ``strategy:`` block in the YAML, any backbone.

Each strategy acts on a built :class:`~workbench.model.BackboneModel` (a ``backbone`` plus task
layers), reports exactly what it left trainable, and can export adapter-only and (where the
method allows) merged weights.

==============  ===========================================================================
baselines       :class:`Full`, :class:`Frozen`
peft library    :class:`LoRA` (DoRA, PiSSA, EVA, CorDA), :class:`LoHa`, :class:`LoKr`, :class:`IA3`,
                :class:`VeRA`, :class:`OFT`, :class:`BOFT`
low-rank, ours  :class:`HydraStrategy` (Hydra), :class:`SVFit`
selective       :class:`BitFit`, :class:`NormOnly`, :class:`HalfFineTuning`, :class:`LastBlocks`, :class:`LISA`
additive        :class:`SSF`, :class:`VPT`, :class:`AdaptFormer`, :class:`BottleneckAdapter` (Houlsby,
                Pfeiffer), :class:`Compacter`
==============  ===========================================================================
"""

from workbench.strategies.adapters import AdaptFormer
from workbench.strategies.base import Strategy, StrategyReport, count_parameters
from workbench.strategies.bottleneck import BottleneckAdapter, Compacter
from workbench.strategies.lowrank import HydraStrategy, SVFit
from workbench.strategies.baselines import Frozen, Full
from workbench.strategies.peft_methods import BOFT, IA3, OFT, LoHa, LoKr, LoRA, PeftStrategy, VeRA
from workbench.strategies.prompts import VPT
from workbench.strategies.selective import LISA, BitFit, HalfFineTuning, LastBlocks, NormOnly
from workbench.strategies.ssf import SSF

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        Full, Frozen, LoRA, LoHa, LoKr, IA3, VeRA, OFT, BOFT, HydraStrategy, SVFit,
        BitFit, NormOnly, HalfFineTuning, LastBlocks, LISA, SSF, VPT, AdaptFormer, BottleneckAdapter, Compacter,
    )
}  # fmt: skip
"""Short names (as in ``workbench compare --strategies lora ssf``) → strategy classes."""

__all__ = [
    "BOFT", "IA3", "OFT", "SSF", "STRATEGIES", "VPT", "AdaptFormer", "BitFit", "BottleneckAdapter", "Compacter",
    "Frozen", "Full",
    "LISA", "HalfFineTuning", "HydraStrategy", "SVFit", "LastBlocks", "LoHa", "LoKr", "LoRA", "NormOnly", "PeftStrategy", "Strategy",
    "StrategyReport", "VeRA", "count_parameters",
]  # fmt: skip
