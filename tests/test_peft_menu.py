"""The PEFT menu: exact trainable counts per method, merged exports, untouched encoders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import backbones  # noqa: F401
from tests.conftest import write_config
from workbench.cli import main
from workbench.errors import UserInputError
from workbench.model import EncoderDecoder, build_encoder_decoder
from workbench.optim import parameter_groups
from workbench.strategies import (
    BOFT, IA3, OFT, SSF, STRATEGIES, VPT, AdaptFormer, BitFit, Frozen, HalfFineTuning, HydraStrategy, InitBatches,
    LastBlocks, LoHa, LoRA, NormOnly, Strategy, SVFit, VeRA, count_parameters,
)  # fmt: skip

# The tiny ViT: width D=64, depth 2, MLP 4D, fused qkv (D → 3D), 6 bands → Conv3d patch embedding.
D, DEPTH, HIDDEN = 64, 2, 256
ATTN = [(D, 3 * D), (D, D)]  # (in, out) of attn.qkv and attn.proj
PER_BLOCK_BIASES = D + 3 * D + D + D + HIDDEN + D  # norm1, qkv, proj, norm2, fc1, fc2
PER_BLOCK_SSF = 2 * (D + 3 * D + D + D + HIDDEN + D)  # scale + shift after each Linear and LayerNorm

EXPECTED_BACKBONE_TRAINABLE = {
    "lora": DEPTH * sum(4 * (i + o) for i, o in ATTN),  # rank 4
    "loha": DEPTH * sum(2 * 4 * (i + o) for i, o in ATTN),  # two rank-4 factor pairs
    "ia3": DEPTH * (3 * D + HIDDEN),  # qkv outputs, fc2 inputs
    "vera": DEPTH * sum(o + 16 for _, o in ATTN),  # lambda_b (out) + lambda_d (rank 16)
    "oft": DEPTH * sum((i // 8) * 8 * 7 // 2 for i, _ in ATTN),  # skew-symmetric 8×8 blocks
    "bitfit": DEPTH * PER_BLOCK_BIASES + D + D,  # + patch-embed bias, final norm bias
    "norm": DEPTH * 4 * D + 2 * D,  # two LayerNorms per block + final norm
    "ssf": DEPTH * PER_BLOCK_SSF + 2 * D + 2 * D,  # + patch-embed conv, final norm
    "vpt": DEPTH * 5 * D,  # 5 deep prompts per block
    "vpt_shallow": 5 * D,
    "adaptformer": DEPTH * (D * 16 + 16 + 16 * D + D),  # bottleneck 16
    "last_k": (3 * D * D + 3 * D + D * D + D + 4 * D + 2 * D * HIDDEN + HIDDEN + D) + 2 * D,  # 1 block + norm
    "frozen": 0,
    "hydra": DEPTH * sum(4 * (i + o) + 2 * 4 * o for i, o in ATTN),  # rank 4: parallel in→out, sequential out→out
    "svfit": DEPTH * len(ATTN) * 16,  # 16 singular values per layer
}


def make_strategy(name: str) -> Strategy:
    return {
        "lora": lambda: LoRA(rank=4),
        "loha": lambda: LoHa(rank=4),
        "ia3": IA3,
        "vera": lambda: VeRA(rank=16),
        "oft": lambda: OFT(block_size=8),
        "boft": lambda: BOFT(block_size=8),
        "bitfit": BitFit,
        "norm": NormOnly,
        "ssf": SSF,
        "vpt": lambda: VPT(num_tokens=5),
        "vpt_shallow": lambda: VPT(num_tokens=5, deep=False),
        "adaptformer": lambda: AdaptFormer(bottleneck=16),
        "last_k": lambda: LastBlocks(k=1),
        "hft": lambda: HalfFineTuning(seed=0),
        "frozen": Frozen,
        "hydra": lambda: HydraStrategy(rank=4),
        "svfit": lambda: SVFit(rank=16),
    }.get(name, STRATEGIES.get(name))()


def images_only(images: list[torch.Tensor]) -> InitBatches:
    """Initialisation batches without labels: the loss is not available."""
    def no_loss(_: int) -> torch.Tensor:
        raise AssertionError("this initialisation must not need the loss")

    return InitBatches(images, no_loss)


def vit() -> nn.Module:
    return timm.create_model("prithvi_eo_v2_tiny_tl", depth=DEPTH, embed_dim=D, num_heads=2, img_size=32)


def tiny(strategy: Strategy | None = None) -> EncoderDecoder:
    torch.manual_seed(0)
    model = build_encoder_decoder(vit(), "fcn", decoder_channels=16, num_classes=3)
    if strategy is not None:
        strategy.apply(model)
    return model


def train(model: EncoderDecoder, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        image, mask = torch.randn(2, 6, 32, 32), torch.randint(0, 3, (2, 32, 32))
        loss = nn.functional.cross_entropy(model(image), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(EXPECTED_BACKBONE_TRAINABLE))
def test_trainable_counts_are_exact(name: str) -> None:
    model = tiny()
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    report = make_strategy(name).apply(model)
    assert report.backbone_trainable == EXPECTED_BACKBONE_TRAINABLE[name]
    assert report.trainable == EXPECTED_BACKBONE_TRAINABLE[name] + head
    assert (report.trainable, report.total) == count_parameters(model)


def test_hft_trains_one_attention_and_one_mlp_matrix_per_block_seeded() -> None:
    def chosen(seed: int) -> list[str]:
        model = tiny(HalfFineTuning(seed=seed))
        return sorted({n.rsplit(".", 1)[0] for n, p in model.backbone.named_parameters() if p.requires_grad})

    picks = chosen(0)
    assert picks == chosen(0)
    for block in range(DEPTH):
        mine = [p for p in picks if p.startswith(f"blocks.{block}.")]
        assert len([p for p in mine if ".attn." in p]) == 1 and len([p for p in mine if ".mlp." in p]) == 1
    assert any(chosen(seed) != picks for seed in range(1, 6))


MERGEABLE = ["lora", "loha", "lokr", "ia3", "vera", "oft", "boft", "ssf", "bitfit", "dora", "pissa", "hydra", "svfit"]


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_export_predicts_the_same(name: str) -> None:
    strategy = {"dora": lambda: LoRA(rank=4, use_dora=True), "pissa": lambda: LoRA(rank=4, init="pissa_niter_4"),
                "lokr": lambda: STRATEGIES["lokr"](rank=4)}.get(name, lambda: make_strategy(name))()
    model = tiny(strategy)
    train(model)
    merged = merged_equal_to_adapted(strategy, model)
    assert not any(n.startswith("backbone.") and "base_layer" in n for n in merged.state_dict())


def merged_equal_to_adapted(strategy: Strategy, model: EncoderDecoder) -> EncoderDecoder:
    """``strategy.merged(model)``, checked: the same outputs as the adapted model, the plain model's keys."""
    model.eval()
    merged = strategy.merged(model).eval()
    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged(image), model(image), atol=1e-4, rtol=1e-4)
    assert merged.state_dict().keys() == tiny().state_dict().keys()
    return merged


