"""Point-PEFT on the point transformer: exact counts, the kNN adapter against a loop, start as the
pretrained model (without prompts), the memory bank, unchanged pretrained weights and keys,
checkpointing, refusal on a ViT, a CLI fit, and the compare config."""

from __future__ import annotations

import copy
import importlib
import math
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import backbones  # noqa: F401
from tests.conftest import fit_run, write_task_config
from tests.test_points import TINY_POINTS, write_las
from workbench.errors import UserInputError
from workbench.merge.checkpoints import load_task
from workbench.model import PointSegmenter, build_encoder_decoder
from workbench.strategies.base import InitBatches, count_parameters
from workbench.strategies.point_peft import (
    GeometryAdapter,
    Neighborhood,
    PointPEFT,
    PointPEFTContext,
)

D, DEPTH, M, P = 64, 2, 16, 8  # width, blocks, adapter bottleneck, prompts
POINTS = {"num_groups": 16, "group_size": 16, "embed_dim": D, "depth": DEPTH, "num_heads": 2}


def segmenter(strategy: PointPEFT | None = None) -> PointSegmenter:
    torch.manual_seed(0)
    model = PointSegmenter(timm.create_model("point_mae_tiny", **POINTS), num_classes=3)
    if strategy is not None:
        strategy.apply(model)
    return model


def clouds(count: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 96, 3, generator=generator) for _ in range(count)]


def no_loss(_: int) -> torch.Tensor:
    raise AssertionError("the memory bank must not need the loss")


def randomize_adapters(model: PointSegmenter) -> None:
    """Non-zero ``up`` projections, so every added parameter gets gradients."""
    with torch.no_grad():
        for block in model.backbone.blocks:
            nn.init.normal_(block.geo_adapter.up.weight, std=0.1)


@pytest.mark.parametrize("prompts", [P, 0])
def test_trainable_count_is_closed_form(prompts: int) -> None:
    plain, model = segmenter(), segmenter()
    report = PointPEFT(num_prompts=prompts, bottleneck=M, k=4).apply(model)
    per_block = (D * M + M) + 3 * M + (M * D + D)  # down, pos (no bias), up
    expected = DEPTH * (2 * D * M + 4 * M + D) + prompts * D
    assert DEPTH * per_block + prompts * D == expected == {P: 4864, 0: 4352}[prompts]
    assert report.backbone_trainable == expected == count_parameters(model.backbone)[0]
    assert report.trainable == expected + count_parameters(plain.head)[0]
    assert report.backbone_total == count_parameters(plain.backbone)[1] + expected


