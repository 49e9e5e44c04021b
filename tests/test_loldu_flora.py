"""LoLDU and FLoRA: exact trainable counts (tiny ViT, csmask U-Net encoder), models that start as
the pretrained one, merged exports equal to the adapted model, the LDU and Tucker forms against
references computed here, and one-line refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import backbones  # noqa: F401
from backbones.builder import create_backbone
from tests.test_peft_menu import ATTN, DEPTH, D, tiny
from workbench.errors import UserInputError
from workbench.model import EncoderDecoder
from workbench.strategies.base import Strategy
from workbench.strategies.lowrank import (
    FLoRA,
    LoLDU,
    LowerDiagUpper,
    TuckerDelta,
    ldu,
    tucker,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while these tests run: on a shared 2-core machine two spinning OpenMP
    threads make the csmask cases ~20× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flora_count(shape: tuple[int, ...], rank: int) -> int:
    """Core ``Π r_n`` plus factors ``Σ d_n r_n``, ``r_n = min(rank, d_n)``."""
    ranks = [min(rank, d) for d in shape]
    return math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))


EXPECTED_BACKBONE_TRAINABLE = {
    "loldu": DEPTH * sum(min(16, i, o) + 1 for i, o in ATTN),  # diagonal (rank 16) + scale
    "loldu_diagonal_only": DEPTH * sum(min(16, i, o) for i, o in ATTN),
    "flora": DEPTH * sum(8 * 8 + 8 * (i + o) for i, o in ATTN),  # rank 8: core 8×8, factors (out, 8), (in, 8)
    # + the Conv3d patch embedding (64, 6, 1, 16, 16): core 8·6·1·8·8 (kernel modes 16 capped at 8),
    # factors 64·8 + 6·6 + 1·1 + 2·16·8
    "flora_patch": DEPTH * sum(8 * 8 + 8 * (i + o) for i, o in ATTN)
    + 8 * 6 * 1 * 8 * 8 + 64 * 8 + 6 * 6 + 1 + 2 * 16 * 8,
}


def make_strategy(name: str) -> Strategy:
    return {
        "loldu": lambda: LoLDU(rank=16),
        "loldu_diagonal_only": lambda: LoLDU(rank=16, train_scale=False),
        "flora": lambda: FLoRA(rank=8, alpha=16),
        "flora_patch": lambda: FLoRA(rank=8, target_modules=["attn.qkv", "attn.proj", "patch_embed.proj"]),
    }[name]()


def train(model: nn.Module, image_size: int = 32, steps: int = 3, lr: float = 0.05, train_mode: bool = True) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    model.train(train_mode)
    for _ in range(steps):
        image = torch.randn(2, 6, image_size, image_size)
        loss = sum(f.square().mean() for f in model.backbone.forward_intermediates(image))
        if isinstance(model, EncoderDecoder) and not isinstance(model.decoder, nn.Identity):
            loss = loss + nn.functional.cross_entropy(model(image), torch.randint(0, 3, (2, image_size, image_size)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(EXPECTED_BACKBONE_TRAINABLE))
def test_starts_as_pretrained_and_merges_after_training(name: str) -> None:
    plain, model = tiny().eval(), tiny().eval()
    original = [(n, p, p.detach().clone()) for n, p in model.backbone.named_parameters()]
    strategy = make_strategy(name)
    report = strategy.apply(model)
    assert report.backbone_trainable == EXPECTED_BACKBONE_TRAINABLE[name]
    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(image), plain(image))

    train(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    merged = strategy.merged(model).eval()
    with torch.no_grad():
        adapted = model(image)
        torch.testing.assert_close(merged(image), adapted, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(adapted, plain(image), atol=1e-3)  # training changed the model
    assert merged.state_dict().keys() == plain.state_dict().keys()
    assert not any("base_layer" in k for k in merged.state_dict())
    qkv = merged.backbone.blocks[0].attn.qkv
    assert type(qkv) is nn.Linear and not torch.allclose(qkv.weight, plain.backbone.blocks[0].attn.qkv.weight)
    kept = {id(p) for p in model.backbone.parameters()}
    for param_name, param, value in original:  # the frozen pretrained weights stay bit-identical
        assert id(param) in kept and not param.requires_grad and torch.equal(param, value), param_name


def test_ldu_reconstructs_the_weight() -> None:
    """``W = P L diag(d) U`` with a permutation P, unit-lower L and unit-upper U, for tall and wide W."""
    for shape in [(12, 7), (7, 12), (9, 9)]:
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
        p, lower, d, upper = ldu(weight)
        k = min(shape)
        assert p.shape == (shape[0], shape[0]) and lower.shape == (shape[0], k) and upper.shape == (k, shape[1])
        torch.testing.assert_close(p @ lower @ torch.diag(d) @ upper, weight)
        torch.testing.assert_close(p @ p.T, torch.eye(shape[0], dtype=torch.float64))
        assert set(p.flatten().tolist()) == {0.0, 1.0}
        torch.testing.assert_close(torch.diagonal(lower), torch.ones(k, dtype=torch.float64))
        torch.testing.assert_close(torch.diagonal(upper), torch.ones(k, dtype=torch.float64))
        assert torch.equal(lower.triu(1), torch.zeros_like(lower))
        assert torch.equal(upper.tril(-1), torch.zeros_like(upper))


def test_loldu_update_is_the_leading_ldu_components_and_only_the_diagonal_trains() -> None:
    strategy = LoLDU(rank=16)
    model = tiny(strategy)
    layer = model.backbone.blocks[0].attn.qkv
    assert isinstance(layer, LowerDiagUpper)
    weight = layer.base_layer.weight.detach().clone()
    p, lower, upper = torch.linalg.lu(weight)  # the reference, from torch directly
    pivots = torch.diagonal(upper)
    left, right = (p @ lower)[:, :16], (upper / pivots[:, None])[:16]
    torch.testing.assert_close(layer.lower, left)
    torch.testing.assert_close(layer.upper, right)
    torch.testing.assert_close(layer.diagonal.detach(), pivots[:16])  # z starts at the pivots d_1..d_r

    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    wrapped = [f"blocks.{b}.attn.{m}" for b in range(DEPTH) for m in ("qkv", "proj")]
    assert trainable == {f"{w}.{p}" for w in wrapped for p in ("diagonal", "scale")}
    only_z = tiny(LoLDU(rank=16, train_scale=False))
    assert {n for n, p in only_z.backbone.named_parameters() if p.requires_grad} == {f"{w}.diagonal" for w in wrapped}

    z, scale = torch.linspace(-1.0, 2.0, 16), torch.tensor(0.5)
    with torch.no_grad():
        layer.diagonal.copy_(z)
        layer.scale.copy_(scale)
    expected = weight + left @ torch.diag(scale * z - pivots[:16]) @ right  # W − P L_r D_r U_r + σ P L_r diag(z) U_r
    merged = strategy.merged(model).backbone.blocks[0].attn.qkv
    torch.testing.assert_close(merged.weight, expected, atol=1e-4, rtol=1e-4)
    x = torch.randn(3, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected.T + layer.base_layer.bias, atol=1e-4, rtol=1e-4)


def test_tucker_product_equals_the_explicit_sum() -> None:
    """``(G ×_1 A_1 … ×_4 A_4)[a, b, c, d] = Σ_{ijkl} G[i,j,k,l] A_1[a,i] A_2[b,j] A_3[c,k] A_4[d,l]``."""
    g = torch.Generator().manual_seed(0)
    core = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    factors = [torch.randn(d, r, generator=g, dtype=torch.float64) for d, r in zip((4, 5, 3, 2), core.shape)]
    reference = torch.zeros(4, 5, 3, 2, dtype=torch.float64)
    for i, j, k, m in torch.cartesian_prod(*(torch.arange(r) for r in core.shape)).tolist():
        a1, a2, a3, a4 = (f[:, n] for f, n in zip(factors, (i, j, k, m)))
        reference += core[i, j, k, m] * a1[:, None, None, None] * a2[None, :, None, None] * a3[None, None, :, None] * a4
    torch.testing.assert_close(tucker(core, factors), reference)

    torch.manual_seed(1)
    conv = nn.Conv2d(5, 4, (3, 2), padding=1)  # weight (4, 5, 3, 2)
    layer = TuckerDelta(copy.deepcopy(conv), rank=3, alpha=6.0)
    assert layer.core.shape == (3, 3, 3, 2) and [f.shape for f in layer.factors] == [(4, 3), (5, 3), (3, 3), (2, 2)]
    assert torch.equal(layer.update(), torch.zeros(4, 5, 3, 2))  # the core starts at zero
    with torch.no_grad():
        layer.core.normal_()
    core, factors = layer.core.detach().double(), [f.detach().double() for f in layer.factors]
    delta = torch.zeros(4, 5, 3, 2, dtype=torch.float64)
    for i, j, k, m in torch.cartesian_prod(*(torch.arange(r) for r in core.shape)).tolist():
        a1, a2, a3, a4 = (f[:, n] for f, n in zip(factors, (i, j, k, m)))
        delta += core[i, j, k, m] * a1[:, None, None, None] * a2[None, :, None, None] * a3[None, None, :, None] * a4
    expected = conv.weight.detach() + 2.0 * delta.float()  # s = alpha / rank
    x = torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer.merged_layer().weight, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x), nn.functional.conv2d(x, expected, conv.bias, padding=1),
                                   atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def csmask() -> nn.Module:
    """The csmask U-Net's EfficientNet-B4 encoder, random init (the 1×1 and depthwise layouts are
    what matter), its BatchNorm statistics set from one batch so that the deep features do not vanish."""
    torch.manual_seed(0)
    encoder = create_backbone("csmask_unet_effb4_s2", None, None, None)
    for bn in encoder.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: the statistics of the batch below
    with torch.no_grad():
        encoder.train().forward_intermediates(torch.randn(4, 6, 32, 32))
    return encoder.eval()


CSMASK_CASES = {
    "flora": (lambda: FLoRA(target_modules=["_expand_conv", "_project_conv", "_depthwise_conv"]),
              lambda c: flora_count((c.out_channels, c.in_channels // c.groups, *c.kernel_size), 8)),
    "loldu": (lambda: LoLDU(target_modules=["_se_reduce", "_se_expand"]),  # 1×1 convs with biases, some < 16 wide
              lambda c: min(16, c.out_channels, c.in_channels // c.groups) + 1),
}


def assert_features_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("name", sorted(CSMASK_CASES))
def test_csmask_counts_start_and_merge(csmask: nn.Module, name: str) -> None:
    make, per_layer = CSMASK_CASES[name]
    strategy = make()
    plain = EncoderDecoder(copy.deepcopy(csmask), None, nn.Identity(), nn.Identity())
    targeted = [m for n, m in plain.backbone.named_modules() if n.endswith(tuple(strategy.target_modules))]
    assert len(targeted) == {"flora": 30 + 32 + 32, "loldu": 32 + 32}[name]
    expected = sum(per_layer(c) for c in targeted)  # from the conv attributes, not the weights
    if name == "flora":  # the depthwise convs: in/groups = 1, full 3×3 / 5×5 kernel modes
        assert any(c.groups == c.in_channels == c.out_channels > 1 and c.kernel_size == (5, 5) for c in targeted)
    model = copy.deepcopy(plain)
    report = strategy.apply(model)
    assert report.backbone_trainable == report.trainable == expected
    assert sum(isinstance(m, strategy.wrapper_types) for m in model.backbone.modules()) == len(targeted)

    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        before = plain.backbone.forward_intermediates(image)
        assert_features_close(model.eval().backbone.forward_intermediates(image), before)
    # BatchNorm kept in eval mode (batch statistics of 2 images are degenerate at stride 32); LoLDU:
    # Adam moves each z_i by ~lr, so its LDU component by ~lr / |d_i| (keep lr small)
    train(model, image_size=32, steps=2, lr=1e-2 if name == "flora" else 1e-3, train_mode=False)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    merged = strategy.merged(model).eval()
    with torch.no_grad():
        adapted = model.backbone.forward_intermediates(image)
        assert_features_close(merged.backbone.forward_intermediates(image), adapted, tol=1e-4)
        assert not torch.allclose(adapted[-1], before[-1], rtol=1e-2, atol=1e-2 * before[-1].abs().max().item())
    assert merged.state_dict().keys() == plain.state_dict().keys()


def test_loldu_refuses_wider_kernels_in_one_line_before_changing_anything(csmask: nn.Module) -> None:
    model = EncoderDecoder(copy.deepcopy(csmask), None, nn.Identity(), nn.Identity())
    with pytest.raises(UserInputError, match=r"^loldu adapts Linear layers and 1×1 convs only, but "
                                             r"\S*_blocks\.0\._depthwise_conv \(and 31 more\) is a Conv2d\w* "
                                             r"with a 3×3 "
                                             r"kernel: target pointwise convs or use flora$"):
        LoLDU(target_modules=["_project_conv", "_depthwise_conv"]).apply(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, LowerDiagUpper) for m in model.modules())
    with pytest.raises(UserInputError, match=r"patch_embed\.proj is a Conv3d with a 1×16×16 kernel"):
        tiny(LoLDU(target_modules=["patch_embed.proj"]))


@pytest.mark.parametrize("strategy", [LoLDU(target_modules=["nope"]), FLoRA(target_modules=["nope"])],
                         ids=["loldu", "flora"])
def test_targets_matching_none_name_the_layers(strategy: Strategy) -> None:
    with pytest.raises(UserInputError, match=r"^(loldu|flora) target_modules \['nope'\] match no "
                                             r"Linear/Conv1d/Conv2d/Conv3d layer of PrithviViT; it has: "
                                             r"attn\.proj, attn\.qkv, mlp\.fc1, mlp\.fc2, patch_embed\.proj$"):
        tiny(strategy)
