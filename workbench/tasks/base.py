"""What every task shares: backbone creation, the adaptation strategy, optimizers, reporting."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from backbones.builder import create_backbone
from workbench.errors import UserInputError
from workbench.optim import PARAMETER_GROUPS, parameter_groups
from workbench.strategies import Full, Strategy, StrategyReport

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")
BACKBONE_INPUTS = ("temporal_coords", "location_coords")
MODEL_INPUTS = ("image", "series", "points")  # rasters and spectrograms, time series, point clouds


def model_input(batch: dict[str, Tensor]) -> Tensor:
    """The batch entry the model reads: ``image`` ``(B, C, [T,] H, W)`` (rasters, spectrograms),
    ``series`` ``(B, M, L)`` or ``points`` ``(B, N, 3 + F)``."""
    for key in MODEL_INPUTS:
        if key in batch:
            return batch[key]
    raise UserInputError(f"a batch has none of {MODEL_INPUTS} (it has {sorted(batch)}): check the datamodule")


class BaseTask(LightningModule):
    """A backbone-based model adapted by a :class:`~workbench.strategies.Strategy`.

    Subclasses set their own attributes, then call :meth:`setup_model`, which creates the
    backbone, wraps it with :meth:`build_model` and applies the strategy. Only parameters left
    trainable by the strategy reach the optimizer.
    """

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
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.strategy = strategy or Full()

    def setup_model(self) -> None:
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
        for stage in STAGES:
            metrics = self.metrics(stage)
            if metrics is not None:
                setattr(self, f"{stage}_metrics", metrics)

    def setup(self, stage: str) -> None:
        if self.hparams.compile_model and stage == "fit" and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def metrics(self, stage: str) -> MetricCollection | None:
        """The task's metrics for ``stage``, names prefixed ``<stage>/``; None: the loss only."""
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

    def forward_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """Model outputs for a batch dict with the model input (and optional coordinates)."""
        return self(model_input(batch), **self.backbone_inputs(batch))

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        """Loss of ``batch`` (logged, with the metrics of ``stage``: train, val or test)."""
        raise NotImplementedError

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
        """Log and reset ``<stage>_metrics`` (a torchmetrics collection), where the task has one."""
        metrics = getattr(self, f"{stage}_metrics", None)
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
        if self.trainer.is_global_zero:
            print(f"workbench: {self.strategy_report}")
        if getattr(self.model, "feature_cache", None) is not None and getattr(self.trainer.datamodule, "augment", False):
            raise UserInputError(
                "strategy.cache_features needs un-augmented chips (augmented ones never repeat): "
                "set data.init_args.augment: false, or cache_features: false."
            )
        if self.strategy.init_batches and self.trainer.ckpt_path is None:
            loader = self.trainer.datamodule.train_dataloader()
            batches = [model_input(batch).to(self.device) for batch, _ in zip(loader, range(self.strategy.init_batches))]
            self.strategy.initialize(self.model, batches)
            print(f"workbench: {self.strategy.name} initialized from {len(batches)} training batches")

    def on_fit_end(self) -> None:
        cache = getattr(self.model, "feature_cache", None)
        if cache is not None and self.trainer.is_global_zero:
            print(f"workbench: feature cache served {cache.hits} of {cache.hits + cache.misses} encoder passes "
                  f"({cache.bytes / 2**20:.1f} MiB)")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = parameter_groups(self.model, self.strategy.added_parameters, hp.lr_multipliers, hp.layer_decay)
        optimizer = self.optimizer(groups)
        for group in optimizer.param_groups:
            group["lr"] *= group["lr_scale"]
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    def export(self, out_dir: str | Path) -> dict[str, str]:
        """Write the fine-tuned weights for use outside Lightning; returns ``{kind: path}``."""
        from workbench.export import export_weights

        return export_weights(self, out_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["workbench"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}", "merged": False}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A merged checkpoint (``workbench merge``) holds plain weights: merge the model's
        adapters first so the keys match."""
        if checkpoint.get("workbench", {}).get("merged") and self.strategy.mergeable:
            self.model = self.strategy.merged(self.model)