def brute_force_adapter(adapter: GeometryAdapter, tokens: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    """The adapter token by token: sort the distances, weigh the ``k`` nearest, sum."""
    features = adapter.down(tokens)
    out = torch.empty_like(tokens)
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            distances = [float(((centers[b, j] - centers[b, i]) ** 2).sum().sqrt()) for j in range(tokens.shape[1])]
            nearest = sorted(range(len(distances)), key=distances.__getitem__)[:k]
            squared = torch.tensor([distances[j] ** 2 for j in nearest])
            weights = torch.softmax(-squared / squared.mean(), 0)
            aggregate = sum(w * (features[b, j] + adapter.pos(centers[b, j] - centers[b, i]))
                            for w, j in zip(weights, nearest))
            out[b, i] = tokens[b, i] + adapter.up(nn.functional.gelu(aggregate))
    return out


@pytest.mark.parametrize("k", [3, 50])  # 50 > G: capped at all 7 tokens
def test_geometry_adapter_matches_a_loop(k: int) -> None:
    torch.manual_seed(0)
    adapter = GeometryAdapter(PointPEFTContext(None, k), 0, dim=8, bottleneck=4)
    nn.init.normal_(adapter.up.weight)  # zero at init: make the branch visible
    tokens, centers = torch.randn(2, 7, 8), torch.rand(2, 7, 3) * 10
    with torch.no_grad():
        out = adapter(tokens, Neighborhood.of(centers, k))
        torch.testing.assert_close(out, brute_force_adapter(adapter, tokens, centers, min(k, 7)))
    assert not torch.allclose(out, tokens)


def test_starts_as_the_pretrained_model_without_prompts() -> None:
    """Zero-initialised ``up``: without prompts the adapted model is exactly the pretrained one.
    Prompts join every block's attention, so with them the group tokens (and outputs) change."""
    plain = segmenter().eval()
    x = torch.randn(2, 96, 3)
    with torch.no_grad():
        expected, levels = plain(x), plain.backbone.forward_intermediates(x)
        for prompts in (0, P):
            model = segmenter(PointPEFT(num_prompts=prompts)).eval()
            out, adapted_levels = model(x), model.backbone.forward_intermediates(x)
            assert out.shape == expected.shape == (2, 3, 96)
            assert [t.shape for t in adapted_levels] == [t.shape for t in levels]  # prompts never reach the head
            assert model.backbone.forward_features(x).shape == (2, 16, D)
            assert torch.equal(out, expected) == (prompts == 0)


def test_bank_is_deterministic_and_enhances_the_prompts() -> None:
    plain = segmenter().eval()
    strategy = PointPEFT(num_prompts=P, bank_batches=2, bank_size=20, prompt_scale=0.5)
    assert strategy.init_batches == 2 and PointPEFT(num_prompts=0).init_batches == 0
    first, second = segmenter(copy.deepcopy(strategy)), segmenter(copy.deepcopy(strategy))
    prompt = first.backbone.point_peft.prompt
    assert prompt.bank.shape == (0, D) and torch.equal(prompt.enhanced(), prompt.prompts)  # empty: unenhanced
    first.train(), second.train()
    strategy.initialize(first, InitBatches(clouds(), no_loss))
    strategy.initialize(second, InitBatches(clouds(), no_loss))
    bank = prompt.bank
    assert bank.shape == (20, D) and torch.equal(bank, second.backbone.point_peft.prompt.bank)
    assert first.training and not first.backbone.encoder.first_conv[1].training  # modes restored
    with torch.no_grad():  # bank rows are tokens of the frozen pretrained backbone
        tokens = torch.cat([plain.backbone.forward_features(c).flatten(0, 1) for c in clouds()])
    assert (bank[:, None] - tokens[None]).abs().amax(-1).min(1).values.max() < 1e-6
    with torch.no_grad():
        attention = torch.softmax(prompt.prompts @ bank.T / math.sqrt(D), -1)
        torch.testing.assert_close(prompt.enhanced(), prompt.prompts + 0.5 * attention @ bank)
    assert not torch.allclose(prompt.enhanced(), prompt.prompts)
    other = segmenter(copy.deepcopy(strategy))
    strategy.initialize(other, InitBatches(clouds(seed=2), no_loss))
    assert not torch.equal(other.backbone.point_peft.prompt.bank, bank)
    # a filled bank loads into a freshly adapted model (empty bank) and gives the same outputs
    fresh = segmenter(copy.deepcopy(strategy))
    fresh.load_state_dict(first.state_dict())
    x = torch.randn(1, 96, 3)
    first.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), first(x))


