"""Adaptation strategies: what trains. One ``strategy:`` block in the YAML, any backbone.

Each strategy acts on a built :class:`~workbench.model.EncoderDecoder`, reports exactly what it
left trainable, and can export adapter-only and merged weights.
"""

from workbench.strategies.base import Strategy, StrategyReport, count_parameters
from workbench.strategies.baselines import Frozen, Full
from workbench.strategies.peft_methods import LoRA, PeftStrategy

__all__ = ["Frozen", "Full", "LoRA", "PeftStrategy", "Strategy", "StrategyReport", "count_parameters"]
