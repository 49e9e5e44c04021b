"""GaLore: memory-efficient full fine-tuning by gradient low-rank projection, as an optimizer.

Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"
(arXiv:2403.03507). The ``galore-torch`` package pulls in ``transformers`` and ``bitsandbytes``;
the algorithm is a few lines on top of AdamW, so it lives here.

    optimizer:
      class_path: workbench.galore.GaLoreAdamW
      init_args: {lr: 1.0e-4, rank: 8, update_proj_gap: 50, scale: 0.25}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def projector(grad: Tensor, rank: int) -> Tensor:
    """The top-``rank`` singular vectors of ``grad`` ``(m, n)`` on its smaller side: ``(m, r)``
    left vectors when ``m < n``, else ``(r, n)`` right ones (as the paper's implementation)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return u[:, :rank] if grad.shape[0] < grad.shape[1] else vh[:rank]


def project(grad: Tensor, basis: Tensor, left: bool) -> Tensor:
    """``(m, n)`` → ``(r, n)`` with a left basis ``(m, r)``, or ``(m, r)`` with a right one ``(r, n)``."""
    return basis.T @ grad if left else grad @ basis.T


def project_back(update: Tensor, basis: Tensor, left: bool) -> Tensor:
    """The projected update back to ``(m, n)``."""
    return basis @ update if left else update @ basis


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose moments, for every matrix parameter with both sides larger than ``rank``, live
    in a rank-``rank`` projection of its gradient: ``R = PᵀG`` (or ``G Qᵀ``), Adam on ``R``, the
    update ``scale · P·N`` projected back; ``P`` is recomputed from the gradient's SVD every
    ``update_proj_gap`` steps. Optimizer state for such an ``(m, n)`` weight is ``2·r·max(m, n)``
    instead of ``2·m·n``; vectors, convolutions and small matrices get plain AdamW.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25) -> None:
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(f"GaLoreAdamW: rank ({rank}) and update_proj_gap ({update_proj_gap}) must be >= 1")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_proj_gap": update_proj_gap, "scale": scale}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                low_rank = grad.ndim == 2 and min(grad.shape) > group["rank"]
                if not state:
                    state["step"] = 0
                if low_rank:
                    if state["step"] % group["update_proj_gap"] == 0:
                        state["projector"] = projector(grad, group["rank"]).to(grad.dtype)
                    left = grad.shape[0] < grad.shape[1]
                    grad = project(grad, state["projector"], left)
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["step"] += 1
                exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (exp_avg / (1 - beta1**step)) / ((exp_avg_sq / (1 - beta2**step)).sqrt() + group["eps"])
                if low_rank:
                    update = project_back(update, state["projector"], left) * group["scale"]
                param.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
        return loss
