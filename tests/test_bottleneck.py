"""Sequential bottleneck adapters (Houlsby, Pfeiffer) and Compacter: exact counts, identity at
init, unchanged keys, checkpointing, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import backbones  # noqa: F401
from backbones.builder import create_backbone
from tests.test_peft_menu import DEPTH, D, tiny, train
from tests.test_satvision_timm import TINY_SWIN, tiny_satvision
from workbench.errors import UserInputError
from workbench.model import EncoderClassifier
from workbench.strategies.base import Strategy, count_parameters
from workbench.strategies.bottleneck import BottleneckAdapter, Compacter, PHMLinear

M = 16  # bottleneck


def linear_adapter(dim: int, m: int = M) -> int:
    return dim * m + m + m * dim + dim  # down (weight, bias) + up (weight, bias)


def phm_adapter(dim: int, m: int = M, rank: int = 1) -> int:
    return rank * (dim + m) + m + rank * (m + dim) + dim  # left/right factors + bias, twice


def make(name: str) -> Strategy:
    return {
        "houlsby": lambda: BottleneckAdapter(bottleneck=M),
        "pfeiffer": lambda: BottleneckAdapter(bottleneck=M, placement="pfeiffer"),
        "compacter": lambda: Compacter(bottleneck=M),
        "compacter_r2": lambda: Compacter(bottleneck=M, phm_rank=2),
        "compacter++": lambda: Compacter(bottleneck=M, placement="pfeiffer", phm_dim=8),
    }[name]()


def expected(name: str, dim: int, depth: int) -> int:
    return {
        "houlsby": depth * 2 * linear_adapter(dim),
        "pfeiffer": depth * linear_adapter(dim),
        "compacter": depth * 2 * phm_adapter(dim) + 4**3,  # + the shared A_i (n, n, n)
        "compacter_r2": depth * 2 * phm_adapter(dim, rank=2) + 4**3,
        "compacter++": depth * phm_adapter(dim) + 8**3,
    }[name]


NAMES = ["houlsby", "pfeiffer", "compacter", "compacter_r2", "compacter++"]


def ast(strategy: Strategy | None = None) -> EncoderClassifier:
    torch.manual_seed(0)
    model = EncoderClassifier(timm.create_model("ast_tiny", n_mels=32, num_frames=48, embed_dim=32, depth=2,
                                                num_heads=2), num_outputs=3)
    if strategy is not None:
        strategy.apply(model)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_trainable_counts_are_exact_on_the_tiny_vit(name: str) -> None:
    model = tiny()
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    strategy = make(name)
    report = strategy.apply(model)
    assert report.backbone_trainable == expected(name, D, DEPTH)
    assert report.trainable == expected(name, D, DEPTH) + head
    assert (report.trainable, report.total) == count_parameters(model)
    assert sum(p.numel() for p in model.backbone.parameters() if id(p) in strategy.added_parameters) == \
        report.backbone_trainable


@pytest.mark.parametrize("name", NAMES)
def test_trainable_counts_are_exact_on_ast(name: str) -> None:
    model = ast()
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    report = make(name).apply(model)
    assert report.backbone_trainable == expected(name, 32, 2)
    assert report.trainable == expected(name, 32, 2) + head
    model(torch.randn(2, 1, 32, 48)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_adapters_sit_after_attention_and_mlp() -> None:
    houlsby, pfeiffer = tiny(make("houlsby")), tiny(make("pfeiffer"))
    for block in houlsby.backbone.blocks:
        assert isinstance(block.attn_adapter.down, nn.Linear) and isinstance(block.mlp_adapter.up, nn.Linear)
    assert all(not hasattr(b, "attn_adapter") and hasattr(b, "mlp_adapter") for b in pfeiffer.backbone.blocks)
    block = houlsby.backbone.blocks[0]
    seen = []
    block.mlp_adapter.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        out = block.mlp(x)
    torch.testing.assert_close(seen[0], block.mlp.fc2(block.mlp.act(block.mlp.fc1(x))))  # the MLP's output
    torch.testing.assert_close(out, seen[0])  # up starts at zero: the adapter passes it through


@pytest.mark.parametrize("name", NAMES)
def test_starts_as_the_pretrained_model_and_moves_after_one_step(name: str) -> None:
    plain, model = tiny().eval(), tiny(make(name))
    image = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), plain(image), atol=0, rtol=0)
    train(model, steps=1)
    with torch.no_grad():
        model.eval()
        after = model(image)
        assert not torch.allclose(after, plain(image))
        torch.testing.assert_close(model.backbone.blocks[1].mlp(torch.ones(1, 1, D)),
                                   model.backbone.blocks[1].mlp_adapter(
                                       plain.backbone.blocks[1].mlp(torch.ones(1, 1, D))))
        torch.testing.assert_close(copy.deepcopy(model)(image), after)  # merged(): hooks follow the copy


@pytest.mark.parametrize("name", ["houlsby", "compacter"])
def test_original_keys_unchanged_and_backbone_frozen(name: str) -> None:
    plain = tiny()
    original = {n: p.detach().clone() for n, p in plain.backbone.named_parameters()}
    model = tiny(make(name))
    keys = set(model.state_dict())
    assert set(plain.state_dict()) <= keys and "backbone.blocks.0.mlp.fc1.weight" in keys
    added = keys - set(plain.state_dict())
    adapter_key = (".attn_adapter.", ".mlp_adapter.", "backbone.compacter_phm_rule")  # the shared A_i: one key
    assert added and all(any(part in k for part in adapter_key) for k in added)
    train(model)
    for key, value in original.items():
        param = model.backbone.get_parameter(key)
        assert not param.requires_grad and torch.equal(param, value), key
    assert model.neck is not None and all(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    trained = make(name).trainable_state_dict(model)
    assert all(any(part in k for part in adapter_key) for k in trained if k.startswith("backbone."))
    fresh = tiny(make(name))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        image = torch.randn(2, 6, 32, 32)
        torch.testing.assert_close(fresh.eval()(image), model.eval()(image))


def test_compacter_shares_the_rule_and_builds_kronecker_sums() -> None:
    model = tiny(make("compacter"))
    layers = [m for m in model.backbone.modules() if isinstance(m, PHMLinear)]
    assert len(layers) == DEPTH * 4 and len({id(m.phm_rule) for m in layers}) == 1
    down = layers[0]
    rule, blocks = down.phm_rule, down.left @ down.right
    reference = sum(torch.kron(rule[i], blocks[i]) for i in range(4))
    torch.testing.assert_close(down.weight, reference)
    x = torch.randn(3, D)
    torch.testing.assert_close(down(x), x @ reference + down.bias)
    assert all(torch.count_nonzero(m.weight) == 0 for m in layers[1::2])  # up projections start at zero


@pytest.mark.parametrize("name", NAMES)
def test_checkpointing_keeps_the_gradients(name: str) -> None:
    x, y = torch.randn(2, 6, 32, 32), torch.randn(2, 6, 32, 32)
    grads = []
    for enable in (False, True):
        model = tiny(make(name))
        train(model, steps=1)  # up projections non-zero: every adapter weight gets a gradient
        model.eval().zero_grad()
        model.backbone.set_grad_checkpointing(enable)
        (model(x).square().mean() + model(y).abs().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any("adapter.down" in k and g.abs().sum() > 0 for k, g in grads[0].items())
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)


def test_satvision_swinv2_blocks_take_adapters() -> None:
    """SwinV2 blocks (post-norm, windowed attention) have `attn` and `mlp` too."""
    plain = EncoderClassifier(tiny_satvision(), 2).eval()
    model = EncoderClassifier(tiny_satvision(), 2)
    report = BottleneckAdapter(bottleneck=4).apply(model)
    widths = [32 * 2**stage for stage, depth in enumerate(TINY_SWIN["depths"]) for _ in range(depth)]
    assert report.backbone_trainable == sum(2 * linear_adapter(w, 4) for w in widths)
    image = torch.randn(1, 14, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), plain(image))


@pytest.mark.parametrize("strategy", [BottleneckAdapter(), Compacter()])
def test_cnn_encoders_refuse_in_one_line(strategy: Strategy) -> None:
    model = EncoderClassifier(create_backbone("smp:resnet18", bands=["B1", "B2", "B3"]), 2)
    with pytest.raises(UserInputError, match=r"ViT-style blocks .* SmpEncoder .* use lora, ssf or bitfit") as err:
        strategy.apply(model)
    assert "\n" not in str(err.value)
    assert all(p.requires_grad for p in model.parameters())  # refused before touching anything


def test_bad_arguments_refuse() -> None:
    with pytest.raises(UserInputError, match="placement 'both'"):
        BottleneckAdapter(placement="both")
    with pytest.raises(UserInputError, match="phm_dim=3 must divide bottleneck=16"):
        Compacter(bottleneck=16, phm_dim=3)
    with pytest.raises(UserInputError, match=r"phm_dim=16 must divide the block width of AudioSpectrogramTransformer \(40\)"):
        Compacter(bottleneck=16, phm_dim=16).apply(
            EncoderClassifier(timm.create_model("ast_tiny", n_mels=32, num_frames=48, embed_dim=40, depth=1,
                                                num_heads=2), 2))


def test_compacter_exports_its_shared_rule_once(tmp_path: Path) -> None:
    """safetensors refuses tensors that share memory: the shared A_i must be one entry."""
    from safetensors.torch import load_file

    from workbench.export import export_weights
    from workbench.tasks import SegmentationTask

    task = SegmentationTask(num_classes=2, decoder="fcn", decoder_channels=8, strategy=Compacter(bottleneck=16),
                            backbone_kwargs={"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2})
    paths = export_weights(task, tmp_path)
    adapter = load_file(paths["adapter"])
    assert [k for k in adapter if "phm_rule" in k] == ["backbone.compacter_phm_rule"]
    assert "merged" not in paths  # nonlinear adapters do not merge
