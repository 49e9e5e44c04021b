"""Gap imputation: reconstruct cloud-covered (or otherwise missing) pixels of multispectral,
multi-temporal rasters with a Prithvi MAE."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from backbones.prithvi_mae import as_frames, keep_from_hidden, unpatchify
from workbench.errors import UserInputError
from workbench.run_plots import Panel, image_panel
from workbench.tasks.base import BaseTask, StepOutput
from workbench.tasks.gaps import hidden_tokens, sample_blob_gaps, sample_patch_gaps
from workbench.tasks.mae import build_mae


class ImputationTask(BaseTask):
    """Fill gaps: every patch touching a gap is hidden from the encoder and the MAE decoder
    predicts its pixels, as a deviation from the frame's mean over the pixels it can see (per
    band). The loss (MSE) and the metrics use the gap pixels only.

    Gaps come from the batch's ``mask`` (``gaps: mask`` — e.g. a real cloud mask, value
    ``gap_value``) or are sampled per frame
    (``patches``: whole patches; ``blobs``: cloud-like shapes) covering ``gap_fraction``.
    Images are ``(B, C, [T,] H, W)`` in normalized units; ``valid`` ``(B, H, W)`` (from the
    datamodule) keeps nodata pixels out of the loss. Metrics: PSNR and MAE per band over the
    scored gap pixels, SSIM of the gap-filled frames against the truth.
    """

    def __init__(
        self,
        gaps: Literal["blobs", "patches", "mask"] = "blobs",
        gap_fraction: float = 0.3,
        gap_value: int = 1,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        pretrained_decoder: bool = True,
        data_range: float = 8.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            gaps: where the gaps come from: sampled ``blobs`` or ``patches``, or the batch ``mask``.
            gap_fraction: fraction of pixels per frame to hide when sampling.
            gap_value: the ``mask`` value that marks a gap (``gaps: mask``).
            decoder_dim: MAE decoder width (official Prithvi: 512).
            decoder_depth: MAE decoder blocks (official: 8).
            decoder_heads: MAE decoder heads (official: 16).
            pretrained_decoder: also load the official ``decoder.*`` keys from ``pretrained``.
            data_range: value range for PSNR and SSIM, in normalized units (8: ±4 std).
            **kwargs: :class:`BaseTask` arguments (backbone, pretrained, strategy, optimizer, ...).
        """
        if not 0.0 < gap_fraction < 1.0:
            raise UserInputError(f"model.gap_fraction {gap_fraction} must be in (0, 1)")
        self.gaps = gaps
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        """The MAE around the backbone; with ``pretrained_decoder``, its decoder from ``pretrained``."""
        super().configure_models()
        if self.hparams.pretrained_decoder and self.hparams.pretrained:
            report = self.model.load_decoder(self.hparams.pretrained)
            if report["unexpected"] or len(report["missing"]) == len(self.model.decoder.state_dict()):
                raise UserInputError(
                    f"model.pretrained {self.hparams.pretrained} has no matching MAE decoder keys "
                    f"(unexpected {report['unexpected'][:5]}): set decoder_dim/depth/heads to the "
                    "checkpoint's, or pretrained_decoder: false."
                )

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return build_mae(backbone, self.hparams, "imputation")

    @property
    def band_names(self) -> list[str]:
        """Names of the input bands (metric keys ``MAE_<band>``)."""
        return self.hparams.bands or [str(i) for i in range(len(self.model.backbone.bands))]

    def metrics(self) -> MetricCollection:
        data_range = self.hparams.data_range
        return MetricCollection(
            {"PSNR": PeakSignalNoiseRatio(data_range=data_range),
             "SSIM": StructuralSimilarityIndexMeasure(data_range=data_range),
             **{f"MAE_{band}": MeanAbsoluteError() for band in self.band_names}},
        )

    def generator(self, device: torch.device, stage: str) -> torch.Generator | None:
        """None in training (fresh random gaps every step); else a generator seeded by the batch
        index, so every epoch (and run) scores the same gaps and hides the same extra tokens, and
        the checkpoint-selecting metric is not sampling noise."""
        return None if stage == "train" else torch.Generator(device).manual_seed(self.batch_idx)

    def gap_mask(self, batch: dict[str, Tensor], image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Gaps ``(B, T, H, W)`` bool for images ``(B, C, T, H, W)``, sampled with ``generator``."""
        b, _, t, h, w = image.shape
        if self.gaps == "mask":
            if "mask" not in batch:
                raise UserInputError("model.gaps: mask needs a mask per chip (data masks = the cloud masks)")
            return (batch["mask"] == self.hparams.gap_value).unsqueeze(1).expand(b, t, h, w)
        if self.gaps == "patches":
            patch = self.model.backbone.patch_size[1:]
            return sample_patch_gaps((b, t, h, w), patch, self.hparams.gap_fraction, generator, image.device)
        return sample_blob_gaps((b, t, h, w), self.hparams.gap_fraction, generator=generator, device=image.device)

    def impute(self, batch: dict[str, Tensor], stage: str = "train") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(image, filled, gaps, scored)``: truth and gap-filled images ``(B, C, T, H, W)``, the
        gaps and the pixels scored (gaps whose truth is not nodata), ``(B, T, H, W)``."""
        image = as_frames(batch["image"])
        generator = self.generator(image.device, stage)
        gaps = self.gap_mask(batch, image, generator)
        valid = batch["valid"].unsqueeze(1) if "valid" in batch else torch.ones_like(gaps[:, :1])
        scored = gaps & valid
        patch = self.model.backbone.patch_size
        keep = keep_from_hidden(hidden_tokens(gaps, patch), generator)
        coords = self.backbone_inputs(batch)
        pred, _, grid = self.model(image, keep=keep, **coords)
        recon = unpatchify(pred, patch, image.shape[1], grid) + visible_mean(image, ~gaps & valid)
        filled = torch.where(gaps.unsqueeze(1), recon, image)
        return image, filled, gaps, scored

    def compute_step(self, batch: dict[str, Tensor], stage: str) -> StepOutput:
        """Gap-filled images against the truth ``(B, C, T, H, W)``, scored on the gap pixels."""
        image, filled, _, scored = self.impute(batch, stage)
        scored_gaps = scored.unsqueeze(1).expand_as(image)
        loss = ((filled - image)[scored_gaps] ** 2).mean() if scored_gaps.any() else filled.sum() * 0.0
        return StepOutput(loss, filled, image, scored=scored_gaps)

    def sample_panels(self, batch: dict[str, Tensor], step: StepOutput, index: int) -> list[Panel]:
        """The time step with the most gap pixels: input (gaps black) | truth | gap-filled, one stretch."""
        truth, filled, gaps = step.target[index], step.preds[index], step.scored[index]  # (C, T, H, W)
        t = int(gaps[0].sum((-2, -1)).argmax())
        truth, filled, gaps = truth[:, t], filled[:, t], gaps[:, t]
        bands = self.band_names
        return [image_panel(truth.masked_fill(gaps, float("nan")), bands, f"input, gaps (t={t})", truth),
                image_panel(truth, bands, "truth"), image_panel(filled, bands, "gap-filled", truth)]

    def update_metrics(self, metrics: MetricCollection, step: StepOutput) -> None:
        """PSNR and per-band MAE over the scored gap pixels; SSIM over whole gap-filled frames."""
        filled, image, scored = step.preds.detach(), step.target, step.scored
        if scored.any():
            metrics["PSNR"].update(filled[scored], image[scored])
        metrics["SSIM"].update(_frames(filled), _frames(image))
        for c, band in enumerate(self.band_names):
            selected = scored[:, c]
            if selected.any():
                metrics[f"MAE_{band}"].update(filled[:, c][selected], image[:, c][selected])


def visible_mean(image: Tensor, seen: Tensor) -> Tensor:
    """Per-band mean ``(B, C, T, 1, 1)`` of ``image`` ``(B, C, T, H, W)`` over the ``seen``
    pixels ``(B, T, H, W)`` of each frame (0, the scene mean, where a frame has none)."""
    weight = seen.unsqueeze(1).to(image.dtype)
    return (image * weight).sum((-2, -1), keepdim=True) / weight.sum((-2, -1), keepdim=True).clamp(min=1)


def _frames(x: Tensor) -> Tensor:
    """``(B, C, T, H, W)`` → ``(B*T, C, H, W)``."""
    return x.transpose(1, 2).flatten(0, 1)
