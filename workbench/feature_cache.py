"""Caching a frozen encoder's features so decoder-only training runs at decoder cost."""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def sample_keys(image: Tensor, extras: dict[str, Tensor]) -> list[bytes]:
    """One content hash per sample of ``image`` ``(B, ...)`` and its per-sample ``extras``, of
    any dtype (bfloat16 included)."""
    batch = [t.detach().cpu() for t in (image, *(extras[k] for k in sorted(extras)))]  # one copy off a GPU
    keys = []
    for i in range(image.shape[0]):
        digest = hashlib.blake2b(digest_size=16)
        for tensor in batch:
            digest.update(tensor[i].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        keys.append(digest.digest())
    return keys


class FeatureCache:
    """Remembers ``backbone.forward_intermediates`` per sample, keyed by the sample's content.

    Only valid for a frozen backbone in eval mode (its features are a pure function of the
    input). Without augmentation every training chip is seen in epoch 1 and every later epoch
    is served from the cache; an augmented chip is a new key (a miss, never a wrong hit). The
    cache stops growing at ``max_mib`` MiB. Not a module: no parameters, no state-dict entries.
    """

    def __init__(self, max_mib: float = 4096) -> None:
        self.max_bytes = int(max_mib * 2**20)
        self.entries: dict[bytes, list[Tensor]] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __call__(self, backbone: nn.Module, image: Tensor, **extras: Tensor) -> list[Tensor]:
        keys = sample_keys(image, extras)
        cached = [self.entries.get(k) for k in keys]
        if all(c is not None for c in cached):
            self.hits += len(keys)
            return [torch.stack([c[level] for c in cached]) for level in range(len(cached[0]))]
        self.misses += len(keys)
        with torch.no_grad():
            features = backbone.forward_intermediates(image, **extras)
        for i, key in enumerate(keys):
            if key in self.entries:
                continue
            sample = [f[i].clone() for f in features]
            size = sum(f.numel() * f.element_size() for f in sample)
            if self.bytes + size > self.max_bytes:
                log.warning("feature cache full at %.0f MiB; later samples are recomputed", self.bytes / 2**20)
                break
            self.entries[key] = sample
            self.bytes += size
        return features
