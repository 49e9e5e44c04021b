"""Merging weights of models fine-tuned from one base: soups, Fisher merging and task-vector
arithmetic (TIES, DARE, Model Breadcrumbs, LiNeS).

Pure functions over state dicts ``{name: tensor}`` in the plain (adapter-free) layout. Only
floating-point tensors are merged; integer buffers (e.g. BatchNorm step counters) are taken from
the first model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def check_compatible(states: list[StateDict], names: list[str]) -> None:
    """Raise ``ValueError`` naming the first model whose keys or shapes differ from the first's."""
    reference = {k: tuple(v.shape) for k, v in states[0].items()}
    for state, name in zip(states[1:], names[1:]):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != reference:
            missing = sorted(set(reference) - set(shapes))[:3]
            extra = sorted(set(shapes) - set(reference))[:3]
            differ = [k for k in set(reference) & set(shapes) if reference[k] != shapes[k]][:3]
            raise ValueError(
                f"{name} does not have the architecture of {names[0]}: missing {missing}, "
                f"unexpected {extra}, other shapes {differ}"
            )


def uniform_soup(states: list[StateDict]) -> StateDict:
    """The element-wise mean of the models' weights."""
    return {
        key: torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype) if value.is_floating_point() else value
        for key, value in states[0].items()
    }


def greedy_soup(states: list[StateDict], score: Callable[[StateDict], float]) -> tuple[StateDict, list[int]]:
    """Greedy soup: rank the models by ``score`` (higher is better), then add each in turn to the
    soup if the uniform soup of the kept models scores at least as well. Returns the soup and
    the indices of the models in it."""
    ranked = sorted(range(len(states)), key=lambda i: score(states[i]), reverse=True)
    kept = [ranked[0]]
    best = score(states[ranked[0]])
    for index in ranked[1:]:
        candidate = uniform_soup([states[i] for i in (*kept, index)])
        value = score(candidate)
        if value >= best:
            kept, best = [*kept, index], value
    return uniform_soup([states[i] for i in kept]), kept


def magnitude_mask(delta: Tensor, count: int) -> Tensor:
    """Boolean mask (shape of ``delta``) of its ``count`` largest-magnitude entries; entries tied
    with the ``count``-th are kept too. ``count <= 0``: nothing."""
    if count <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    count = min(count, delta.numel())
    threshold = delta.abs().flatten().kthvalue(delta.numel() - count + 1).values
    return delta.abs() >= threshold


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude; zero the rest."""
    if density >= 1.0 or delta.numel() == 0:
        return delta
    keep = max(1, int(round(delta.numel() * density)))
    return torch.where(magnitude_mask(delta, keep), delta, torch.zeros_like(delta))


def breadcrumbs(delta: Tensor, density: float, top: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024, arXiv:2312.06795) on one tensor of a task
    vector (any shape): mask both tails of the magnitudes. The largest ``top`` fraction (outliers)
    and the smallest entries are zeroed so that the ``density`` fraction in between remains."""
    if not (0.0 <= top < 1.0 and 0.0 < density and density + top <= 1.0 + 1e-9):
        raise ValueError(f"breadcrumbs needs 0 <= top < 1, density > 0 and density + top <= 1; got {top}, {density}")
    n = delta.numel()
    outliers = int(round(n * top))
    keep = min(max(1, int(round(n * density))), n - outliers)
    kept = magnitude_mask(delta, outliers + keep) & ~magnitude_mask(delta, outliers)
    return torch.where(kept, delta, torch.zeros_like(delta))


