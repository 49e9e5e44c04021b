"""GaLore: plain AdamW where nothing is projected, low-rank updates and state where it is, and a
fit from the CLI."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import fit_run, write_config
from workbench.galore import GaLoreAdamW


def test_without_projection_it_is_adamw() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(4, 6, requires_grad=True), torch.randn(6, requires_grad=True)]
    reference = [w.detach().clone().requires_grad_() for w in weights]
    ours = GaLoreAdamW(weights, lr=0.1, weight_decay=0.05, rank=4)  # min side 4: not larger than rank
    adamw = torch.optim.AdamW(reference, lr=0.1, weight_decay=0.05)
    for step in range(3):
        target = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for params, optimizer in ((weights, ours), (reference, adamw)):
            optimizer.zero_grad()
            ((params[0] + params[1] - target) ** 2).sum().backward()
            optimizer.step()
    for ours_w, ref_w in zip(weights, reference):
        torch.testing.assert_close(ours_w, ref_w)


def test_matrix_updates_and_moments_are_low_rank() -> None:
    torch.manual_seed(0)
    tall, wide = torch.randn(12, 8, requires_grad=True), torch.randn(8, 12, requires_grad=True)
    optimizer = GaLoreAdamW([tall, wide], lr=0.1, weight_decay=0.0, rank=2, update_proj_gap=10)
    before = [tall.detach().clone(), wide.detach().clone()]
    (tall @ torch.randn(8, 5)).square().sum().backward()  # gradients of rank 5 and 3
    (wide @ torch.randn(12, 3)).square().sum().backward()
    optimizer.step()
    for param, old in zip((tall, wide), before):
        assert torch.linalg.matrix_rank(param.detach() - old, atol=1e-4) == 2  # the update lives in a rank-2 subspace
    assert optimizer.state[tall]["exp_avg"].shape == (12, 2)  # m >= n: right projection, (m, r) moments
    assert optimizer.state[wide]["exp_avg"].shape == (2, 12)  # m < n: left projection, (r, n) moments


def test_full_fine_tuning_with_galore_from_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path, model={
        "strategy": {"class_path": "workbench.strategies.Full"},
        "optimizer": {"class_path": "workbench.galore.GaLoreAdamW",
                      "init_args": {"lr": 3e-3, "rank": 8, "update_proj_gap": 5}}}, trainer={"max_epochs": 3})
    losses, _ = fit_run(config, "--test_after_fit", "false")
    assert losses[-1] < losses[0]
