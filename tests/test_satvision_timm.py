"""SatVision-TOA SwinV2 (official checkpoint layout, strategies across stages) and generic timm
backbones behind the same interface."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones import SatVisionSwinV2, load_satvision
from backbones.builder import create_backbone
from tests.conftest import fit_run, write_config
from workbench.errors import UserInputError
from workbench.model import build_encoder_decoder
from workbench.strategies import SSF, LoRA, VeRA

TINY_SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (2, 2, 4, 4)}


def tiny_satvision() -> SatVisionSwinV2:
    """Seeded; timm zero-initialises SwinV2's post-norm scales (each block starts as identity),
    so they are drawn here as trained weights would be, or attention would not reach the output."""
    torch.manual_seed(0)
    model = create_backbone("satvision_toa_tiny", None, None, TINY_SWIN)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.1)
    return model


def write_official_satvision(model: SatVisionSwinV2, path: Path) -> dict[str, torch.Tensor]:
    """The layout of the released SatVision-TOA files: a DeepSpeed ``module`` dict of SimMIM
    ``encoder.*`` keys in Microsoft's SwinV2 layout (patch merging at the END of each stage, with
    the relative-position buffers) plus the SimMIM ``decoder.*`` and ``mask_token``."""
    encoder = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
               for k, v in model.model.state_dict().items()}
    for name, buffer in model.model.named_buffers():
        if "relative_coords_table" in name or "relative_position_index" in name:
            encoder[name] = buffer
    state = {f"encoder.{k}": v.clone() for k, v in encoder.items()}
    state["encoder.mask_token"] = torch.zeros(1, 1, 32)
    state["decoder.0.weight"] = torch.zeros(16 * 14, 256, 1, 1)
    torch.save({"module": state}, path)
    return state


def test_satvision_features_are_hierarchical() -> None:
    features = tiny_satvision().forward_intermediates(torch.randn(2, 14, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    with pytest.raises(UserInputError, match="14"):
        tiny_satvision().forward_intermediates(torch.randn(2, 6, 64, 64))


def test_official_satvision_checkpoint_loads_exactly(tmp_path: Path) -> None:
    source = tiny_satvision()
    state = write_official_satvision(source, tmp_path / "satvision.pt")
    assert "encoder.layers.0.downsample.reduction.weight" in state  # the MS layout, not timm's
    torch.manual_seed(1)
    target = create_backbone("satvision_toa_tiny", None, str(tmp_path / "satvision.pt"), TINY_SWIN)
    for key, value in source.model.state_dict().items():
        assert torch.equal(target.model.state_dict()[key], value), key
    image = torch.randn(1, 14, 64, 64)
    torch.testing.assert_close(target.eval().forward_intermediates(image)[-1], source.eval().forward_intermediates(image)[-1])
    wrong = create_backbone("satvision_toa_tiny", None, None, {**TINY_SWIN, "embed_dim": 64})
    with pytest.raises(UserInputError, match="does not fit"):
        load_satvision(wrong, tmp_path / "satvision.pt")


def test_extra_norm_period_adds_swinv2g_post_norms_after_every_nth_block() -> None:
    """SatVision-TOA giant's NORM_PERIOD 6: ``norm3`` after blocks 5, 11, ... of a stage (official
    keys ``layers.<s>.blocks.<i>.norm3``); such a block's output is its plain output, normalised."""
    torch.manual_seed(0)
    plain = SatVisionSwinV2(**{**TINY_SWIN, "depths": (2, 2, 6, 2)})
    torch.manual_seed(0)
    normed = SatVisionSwinV2(**{**TINY_SWIN, "depths": (2, 2, 6, 2)}, extra_norm_period=3)
    assert sorted(k for k in normed.state_dict() if "norm3" in k) == [
        f"model.layers.2.blocks.{i}.norm3.{p}" for i in (2, 5) for p in ("bias", "weight")]
    assert set(normed.state_dict()) - set(plain.state_dict()) == {k for k in normed.state_dict() if "norm3" in k}
    tokens = torch.randn(2, 4, 4, 128)
    block, reference = normed.model.layers[2].blocks[2], plain.model.layers[2].blocks[2]
    nn.init.normal_(block.norm3.weight)
    block.load_state_dict(reference.state_dict(), strict=False)
    torch.testing.assert_close(block(tokens), block.norm3(reference(tokens)))
    assert not torch.allclose(block(tokens), reference(tokens))


