"""S2FT and SPT: exact trainable sets, only the chosen entries move, merged equals adapted,
SPT's choice equals the top squared gradients computed here, and its checkpoints reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import write_config
from tests.test_peft_menu import DEPTH, HIDDEN, D, merged_equal_to_adapted, tiny, train
from workbench.cli import main
from workbench.errors import UserInputError
from workbench.strategies import InitBatches
from workbench.strategies.sparse import S2FT, SPT, SensitiveUpdate

HEAD_DIM = D // 2  # the tiny ViT has 2 heads


def labelled_batches(model: nn.Module, count: int = 2) -> InitBatches:
    images = [torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(count)]
    masks = [torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(50 + i)) for i in range(count)]
    return InitBatches(images, lambda i: nn.functional.cross_entropy(model(images[i]), masks[i]))


def test_s2ft_trains_the_chosen_heads_and_channels_columns_only() -> None:
    strategy = S2FT(heads=1, channel_fraction=0.05, seed=3)
    report = strategy.apply(model := tiny())
    assert report.backbone_trainable == DEPTH * D * (HEAD_DIM + round(0.05 * HIDDEN))
    before = tiny().eval()
    train(model)
    merged = merged_equal_to_adapted(strategy, model)
    for block, plain in zip(merged.backbone.blocks, before.backbone.blocks):
        for layer, reference, width in ((block.attn.proj, plain.attn.proj, HEAD_DIM),
                                        (block.mlp.fc2, plain.mlp.fc2, round(0.05 * HIDDEN))):
            changed = (layer.weight != reference.weight).any(0).nonzero().flatten()
            assert len(changed) == width  # exactly the chosen input columns moved
            if width == HEAD_DIM:  # one whole head: consecutive columns starting at a head boundary
                assert changed[0] % HEAD_DIM == 0 and (changed.diff() == 1).all()
    other = lambda m: {n: p for n, p in m.backbone.named_parameters() if "proj" not in n and "fc2" not in n}  # noqa: E731
    for name, value in other(merged).items():
        torch.testing.assert_close(value, other(before)[name], atol=0, rtol=0)


def test_s2ft_choice_is_seeded() -> None:
    def columns(seed: int) -> list[list[int]]:
        model = tiny(S2FT(heads=1, channel_fraction=0.1, seed=seed))
        return [m.columns.tolist() for m in model.backbone.modules() if hasattr(m, "columns")]

    assert columns(0) == columns(0)
    assert any(columns(seed) != columns(0) for seed in range(1, 5))


def test_s2ft_refuses_too_many_heads_and_blockless_backbones() -> None:
    with pytest.raises(UserInputError, match="s2ft heads 3 exceeds the 2 attention heads"):
        tiny(S2FT(heads=3))
    from workbench.model import BackboneModel
    with pytest.raises(UserInputError, match="has no `blocks` lists"):
        S2FT().apply(BackboneModel(nn.Sequential(nn.Conv2d(3, 8, 3))))


def test_spt_trains_the_most_sensitive_entries() -> None:
    """The chosen entries are the global top ``budget`` of the summed squared gradients of the
    loss, computed here on the un-adapted model with the same weights and batches."""
    plain = tiny()
    data = labelled_batches(plain)
    sums = {}
    for i in range(len(data)):
        grads = torch.autograd.grad(data.loss(i), [m.weight for n, m in plain.backbone.named_modules()
                                                   if n.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))])
        for j, g in enumerate(grads):
            sums[j] = sums.get(j, 0) + g.square()
    flat = torch.cat([s.flatten() for s in sums.values()])
    budget = 0.02
    threshold = flat.topk(round(budget * len(flat))).values[-1]

    strategy = SPT(budget=budget, rank=0)
    model = tiny(strategy)
    report = strategy.initialize_from(model, labelled_batches(model))
    layers = [m for m in model.backbone.modules() if isinstance(m, SensitiveUpdate)]
    for layer, reference in zip(layers, sums.values()):
        assert layer.index.tolist() == (reference.flatten() >= threshold).nonzero().flatten().tolist()
    assert report.backbone_trainable == (flat >= threshold).sum() == sum(len(m.index) for m in layers)


def test_spt_gives_matrices_with_many_sensitive_entries_a_low_rank_update() -> None:
    strategy = SPT(budget=0.5, rank=2)
    model = tiny(strategy)
    strategy.initialize_from(model, labelled_batches(model))
    layers = [m for m in model.backbone.modules() if isinstance(m, SensitiveUpdate)]
    structured = [m for m in layers if m.up.shape[1] == 2]
    assert structured and all(len(m.index) == 0 for m in structured)
    for m in structured:
        assert m.up.abs().sum() == 0 and m.down.abs().sum() > 0  # starts as the pretrained layer
    for m in layers:
        if m not in structured:  # unstructured ones hold fewer chosen entries than a rank-2 update costs
            assert len(m.index) <= 2 * (m.base_layer.out_features + m.base_layer.in_features)


def test_spt_merges_and_its_checkpoint_loads_into_a_model_built_from_the_config() -> None:
    strategy = SPT(budget=0.05, rank=2)
    model = tiny(strategy)
    strategy.initialize_from(model, labelled_batches(model))
    train(model)
    model.eval()
    image = torch.randn(2, 6, 32, 32)
    merged = strategy.merged(model).eval()
    rebuilt = tiny(SPT(budget=0.05, rank=2)).eval()  # not initialised: empty updates
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = model(image)
        assert not torch.allclose(expected, tiny().eval()(image), atol=1e-4)
        torch.testing.assert_close(merged(image), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rebuilt(image), expected, atol=1e-5, rtol=1e-5)


def test_spt_update_on_a_convolution_folds_into_it() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = SensitiveUpdate(conv)
    layer.resize(torch.tensor([0, 5, 17, 100]), rank=2)
    with torch.no_grad():
        layer.values.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        layer.up.normal_()
    x = torch.randn(1, 4, 8, 8)
    reference = conv.weight.detach().clone().flatten()
    reference[[0, 5, 17, 100]] += torch.tensor([1.0, -2.0, 0.5, 3.0])
    reference = reference.view_as(conv.weight) + (layer.up @ layer.down).detach().view_as(conv.weight)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.conv2d(x, reference, conv.bias, padding=1))
        torch.testing.assert_close(layer.merged_layer()(x), layer(x))


@pytest.mark.parametrize("strategy", [{"class_path": "workbench.strategies.SPT", "init_args": {"budget": 0.01, "batches": 2}},
                                      {"class_path": "workbench.strategies.S2FT", "init_args": {"heads": 1}}],
                         ids=["spt", "s2ft"])
def test_sparse_strategies_fit_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture, strategy: dict) -> None:
    config = write_config(tmp_path, model={"strategy": strategy}, trainer={"max_epochs": 1})
    capsys.readouterr()
    assert main(["fit", "--config", str(config), "--test_after_fit", "false"]) == 0
    out = capsys.readouterr().out
    name = strategy["class_path"].rsplit(".", 1)[-1].lower()
    assert f"workbench: {name}: " in out and "backbone 0 /" not in out
    export = next(Path(tmp_path).rglob("export/merged.safetensors"), None)
    assert export is not None
