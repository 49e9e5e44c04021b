"""Masked-autoencoder (continued) pretraining of a Prithvi encoder on unlabelled rasters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from backbones.prithvi_mae import as_frames, patchify
from workbench.errors import UserInputError
from workbench.tasks.base import BaseTask, StepOutput
from workbench.tasks.mae import build_mae


def patch_targets(image: Tensor, patch: tuple[int, int, int], normalize: bool) -> Tensor:
    """``(B, C, [T,] H, W)`` → per-patch pixel targets ``(B, N, s*p*q*C)``, optionally
    normalized per patch (MAE's ``norm_pix_loss``)."""
    target = patchify(as_frames(image), patch)
    if normalize:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def hidden_patch_mse(pred: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error over the patches NOT in ``keep``: ``pred``/``target`` ``(B, N, P)``,
    ``keep`` ``(B, K)`` visible token indices."""
    hidden = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device).scatter_(1, keep, False)
    return ((pred - target) ** 2).mean(-1)[hidden].mean()


class MAEPretrainTask(BaseTask):
    """Prithvi MAE: hide ``mask_ratio`` of the patches, reconstruct their pixels (MSE on hidden
    patches). Batches need only ``image``; masks in the batch are ignored (no labels used).

    At the end of ``fit`` the ``ExportWeights`` callback writes ``encoder.safetensors`` in the
    official Prithvi MAE layout: any config loads it with ``model.init_args.pretrained``.
    """

    def __init__(
        self,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            mask_ratio: fraction of patches hidden from the encoder.
            decoder_dim: MAE decoder width (official: 512).
            decoder_depth: MAE decoder blocks (official: 8).
            decoder_heads: MAE decoder attention heads (official: 16).
            norm_pix_loss: reconstruct per-patch normalized pixels (as Prithvi was trained).
            **kwargs: :class:`BaseTask` arguments (backbone, pretrained, optimizer, ...).
        """
        if not 0.0 < mask_ratio < 1.0:
            raise UserInputError(f"model.mask_ratio {mask_ratio} must be in (0, 1), e.g. 0.75")
        self.mask_ratio = mask_ratio
        super().__init__(**kwargs)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return build_mae(backbone, self.hparams, "MAE pretraining")

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """MSE of the reconstructed hidden patches of ``image``; no metrics."""
        coords = self.backbone_inputs(batch)
        pred, keep, _ = self.model(batch["image"], mask_ratio=self.mask_ratio, **coords)
        target = patch_targets(batch["image"], self.model.backbone.patch_size, self.hparams.norm_pix_loss)
        return StepOutput(hidden_patch_mse(pred, target, keep))

    def export_tensors(self) -> dict[str, dict[str, Tensor]]:
        """``encoder``: the encoder (and MAE decoder) in the official Prithvi MAE layout."""
        return {"encoder": self.model.encoder_state_dict()}