def test_pretrained_keys_stay_and_weights_do_not_train() -> None:
    plain = segmenter()
    model = segmenter(PointPEFT(num_prompts=P, bank_batches=1))
    PointPEFT(num_prompts=P).initialize(model, InitBatches(clouds(1), no_loss))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    plain_state = plain.backbone.state_dict()
    assert {k: v.shape for k, v in before.items() if k in plain_state} == {k: v.shape for k, v in plain_state.items()}
    added = sorted(set(before) - set(plain_state))
    assert all(k.startswith(("point_peft.prompt.", "blocks.0.geo_adapter.", "blocks.1.geo_adapter.")) for k in added)
    assert "point_peft.prompt.bank" in added and "blocks.1.geo_adapter.pos.weight" in added
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)  # frozen ones get no grads
    model.train()
    for step in range(3):
        x, labels = torch.randn(2, 96, 3), torch.randint(0, 3, (2, 96))
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.backbone.state_dict()
    for key in plain_state:  # weights and BatchNorm statistics of the pretrained encoder
        assert torch.equal(after[key], before[key]), key
    assert torch.equal(after["point_peft.prompt.bank"], before["point_peft.prompt.bank"])  # a buffer, never trained
    for key in ("point_peft.prompt.prompts", "blocks.0.geo_adapter.up.weight", "blocks.1.geo_adapter.pos.weight"):
        assert not torch.equal(after[key], before[key]), key


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    """Blocks re-run in backward find the same prompts (kept per block) and neighbourhoods."""
    x, labels = torch.randn(2, 96, 3), torch.randint(0, 3, (2, 96))
    grads = []
    for checkpointing in (False, True):
        model = segmenter(PointPEFT(num_prompts=P))
        PointPEFT(num_prompts=P).initialize(model, InitBatches(clouds(1), no_loss))
        randomize_adapters(model)
        model.backbone.set_grad_checkpointing(checkpointing)
        model.eval()  # no head dropout: both runs compute the same function
        nn.functional.cross_entropy(model(x), labels).backward()
        grads.append({n: p.grad for n, p in model.backbone.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 1 + DEPTH * 5
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_refuses_a_vit_and_bad_knobs() -> None:
    vit = timm.create_model("prithvi_eo_v2_tiny_tl", depth=2, embed_dim=64, num_heads=2, img_size=32)
    model = build_encoder_decoder(vit, "fcn", decoder_channels=16, num_classes=3)
    with pytest.raises(UserInputError, match=r"point_peft adapts the point transformer \(point_mae_\*\) only") as error:
        PointPEFT().apply(model)
    assert "\n" not in str(error.value) and "use bottleneck, lora or vpt" in str(error.value)
    with pytest.raises(UserInputError, match="point_peft k=0 must be >= 1"):
        PointPEFT(k=0)


def test_point_peft_fits_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_las(tmp_path / "las" / "scene.las", n=3000)
    strategy = {"class_path": "workbench.strategies.point_peft.PointPEFT",
                "init_args": {"num_prompts": 4, "bottleneck": 8, "k": 4, "bank_batches": 2, "bank_size": 16}}
    model = {"class_path": "workbench.tasks.PointSegmentationTask", "init_args": {
        "backbone": "point_mae_tiny", "backbone_kwargs": dict(TINY_POINTS), "strategy": strategy,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}}}
    data = {"class_path": "datamodules.PointSegmentationDataModule", "init_args": {
        "root": str(tmp_path / "las"), "tile_size": 10.0, "num_points": 128, "features": ["intensity"],
        "train_repeats": 2, "batch_size": 4}}
    config = write_task_config(tmp_path, model, data, "val/mIoU", "max", 1)
    losses, results = fit_run(config)
    assert len(losses) == 1 and math.isfinite(losses[0]) and "test/mIoU" in results["test"]
    assert "point_peft initialized from 2 training batches" in capsys.readouterr().out
    run = tmp_path / "runs" / "tiny" / "version_0"  # the only run
    task = load_task(next((run / "checkpoints").glob("epoch=*.ckpt")))  # a fresh (empty) bank takes the saved one
    bank = task.model.backbone.point_peft.prompt.bank
    assert bank.shape == (16, 32)
    adapter = load_file(run / "export" / "adapter.safetensors")
    assert torch.equal(adapter["backbone.point_peft.prompt.bank"], bank)
    assert not any(k.startswith("backbone.blocks.0.attn") for k in adapter)  # frozen weights stay out


def test_compare_config_builds_its_arms(monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.compare.arms import build_arms
    from workbench.compare.command import parser
    from workbench.strategies import STRATEGIES

    registered = PointPEFT.name in STRATEGIES
    monkeypatch.setitem(STRATEGIES, PointPEFT.name, STRATEGIES.get(PointPEFT.name, PointPEFT))
    cfg = parser().parse_args(["--config", "configs/compare_points.yaml"])
    base = yaml.safe_load(Path(cfg.base_config).read_text())
    assert base["model"]["init_args"]["pretrained"] is None  # random init: no scratch arm (full is one)
    assert "scratch" not in cfg.strategies and "zero_shot" not in cfg.strategies
    assert cfg.metric == "mIoU" and cfg.seeds == [0, 1, 2] and cfg.fractions == [1.0]
    arms = build_arms(cfg.strategies, cfg.fractions, cfg.seeds)
    assert [(a.strategy, a.seed) for a in arms if a.strategy == "trivial"] == [("trivial", 0)]  # one seed: no spread
    arms = [a for a in arms if a.strategy != "trivial"]
    assert len(arms) == 6 * 3
    names = {arm.strategy.partition(":")[0] for arm in arms}
    assert names == {"frozen", "full", "lora", "bottleneck", "point_peft"}
    for arm in arms[::3]:  # every strategy applies to the base config's backbone (here at test size)
        module, _, cls = arm.class_path.rpartition(".")
        strategy_cls = STRATEGIES[arm.strategy.partition(":")[0]]
        assert cls == strategy_cls.__name__
        if registered or strategy_cls is not PointPEFT:  # the fit resolves the class path
            assert getattr(importlib.import_module(module), cls) is strategy_cls
        strategy_cls(**arm.init_args).apply(segmenter())
