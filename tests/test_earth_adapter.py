"""Earth-Adapter: exact counts, the frequency split against closed forms and an fftshift reference,
identity at init, frozen backbone and unchanged keys, multi-frame Prithvi, checkpointing, refusals."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import backbones  # noqa: F401
from backbones.builder import create_backbone
from tests.test_peft_menu import DEPTH, D, tiny, train
from tests.test_satvision_timm import TINY_SWIN, tiny_satvision
from workbench.errors import UserInputError
from workbench.model import (
    BackboneModel,
    EncoderClassifier,
    PointSegmenter,
    SeriesForecaster,
    build_encoder_decoder,
)
from workbench.strategies.base import count_parameters
from workbench.strategies.earth_adapter import (
    EarthAdapter,
    FrequencyMixtureAdapter,
    frequency_split,
)

M = 16  # bottleneck
TIMM_VIT = {"img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2, "out_indices": (0, 1)}
TIMM_SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 16, "depths": (1, 2), "num_heads": (1, 2)}


def per_block(dim: int, m: int = M) -> int:
    """Three experts (down D→m and up m→D, with biases) and the router D→3 (with bias)."""
    return 3 * (dim * m + m + m * dim + dim) + dim * 3 + 3


def swin_widths(embed_dim: int, depths: tuple[int, ...]) -> list[int]:
    return [embed_dim * 2**stage for stage, depth in enumerate(depths) for _ in range(depth)]


def drawn_norms(model: nn.Module) -> nn.Module:
    """timm zero-initialises SwinV2's post-norm scales; draw them as trained weights would be."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.1)
    return model


def timm_vit() -> BackboneModel:
    torch.manual_seed(0)
    return EncoderClassifier(create_backbone("vit_tiny_patch16_224", None, None, TIMM_VIT), 2)


def timm_swin() -> BackboneModel:
    torch.manual_seed(0)
    return EncoderClassifier(drawn_norms(create_backbone("swinv2_tiny_window8_256", None, None, TIMM_SWIN)), 2)


def satvision() -> BackboneModel:
    return EncoderClassifier(tiny_satvision(), 2)


MODELS: dict[str, tuple[Callable[[], BackboneModel], tuple[int, ...], list[int]]] = {  # model, input, block widths
    "prithvi": (tiny, (2, 6, 32, 32), [D] * DEPTH),
    "timm_vit": (timm_vit, (2, 3, 64, 64), [32] * 2),
    "satvision_swinv2": (satvision, (1, 14, 64, 64), swin_widths(32, TINY_SWIN["depths"])),
    "timm_swinv2": (timm_swin, (2, 3, 64, 64), swin_widths(16, TIMM_SWIN["depths"])),
}


