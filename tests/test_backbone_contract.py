"""The backbone contract every family keeps (timm's): ``forward_features`` a tensor,
``forward_intermediates`` one map per ``feature_info`` level, ``group_matcher`` numbering the
layers as timm's layer decay does, checkpointing changing no number."""

from __future__ import annotations

import pytest
import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from backbones.builder import create_backbone
from workbench.model import BackboneModel
from workbench.optim import parameter_groups

TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
BACKBONES = {  # name, constructor kwargs, input
    "prithvi": ("prithvi_eo_v2_tiny_tl", {**TINY_VIT, "img_size": 32}, (2, 6, 32, 32)),
    "ast": ("ast_tiny", {**TINY_VIT, "n_mels": 32, "num_frames": 40}, (2, 1, 32, 40)),
    "patchtst": ("patchtst_tiny", {**TINY_VIT, "context_length": 48}, (2, 3, 48)),
    "point_mae": ("point_mae_tiny", {**TINY_VIT, "num_groups": 8, "group_size": 8}, (2, 64, 3)),
    "satvision": ("satvision_toa_tiny", {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1),
                                         "img_size": 64, "window_size": 2}, (2, 14, 64, 64)),
    "smp_resnet": ("smp:resnet18", {}, (2, 3, 64, 64)),
    "timm_convnext": ("convnext_atto", {}, (2, 3, 64, 64)),
}


def build(key: str) -> tuple[nn.Module, Tensor]:
    name, kwargs, shape = BACKBONES[key]
    torch.manual_seed(0)
    return create_backbone(name, None, None, kwargs).eval(), torch.randn(shape)


@pytest.mark.parametrize("key", list(BACKBONES))
def test_features_and_intermediates(key: str) -> None:
    model, x = build(key)
    with torch.no_grad():
        final, maps = model.forward_features(x), model.forward_intermediates(x)
    assert isinstance(final, Tensor) and isinstance(maps, list)
    assert [m.shape[1] for m in maps] == [i["num_chs"] for i in model.feature_info]
    torch.testing.assert_close(model(x), final)
    if key.startswith(("smp", "timm")):  # CNNs: the final features are the deepest map
        torch.testing.assert_close(final, maps[-1])


@pytest.mark.parametrize("key", list(BACKBONES))
def test_layer_decay_numbers_layers_as_timm(key: str) -> None:
    """Our scales are timm's ``param_groups_layer_decay`` scales of the backbone alone, one
    step lower: our task layers sit on top, where timm puts a classifier head."""
    model, _ = build(key)
    decay = 0.5
    timm_scale = {}
    for group in param_groups_layer_decay(model, layer_decay=decay):
        timm_scale.update({id(p): group["lr_scale"] for p in group["params"]})
    ours = {id(p): g["lr_scale"] for g in parameter_groups(BackboneModel(model), frozenset(), None, decay)
            for p in g["params"]}
    assert set(ours) == set(timm_scale)
    assert all(ours[i] == pytest.approx(timm_scale[i] * decay) for i in ours)
    layers = group_parameters(model, model.group_matcher(), reverse=True)
    assert max(layers.values()) >= 2  # the stem and at least two blocks really are told apart


@pytest.mark.parametrize("key", ["prithvi", "ast", "patchtst", "point_mae", "satvision"])
def test_checkpointing_changes_no_number(key: str) -> None:
    model, x = build(key)

    def run() -> tuple[list[Tensor], list[Tensor]]:
        model.zero_grad()
        maps = model.forward_intermediates(x)
        sum(m.square().mean() for m in maps).backward()
        return [m.detach() for m in maps], [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = run()
    model.set_grad_checkpointing(True)
    checkpointed = run()
    torch.testing.assert_close(checkpointed, plain)
