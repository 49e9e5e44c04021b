"""Merging: soups, task arithmetic, TIES (exact small cases) and `workbench merge` end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backbones.builder import create_backbone
from tests.conftest import TINY_BACKBONE, write_config
from workbench.cli import main
from workbench.merge import greedy_soup, merge_task_vectors, trim, uniform_soup
from workbench.merge.checkpoints import load_task


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


def fit(tmp_path: Path, name: str, strategy: dict, pretrained: str | None = None) -> Path:
    changes = {"strategy": strategy, **({"pretrained": pretrained} if pretrained else {})}
    config = write_config(tmp_path / name, model=changes, trainer={"max_epochs": 2})
    assert main(["fit", "--config", str(config)]) == 0
    return next((tmp_path / name / "runs" / "tiny" / "version_0" / "checkpoints").glob("epoch=*.ckpt"))


def predictions(task: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    task.eval()
    with torch.no_grad():
        return task(image)


LORA = {"class_path": "workbench.strategies.LoRA", "init_args": {"rank": 4, "alpha": 8}}
SSF = {"class_path": "workbench.strategies.SSF"}


def test_merge_cli_adapters_soup_and_ties(tmp_path: Path) -> None:
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
    assert not (tmp_path / "x.ckpt").exists()