def lora_count(backbone: nn.Module, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for n, m in backbone.named_modules()
               if isinstance(m, nn.Linear) and n.endswith(("attn.qkv", "attn.proj")))


@pytest.mark.parametrize("strategy", [LoRA(rank=4), SSF(), VeRA(rank=8)], ids=["lora", "ssf", "vera"])
def test_strategies_across_stages_of_different_widths(strategy) -> None:
    torch.manual_seed(0)
    backbone = tiny_satvision()
    expected = {"lora": lora_count(backbone, 4),
                "ssf": sum((1 + (m.bias is not None)) * m.weight.shape[0] for m in backbone.modules()
                           if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d)) and m.weight is not None),
                "vera": sum(m.out_features + 8 for n, m in backbone.named_modules()
                            if isinstance(m, nn.Linear) and n.endswith(("attn.qkv", "attn.proj")))}[strategy.name]
    model = build_encoder_decoder(backbone, "uper", 16, 3)
    report = strategy.apply(model)
    assert report.backbone_trainable == expected
    with torch.no_grad():  # adapters that were bypassed would leave the output unchanged
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    image = torch.randn(1, 14, 64, 64)
    frozen_only = build_encoder_decoder(tiny_satvision(), "uper", 16, 3).eval()
    frozen_only.load_state_dict({k: v for k, v in strategy.merged(model).state_dict().items()})
    torch.testing.assert_close(frozen_only(image), model(image), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(strategy.merged(model).backbone.forward_intermediates(image)[-1],
                              tiny_satvision().eval().forward_intermediates(image)[-1], atol=1e-3)


def test_timm_backbone_by_name_fits_through_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path, model={"backbone": "vit_tiny_patch16_224",
                                           "backbone_kwargs": {"img_size": 32, "in_chans": 6, "out_indices": [2, 5, 8, 11]}},
                          trainer={"max_epochs": 2})
    losses, results = fit_run(config)
    assert len(losses) == 2 and results["backbone_trainable"] == lora_count(
        create_backbone("vit_tiny_patch16_224", None, None, {"img_size": 32}), 4)
    convnext = create_backbone("convnext_atto", ["B"] * 5, None, None)
    assert [f.shape[1] for f in convnext.forward_intermediates(torch.randn(1, 5, 64, 64))] == [40, 80, 160, 320]


def test_smp_encoder_loads_a_unet_checkpoint_and_fits(tmp_path: Path) -> None:
    import segmentation_models_pytorch as smp

    unet = smp.Unet("resnet18", encoder_weights=None, in_channels=6, classes=3)  # e.g. a released EO U-Net
    torch.save({"state_dict": {f"model.{k}": v for k, v in unet.state_dict().items()}}, tmp_path / "unet.ckpt")
    encoder = create_backbone("smp:resnet18", ["B"] * 6, str(tmp_path / "unet.ckpt"), None)
    for key, value in unet.encoder.state_dict().items():
        torch.testing.assert_close(encoder.model.state_dict()[key], value)
    assert [i["reduction"] for i in encoder.feature_info] == [2, 4, 8, 16, 32]
    with pytest.raises(UserInputError, match="does not fit"):
        create_backbone("smp:resnet34", ["B"] * 6, str(tmp_path / "unet.ckpt"), None)

    config = write_config(tmp_path, model={"backbone": "smp:resnet18", "backbone_kwargs": {"in_chans": 6},
                                           "strategy": {"class_path": "workbench.strategies.BitFit"}},
                          trainer={"max_epochs": 2})
    losses, results = fit_run(config)
    biases = sum(m.bias.numel() for m in encoder.modules() if getattr(m, "bias", None) is not None)
    assert len(losses) == 2 and results["backbone_trainable"] == biases  # BatchNorm betas: the CNN's biases