def perturb_adapters(model: nn.Module) -> None:
    """Non-zero ``up`` projections, as after training, so the adapters change the outputs."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "earth_adapter." in name and ".up." in name:
            nn.init.normal_(param, std=0.3)


def reference_low(x: Tensor, cutoff: float) -> Tensor:
    """Low-pass of ``x`` ``(B, H, W, D)`` by the full complex DFT with the zero frequency shifted
    to the centre: keep ``|f| <= cutoff * 0.5`` cycles per token."""
    h, w = x.shape[1:3]
    fy, fx = (torch.arange(h) - h // 2) / h, (torch.arange(w) - w // 2) / w
    disk = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() <= 0.5 * cutoff
    spectrum = torch.fft.fftshift(torch.fft.fft2(x, dim=(1, 2)), dim=(1, 2)) * disk[..., None]
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(1, 2)), dim=(1, 2)).real


# --- the frequency split and the mixture ------------------------------------------------------


@pytest.mark.parametrize("cutoff", [0.25, 1.0])
def test_low_pass_keeps_the_constant_and_drops_the_checkerboard(cutoff: float) -> None:
    h, w = torch.arange(8)[:, None], torch.arange(6)[None, :]
    constant, amplitude = torch.randn(2, 1, 1, 5), torch.randn(2, 1, 1, 5)
    checkerboard = amplitude * (-1.0) ** (h + w)[..., None]  # frequency (1/2, 1/2): radius √2 · Nyquist
    x = constant + checkerboard
    low, high = frequency_split(x, cutoff)
    torch.testing.assert_close(low, constant.expand_as(x))
    torch.testing.assert_close(high, checkerboard)
    torch.testing.assert_close(low + high, x)


@pytest.mark.parametrize(("wave", "radius"), [((1, 0), 0.25), ((0, 1), 0.25), ((1, 1), math.sqrt(2) / 4)])
def test_cutoff_is_a_fraction_of_the_nyquist_frequency(wave: tuple[int, int], radius: float) -> None:
    """``cos 2π (k h + l w) / 8`` on an 8×8 grid lies at ``|f| = |(k, l)| / 8``, a fraction
    ``|(k, l)| / 4`` of Nyquist: in ``low`` for larger cutoffs, in ``high`` for smaller ones."""
    h, w = torch.arange(8.0)[:, None], torch.arange(8.0)[None, :]
    x = torch.cos(2 * math.pi * (wave[0] * h + wave[1] * w) / 8)[None, ..., None].expand(1, 8, 8, 3)
    low, high = frequency_split(x, radius + 0.05)
    torch.testing.assert_close(low, x, atol=1e-6, rtol=0)
    low, high = frequency_split(x, radius - 0.05)
    torch.testing.assert_close(high, x, atol=1e-6, rtol=0)
    assert low.abs().max() < 1e-6


def test_frequency_split_matches_a_centred_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 4)  # odd and even sides
    low, high = frequency_split(x, 0.6)
    torch.testing.assert_close(low, reference_low(x, 0.6))
    torch.testing.assert_close(low + high, x)
    assert low.dtype == x.dtype and not torch.allclose(low, x) and low.abs().sum() > 0
    half = x.to(torch.bfloat16)  # the DFT runs in float32, the parts keep the input's dtype
    low, high = frequency_split(half, 0.6)
    assert low.dtype == high.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference_low(half.float(), 0.6), atol=2e-2, rtol=2e-2)


def test_router_mixes_the_three_experts() -> None:
    torch.manual_seed(0)
    adapter = FrequencyMixtureAdapter(8, 4, cutoff=0.6, scale=0.5)
    perturb_adapters(nn.ModuleDict({"earth_adapter": adapter}))
    x = torch.randn(2, 5, 8, 8)
    low = reference_low(x, 0.6)
    weights = F.softmax(x @ adapter.router.weight.T + adapter.router.bias, dim=-1)

    def expert(e: nn.Module, c: Tensor) -> Tensor:
        return F.gelu(c @ e.down.weight.T + e.down.bias) @ e.up.weight.T + e.up.bias

    parts = [(adapter.spatial_expert, x), (adapter.low_expert, low), (adapter.high_expert, x - low)]
    expected = x + 0.5 * sum(weights[..., k, None] * expert(e, c) for k, (e, c) in enumerate(parts))
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), expected)
        assert all(not torch.allclose(expert(e, c), torch.zeros(())) for e, c in parts)


# --- the strategy -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(MODELS))
def test_trainable_counts_are_exact(key: str) -> None:
    build, _, widths = MODELS[key]
    model = build()
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    strategy = EarthAdapter(bottleneck=M)
    report = strategy.apply(model)
    assert report.backbone_trainable == sum(per_block(w) for w in widths)
    assert report.trainable == report.backbone_trainable + head
    assert (report.trainable, report.total) == count_parameters(model)
    assert sum(p.numel() for p in model.backbone.parameters() if id(p) in strategy.added_parameters) == \
        report.backbone_trainable


def test_every_adapts_every_kth_block() -> None:
    vit = tiny(EarthAdapter(bottleneck=M, every=2))
    assert [hasattr(b, "earth_adapter") for b in vit.backbone.blocks] == [False, True]
    swin = satvision()
    report = EarthAdapter(bottleneck=M, every=3).apply(swin)
    widths = swin_widths(32, TINY_SWIN["depths"])
    assert report.backbone_trainable == sum(per_block(w) for w in widths[2::3])
    with pytest.raises(UserInputError, match="every=3 adapts none of the 2 blocks of PrithviViT"):
        EarthAdapter(every=3).apply(tiny())


@pytest.mark.parametrize("key", list(MODELS))
def test_starts_as_the_pretrained_model_and_the_adapters_act(key: str) -> None:
    build, shape, _ = MODELS[key]
    plain, model = build().eval(), build()
    EarthAdapter(bottleneck=M).apply(model)
    image = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), plain(image), atol=0, rtol=0)
        perturb_adapters(model)
        assert not torch.allclose(model(image), plain(image), atol=1e-4)


def test_backbone_frozen_and_pretrained_keys_unchanged_after_training() -> None:
    plain = tiny()
    original = {n: p.detach().clone() for n, p in plain.backbone.named_parameters()}
    model = tiny(EarthAdapter(bottleneck=M))
    keys = set(model.state_dict())
    assert set(plain.state_dict()) <= keys and "backbone.blocks.0.mlp.fc1.weight" in keys
    added = keys - set(plain.state_dict())
    assert len(added) == DEPTH * 14 and all(k.startswith("backbone.blocks.") and ".earth_adapter." in k for k in added)
    head = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("backbone.")}
    train(model)
    for key, value in original.items():
        param = model.backbone.get_parameter(key)
        assert not param.requires_grad and torch.equal(param, value), key
    for name, param in model.named_parameters():
        if ".earth_adapter." in name and ".up." in name:
            assert param.requires_grad and param.abs().sum() > 0, name  # trained away from zero
    assert any(not torch.equal(model.get_parameter(n), v) for n, v in head.items())
    trained = EarthAdapter().trainable_state_dict(model)
    assert all(".earth_adapter." in k for k in trained if k.startswith("backbone."))
    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(model(image), plain.eval()(image))
        torch.testing.assert_close(copy.deepcopy(model)(image), model(image))  # hooks follow the copy
        fresh = tiny(EarthAdapter(bottleneck=M))
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh.eval()(image), model(image))


def test_multi_frame_prithvi_splits_each_frame_and_passes_the_cls_token() -> None:
    def build() -> BackboneModel:
        torch.manual_seed(0)
        vit = timm.create_model("prithvi_eo_v2_tiny_tl", depth=DEPTH, embed_dim=D, num_heads=2, img_size=32,
                                num_frames=2)
        return build_encoder_decoder(vit, "fcn", decoder_channels=16, num_classes=3)

    plain, model = build().eval(), build()
    EarthAdapter(bottleneck=M).apply(model)
    image = torch.randn(2, 6, 2, 32, 64)  # T=2 frames of a 2×4 patch grid
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), plain(image), atol=0, rtol=0)
        perturb_adapters(model)
        block = model.backbone.blocks[1]
        seen: list[Tensor] = []
        handle = block.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        model(image)
        handle.remove()
        tokens = block.forward(seen[0])  # the block without its hook: (B, 1 + 2*2*4, D)
        frames = [block.earth_adapter(tokens[:, 1 + 8 * t: 9 + 8 * t].reshape(2, 2, 4, D)).reshape(2, 8, D)
                  for t in range(2)]
        adapted = block(seen[0])
        torch.testing.assert_close(adapted, torch.cat([tokens[:, :1], *frames], 1))
        assert torch.equal(adapted[:, 0], tokens[:, 0]) and not torch.allclose(adapted[:, 1:], tokens[:, 1:])
        assert model(image).shape == (2, 3, 32, 64)


def test_checkpointing_keeps_the_gradients_across_input_sizes() -> None:
    """Checkpointed blocks are recomputed in backward, after later forwards of other sizes."""
    x, y = torch.randn(2, 6, 32, 32), torch.randn(2, 6, 32, 64)
    grads = []
    for enable in (False, True):
        model = tiny(EarthAdapter(bottleneck=M))
        train(model, steps=1)
        model.eval().zero_grad()
        model.backbone.set_grad_checkpointing(enable)
        (model(x).square().mean() + model(y).abs().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(g.abs().sum() > 0 for k, g in grads[0].items() if ".earth_adapter." in k)
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("build", "kind"), [
    (lambda: PointSegmenter(timm.create_model("point_mae_tiny", num_groups=8, group_size=8, embed_dim=32, depth=2,
                                              num_heads=2), 3), "PointTransformer"),
    (lambda: SeriesForecaster(timm.create_model("patchtst_tiny", context_length=48, patch_len=8, stride=4,
                                                embed_dim=32, depth=2, num_heads=2), 48, 8), "PatchTST"),
])
def test_backbones_without_a_patch_grid_refuse_in_one_line(build: Callable[[], BackboneModel], kind: str) -> None:
    model = build()
    with pytest.raises(UserInputError, match=rf"^earth_adapter .* Block blocks of backbone {kind} are not on a 2-D "
                                             r"patch grid .*: use lora or bottleneck for it\.$") as err:
        EarthAdapter().apply(model)
    assert "\n" not in str(err.value)
    assert all(p.requires_grad for p in model.parameters())  # refused before touching anything
    assert not any(hasattr(b, "earth_adapter") for b in model.backbone.blocks)


def test_masked_tokens_and_bad_knobs_refuse() -> None:
    model = tiny(EarthAdapter()).eval()
    model(torch.randn(1, 6, 32, 32))
    with pytest.raises(UserInputError, match=r"3 patch tokens of PrithviViT do not fill .* \(\(1, 2, 2\)\)"):
        model.backbone.blocks[0](torch.randn(1, 4, D))  # cls + 3 of the 4 patches, as an MAE pass
    with pytest.raises(UserInputError, match="cutoff=0 must lie in"):
        EarthAdapter(cutoff=0)
    with pytest.raises(UserInputError, match="cutoff=1.5 must lie in"):
        EarthAdapter(cutoff=1.5)
    with pytest.raises(UserInputError, match="bottleneck=0 and every=1 must be >= 1"):
        EarthAdapter(bottleneck=0)
