"""Merging weights of models fine-tuned from one base: soups and task-vector arithmetic.

Pure functions over state dicts ``{name: tensor}`` in the plain (adapter-free) layout. Only
floating-point tensors are merged; integer buffers (e.g. BatchNorm step counters) are taken from
the first model.
"""

from __future__ import annotations

from collections.abc import Callable

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


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude; zero the rest."""
    if density >= 1.0 or delta.numel() == 0:
        return delta
    keep = max(1, int(round(delta.numel() * density)))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def merge_task_vectors(
    base: StateDict,
    finetuned: list[StateDict],
    scale: float = 1.0,
    density: float = 1.0,
    ties: bool = False,
) -> StateDict:
    """``base + scale * merge(τ_1..τ_n)`` with task vectors ``τ_i = θ_i − base``.

    Args:
        base: the weights every model was fine-tuned from.
        finetuned: the fine-tuned weights (same keys as ``base``).
        scale: λ on the merged task vector.
        density: magnitude pruning: keep this fraction of each task vector's entries per tensor.
        ties: TIES-merging: elect each entry's sign by the sum of the (pruned) task vectors and
            average only the entries that agree with it; otherwise task arithmetic (the sum).
    """
    merged = {}
    for key, value in base.items():
        if not value.is_floating_point():
            merged[key] = value
            continue
        deltas = torch.stack([trim(s[key].float() - value.float(), density) for s in finetuned])
        if ties:
            sign = torch.sign(deltas.sum(0))
            agree = (torch.sign(deltas) == sign) & (deltas != 0)
            delta = (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)
        else:
            delta = deltas.sum(0)
        merged[key] = (value.float() + scale * delta).to(value.dtype)
    return merged
