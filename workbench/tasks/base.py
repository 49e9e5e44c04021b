"""What every task shares: model, loss and metrics set up once, the strategy, the optimizer,
one training/evaluation step (loss, metric updates, logging) and reporting."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from backbones.builder import create_backbone
from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.optim import PARAMETER_GROUPS, fused_default, parameter_groups
from workbench.run_plots import Panel, curve, field_panel, image_panel, lines_panel, points_panel
from workbench.strategies import Full, InitBatches, Strategy, StrategyReport

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")
BACKBONE_INPUTS = ("temporal_coords", "location_coords")


class ModelInput(StrEnum):
    """The batch entry a model reads."""

    IMAGE = "image"  # rasters and spectrograms (B, C, [T,] H, W)
    SERIES = "series"  # time series (B, M, L)
    POINTS = "points"  # point clouds (B, N, 3 + F)
    FIELDS = "x"  # gridded weather fields at the input times (B, T, C, H, W)
    COARSE_FIELDS = "coarse"  # coarse gridded fields to downscale (B, C, h, w)


def model_input(batch: dict[str, Tensor], accepted: tuple[ModelInput, ...] = tuple(ModelInput)) -> Tensor:
    """The one ``accepted`` entry of ``batch``; an error when it has none or several."""
    present = [key for key in accepted if key in batch]
    if len(present) != 1:
        raise UserInputError(
            f"a batch must hold exactly one of {[str(k) for k in accepted]} (it has {sorted(batch)}): "
            "check that the data section matches the model's task"
        )
    return batch[present[0]]


@dataclass
class StepOutput:
    """One batch through a task: the loss and what the metrics compare.

    ``preds`` and ``target`` are the metric inputs (``preds`` detached by the shared step);
    ``scored`` selects the elements scored (None: all); ``logs`` are further values logged as
    ``<stage>/<name>`` (reference scores such as a naive forecast's error); ``extras`` are further
    inputs of a task's own :meth:`~BaseTask.update_metrics`: baseline predictions of the same
    target (persistence, bicubic, ...), weights, climatology.
    """

    loss: Tensor
    preds: Tensor | None = None
    target: Tensor | None = None
    scored: Tensor | None = None
    logs: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)


class BaseTask(LightningModule):
    """A backbone-based model adapted by a :class:`~workbench.strategies.Strategy`.

    ``__init__`` calls :meth:`configure_models` (backbone → :meth:`build_model` → strategy),
    :meth:`configure_losses` and :meth:`configure_metrics` (the task's :meth:`metrics`, cloned
    per stage as ``<stage>_metrics`` with the prefix ``<stage>/``): subclasses set what these
    read before calling ``super().__init__``. A subclass says how a batch gives its loss and
    metric inputs (:meth:`compute_step`); the shared step logs ``<stage>/loss`` and updates the
    metrics. Only parameters left trainable by the strategy reach the optimizer.
    """

    inputs: ClassVar[tuple[ModelInput, ...]] = (ModelInput.IMAGE,)  # the batch entries the model may read
    batch_idx: int = 0  # index of the batch in its epoch, set by the step hooks (seeds evaluation draws)

    def __init__(
        self,
        backbone: str = "prithvi_eo_v2_tiny_tl",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool | str | None = None,
        bands: list[str] | None = None,
        strategy: Strategy | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_multipliers: dict[str, float] | None = None,
        layer_decay: float | None = None,
        activation_checkpointing: bool = False,
        compile_model: bool = False,
    ) -> None:
        """
        Args:
            backbone: timm name of the backbone (``timm.list_models('prithvi*')``).
            backbone_kwargs: extra backbone constructor arguments; unknown keys are an error.
            pretrained: local checkpoint in the backbone family's official key layout, or ``true``
                for the weights the backbone's ``pretrained_cfg`` names (e.g. ukis-csmask's
                installed ONNX file for ``csmask_unet_effb4_s2``).
            bands: band names of the input; linked from the datamodule by the CLI.
            strategy: what trains (``Full``, ``Frozen``, ``LoRA``, ...); None means ``Full``.
            optimizer: optimizer class and its arguments (``class_path``/``init_args``).
            lr_scheduler: optional scheduler class and its arguments.
            lr_multipliers: learning-rate factor per parameter group: ``backbone`` (the
                encoder's own weights), ``adapter`` (what the strategy added: LoRA matrices,
                prompts, SSF vectors, ...) and ``head`` (neck, decoder, head); default 1.
            layer_decay: layer-wise LR decay for the encoder: block ``i`` of ``L`` gets
                ``layer_decay ** (L - i)`` (embeddings one step less), e.g. 0.75.
            activation_checkpointing: recompute the backbone's block activations in backward
                (timm's ``set_grad_checkpointing``): far less activation memory, ~1 more forward.
            compile_model: ``torch.compile`` the model for training (first steps compile; the
                weights' names do not change, checkpoints load either way).
        """
        unknown = set(lr_multipliers or {}) - set(PARAMETER_GROUPS)
        if unknown:
            raise UserInputError(
                f"model.lr_multipliers: unknown group(s) {sorted(unknown)}; use {', '.join(PARAMETER_GROUPS)}."
            )
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise UserInputError(f"model.layer_decay {layer_decay} must be in (0, 1], e.g. 0.75")
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "num_outputs"])  # num_outputs: set by the task
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.strategy = strategy or Full()
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self) -> None:
        """Create the backbone, build ``self.model`` around it and apply the strategy."""
        hp = self.hparams
        encoder = create_backbone(hp.backbone, hp.bands, hp.pretrained, hp.backbone_kwargs)
        if hp.activation_checkpointing:
            if not hasattr(encoder, "set_grad_checkpointing"):
                raise UserInputError(f"model.activation_checkpointing: backbone {hp.backbone!r} has no checkpointing switch")
            encoder.set_grad_checkpointing(True)
        self.model = self.build_model(encoder)
        self.strategy_report: StrategyReport = self.strategy.apply(self.model)
        log.info("%s", self.strategy_report)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise UserInputError(f"model.strategy {self.strategy.name} leaves nothing to train in "
                                 f"{type(self.model).__name__} (the backbone is the whole model, no head): "
                                 "choose full or a PEFT method")

    def configure_losses(self) -> None:
        """Set the task's loss module(s); the default: none (the loss is computed in the step)."""

    def configure_metrics(self) -> None:
        """``train_metrics``, ``val_metrics``, ``test_metrics``: :meth:`metrics` with the stage prefix."""
        metrics = self.metrics()
        if metrics is not None:
            for stage in STAGES:
                setattr(self, f"{stage}_metrics", metrics.clone(prefix=f"{stage}/"))

    def stage_metrics(self, stage: str) -> MetricCollection | None:
        """The metrics of ``stage`` (train, val, test); None where the task logs its loss only."""
        return getattr(self, f"{stage}_metrics", None)

    def setup(self, stage: str) -> None:
        if isinstance(self.model, BackboneModel):  # NHWC task layers pay under mixed precision only
            self.model.set_channels_last("16" in str(self.trainer.precision))
        if stage == "fit" and self.strategy.init_batches and not getattr(self, "_initialized", False):
            self.initialize_strategy()
        if self.hparams.compile_model and stage == "fit" and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def initialize_strategy(self) -> None:
        """The strategy's data-driven initialisation from its first ``init_batches`` training batches,
        on the training device, before the optimizer is built (so parameters it adds train). A
        resumed run does it too; the checkpoint's weights then replace what it set. Under data
        parallelism every rank takes rank 0's batches, so the choices (SPT's entries, EVA's ranks,
        hence parameter shapes) agree across ranks."""
        self.to(self.trainer.strategy.root_device)
        loader = self.trainer.datamodule.train_dataloader()
        first = self.trainer.strategy.broadcast([batch for batch, _ in zip(loader, range(self.strategy.init_batches))])
        batches = [self.transfer_batch_to_device(batch, self.device, 0) for batch in first]
        data = InitBatches([self.model_input(b) for b in batches], lambda i: self.compute_step(batches[i], "train").loss)
        self.strategy_report = self.strategy.initialize_from(self.model, data)
        self.model.zero_grad(set_to_none=True)
        self._initialized = True
        print(f"workbench: {self.strategy.name} initialized from {len(batches)} training batches")

    def metrics(self) -> MetricCollection | None:
        """The task's metrics (names without the stage prefix); None: the loss only."""
        return None

    def build_model(self, backbone: nn.Module) -> nn.Module:
        """Wrap ``backbone`` into the task's full model (neck, decoder, head)."""
        raise NotImplementedError

    def forward(self, image: Tensor, **backbone_kwargs: Tensor) -> Tensor:
        return self.model(image, **backbone_kwargs)

    @staticmethod
    def backbone_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch entries the backbone takes besides the image (time and location coordinates)."""
        return {k: batch[k] for k in BACKBONE_INPUTS if k in batch}

    def model_input(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch entry the model reads: the one of :attr:`inputs` the batch holds."""
        return model_input(batch, self.inputs)

    def forward_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """Model outputs for a batch dict with the model input (and optional coordinates)."""
        return self(self.model_input(batch), **self.backbone_inputs(batch))

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Loss and metric inputs of ``batch`` in ``stage`` (train, val or test)."""
        raise NotImplementedError

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The pictures of sample ``index`` of a test ``batch`` in ``samples.png`` (``step``: the batch's
        :meth:`compute_step`); tasks add their target and prediction to the input."""
        return [self.input_panel(batch, index)]

    def input_panel(self, batch: dict[str, Tensor], index: int, title: str = "input") -> Panel:
        """Sample ``index`` of the model input: rasters as RGB (the first band's map with fewer than
        three bands), series as lines (first three channels), point clouds from above coloured by
        height, gridded fields as the first variable's map (the last input time)."""
        key = next(k for k in self.inputs if k in batch)
        x, bands = batch[key][index], self.hparams.bands
        if key is ModelInput.SERIES:
            return lines_panel({f"channel {m}": curve(series) for m, series in enumerate(x[:3])}, title)
        if key is ModelInput.POINTS:
            return points_panel(x, x[:, 2], f"{title} (colour: height)")
        if key in (ModelInput.FIELDS, ModelInput.COARSE_FIELDS):
            return field_panel(x[-1, 0] if key is ModelInput.FIELDS else x[0], f"{title} ({bands[0]})" if bands else title)
        return image_panel(x, bands, title)

    def update_metrics(self, metrics: MetricCollection, step: StepOutput) -> None:
        """Feed one step's scored predictions and targets to ``metrics`` (nothing scored: no update)."""
        preds, target = step.preds.detach(), step.target
        if step.scored is not None:
            preds, target = preds[step.scored], target[step.scored]
        if target.numel():
            metrics.update(preds, target)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        """Loss of ``batch``, logged as ``<stage>/loss`` (with the step's other values), and the
        metric update of ``stage``."""
        step = self.compute_step(batch, stage)
        size = len(self.model_input(batch))
        self.log(f"{stage}/loss", step.loss, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in step.logs.items():
            self.log(f"{stage}/{name}", value, on_epoch=True, batch_size=size)
        metrics = self.stage_metrics(stage)
        if metrics is not None:
            self.update_metrics(metrics, step)
        return step.loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.strategy.on_train_step(self.model, self.global_step)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.batch_idx = batch_idx
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.batch_idx = batch_idx  # for per-batch seeded evaluation (fixed gaps, masks)
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.batch_idx = batch_idx
        self._step(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        """Log and reset the metrics of ``stage``, where the task has them."""
        metrics = self.stage_metrics(stage)
        if metrics is not None:
            self.log_dict(metrics.compute(), prog_bar=stage != "train")
            metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        augment = getattr(data, "augment", None)
        augmented = None if augment is None else bool(augment) or getattr(data, "batch_augmentation", None) is not None
        lines = [str(self.strategy_report), self.strategy.on_fit_start(self.model, augmented)]
        if self.trainer.is_global_zero:
            print("\n".join(f"workbench: {line}" for line in lines if line))

    def on_fit_end(self) -> None:
        line = self.strategy.on_fit_end(self.model)
        if line and self.trainer.is_global_zero:
            print(f"workbench: {line}")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = parameter_groups(self.model, self.strategy.added_parameters, hp.lr_multipliers, hp.layer_decay)
        try:
            optimizer = self.optimizer(groups, **fused_default(self.optimizer))
        except RuntimeError:  # parameters on a device or of a dtype the fused kernel does not take
            optimizer = self.optimizer(groups)
        for group in optimizer.param_groups:
            group["lr"] *= group["lr_scale"]
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    def export_tensors(self) -> dict[str, dict[str, Tensor]]:
        """The fine-tuned weights for use outside Lightning, by kind: ``adapter`` (what the
        strategy trained: e.g. LoRA matrices plus neck/decoder/head) and, for mergeable
        strategies, ``merged`` (the whole model, adapters merged, in the plain key layout)."""
        tensors = {"adapter": self.strategy.trainable_state_dict(self.model)}
        if self.strategy.mergeable:
            tensors["merged"] = self.strategy.merged(self.model).state_dict()
        return tensors

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the task class and the precision it trained in (``workbench predict`` predicts in it;
        None when no trainer is attached)."""
        checkpoint["workbench"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}", "merged": False,
                                   "precision": self._trainer.precision if self._trainer is not None else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A merged checkpoint (``workbench merge``) holds plain weights: merge the model's
        adapters first so the keys match."""
        if checkpoint.get("workbench", {}).get("merged") and self.strategy.mergeable:
            self.model = self.strategy.merged(self.model)
