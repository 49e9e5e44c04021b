"""The strategy interface: decide what trains, report it, export adapter-only and merged weights."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from workbench.model import BackboneModel


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@dataclass(frozen=True)
class StrategyReport:
    """What a strategy left trainable, for the whole model and for the backbone."""

    strategy: str
    trainable: int
    total: int
    backbone_trainable: int
    backbone_total: int

    @classmethod
    def of(cls, strategy: str, model: BackboneModel) -> StrategyReport:
        return cls(strategy, *count_parameters(model), *count_parameters(model.backbone))

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"{self.strategy}: {self.trainable:,} / {self.total:,} parameters trainable "
            f"({self.trainable_percent:.2f}%); backbone {self.backbone_trainable:,} / "
            f"{self.backbone_total:,}"
        )


@dataclass(frozen=True)
class InitBatches:
    """A few training batches for a data-driven initialisation (EVA, CorDA, LoRA-GA, SPT, Point-PEFT).

    ``inputs``: the model input of each batch — images ``(B, C, [T,] H, W)``, points
    ``(B, N, 3 + F)``, ...; ``loss(i)``: the task's training loss of batch ``i`` through the model
    as it is at the call (labels included, autograd graph attached).
    """

    inputs: list[Tensor]
    loss: Callable[[int], Tensor]

    def __len__(self) -> int:
        return len(self.inputs)


class Strategy:
    """Base class: subclasses change which parameters of an :class:`BackboneModel` train."""

    name = "strategy"
    mergeable = True  # adapters fold into the base weights (no extra inference cost)
    added_parameters: frozenset[int] = frozenset()
    init_batches = 0  # training batches :meth:`initialize` wants (0: none)

    def apply(self, model: BackboneModel) -> StrategyReport:
        """Adapt ``model`` in place and report the trainable parameters.

        Records in :attr:`added_parameters` the ids of the trainable parameters the strategy
        added to the backbone (adapters, prompts, scale/shift vectors).
        """
        self.added_parameters = frozenset()
        return self._recording(model, self.prepare)

    def initialize_from(self, model: BackboneModel, data: InitBatches) -> StrategyReport:
        """Run :meth:`initialize` (which may add parameters, e.g. SPT's) and report again."""
        return self._recording(model, lambda m: self.initialize(m, data))

    def _recording(self, model: BackboneModel, change: Callable[[BackboneModel], None]) -> StrategyReport:
        """``change(model)``, adding the new trainable backbone parameters to :attr:`added_parameters`."""
        before = {id(p) for p in model.backbone.parameters()}
        change(model)
        self.added_parameters |= {id(p) for p in model.backbone.parameters() if p.requires_grad and id(p) not in before}
        return StrategyReport.of(self.name, model)

    def prepare(self, model: BackboneModel) -> None:
        """Freeze, inject or wrap modules of ``model`` in place."""
        raise NotImplementedError

    def initialize(self, model: BackboneModel, data: InitBatches) -> None:
        """Data-driven initialization from :attr:`init_batches` training batches; most strategies
        need none. Called once before training starts, also by a resumed run (whose checkpoint
        weights then replace what it set)."""

    def on_fit_start(self, model: BackboneModel, augmented: bool | None) -> str | None:
        """Called when fitting starts; ``augmented``: whether the training chips are augmented
        (None: the datamodule does not say). Returns a line for the log, or None."""
        return None

    def on_fit_end(self, model: BackboneModel) -> str | None:
        """Called when fitting ends. Returns a line for the log, or None."""
        return None

    def on_train_step(self, model: BackboneModel, step: int) -> None:
        """Called before every training batch with the optimizer step count (LISA draws the
        blocks that train); most strategies do nothing."""

    def merged(self, model: BackboneModel) -> BackboneModel:
        """A copy of ``model`` in the plain layout (adapters merged); the base copies as is."""
        return copy.deepcopy(model)

    def trainable_state_dict(self, model: BackboneModel) -> dict[str, Tensor]:
        """The state dict without the frozen parameters: what this strategy changed.

        Buffers (e.g. decoder BatchNorm statistics) are kept, so the result together with the
        original pretrained backbone restores the fine-tuned model.
        """
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        return {k: v for k, v in model.state_dict().items() if k not in frozen}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
