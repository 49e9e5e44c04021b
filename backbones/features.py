"""Shared backbone helpers: timm ViT block stacks, running them for multi-level features,
feature-map layout, and making timm SwinV2 adapter-friendly."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from timm.models import checkpoint, checkpoint_seq
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from workbench.errors import UserInputError


def to_nchw(features: list[Tensor], channels: list[int]) -> list[Tensor]:
    """Feature maps as ``(B, C, H, W)``; timm's Swin stages return ``(B, H, W, C)``."""
    return [f.permute(0, 3, 1, 2).contiguous() if f.shape[1] != c and f.shape[-1] == c else f
            for f, c in zip(features, channels)]


def call_layers_as_modules(model: nn.Module) -> nn.Module:
    """Make timm's SwinV2 attention call ``qkv(x)`` and add its q/k/v biases after, instead of
    ``F.linear(x, qkv.weight, bias)``: the same numbers, but adapters wrapped around ``qkv``
    (LoRA, SSF, ...) are then used rather than silently bypassed."""
    for module in model.modules():
        if hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
    return model


class GradCheckpointing:
    """timm's ``set_grad_checkpointing`` for backbones that run their blocks with
    :func:`forward_blocks` / :func:`block_intermediates`."""

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward instead of storing them: much less
        activation memory for roughly one more forward pass of compute."""
        self.grad_checkpointing = enable

    @property
    def recompute(self) -> bool:
        """Checkpointing is on and gradients are being recorded."""
        return self.grad_checkpointing and torch.is_grad_enabled()


EXPLICIT_ATTENTION_MAX_ELEMENTS = 2**24  # (B, heads, N, N) attention entries: 32 MiB per block in bf16


def explicit_attention_pays(tokens: Tensor, heads: int) -> bool:
    """Whether timm's explicit ``softmax(QKᵀ)V`` attention trains faster than its fused
    ``scaled_dot_product_attention`` on ``tokens`` ``(B, N, D)``: under CPU bfloat16 autocast with
    gradients recorded, where the fused kernel's bf16 backward is slow (a timm ``Attention``
    forward + backward took 0.54-0.80x the time explicit at 64-256 tokens, dims 192 and 768, on an
    AVX512-BF16 CPU; forward alone and float32 are as fast or faster fused), and while the
    attention matrix it keeps for backward stays small."""
    batch, length = tokens.shape[:2]
    return (tokens.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and batch * heads * length * length <= EXPLICIT_ATTENTION_MAX_ELEMENTS)


@contextmanager
def fastest_attention(blocks: Sequence[nn.Module], tokens: Tensor) -> Iterator[None]:
    """Run the fused-attention timm ``blocks`` with explicit attention inside the context where
    :func:`explicit_attention_pays` for ``tokens``; blocks built unfused (``TIMM_FUSED_ATTN=0``)
    stay so. Not for recomputed (checkpointed) blocks: their backward re-runs the forward after
    the context has ended."""
    fused = [block.attn for block in blocks if getattr(getattr(block, "attn", None), "fused_attn", False)]
    if not (fused and explicit_attention_pays(tokens, fused[0].num_heads)):
        yield
        return
    for attn in fused:
        attn.fused_attn = False
    try:
        yield
    finally:
        for attn in fused:
            attn.fused_attn = True


def forward_blocks(blocks: nn.ModuleList, tokens: Tensor, norm: nn.Module, recompute: bool = False) -> Tensor:
    """All ``blocks`` over ``tokens`` ``(B, N, D)``, then ``norm``; ``recompute``: timm's
    ``checkpoint_seq`` (activations recomputed in backward); otherwise in :func:`fastest_attention`."""
    if recompute:
        return norm(checkpoint_seq(blocks, tokens))
    with fastest_attention(blocks, tokens):
        for block in blocks:
            tokens = block(tokens)
    return norm(tokens)


def block_intermediates(blocks: nn.ModuleList, tokens: Tensor, indices: Sequence[int], norm: nn.Module,
                        pos: Tensor | None = None, recompute: bool = False) -> list[Tensor]:
    """Outputs ``(B, N, D)`` of the blocks in ``indices`` (in that order, repeats allowed), the
    last block's through ``norm``; blocks after the deepest index are not run. ``pos`` ``(B, N, D)``,
    if given, is added to the input of every block (Point-BERT/MAE); ``recompute``: each block
    through timm's ``checkpoint``; otherwise in :func:`fastest_attention`."""
    outputs: dict[int, Tensor] = {}
    last = len(blocks) - 1
    run = blocks[: max(indices) + 1]
    with nullcontext() if recompute else fastest_attention(run, tokens):
        for i, block in enumerate(run):
            x = tokens if pos is None else tokens + pos
            tokens = checkpoint(block, x) if recompute else block(x)
            if i in indices:
                outputs[i] = norm(tokens) if i == last else tokens
    return [outputs[i] for i in indices]


