"""Merging: soups, Fisher merging, task arithmetic, TIES, DARE, Model Breadcrumbs, LiNeS (exact
small cases) and `workbench merge` end to end."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backbones.builder import create_backbone
from tests.conftest import TINY_BACKBONE, write_config
from workbench.cli import main
from workbench.merge import greedy_soup, merge_task_vectors, trim, uniform_soup
from workbench.merge.checkpoints import load_task, plain_weights
from workbench.merge.command import key_layers
from workbench.merge.weights import breadcrumbs, dare_pruner, fisher_merge, lines


def test_uniform_soup_means_floats_and_keeps_integer_buffers() -> None:
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    soup = uniform_soup([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0])) and soup["n"].item() == 5


def test_greedy_soup_skips_a_model_that_hurts() -> None:
    good, also_good, bad = ({"w": torch.tensor([v])} for v in (1.0, 1.2, 9.0))
    soup, kept = greedy_soup([bad, good, also_good], score=lambda s: -abs(s["w"].item() - 1.1))
    assert sorted(kept) == [1, 2]
    assert soup["w"].item() == pytest.approx(1.1)


def test_trim_keeps_largest_magnitudes() -> None:
    delta = torch.tensor([0.1, -3.0, 2.0, -0.5])
    assert torch.equal(trim(delta, 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0]))


def test_task_arithmetic_and_ties() -> None:
    base = {"w": torch.zeros(3), "step": torch.tensor(1)}
    one = {"w": torch.tensor([1.0, -2.0, 4.0]), "step": torch.tensor(1)}
    two = {"w": torch.tensor([3.0, 1.0, -1.0]), "step": torch.tensor(1)}
    assert torch.equal(merge_task_vectors(base, [one])["w"], one["w"])
    assert torch.equal(merge_task_vectors(base, [one, two], scale=0.5)["w"], torch.tensor([2.0, -0.5, 1.5]))
    # TIES: signs elected by the sum (+, -, +); only agreeing entries are averaged
    assert torch.equal(merge_task_vectors(base, [one, two], ties=True)["w"], torch.tensor([2.0, -2.0, 4.0]))


def test_breadcrumbs_masks_both_tails() -> None:
    delta = torch.tensor([0.1, -5.0, 2.0, -0.5, 1.0, 0.3, -0.2, 4.0, 0.05, 3.0])
    # top 10 %: the outlier -5 goes; density 50 %: the next five magnitudes (4, 3, 2, 1, 0.5) stay
    expected = torch.tensor([0.0, 0.0, 2.0, -0.5, 1.0, 0.0, 0.0, 4.0, 0.0, 3.0])
    assert torch.equal(breadcrumbs(delta, density=0.5, top=0.1), expected)
    assert torch.equal(breadcrumbs(delta.view(2, 5), density=0.5, top=0.1), expected.view(2, 5))
    assert torch.equal(breadcrumbs(delta, density=1.0, top=0.0), delta)
    base = {"w": torch.ones(10), "step": torch.tensor(1)}
    prune = partial(breadcrumbs, density=0.5, top=0.1)
    merged = merge_task_vectors(base, [{"w": 1 + delta, "step": torch.tensor(1)}], scale=2.0, prune=prune)
    assert torch.equal(merged["w"], 1 + 2 * expected) and merged["step"].item() == 1
    with pytest.raises(ValueError, match="density \\+ top"):
        breadcrumbs(delta, density=0.95, top=0.1)


def test_dare_drops_by_its_seeded_masks_and_rescales() -> None:
    base = {"w": torch.zeros(8), "b": torch.zeros(3), "step": torch.tensor(1)}
    one = {"w": torch.arange(1.0, 9.0), "b": torch.tensor([1.0, -2.0, 3.0]), "step": torch.tensor(1)}
    two = {"w": -torch.arange(1.0, 9.0) / 2, "b": torch.tensor([2.0, 2.0, -1.0]), "step": torch.tensor(1)}
    # the masks: one generator seeded 3, drawn per tensor in base's key order, model by model
    generator = torch.Generator().manual_seed(3)
    keep = {(key, i): torch.rand(base[key].shape, generator=generator) < 0.25 for key in ("w", "b") for i in (0, 1)}
    dropped = [{key: torch.where(keep[key, i], s[key] / 0.25, 0.0) for key in ("w", "b")} | {"step": s["step"]}
               for i, s in enumerate((one, two))]
    merged = merge_task_vectors(base, [one, two], scale=0.5, prune=dare_pruner(0.25, seed=3))
    for key in ("w", "b"):
        expected = 0.5 * 4 * (one[key] * keep[key, 0] + two[key] * keep[key, 1])  # kept entries × 1/(1 − 0.75)
        torch.testing.assert_close(merged[key], expected)
    assert 0 < sum(int(m.sum()) for m in keep.values()) < 22  # some dropped, some kept
    # dare_ties: TIES' sign election and disjoint mean on the dropped-and-rescaled task vectors
    ties = merge_task_vectors(base, [one, two], ties=True, prune=dare_pruner(0.25, seed=3))
    for key in ("w", "b"):
        torch.testing.assert_close(ties[key], merge_task_vectors(base, dropped, ties=True)[key])
    # the seed makes merges repeat; another seed draws other masks; density 1 drops nothing
    again = merge_task_vectors(base, [one, two], scale=0.5, prune=dare_pruner(0.25, seed=3))
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    other = merge_task_vectors(base, [one, two], scale=0.5, prune=dare_pruner(0.25, seed=4))
    assert not torch.equal(merged["w"], other["w"])
    assert torch.equal(merge_task_vectors(base, [one, two], prune=dare_pruner(1.0, seed=3))["w"], one["w"] + two["w"])


def test_lines_scales_task_vectors_by_layer() -> None:
    backbone = create_backbone("prithvi_eo_v2_tiny_tl", None, None, TINY_BACKBONE)
    layers, top = key_layers(backbone)  # group_matcher: embeddings 0, blocks.0 1, blocks.1 (+ norm) 2, head 3
    assert top == 3
    base = {**backbone.state_dict(), "head.weight": torch.zeros(2)}
    merged = {k: v + 1 for k, v in base.items()}  # a task vector of ones everywhere
    scaled = lines(base, merged, layers, top, alpha=0.2, beta=1.0)
    expected = {"patch_embed.proj.weight": 0.2, "cls_token": 0.2, "blocks.0.attn.qkv.weight": 0.2 + 0.8 / 3,
                "blocks.1.mlp.fc2.bias": 0.2 + 0.8 * 2 / 3, "norm.weight": 0.2 + 0.8 * 2 / 3, "head.weight": 1.0}
    for key, factor in expected.items():
        torch.testing.assert_close(scaled[key] - base[key], torch.full_like(base[key], factor))


def test_fisher_merge_weights_by_fisher_and_falls_back_to_the_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "running_mean": torch.tensor([0.0, 4.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0, 5.0]), "running_mean": torch.tensor([2.0, 0.0]), "n": torch.tensor(7)}
    fisher_a, fisher_b = {"w": torch.tensor([1.0, 3.0, 0.0])}, {"w": torch.tensor([3.0, 1.0, 0.0])}
    merged = fisher_merge([a, b], [fisher_a, fisher_b], eps=0.0)
    # (1·1 + 3·3) / 4, (3·2 + 1·6) / 4, and no Fisher in either model: the mean (3 + 5) / 2
    assert torch.equal(merged["w"], torch.tensor([2.5, 3.0, 4.0]))
    assert torch.equal(merged["running_mean"], torch.tensor([1.0, 2.0])) and merged["n"].item() == 5  # no Fisher
    floored = fisher_merge([a, b], [fisher_a, fisher_b], eps=1.0)  # weights 2 and 4 on the first entry
    torch.testing.assert_close(floored["w"], torch.tensor([(2 * 1.0 + 4 * 3.0) / 6, (4 * 2.0 + 2 * 6.0) / 6, 4.0]))


def fit(tmp_path: Path, name: str, strategy: dict, pretrained: str | None = None) -> Path:
    changes = {"strategy": strategy, **({"pretrained": pretrained} if pretrained else {}),
               "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}}  # adapters that matter
    config = write_config(tmp_path / name, model=changes, trainer={"max_epochs": 2})
    assert main(["fit", "--config", str(config)]) == 0
    return next((tmp_path / name / "runs" / "tiny" / "version_0" / "checkpoints").glob("epoch=*.ckpt"))


def predictions(task: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    task.eval()
    with torch.no_grad():
        return task(image)


LORA = {"class_path": "workbench.strategies.LoRA", "init_args": {"rank": 4, "alpha": 8}}
SSF = {"class_path": "workbench.strategies.SSF"}


def test_merge_cli_adapters_soups_and_task_vectors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = create_backbone("prithvi_eo_v2_tiny_tl", None, None, TINY_BACKBONE)
    base_file = tmp_path / "base.safetensors"
    save_file({f"encoder.{k}": v.contiguous() for k, v in base.state_dict().items()}, str(base_file))
    lora = fit(tmp_path, "lora", LORA, str(base_file))
    ssf = fit(tmp_path, "ssf", SSF, str(base_file))
    image = torch.randn(2, 6, 32, 32)

    # adapters folded: a .ckpt that loads like any other and predicts what the unmerged model does
    for ckpt in (lora, ssf):
        merged = tmp_path / f"{ckpt.parents[4].name}_merged.ckpt"
        assert main(["merge", "adapters", "--checkpoints", str(ckpt), "--output", str(merged)]) == 0
        reloaded, unmerged = load_task(merged), load_task(ckpt)
        assert any("lora_" in k or "ssf_" in k for k in unmerged.state_dict())
        assert not any("lora_" in k or "ssf_" in k for k in reloaded.state_dict())
        torch.testing.assert_close(predictions(reloaded, image), predictions(unmerged, image), atol=1e-4, rtol=1e-4)
        if ckpt == lora:  # the trained adapters matter: without them the predictions differ
            with unmerged.model.backbone.peft_model.disable_adapter():
                assert not torch.allclose(predictions(unmerged, image), predictions(reloaded, image), atol=1e-3)

    # a soup of the same checkpoint twice is that checkpoint
    soup = tmp_path / "soup.ckpt"
    assert main(["merge", "soup", "--checkpoints", str(lora), str(lora), "--output", str(soup)]) == 0
    torch.testing.assert_close(predictions(load_task(soup), image), predictions(load_task(lora), image),
                               atol=1e-4, rtol=1e-4)

    # greedy soup scored on the lora config's validation split
    config = tmp_path / "lora" / "config.yaml"
    last = lora.parent / "last.ckpt"
    greedy = tmp_path / "greedy.ckpt"
    assert main(["merge", "greedy_soup", "--checkpoints", str(lora), str(last), "--config", str(config),
                 "--output", str(greedy)]) == 0
    assert load_task(greedy).strategy.name == "lora"

    # TIES of two runs from one base into a backbone file that loads as `pretrained`
    merged_backbone = tmp_path / "ties.safetensors"
    assert main(["merge", "ties", "--checkpoints", str(lora), str(ssf), "--density", "0.5",
                 "--output", str(merged_backbone)]) == 0
    loaded = create_backbone("prithvi_eo_v2_tiny_tl", None, str(merged_backbone), TINY_BACKBONE)
    assert not torch.equal(loaded.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)

    # DARE (+ TIES), Breadcrumbs and LiNeS: backbones that load as `pretrained`, or loadable .ckpt files
    runs = [str(lora), str(ssf)]
    task_vectors = {
        "dare_ties": ["--density", "0.5", "--seed", "1"],
        "dare": ["--density", "0.5", "--seed", "1", "--scale", "0.5"],
        "breadcrumbs": ["--density", "0.9", "--top", "0.05"],
        "lines": ["--alpha", "0.2", "--beta", "0.8"],
    }
    for method, flags in task_vectors.items():
        out = tmp_path / f"{method}.safetensors"
        assert main(["merge", method, "--checkpoints", *runs, *flags, "--output", str(out)]) == 0
        loaded = create_backbone("prithvi_eo_v2_tiny_tl", None, str(out), TINY_BACKBONE)
        assert not torch.equal(loaded.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight), method
        as_ckpt = tmp_path / f"{method}.ckpt"
        assert main(["merge", method, "--checkpoints", *runs, *flags, "--output", str(as_ckpt)]) == 0
        assert predictions(load_task(as_ckpt), image).shape == predictions(load_task(lora), image).shape
    again = tmp_path / "dare_ties_again.safetensors"
    assert main(["merge", "dare_ties", "--checkpoints", *runs, *task_vectors["dare_ties"], "--output", str(again)]) == 0
    assert again.read_bytes() == (tmp_path / "dare_ties.safetensors").read_bytes()  # seeded: the merge repeats

    # Fisher merging, each run's Fisher from its own training data: a per-entry convex combination
    fisher = tmp_path / "fisher.ckpt"
    configs = [str(tmp_path / name / "config.yaml") for name in ("lora", "ssf")]
    assert main(["merge", "fisher", "--checkpoints", *runs, "--config", *configs, "--fisher_batches", "2",
                 "--output", str(fisher)]) == 0
    plains = [plain_weights(load_task(p), p) for p in runs]
    fused = load_task(fisher).model.state_dict()  # a merged checkpoint loads in the plain layout
    key = "backbone.blocks.0.attn.qkv.weight"
    low, high = torch.minimum(plains[0][key], plains[1][key]), torch.maximum(plains[0][key], plains[1][key])
    assert bool(((fused[key] >= low - 1e-6) & (fused[key] <= high + 1e-6)).all())
    assert not torch.equal(fused[key], (plains[0][key] + plains[1][key]) / 2)  # not the uniform soup
    assert main(["merge", "fisher", "--checkpoints", *runs, "--output", str(tmp_path / "f.ckpt")]) == 2  # no --config


def test_merge_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    vpt = fit(tmp_path, "vpt", {"class_path": "workbench.strategies.VPT", "init_args": {"num_tokens": 2}})
    export = vpt.parents[1] / "export"
    assert (export / "adapter.safetensors").is_file() and not (export / "merged.safetensors").exists()
    assert main(["merge", "adapters", "--checkpoints", str(vpt), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "vpt" in capsys.readouterr().err
    assert main(["merge", "ties", "--checkpoints", str(vpt), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert main(["merge", "soup", "--checkpoints", str(tmp_path / "missing.ckpt"),
                 "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert main(["merge", "breadcrumbs", "--checkpoints", str(vpt), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "--density + --top must be at most 1" in capsys.readouterr().err  # default density 1 + top 0.01
    assert not (tmp_path / "x.ckpt").exists()