UNTOUCHED = ["frozen", "lora", "ia3", "vera", "oft", "ssf", "vpt", "adaptformer", "hydra", "svfit"]


@pytest.mark.parametrize("name", UNTOUCHED)
def test_strategies_leave_the_encoder_bit_identical(name: str) -> None:
    model = tiny()
    original = [(n, p, p.detach().clone()) for n, p in model.backbone.named_parameters()]
    make_strategy(name).apply(model)
    train(model)
    kept = {id(p) for p in model.backbone.parameters()}
    for param_name, param, value in original:
        assert id(param) in kept, f"{param_name} was replaced"
        assert not param.requires_grad and torch.equal(param, value), f"{param_name} changed"


def test_vpt_needs_a_plain_vit_and_keeps_features_layout() -> None:
    deep = tiny(VPT(num_tokens=3))
    shallow = tiny(VPT(num_tokens=3, deep=False))
    image = torch.randn(2, 6, 32, 32)
    plain = [f.shape for f in tiny().backbone.forward_intermediates(image)]
    assert [f.shape for f in deep.backbone.forward_intermediates(image)] == plain
    assert [f.shape for f in shallow.backbone.forward_intermediates(image)] == plain
    with pytest.raises(UserInputError, match="plain ViT"):
        VPT().apply(EncoderDecoder(nn.Linear(2, 2), None, nn.Identity(), nn.Identity()))


def test_peft_target_typo_lists_layers() -> None:
    with pytest.raises(UserInputError, match="attn.qkv"):
        LoHa(target_modules=["attn.qvk"]).apply(tiny())


def test_last_k_out_of_range_is_clear() -> None:
    with pytest.raises(UserInputError, match="k=5"):
        LastBlocks(k=5).apply(tiny())


