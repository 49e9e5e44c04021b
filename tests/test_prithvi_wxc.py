"""Prithvi WxC (official key layout): shapes, residual targets, time conditioning, masking,
activation checkpointing, official-file loading and LoRA on its attention layers — tiny sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
from timm.models import group_parameters

from backbones import PrithviWxC, load_prithvi_wxc
from backbones.builder import create_backbone
from workbench.errors import UserInputError
from workbench.model import BackboneModel
from workbench.strategies import LoRA
from workbench.strategies.blocks import transformer_blocks

MANIFEST = Path(__file__).parent / "manifests" / "prithvi_wxc_2300m.json"
B, T, C, C_STATIC, H, W, D = 2, 2, 4, 4, 16, 32, 64  # tiny: 8x8 mask units of 2x2 patches → G 2x4, L 4x4


def tiny(**kwargs) -> PrithviWxC:
    torch.manual_seed(0)
    return create_backbone("prithvi_wxc_tiny", backbone_kwargs=kwargs)


def batch(lead_time: tuple[float, float] = (6.0, 0.0), seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, T, C, H, W, generator=g), "static": torch.randn(B, C_STATIC + 2, H, W, generator=g),
            "climate": torch.randn(B, C, H, W, generator=g), "input_time": torch.tensor([-6.0, -3.0]),
            "lead_time": torch.tensor(lead_time)}


def test_shapes_and_registration() -> None:
    model = tiny().eval()
    with torch.no_grad():
        assert model(batch()).shape == (B, C, H, W)
        assert model.forward_features(batch()).shape == (B, 8, 16, D)
        assert [f.shape for f in model.forward_intermediates(batch())] == [(B, D, H // 2, W // 2)] * 2
    assert [i["num_chs"] for i in model.feature_info] == [D, D]
    assert model.bands == ["EFLUX", "GWETROOT", "HFLUX", "LAI"]
    assert create_backbone("prithvi_wxc_tiny", bands=["T2M", "U10M", "V10M"]).in_channels == 3
    cfg = timm.models.get_pretrained_cfg("prithvi_wxc_2300m")
    assert cfg.hf_hub_id == "ibm-nasa-geospatial/Prithvi-WxC-1.0-2300M"
    assert cfg.hf_hub_filename == "prithvi.wxc.2300m.v1.pt"
    with pytest.raises(UserInputError, match=r"batch\['static'\] must be \(B, 6, 16, 32\)"):
        model({**batch(), "static": torch.randn(B, C_STATIC, H, W)})


@pytest.mark.parametrize("residual", ["climate", "temporal", "none"])
def test_residual_targets(residual: str) -> None:
    mu, sigma, out_scale = torch.randn(C), torch.rand(C) + 0.5, torch.rand(C) + 0.5
    model = tiny(residual=residual, input_scalers_mu=mu, input_scalers_sigma=sigma, output_scalers=out_scale).eval()
    data = batch(lead_time=(6.0, 0.0))
    target = {"climate": data["climate"],
              "temporal": torch.stack([data["x"][0, T - 1], data["x"][1, 0]]),  # last input if lead > 0, else first
              "none": mu.view(1, C, 1, 1).expand(B, C, H, W)}[residual]
    torch.nn.init.zeros_(model.unembed.weight)
    torch.nn.init.zeros_(model.unembed.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(data), target, rtol=0, atol=0)
        model.unembed.bias.fill_(1.0)  # every pixel of the network output is 1: output = scale + target
        torch.testing.assert_close(model(data), out_scale.view(1, C, 1, 1) + target)


def test_lead_and_input_time_condition_the_output() -> None:
    model = tiny().eval()
    with torch.no_grad():
        base, later = model(batch(lead_time=(6.0, 6.0))), model(batch(lead_time=(18.0, 6.0)))
        assert not torch.allclose(base[0], later[0])
        torch.testing.assert_close(base[1], later[1])  # per sample
        assert not torch.allclose(base, model({**batch(lead_time=(6.0, 6.0)), "input_time": torch.zeros(B)}))


def test_masking_only_in_training() -> None:
    model = tiny(mask_ratio_inputs=0.5, encoder_shifting=False)
    plain = tiny(encoder_shifting=False)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch()), plain.eval()(batch()))
    model.train()
    assert model.forward_features(batch()).shape == (B, 4, 16, D)  # half the 8 mask units kept
    local = tiny(mask_ratio_inputs=0.5, encoder_shifting=False, masking_mode="local").train()
    assert local.forward_features(batch()).shape == (B, 8, 8, D)  # half the 16 tokens of every unit
    assert local(batch()).shape == (B, C, H, W)
    with pytest.raises(UserInputError, match="encoder_shifting"):
        tiny(mask_ratio_inputs=0.5)


def test_activation_checkpointing_gives_identical_gradients() -> None:
    grads = []
    for enable in (False, True):
        model = tiny(decoder_shifting=True).train()
        model.set_grad_checkpointing(enable)
        model(batch()).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def official_layout_file(model: PrithviWxC, path: Path) -> dict[str, torch.Tensor]:
    """``model``'s weights as the released file holds them: ``{"model_state": ...}`` with the
    official names, including the decoder SWIN mask buffers (stored twice) that we drop."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g, n = 8, 16
    for prefix in ("decoder_shifter.", "decoder.lgl_block.shifter."):
        state[prefix + "local_mask"] = torch.ones(g, 1, n, n, dtype=torch.bool)
        state[prefix + "global_mask"] = torch.ones(n, 1, g, g, dtype=torch.bool)
    torch.save({"model_state": state}, path)
    return state


