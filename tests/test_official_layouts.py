"""The real published checkpoints' layouts load through our loaders.

``tests/manifests/*.json`` hold the key names, shapes and (non-float32) dtypes of official files —
Prithvi-EO v1/v2, SatVision-TOA, AST, Point-MAE — dumped from each project's own model code at its
published size (``source`` says which code and config; ``official`` which file and container).
The test builds those tensors, and our model, on the meta device (official sizes, no memory),
saves them in the official container and loads them: every official weight outside the
manifest's ``unused`` patterns (decoders, heads, recomputed buffers) must be consumed, and chosen
official tensors (``probes``) must arrive, value for value, in the named parameter of our model.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from backbones.builder import create_backbone

MANIFESTS = sorted((Path(__file__).parent / "manifests").glob("*.json"))


def official_state(manifest: dict[str, Any], real: dict[str, Tensor]) -> dict[str, Tensor]:
    """The manifest's tensors, meta (shape and dtype only) except the ``real`` ones."""
    return {name: real[name] if name in real else
            torch.empty(shape, dtype=getattr(torch, manifest["dtypes"].get(name, "float32")), device="meta")
            for name, shape in manifest["keys"].items()}


def save_official(manifest: dict[str, Any], state: dict[str, Tensor], path: Path) -> Path:
    """``state`` saved as the official file is: a plain state dict or under its container key."""
    torch.save(state if manifest["container"] is None else {manifest["container"]: state}, path)
    return path


def probe_values(manifest: dict[str, Any]) -> dict[str, Tensor]:
    """A distinctive, position-dependent tensor for each probed official key (a transposed,
    permuted or swapped copy would not match)."""
    values = {}
    for i, name in enumerate(manifest["probes"]):
        shape = manifest["keys"][name]
        values[name] = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) / math.prod(shape) + i + 1
    return values


def meta_backbone(name: str, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """Our backbone ``name`` at its default (official) size, every tensor on the meta device."""
    # vit_blocks reads its drop-path rates with linspace(...).tolist(), which a meta tensor cannot
    # answer; timm's calculate_drop_path_rates makes them on the CPU, as this does
    monkeypatch.setattr(torch, "linspace", functools.partial(torch.linspace, device="cpu"))
    with torch.device("meta"):  # a 3B-parameter model costs nothing
        return create_backbone(name)


@pytest.mark.parametrize("manifest_path", MANIFESTS, ids=[path.stem for path in MANIFESTS])
def test_official_checkpoint_loads_into_the_right_parameters(manifest_path: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = json.loads(manifest_path.read_text())
    unused = {name for name in manifest["keys"] if any(re.search(p, name) for p in manifest["unused"])}
    assert all(any(re.search(p, name) for name in manifest["keys"]) for p in manifest["unused"])  # no stale pattern
    model = meta_backbone(manifest["backbone"], monkeypatch)
    for ours in manifest["probes"].values():  # only the probed parameters hold real memory
        owner, _, leaf = ours.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, leaf, nn.Parameter(torch.zeros(getattr(module, leaf).shape)))
    values = probe_values(manifest)
    path = save_official(manifest, official_state(manifest, values), tmp_path / "official.pt")
    module_name, _, function = manifest["loader"].partition(":")
    getattr(importlib.import_module(module_name), function)(model, path)  # the loader create_backbone calls
    # the loader checks that every model key came from the file with its shape; as many model keys
    # as official keys outside ``unused`` means no official encoder weight was left behind
    assert len(model.state_dict()) == len(manifest["keys"]) - len(unused)
    for official, ours in manifest["probes"].items():
        torch.testing.assert_close(model.get_parameter(ours).detach(), values[official], rtol=0, atol=0)