def test_eva_initialises_lora_a_from_data() -> None:
    strategy = LoRA(rank=4, init="eva")
    model = tiny(strategy)
    qkv = model.backbone.blocks[0].attn.qkv
    before = qkv.lora_A["default"].weight.clone()
    strategy.initialize(model, images_only([torch.randn(4, 6, 32, 32) for _ in range(3)]))
    after = qkv.lora_A["default"].weight
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.norm(dim=1), torch.ones(4), atol=1e-4, rtol=0)  # singular vectors
    torch.testing.assert_close(qkv.lora_B["default"].weight, torch.zeros_like(qkv.lora_B["default"].weight))


def test_parameter_groups_and_layer_decay() -> None:
    strategy = LoRA(rank=4, target_modules=["attn.qkv"])
    model = tiny(strategy)
    model.backbone.blocks[1].mlp.fc1.weight.requires_grad_(True)  # one encoder weight trains too
    groups = parameter_groups(model, strategy.added_parameters, {"backbone": 0.1, "head": 2.0}, layer_decay=0.5)
    scale = {g["name"]: g["lr_scale"] for g in groups}
    top = DEPTH + 1  # embeddings 0, blocks 1..DEPTH (final norm with the last), the task layers DEPTH + 1
    assert scale["head"] == 2.0
    assert scale["adapter.1"] == pytest.approx(0.5 ** (top - 1))
    assert scale["adapter.2"] == pytest.approx(0.5 ** (top - 2))
    assert scale["backbone.2"] == pytest.approx(0.1 * 0.5 ** (top - 2))
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_feature_cache_gives_the_same_outputs() -> None:
    strategy = Frozen()
    cached, plain = tiny(strategy), tiny(Frozen())
    assert "feature cache on" in strategy.on_fit_start(cached, augmented=False)
    cached.eval(), plain.eval()  # no head dropout: the outputs must be equal
    images = torch.randn(4, 6, 32, 32)
    for _ in range(2):  # two "epochs": the second is served from the cache
        for i in (0, 2):
            torch.testing.assert_close(cached(images[i:i + 2]), plain(images[i:i + 2]))
    cache = cached.feature_cache
    assert cache.hits == 4 and cache.misses == 4
    assert "served 4 of 8" in strategy.on_fit_end(cached) and cached.feature_cache is None  # not kept for predict
    for augmented in (True, None):  # augmented, or a datamodule that does not say: no cache unless asked for
        assert "feature cache off" in strategy.on_fit_start(cached, augmented) and cached.feature_cache is None


def test_feature_cache_keys_any_dtype() -> None:
    """Samples are keyed by their bytes whatever the input dtype (a ``bf16-true`` fit feeds
    bfloat16 images, which numpy cannot hold): equal samples hit, another sample misses."""
    from workbench.feature_cache import sample_keys

    images = torch.randn(3, 6, 8, 8)
    images[2] = images[0]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        keys = sample_keys(images.to(dtype), {"temporal_coords": torch.tensor([[2020.0], [2021.0], [2020.0]])})
        assert keys[0] == keys[2] and keys[0] != keys[1], dtype
    years = {"temporal_coords": torch.tensor([[2020.0], [2021.0], [2021.0]])}
    assert len(set(sample_keys(images, years))) == 3  # the extras are part of the key