def dare(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE, drop and rescale (Yu et al. 2024, "Language Models are Super Mario",
    arXiv:2311.03099) on one tensor of a task vector (any shape): drop each entry with
    probability ``p = 1 - density`` and rescale the kept ones by ``1 / (1 - p)``, so the expected
    delta is unchanged. Entry ``j`` is kept iff ``u_j < density`` for
    ``u = torch.rand(delta.shape, generator=generator)``."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=generator.device).to(delta.device) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def dare_pruner(density: float, seed: int) -> Callable[[Tensor], Tensor]:
    """:func:`dare` with its own generator seeded by ``seed``, for ``merge_task_vectors(prune=...)``:
    the masks are drawn tensor by tensor (in ``base``'s key order), model by model within a tensor."""
    return partial(dare, density=density, generator=torch.Generator().manual_seed(seed))


def merge_task_vectors(
    base: StateDict,
    finetuned: list[StateDict],
    scale: float = 1.0,
    density: float = 1.0,
    ties: bool = False,
    prune: Callable[[Tensor], Tensor] | None = None,
) -> StateDict:
    """``base + scale * merge(τ_1..τ_n)`` with task vectors ``τ_i = θ_i − base``.

    Args:
        base: the weights every model was fine-tuned from.
        finetuned: the fine-tuned weights (same keys as ``base``).
        scale: λ on the merged task vector.
        density: magnitude pruning: keep this fraction of each task vector's entries per tensor.
        ties: TIES-merging: elect each entry's sign by the sum of the (pruned) task vectors and
            average only the entries that agree with it; otherwise task arithmetic (the sum).
        prune: another sparsifier of each task vector's tensors instead of magnitude pruning
            (:func:`dare_pruner`, :func:`breadcrumbs`); then ``density`` must stay 1.
    """
    if prune is not None and density < 1.0:
        raise ValueError("pass the density to the prune function, not to merge_task_vectors")
    prune = prune or partial(trim, density=density)
    merged = {}
    for key, value in base.items():
        if not value.is_floating_point():
            merged[key] = value
            continue
        deltas = torch.stack([prune(s[key].float() - value.float()) for s in finetuned])
        if ties:
            sign = torch.sign(deltas.sum(0))
            agree = (torch.sign(deltas) == sign) & (deltas != 0)
            delta = (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)
        else:
            delta = deltas.sum(0)
        merged[key] = (value.float() + scale * delta).to(value.dtype)
    return merged


def lines(base: StateDict, merged: StateDict, layers: Mapping[str, int], top: int,
          alpha: float, beta: float) -> StateDict:
    """LiNeS, layer-increasing network scaling (Wang et al. 2025, "LiNeS: Post-training Layer
    Scaling Prevents Forgetting and Enhances Model Merging", arXiv:2410.17146): scale the task
    vector ``merged − base`` of each key's layer ``l`` by ``α + (β − α) · l / top``, so shallow
    layers keep little of the change and deep layers more.

    ``layers`` maps keys to layers ``0..top`` (embeddings 0, block ``i`` at ``i + 1``: see
    ``workbench.optim.layer_ids``); keys not in it (decoder, head, buffers) are at ``top``: ``β``.
    """
    if top < 1:
        raise ValueError(f"LiNeS needs at least two layers (top >= 1), got top={top}")
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = merged[key]
            continue
        factor = alpha + (beta - alpha) * layers.get(key, top) / top
        out[key] = (value.float() + factor * (merged[key].float() - value.float())).to(value.dtype)
    return out


def fisher_merge(states: list[StateDict], fishers: list[StateDict], eps: float = 1e-6) -> StateDict:
    """Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
    arXiv:2111.09832): per entry ``Σ_i (F_i + eps) θ_i / Σ_i (F_i + eps)``, the models' weights
    averaged with their diagonal Fisher information ``F_i`` (shape of ``θ_i``) as weights.

    ``eps`` is a Fisher floor added to every model (the paper's code's ``fisher_floor``): it pulls
    entries with almost no information towards the uniform mean. Entries whose Fisher is zero in
    every model, and keys missing from any Fisher dict (buffers), take the uniform mean.
    """
    if len(states) != len(fishers):
        raise ValueError(f"{len(states)} models but {len(fishers)} Fisher dicts")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    merged = uniform_soup(states)
    for key, value in states[0].items():
        if not value.is_floating_point() or any(key not in f for f in fishers):
            continue
        weights = torch.stack([f[key].float() for f in fishers])
        thetas = torch.stack([s[key].float() for s in states])
        weighted = ((weights + eps) * thetas).sum(0) / (weights + eps).sum(0)
        merged[key] = torch.where(weights.sum(0) > 0, weighted, merged[key].float()).to(value.dtype)
    return merged
