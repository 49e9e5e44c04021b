"""Heads, EncoderDecoder and the adaptation strategies: exact counts, freezing, merging."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import backbones  # noqa: F401
from heads import FCN, UPerNet, ViTFeaturePyramid, build_decoder, build_neck
from workbench.errors import UserInputError
from workbench.model import EncoderDecoder, build_encoder_decoder
from workbench.strategies import Frozen, Full, LoRA, count_parameters


def vit(width: int = 64, **kwargs) -> nn.Module:
    return timm.create_model("prithvi_eo_v2_tiny_tl", depth=2, embed_dim=width, num_heads=2, img_size=32,
                             **kwargs)


def model(width: int = 64, decoder: str = "fcn", **kwargs) -> EncoderDecoder:
    torch.manual_seed(0)
    return build_encoder_decoder(vit(width, **kwargs), decoder, decoder_channels=16, num_classes=3)


def lora_count(backbone: nn.Module, rank: int, suffixes: tuple[str, ...]) -> int:
    return sum(rank * (m.in_features + m.out_features) for n, m in backbone.named_modules()
               if isinstance(m, nn.Linear) and n.endswith(suffixes))


def train_steps(m: EncoderDecoder, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(m(torch.randn(2, 6, 32, 32)), torch.randint(0, 3, (2, 32, 32)))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_pyramid_neck_and_decoders() -> None:
    maps = [torch.randn(2, 64, 4, 4) for _ in range(4)]
    neck = ViTFeaturePyramid([64] * 4)
    assert [tuple(f.shape[-2:]) for f in neck(maps)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    pyramid = neck(maps)
    assert UPerNet([64] * 4, 32)(pyramid).shape == (2, 32, 16, 16)
    assert FCN([64] * 4, 32)(pyramid).shape == (2, 32, 2, 2)
    with pytest.raises(UserInputError, match="one entry per backbone level"):
        ViTFeaturePyramid([64] * 3, (4, 2, 1, 0.5))
    with pytest.raises(UserInputError, match="fcn"):
        build_decoder("segformer", [64] * 4)
    hierarchical = [{"num_chs": c, "reduction": r} for c, r in ((32, 4), (64, 8), (128, 16))]
    assert build_neck(hierarchical) is None


def test_lean_neck_divides_the_upsampled_channels() -> None:
    c = 64
    maps = [torch.randn(2, c, 4, 4) for _ in range(4)]
    lean, wide = ViTFeaturePyramid([c] * 4, lean=True), ViTFeaturePyramid([c] * 4)
    assert lean.out_channels == [16, 32, 64, 64]
    assert [tuple(f.shape[1:]) for f in lean(maps)] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (64, 2, 2)]
    transposed = lambda i, o: i * o * 4 + o  # noqa: E731  (2x2 kernel + bias)
    # x4: C -> C/2 (+ GroupNorm of C/2) -> C/4; x2: C -> C/2; identity and max-pool have none
    expected = transposed(c, c // 2) + 2 * (c // 2) + transposed(c // 2, c // 4) + transposed(c, c // 2)
    assert sum(p.numel() for p in lean.parameters()) == expected
    assert sum(p.numel() for p in wide.parameters()) == 3 * transposed(c, c) + 2 * c
    assert UPerNet(lean.out_channels, 32)(lean(maps)).shape == (2, 32, 16, 16)
    lean_decoder, wide_decoder = UPerNet(lean.out_channels, 32), UPerNet(wide.out_channels, 32)
    assert sum(p.numel() for p in lean_decoder.parameters()) < sum(p.numel() for p in wide_decoder.parameters())


def test_a_checkpoint_with_the_other_neck_is_named_with_the_fix(tmp_path) -> None:
    from tests.conftest import TINY_BACKBONE
    from workbench.checkpoints import load_lightning_weights
    from workbench.tasks import SegmentationTask

    wide = SegmentationTask(num_classes=2, decoder_channels=8, neck="wide", backbone_kwargs=TINY_BACKBONE)
    default = SegmentationTask(num_classes=2, decoder_channels=8, backbone_kwargs=TINY_BACKBONE)
    assert default.hparams.neck == "lean"
    ckpt = {"state_dict": wide.state_dict()}
    with pytest.raises(UserInputError, match="trained with neck: wide .*set model.init_args.neck: wide"):
        load_lightning_weights(default, ckpt, tmp_path / "old.ckpt")
    again = SegmentationTask(num_classes=2, decoder_channels=8, neck="wide", backbone_kwargs=TINY_BACKBONE)
    load_lightning_weights(again, ckpt, tmp_path / "old.ckpt")  # the named fix loads it
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ckpt["state_dict"].items())


@pytest.mark.parametrize("decoder", ["uper", "fcn"])
def test_logits_at_input_size(decoder: str) -> None:
    assert model(decoder=decoder)(torch.randn(2, 6, 32, 48)).shape == (2, 3, 32, 48)
    temporal = model(decoder=decoder, num_frames=2)
    assert temporal(torch.randn(2, 6, 2, 32, 32)).shape == (2, 3, 32, 32)


def test_full_and_frozen_counts() -> None:
    m = model()
    total = sum(p.numel() for p in m.parameters())
    report = Full().apply(m)
    assert (report.trainable, report.total) == (total, total)
    m = model()
    report = Frozen().apply(m)
    backbone = sum(p.numel() for p in m.backbone.parameters())
    assert report.backbone_trainable == 0 and report.backbone_total == backbone
    assert report.trainable == total - backbone
    assert all(p.requires_grad for mod in (m.neck, m.decoder, m.head) for p in mod.parameters())
    assert "frozen" in str(report) and f"{total - backbone:,}" in str(report)


def test_lora_counts_are_exact_and_small() -> None:
    m = model(width=192)
    decoder_side = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("backbone."))
    expected = lora_count(m.backbone, 4, ("attn.qkv", "attn.proj"))
    report = LoRA(rank=4).apply(m)
    assert report.backbone_trainable == expected
    assert report.trainable == expected + decoder_side
    assert report.backbone_trainable / report.backbone_total < 0.05
    assert count_parameters(m) == (report.trainable, report.total)


def test_frozen_backbone_stays_in_eval_and_unchanged() -> None:
    m = model(drop_path_rate=0.5)
    Frozen().apply(m)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    decoder_before = m.head.conv.weight.clone()
    train_steps(m)
    assert m.training and not m.backbone.training
    x = torch.randn(1, 6, 32, 32)
    assert torch.equal(m.backbone(x)[-1], m.backbone(x)[-1])  # no drop-path in train mode
    assert all(torch.equal(v, m.backbone.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(decoder_before, m.head.conv.weight)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_trains_adapters_only_and_merges(use_dora: bool) -> None:
    m = model()
    strategy = LoRA(rank=4, use_dora=use_dora)
    strategy.apply(m)
    base = m.backbone.blocks[0].attn.qkv.base_layer.weight.clone()
    lora_b = m.backbone.blocks[0].attn.qkv.lora_B["default"].weight.clone()
    train_steps(m)
    assert torch.equal(base, m.backbone.blocks[0].attn.qkv.base_layer.weight)
    assert not torch.equal(lora_b, m.backbone.blocks[0].attn.qkv.lora_B["default"].weight)
    m.eval()
    merged = strategy.merged(m).eval()
    x = torch.randn(2, 6, 32, 32)
    torch.testing.assert_close(merged(x), m(x), atol=1e-5, rtol=1e-4)
    plain = model()
    plain.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(plain.eval()(x), m(x), atol=1e-5, rtol=1e-4)


def test_trainable_state_dict_is_what_trained() -> None:
    m = model(decoder="uper")
    strategy = LoRA(rank=2)
    strategy.apply(m)
    state = strategy.trainable_state_dict(m)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(state)
    assert any("lora_A" in k for k in state) and any(k.endswith("running_mean") for k in state)
    assert set(state) | frozen == set(m.state_dict())


def test_bad_lora_target_lists_linear_layers() -> None:
    with pytest.raises(UserInputError, match="attn.qkv.*mlp.fc1|mlp.fc1.*attn.qkv"):
        LoRA(target_modules=["attn.qkvv"]).apply(model())
