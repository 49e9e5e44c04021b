"""Prithvi-style ViT: shapes, embeddings, timm registration, official checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import backbones  # noqa: F401
from backbones.features import default_out_indices
from backbones.layers import sincos_3d
from backbones.prithvi import HLS_BANDS, load_pretrained
from workbench.errors import UserInputError

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32}
NAMES = ["prithvi_eo_v1_100m", "prithvi_eo_v2_tiny_tl", "prithvi_eo_v2_100m_tl", "prithvi_eo_v2_300m",
         "prithvi_eo_v2_300m_tl", "prithvi_eo_v2_600m", "prithvi_eo_v2_600m_tl"]


def tiny(name: str = "prithvi_eo_v2_tiny_tl", **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **{**TINY, "num_frames": 1, **kwargs}).eval()


def official_v2_state(model: torch.nn.Module, decoder_dim: int = 32) -> dict[str, torch.Tensor]:
    """The model's weights in the official MAE layout: encoder.* (with pos_embed) + decoder.*."""
    state = {f"encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    grid = model.pos_embed.shape[1]
    state["encoder.pos_embed"] = torch.zeros(1, grid + 1, model.embed_dim)
    state["decoder.mask_token"] = torch.zeros(1, 1, decoder_dim)
    state["decoder.decoder_embed.weight"] = torch.zeros(decoder_dim, model.embed_dim)
    state["decoder.decoder_blocks.0.norm1.weight"] = torch.ones(decoder_dim)
    state["decoder.decoder_pred.weight"] = torch.zeros(16 * 16 * 6, decoder_dim)
    return state


def reference_sincos_3d(dim: int, grid: tuple[int, int, int]) -> np.ndarray:
    """Independent numpy version of the official MAE 3-D sin-cos embedding."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    t, h, w = grid
    emb_w = np.tile(one_d(dim // 16 * 6, np.arange(w)), (t * h, 1))
    emb_h = np.tile(np.repeat(one_d(dim // 16 * 6, np.arange(h)), w, axis=0), (t, 1))
    emb_t = np.repeat(one_d(dim // 16 * 4, np.arange(t)), h * w, axis=0)
    return np.concatenate([emb_w, emb_h, emb_t], axis=1)


def test_forward_features_is_the_last_intermediate_as_tokens() -> None:
    """timm's contract: ``forward_features`` the final normed tokens (cls first), which are the
    last ``forward_intermediates`` map before the reshape; checkpointing changes neither."""
    model = tiny().eval()
    x = torch.randn(2, 6, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 4, 64)
    last = model.forward_intermediates(x)[-1]
    torch.testing.assert_close(last, tokens[:, 1:].transpose(1, 2).reshape(2, 64, 2, 2))
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model.forward_features(x), tokens)


def test_shapes_2d_temporal_and_other_sizes() -> None:
    model = tiny()
    feats = model.forward_intermediates(torch.randn(2, 6, 32, 32))
    assert [f.shape for f in feats] == [(2, 64, 2, 2)] * 4
    assert [i["num_chs"] for i in model.feature_info] == [64] * 4
    assert {i["reduction"] for i in model.feature_info} == {16}
    temporal = tiny("prithvi_eo_v2_100m_tl", num_frames=2)
    assert [f.shape for f in temporal.forward_intermediates(torch.randn(1, 6, 2, 48, 64))] == [(1, 128, 3, 4)] * 4
    assert temporal.feature_info[0]["num_chs"] == 128


def test_default_feature_blocks_per_size() -> None:
    assert default_out_indices(12) == [2, 5, 8, 11]
    assert default_out_indices(24) == [5, 11, 17, 23]
    assert default_out_indices(32) == [7, 15, 23, 31]
    assert tiny(depth=3).out_indices == [0, 1, 2, 2]


def test_sincos_matches_official_formula() -> None:
    ours = sincos_3d(64, (2, 3, 4)).numpy()
    np.testing.assert_allclose(ours, reference_sincos_3d(64, (2, 3, 4)), atol=1e-6)


def test_coordinate_encodings() -> None:
    x = torch.randn(2, 6, 1, 32, 32)
    time, loc = torch.tensor([[[2020.0, 100.0]], [[2021.0, 200.0]]]), torch.tensor([[40.0, -75.0], [10.0, 5.0]])
    tl = tiny()
    base = tl(x)[-1]
    assert not torch.allclose(tl(x, temporal_coords=time)[-1], base)
    assert not torch.allclose(tl(x, location_coords=loc)[-1], base)
    plain = tiny("prithvi_eo_v2_300m")
    assert plain.temporal_embed_enc is None and plain.location_embed_enc is None


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_metadata(name: str) -> None:
    assert name in timm.list_models("prithvi*")
    cfg = timm.get_pretrained_cfg(name)
    assert cfg.hf_hub_id.startswith("ibm-nasa-geospatial/") and cfg.hf_hub_filename.endswith(".pt")
    assert len(cfg.mean) == len(cfg.std) == len(HLS_BANDS)


def test_official_v2_layout_loads_every_encoder_key(tmp_path: Path) -> None:
    source = tiny()
    torch.nn.init.normal_(source.blocks[1].attn.qkv.weight)
    path = tmp_path / "Prithvi_EO_V2_tiny_TL.pt"
    torch.save(official_v2_state(source), path)
    target = tiny()
    report = load_pretrained(target, path)
    assert report["loaded"] == len(target.state_dict())
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert torch.equal(target.temporal_embed_enc.scale, source.temporal_embed_enc.scale)
    x = torch.randn(1, 6, 32, 32)
    assert torch.allclose(target(x)[-1], source(x)[-1])


def test_v1_unprefixed_wrapped_and_safetensors_layouts(tmp_path: Path) -> None:
    source = tiny("prithvi_eo_v1_100m", num_frames=3)
    v1 = {k: v for k, v in source.state_dict().items()}
    v1.update({"mask_token": torch.zeros(1, 1, 8), "decoder_embed.weight": torch.zeros(8, 64)})
    torch.save({"model": v1}, tmp_path / "Prithvi_100M.pt")
    save_file({k: v.contiguous() for k, v in official_v2_state(source).items()}, str(tmp_path / "w.safetensors"))
    for name in ("Prithvi_100M.pt", "w.safetensors"):
        target = tiny("prithvi_eo_v1_100m", num_frames=3)
        load_pretrained(target, tmp_path / name)
        assert torch.equal(target.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_pretrained_through_timm(tmp_path: Path) -> None:
    source = tiny()
    path = tmp_path / "ckpt.pt"
    torch.save(official_v2_state(source), path)
    model = timm.create_model("prithvi_eo_v2_tiny_tl", pretrained=True,
                              pretrained_cfg_overlay={"file": str(path)}, num_frames=1, **TINY)
    assert torch.equal(model.norm.weight, source.norm.weight)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


def test_band_subset_and_new_band_adaptation(tmp_path: Path) -> None:
    source = tiny()
    path = tmp_path / "ckpt.pt"
    torch.save(official_v2_state(source), path)
    target = tiny(bands=["RED", "NIR_NARROW", "EXTRA"])
    report = load_pretrained(target, path)
    weight, src = target.patch_embed.proj.weight, source.patch_embed.proj.weight
    assert torch.equal(weight[:, 0], src[:, HLS_BANDS.index("RED")])
    assert torch.equal(weight[:, 1], src[:, HLS_BANDS.index("NIR_NARROW")])
    assert not weight[:, 2].any() and report["new_bands"] == ["EXTRA"]


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="missing.pt"):
        load_pretrained(tiny(), tmp_path / "missing.pt")
    wide = tiny(embed_dim=96, num_heads=2)
    torch.save(official_v2_state(wide), tmp_path / "wide.pt")
    with pytest.raises(UserInputError, match="embed_dim 96") as err:
        load_pretrained(tiny(), tmp_path / "wide.pt")
    assert "shape mismatch" in str(err.value) and "wide.pt" in str(err.value)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(UserInputError, match="could not be read"):
        load_pretrained(tiny(), tmp_path / "notes.pt")


def test_bad_inputs_at_forward() -> None:
    model = tiny()
    with pytest.raises(UserInputError, match="6 bands.*BLUE"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(UserInputError, match="num_frames=1"):
        model(torch.randn(1, 6, 2, 32, 32))
    with pytest.raises(UserInputError, match="multiple of the patch"):
        model(torch.randn(1, 6, 40, 32))
    with pytest.raises(TypeError, match="num_frame"):
        timm.create_model("prithvi_eo_v2_tiny_tl", num_frame=2, **TINY)
