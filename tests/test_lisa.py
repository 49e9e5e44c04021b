"""LISA: which blocks train at which step, and that only those move."""

from __future__ import annotations

import timm
import torch

from workbench.model import build_encoder_decoder
from workbench.strategies import LISA
from workbench.tasks import SegmentationTask

TINY = {"img_size": 32, "depth": 4, "embed_dim": 32, "num_heads": 2}


def lisa_model(strategy: LISA):
    torch.manual_seed(0)
    model = build_encoder_decoder(timm.create_model("prithvi_eo_v2_tiny_tl", **TINY), "fcn", 8, num_classes=2)
    strategy.apply(model)
    return model


def trainable_blocks(model) -> list[int]:
    return [i for i, block in enumerate(model.backbone.blocks) if all(p.requires_grad for p in block.parameters())]


def test_blocks_are_drawn_per_interval_and_the_rest_of_the_backbone_always_trains() -> None:
    strategy = LISA(layers=2, interval=3, seed=7)
    model = lisa_model(strategy)
    outside = [p for n, p in model.backbone.named_parameters() if not n.startswith("blocks.")]
    draws = []
    for step in range(12):
        strategy.on_train_step(model, step)
        draws.append(trainable_blocks(model))
        assert len(draws[-1]) == 2 and all(p.requires_grad for p in outside)
        frozen = [b for i, b in enumerate(model.backbone.blocks) if i not in draws[-1]]
        assert not any(p.requires_grad for b in frozen for p in b.parameters())
    assert all(draws[i] == draws[i - i % 3] for i in range(12))  # one draw per interval of 3 steps
    assert len({tuple(d) for d in draws}) > 1  # drawn anew
    again = LISA(layers=2, interval=3, seed=7)
    assert [again.active_blocks(step, 4) for step in range(12)] == draws  # the seed repeats the draws


def test_only_the_drawn_blocks_and_the_embeddings_move() -> None:
    strategy = LISA(layers=1, interval=10, seed=0)
    task = SegmentationTask(num_classes=2, decoder="fcn", decoder_channels=8, strategy=strategy,
                            backbone_kwargs=TINY)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in task.model.backbone.named_parameters()}
    task.on_train_batch_start({}, 0)  # the hook the trainer calls (step 0 without a trainer)
    (active,) = trainable_blocks(task.model)
    task.model(torch.randn(2, 6, 32, 32)).square().mean().backward()
    optimizer.step()
    for name, param in task.model.backbone.named_parameters():
        moved = not torch.equal(param, before[name])
        in_block = name.startswith("blocks.")
        expected = not in_block or name.startswith(f"blocks.{active}.")
        if "weight" in name and param.ndim > 1:  # matrices always get a non-zero gradient here
            assert moved == expected, name
        if in_block and not expected:
            assert not moved, name  # frozen blocks: no gradient, no weight decay