def vit_group_matcher(stem: str, coarse: bool = False) -> dict[str, Any]:
    """timm ``group_matcher`` of a ViT-like backbone: ``stem`` (a regex of the embedding
    parameters) is group 0, block ``i`` group ``i + 1``, the final norm joins the last block's
    group (timm's ``99999`` suffix; layer decay, ``timm.models.group_parameters``)."""
    return {"stem": stem, "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}


def default_out_indices(depth: int, levels: int = 4) -> list[int]:
    """Evenly spaced block indices ending at the last block.

    depth 12 → [2, 5, 8, 11], 24 → [5, 11, 17, 23], 32 → [7, 15, 23, 31], 2 → [0, 0, 1, 1].
    """
    return [math.ceil((i + 1) * depth / levels) - 1 for i in range(levels)]


def checked_out_indices(out_indices: Sequence[int] | None, depth: int, default: list[int]) -> list[int]:
    """``out_indices`` (``default`` when None), each checked to name one of ``depth`` blocks."""
    indices = list(out_indices) if out_indices is not None else default
    if not all(0 <= i < depth for i in indices):
        raise UserInputError(f"out_indices {indices} must lie in [0, {depth - 1}]")
    return indices


def vit_blocks(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float = 0.0,
               norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, **block_kwargs: Any) -> nn.ModuleList:
    """``depth`` timm ViT blocks (fused scaled-dot-product attention) with drop-path rising
    linearly to ``drop_path_rate``."""
    rates = torch.linspace(0, drop_path_rate, depth).tolist()
    return nn.ModuleList(
        Block(embed_dim, num_heads, mlp_ratio, drop_path=rate, norm_layer=norm_layer, **block_kwargs) for rate in rates
    )


def bands_from_kwargs(kwargs: dict[str, Any], known: Sequence[str]) -> None:
    """Turn an ``in_chans`` in a registered model's ``kwargs`` into band names, in place: the
    family's ``known`` bands first, then ``BAND_<i>``; refuse ``in_chans`` that contradicts ``bands``."""
    in_chans = kwargs.pop("in_chans", None)
    if in_chans is not None and "bands" not in kwargs:
        kwargs["bands"] = [*known, *(f"BAND_{i + 1}" for i in range(len(known), in_chans))][:in_chans]
    elif in_chans is not None and in_chans != len(kwargs["bands"]):
        raise UserInputError(f"in_chans={in_chans} but {len(kwargs['bands'])} bands given: set only `bands`")


def adapt_input_channels(weight: Tensor, source: Sequence[str], target: Sequence[str]) -> tuple[Tensor, list[str]]:
    """First-layer weight ``(D, C_src, ...)`` → ``(D, C_tgt, ...)`` by band name (a ViT patch
    embedding ``(D, C, t, p, p)``, a CNN stem ``(D, C, k, k)``).

    Bands missing from the checkpoint get zero weights, so the pretrained function is unchanged
    until they are trained. Returns the new weight and the names of the new bands.
    """
    if list(source) == list(target):
        return weight, []
    new = [b for b in target if b not in source]
    adapted = weight.new_zeros((weight.shape[0], len(target), *weight.shape[2:]))
    for i, band in enumerate(target):
        if band in source:
            adapted[:, i] = weight[:, list(source).index(band)]
    return adapted, new