def test_cached_frozen_fit_matches_uncached(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The default frozen strategy caches features when the chips are not augmented, with the
    results of an uncached run; asking for the cache on augmented data is refused."""
    results = []
    for name, init_args in (("off", {"cache_features": False}), ("default", {})):
        strategy = {"class_path": "workbench.strategies.Frozen", "init_args": init_args}
        config = write_config(tmp_path / name, model={"strategy": strategy, "decoder": "fcn"}, data={"augment": False},
                              trainer={"max_epochs": 3})
        capsys.readouterr()
        assert main(["fit", "--config", str(config)]) == 0
        served = re.search(r"feature cache served (\d+) of (\d+)", capsys.readouterr().out)
        if name == "default":  # 3 epochs of 4 train batches of 4 chips: epochs 2 and 3 come from the cache
            assert served and 0 < int(served[1]) < int(served[2])
        else:
            assert served is None
        run = tmp_path / name / "runs" / "tiny" / "version_0"
        results.append(json.loads((run / "results.json").read_text()))
    assert results[1]["val"] == pytest.approx(results[0]["val"], abs=1e-4)
    assert results[1]["test"] == pytest.approx(results[0]["test"], abs=1e-4)
    default_augmented = write_config(tmp_path / "aug_default", model={"strategy": {
        "class_path": "workbench.strategies.Frozen"}}, trainer={"max_epochs": 1})
    capsys.readouterr()
    assert main(["fit", "--config", str(default_augmented)]) == 0
    assert "feature cache off: the training chips are augmented" in capsys.readouterr().out
    augmented = write_config(tmp_path / "aug", model={"strategy": {
        "class_path": "workbench.strategies.Frozen", "init_args": {"cache_features": True}}})
    assert main(["fit", "--config", str(augmented)]) == 2
    assert "augment: false" in capsys.readouterr().err
    flips = [{"class_path": "kornia.augmentation.RandomHorizontalFlip", "init_args": {"p": 0.5}}]
    yaml_augmented = write_config(tmp_path / "yaml_aug", model={"strategy": {
        "class_path": "workbench.strategies.Frozen", "init_args": {"cache_features": True}}},
        data={"augment": False, "augmentations": flips})
    assert main(["fit", "--config", str(yaml_augmented)]) == 2
    assert "remove data.init_args.augmentations" in capsys.readouterr().err


def test_corda_adapters_come_from_the_inputs_and_keep_the_output() -> None:
    """CorDA: adapters and residual base weights from the layers' input covariance; the adapted
    model starts equal to the original, with the same trainable parameters as plain LoRA."""
    plain, model = tiny().eval(), tiny(LoRA(rank=4, init="corda")).eval()
    qkv = model.backbone.blocks[0].attn.qkv
    default_a, base = qkv.lora_A["default"].weight.clone(), qkv.base_layer.weight.clone()
    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        LoRA(rank=4, init="corda").initialize(model, images_only(
            [torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]))
        torch.testing.assert_close(model.backbone.forward_features(image), plain.backbone.forward_features(image),
                                   atol=1e-5, rtol=1e-5)
    assert not torch.allclose(qkv.lora_A["default"].weight, default_a) and qkv.lora_B["default"].weight.abs().sum() > 0
    assert not torch.allclose(qkv.base_layer.weight, base)  # the residual W − s·BA stays frozen in the base
    assert sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) == EXPECTED_BACKBONE_TRAINABLE["lora"]


def test_lora_ga_adapters_span_the_loss_gradient_and_keep_the_output() -> None:
    """LoRA-GA: A's rows span the top right-singular vectors of each weight's mean loss gradient,
    B's columns the next left-singular ones (peft's default ``ArB2r``); the model starts as the original."""
    images = [torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    masks = [torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(9 + i)) for i in range(2)]
    plain = tiny().eval()
    for image, mask in zip(images, masks):
        nn.functional.cross_entropy(plain(image), mask).backward()
    u, _, vh = torch.linalg.svd(plain.backbone.blocks[0].attn.qkv.weight.grad)

    strategy = LoRA(rank=4, init="lora_ga")
    model = tiny(strategy).eval()
    strategy.initialize(model, InitBatches(images, lambda i: nn.functional.cross_entropy(model(images[i]), masks[i])))
    qkv = model.backbone.blocks[0].attn.qkv
    a, b = qkv.lora_A["default"].weight.detach(), qkv.lora_B["default"].weight.detach()
    torch.testing.assert_close(a @ vh[:4].T @ vh[:4], a, atol=1e-4, rtol=1e-3)  # rows in span(v_1..v_4)
    torch.testing.assert_close(u[:, 4:8] @ u[:, 4:8].T @ b, b, atol=1e-4, rtol=1e-3)  # columns in span(u_5..u_8)
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(images[0]), plain(images[0]), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) == EXPECTED_BACKBONE_TRAINABLE["lora"]


def test_lora_ga_refuses_conv_targets() -> None:
    with pytest.raises(UserInputError, match="lora_ga adapts Linear layers only.*patch_embed.proj"):
        tiny(LoRA(rank=4, init="lora_ga", target_modules=["attn.qkv", "patch_embed.proj"]))


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga"])
def test_data_driven_lora_fit_initialises_from_training_batches(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                init: str) -> None:
    strategy = {"class_path": "workbench.strategies.LoRA", "init_args": {"rank": 4, "init": init, "eva_batches": 2}}
    config = write_config(tmp_path, model={"strategy": strategy}, trainer={"max_epochs": 1})
    capsys.readouterr()
    assert main(["fit", "--config", str(config), "--test_after_fit", "false"]) == 0
    assert "lora initialized from 2 training batches" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(EXPECTED_BACKBONE_TRAINABLE))
def test_checkpointing_keeps_every_strategys_gradients(name: str) -> None:
    """Activation checkpointing recomputes blocks in backward, after every forward of the step:
    every strategy's trainable parameters must get the same gradients with and without it, also
    when two forwards run before one backward."""
    x, y = torch.randn(2, 6, 32, 32), torch.randn(2, 6, 32, 32)
    grads = []
    for enable in (False, True):
        model = tiny(make_strategy(name)).eval()  # same seed: same weights and adapters
        model.backbone.set_grad_checkpointing(enable)
        (model(x).square().mean() + model(y).abs().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)


def prompted_features(backbone: nn.Module, prompts: torch.Tensor, deep: bool, image: torch.Tensor) -> torch.Tensor:
    """Reference VPT on a plain backbone: ``prompts`` ``(blocks or 1, P, D)`` enter before every
    block (deep) or the first one (shallow, then kept in the sequence up to the last block)."""
    blocks, count = backbone.blocks, prompts.shape[1]

    def prepend(index: int):
        return lambda _, args: (torch.cat([prompts[index].expand(len(args[0]), -1, -1), args[0]], 1), *args[1:])

    def strip(_: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output[:, count:]

    inserted = range(len(blocks)) if deep else [0]
    stripped = range(len(blocks)) if deep else [len(blocks) - 1]
    handles = [blocks[i].register_forward_pre_hook(prepend(i)) for i in inserted]
    handles += [blocks[i].register_forward_hook(strip) for i in stripped]
    try:
        return backbone.forward_features(image)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_loads_checkpoints_of_the_single_tensor_layout(deep: bool) -> None:
    plain = tiny().eval()
    tokens = torch.randn(DEPTH if deep else 1, 3, D, generator=torch.Generator().manual_seed(1))
    old = {**plain.state_dict(), "backbone.prompt_tokens.tokens": tokens}  # blocks.<i>.* and one prompt tensor
    model = tiny(VPT(num_tokens=3, deep=deep)).eval()
    model.load_state_dict(old, strict=True)
    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        expected = prompted_features(plain.backbone, tokens, deep, image)
        torch.testing.assert_close(model.backbone.forward_features(image), expected)
        assert not torch.allclose(plain.backbone.forward_features(image), expected)


def test_vera_loads_checkpoints_of_the_wrapped_layout() -> None:
    trained = tiny(VeRA(rank=16))
    train(trained)
    trained.eval()
    qkv = trained.backbone.blocks[0].attn.qkv
    old = {("backbone.model." + k.removeprefix("backbone.") if k.startswith("backbone.") else k): v
           for k, v in trained.state_dict().items()}  # the backbone was peft's VeraModel: keys under `model.`
    old |= {"backbone.vera_A.default": qkv.vera_A["default"], "backbone.vera_B.default": qkv.vera_B["default"]}
    assert "backbone.model.blocks.0.attn.qkv.vera_lambda_b.default" in old
    model = tiny(VeRA(rank=16)).eval()
    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(image), trained(image))
        model.load_state_dict(old, strict=True)
        torch.testing.assert_close(model(image), trained(image))


def test_peft_keeps_the_backbone_keys_and_its_peft_model_outside_them() -> None:
    model = tiny(LoRA(rank=4))
    keys = set(model.state_dict())
    assert "backbone.blocks.0.attn.qkv.lora_A.default.weight" in keys
    assert not any(".model." in k or "base_model" in k for k in keys)
    assert model.backbone.peft_model.get_base_model() is model.backbone


@pytest.mark.parametrize("strategy", [HydraStrategy(target_modules=["nope"]), SVFit(target_modules=["nope"])],
                         ids=["hydra", "svfit"])
def test_our_low_rank_methods_name_the_linears_when_targets_match_none(strategy: Strategy) -> None:
    with pytest.raises(UserInputError, match=r"target_modules \['nope'\] match no Linear layer of PrithviViT; it has: "
                                             r"attn\.proj, attn\.qkv, mlp\.fc1, mlp\.fc2"):
        tiny(strategy)


def test_svfit_trains_the_leading_singular_values() -> None:
    model = tiny(SVFit(rank=16))
    layer = model.backbone.blocks[0].attn.qkv
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.delta.copy_(torch.arange(16.0))
    expected = weight + torch.linalg.svd(weight)[0][:, :16] @ torch.diag(torch.arange(16.0)) @ torch.linalg.svd(weight)[2][:16]
    torch.testing.assert_close(SVFit(rank=16).merged(model).backbone.blocks[0].attn.qkv.weight, expected,
                               atol=1e-4, rtol=1e-4)