def test_official_file_round_trip(tmp_path: Path) -> None:
    source = tiny().eval()
    with torch.no_grad():
        source.unembed.bias.normal_()
    state = official_layout_file(source, tmp_path / "prithvi.wxc.tiny.pt")
    # the names are the official ones (the 2.3B manifest, layer numbers aside), not just our own
    official = json.loads(MANIFEST.read_text())["keys"]
    pattern = re.compile(r"transformers\.\d+\.")
    assert {pattern.sub("transformers.N.", k) for k in state} == {pattern.sub("transformers.N.", k) for k in official}
    target = tiny()
    with torch.no_grad():
        target.unembed.bias.zero_()
    report = load_prithvi_wxc(target, tmp_path / "prithvi.wxc.tiny.pt")
    assert report["loaded"] == len(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(batch()), source(batch()), rtol=0, atol=0)


def test_wrong_size_file_is_one_clear_error(tmp_path: Path) -> None:
    torch.save({"model_state": tiny(embed_dim=32).state_dict()}, tmp_path / "small.pt")
    with pytest.raises(UserInputError) as err:
        load_prithvi_wxc(tiny(), tmp_path / "small.pt")
    message = str(err.value)
    assert "\n" not in message and "shape mismatch" in message and "embed_dim 32" in message


def test_blocks_layer_decay_and_lora_count() -> None:
    model = BackboneModel(tiny())
    layers = transformer_blocks(model.backbone)
    assert layers == [*model.backbone.encoder.lgl_block.transformers, *model.backbone.decoder.lgl_block.transformers]
    assert len(layers) == (2 * 2 + 1) + (2 * 1 + 1)
    group = group_parameters(model.backbone, model.backbone.group_matcher(), reverse=True)
    assert group["patch_embedding.proj.weight"] == group["mask_token"] == 0
    assert group["encoder.lgl_block.transformers.0.ff.0.weight"] == 1
    assert group["decoder.lgl_block.transformers.0.ff.0.weight"] == 6
    assert group["unembed.weight"] == group["decoder.lgl_block.transformers.2.ff.0.weight"] == 8
    report = LoRA(rank=4, target_modules=["qkv_layer", "w_layer"]).apply(model)
    # per layer, rank 4 × (in + out) of qkv_layer (D → 3D) and w_layer (D → D)
    assert report.backbone_trainable == len(layers) * 4 * ((D + 3 * D) + (D + D))
    model.eval()
    with torch.no_grad():
        assert model.backbone(batch()).shape == (B, C, H, W)
