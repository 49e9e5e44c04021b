"""Audio: decoding and resampling, the mel front end, SpecAugment, AST and a CLI fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import timm
import torch

from backbones.ast import load_ast, patch_grid
from datamodules.audio import AudioFolderDataModule, LogMel, load_audio, mel_filterbank, spec_augment
from tests.conftest import fit_run, write_task_config
from workbench.errors import UserInputError


def write_tone(path: Path, hz: float, seconds: float, rate: int, seed: int = 0) -> Path:
    """A sine tone with a little noise, as 16-bit PCM ``path`` (wav or flac by suffix)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, (0.5 * np.sin(2 * np.pi * hz * t) + 0.02 * rng.normal(size=t.size)).astype(np.float32), rate)
    return path


def test_load_audio_resamples_and_mixes_down(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "a.flac", 440.0, 1.0, 22050)
    audio = load_audio(path, 16000)
    assert audio.dtype == torch.float32 and audio.shape == (16000,)
    spectrum = torch.fft.rfft(audio).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 2  # 1 s at 16 kHz: bin k is k Hz
    native = write_tone(tmp_path / "b.wav", 300.0, 1.0, 16000)
    full = load_audio(native, 16000)
    torch.testing.assert_close(load_audio(native, 16000, start=8000, frames=4000), full[8000:12000], atol=1e-4, rtol=0)
    assert load_audio(path, 16000, start=4000, frames=2000).shape == (2000,)  # a resampled part
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(UserInputError, match="bad.wav could not be decoded"):
        load_audio(tmp_path / "bad.wav", 16000)


def test_mel_front_end() -> None:
    filters = mel_filterbank(257, 40, 16000)
    assert filters.shape == (257, 40) and filters.min() >= 0
    peaks = filters.argmax(0)
    assert torch.all(peaks[1:] >= peaks[:-1])  # filter centres rise with the mel index
    mel = LogMel(16000, n_mels=40)
    t = torch.arange(16000) / 16000
    low, high = mel(torch.sin(2 * torch.pi * 300 * t)), mel(torch.sin(2 * torch.pi * 4000 * t))
    assert low.shape == (40, 101)
    assert int(low.mean(1).argmax()) < int(high.mean(1).argmax())
    masked = spec_augment(torch.ones(1, 40, 101), 10, 30, torch.Generator().manual_seed(0))
    assert 0 < (masked == 0).float().mean() < 0.6 and masked.shape == (1, 40, 101)


def test_ast_shapes_and_official_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    model = timm.create_model("ast_tiny", n_mels=32, num_frames=48, **arch).eval()
    spectrogram = torch.randn(2, 1, 32, 48)
    features = model.forward_intermediates(spectrogram)
    assert [f.shape for f in features] == [(2, 32, *patch_grid(32, 48, 16, 10, 10))] * len(model.out_indices)
    assert model.forward_intermediates(torch.randn(1, 1, 32, 90))[-1].shape[-1] == patch_grid(32, 90, 16, 10, 10)[1]

    # a checkpoint in the official layout: DataParallel-wrapped ASTModel, 128-mel grid of 12 x 9 patches
    official = timm.create_model("ast_tiny", n_mels=128, num_frames=100, **arch)
    state = {f"module.v.{k}": v for k, v in official.state_dict().items()}
    state["module.v.head.weight"] = torch.zeros(1000, 32)
    state["module.mlp_head.1.weight"] = torch.zeros(527, 32)
    torch.save(state, tmp_path / "audioset.pth")
    same = timm.create_model("ast_tiny", n_mels=128, num_frames=100, **arch)
    load_ast(same, tmp_path / "audioset.pth")
    for key, value in official.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value)
    report = load_ast(model, tmp_path / "audioset.pth")  # 32 mels x 48 frames: position embedding resampled
    assert report["loaded"] == len(model.state_dict())
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, official.blocks[1].mlp.fc2.weight)
    with pytest.raises(UserInputError, match="official AST layout"):
        torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
        load_ast(model, tmp_path / "other.pth")


def make_tones(root: Path) -> Path:
    """Three classes of tones (low, mid, high pitch), 6 files each, 1.5 s at 8 kHz."""
    for name, hz in (("low", 200.0), ("mid", 800.0), ("high", 2500.0)):
        for i in range(6):
            write_tone(root / name / f"{name}_{i}.wav", hz * (1 + 0.05 * i), 1.5, 8000, seed=i)
    return root


def test_audio_folder_datamodule_splits_per_class(tmp_path: Path) -> None:
    dm = AudioFolderDataModule(str(make_tones(tmp_path)), sample_rate=8000, clip_seconds=0.5, n_mels=32,
                               split_ratios=(0.5, 0.25, 0.25))
    assert dm.class_names == ["high", "low", "mid"] and dm.num_classes == 3
    files = {s: {f for f, _ in pairs} for s, pairs in dm.split_files.items()}
    assert not files["train"] & files["test"] and not files["train"] & files["val"]
    assert {name for _, name in dm.split_files["test"]} == {"high", "low", "mid"}
    dm.setup("fit")
    sample = dm.datasets["train"][0]
    assert sample["image"].shape == (1, 32, 51) and sample["label"].dtype == torch.int64
    assert len(dm.datasets["train"]) == 9 * 5  # 1.5 s files, 0.5 s windows every 0.25 s
    with pytest.raises(UserInputError, match="no class folders"):
        AudioFolderDataModule(str(tmp_path / "low")).class_names


def test_audio_classification_fits_through_the_cli(tmp_path: Path) -> None:
    model = {"class_path": "workbench.tasks.ClassificationTask", "init_args": {
        "backbone": "ast_tiny", "backbone_kwargs": {"n_mels": 32, "num_frames": 51, "embed_dim": 32, "depth": 2,
                                                     "num_heads": 2},
        "strategy": {"class_path": "workbench.strategies.LoRA", "init_args": {"rank": 4}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}}}
    data = {"class_path": "datamodules.AudioFolderDataModule", "init_args": {
        "root": str(make_tones(tmp_path / "tones")), "sample_rate": 8000, "clip_seconds": 0.5, "n_mels": 32,
        "split_ratios": [0.5, 0.25, 0.25], "batch_size": 8}}
    losses, results = fit_run(write_task_config(tmp_path, model, data, "val/accuracy", "max", 5))
    assert losses[-1] < losses[0]
    assert results["test"]["test/accuracy"] > 0.6  # three pitches; chance is 1/3
