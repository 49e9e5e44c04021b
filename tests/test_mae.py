"""Prithvi MAE: patch layout, official key layout round trip, hidden-patch loss, CLI pretraining
whose encoder loads through the normal `pretrained` path."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

import backbones  # noqa: F401
from backbones.builder import create_backbone
from backbones.prithvi import load_pretrained
from backbones.prithvi_mae import PrithviMAE, keep_from_hidden, patchify, unpatchify
from tests.conftest import TINY_BACKBONE, fit_run, write_config
from workbench.cli import main
from workbench.tasks.pretrain import hidden_patch_mse


def tiny_mae() -> PrithviMAE:
    torch.manual_seed(0)
    return PrithviMAE(create_backbone("prithvi_eo_v2_tiny_tl", None, None, TINY_BACKBONE), 32, 1, 2)


def test_patchify_round_trip_and_official_order() -> None:
    x = torch.arange(2 * 6 * 2 * 32 * 32, dtype=torch.float32).reshape(2, 6, 2, 32, 32)
    patches = patchify(x, (1, 16, 16))
    assert patches.shape == (2, 2 * 2 * 2, 16 * 16 * 6)
    assert torch.equal(patches[0, 0, :6], x[0, :, 0, 0, 0])  # channels fastest, as (s p q c)
    assert torch.equal(unpatchify(patches, (1, 16, 16), 6, (2, 2, 2)), x)


def test_keep_from_hidden_equalises_visible_counts() -> None:
    hidden = torch.tensor([[True, False, False, False], [True, True, False, False]])
    keep = keep_from_hidden(hidden)
    assert keep.shape == (2, 2)
    assert not hidden.gather(1, keep).any()


def test_mae_checkpoint_has_official_layout_and_loads(tmp_path: Path) -> None:
    mae = tiny_mae()
    state = mae.encoder_state_dict()
    for key in ("encoder.cls_token", "encoder.patch_embed.proj.weight", "encoder.blocks.1.mlp.fc2.weight",
                "encoder.norm.weight", "decoder.mask_token", "decoder.decoder_embed.weight",
                "decoder.decoder_blocks.0.attn.qkv.weight", "decoder.decoder_norm.weight"):
        assert key in state, key
    assert state["decoder.decoder_pred.weight"].shape == (16 * 16 * 6, 32)
    path = tmp_path / "mae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    fresh = create_backbone("prithvi_eo_v2_tiny_tl", None, None, TINY_BACKBONE)
    report = load_pretrained(fresh, path)
    assert report["loaded"] == len(fresh.state_dict())
    assert torch.equal(fresh.blocks[1].attn.qkv.weight, mae.backbone.blocks[1].attn.qkv.weight)
    other = tiny_mae()
    torch.nn.init.zeros_(other.decoder.decoder_pred.weight)
    assert other.load_decoder(path) == {"missing": [], "unexpected": []}
    assert torch.equal(other.decoder.decoder_pred.weight, mae.decoder.decoder_pred.weight)


def test_loss_only_on_hidden_patches() -> None:
    mae = tiny_mae()
    image = torch.randn(2, 6, 32, 32)
    pred, keep, _ = mae(image, mask_ratio=0.5)
    target = patchify(image.unsqueeze(2), (1, 16, 16))
    loss = hidden_patch_mse(pred, target, keep)
    changed = pred.detach().clone()
    changed.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), 1e3)  # visible patches only
    assert torch.equal(hidden_patch_mse(changed, target, keep), loss.detach())


def test_mae_runs_under_bf16_autocast_like_fp32() -> None:
    """Under bfloat16 autocast (``trainer.precision: bf16-mixed``) the decoder's mask tokens take the
    activations' dtype: the same predictions within bfloat16 rounding, and the mask token still learns."""
    mae = tiny_mae()
    image = torch.randn(2, 6, 32, 32)
    torch.manual_seed(1)
    pred, keep, _ = mae(image, mask_ratio=0.5)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred_bf16, keep_bf16, _ = mae(image, mask_ratio=0.5)
    assert torch.equal(keep, keep_bf16) and pred_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(pred_bf16.float(), pred.detach(), atol=0.05 * pred.abs().max().item(), rtol=0)
    pred_bf16.float().square().mean().backward()
    assert mae.decoder.mask_token.grad is not None and mae.decoder.mask_token.grad.abs().sum() > 0


def test_pretrain_cli_lowers_loss_and_encoder_loads_as_pretrained(tmp_path: Path) -> None:
    path = write_config(tmp_path, trainer={"max_epochs": 5})
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"][0]["init_args"] = {"monitor": "val/loss", "mode": "min"}
    config["model"] = {"class_path": "workbench.tasks.MAEPretrainTask", "init_args": {
        "backbone": "prithvi_eo_v2_tiny_tl", "backbone_kwargs": TINY_BACKBONE, "mask_ratio": 0.5,
        "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}}}
    path.write_text(yaml.safe_dump(config))
    losses, _ = fit_run(path)
    assert losses[-1] < losses[0]
    encoder = tmp_path / "runs" / "tiny" / "version_0" / "export" / "encoder.safetensors"
    assert encoder.is_file()
    finetune = write_config(tmp_path / "ft", model={"pretrained": str(encoder)}, trainer={"max_epochs": 1})
    assert main(["fit", "--config", str(finetune), "--test_after_fit", "false"]) == 0
