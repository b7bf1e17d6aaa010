"""Build the models the command line and eval scripts work on, from names and local files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from tokcomp.pretrained import OFFLINE_MODELS, weights


def create_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """A timm model by name, optionally with weights from a local checkpoint.

    A .safetensors checkpoint written by tokcomp's training scripts carries its timm name,
    constructor arguments and data config (preprocessing) in its metadata, so `name` may
    then be omitted and timm's resolve_data_config sees the right preprocessing. The names
    of `tokcomp.pretrained.OFFLINE_MODELS` (e.g. "dinov2_vits14") load pretrained weights
    that a registry package ships, converted and cached on first use.
    """
    if name in OFFLINE_MODELS:
        if checkpoint or pretrained:
            raise ValueError(f"{name} brings its own weights: drop --checkpoint/--pretrained")
        name, checkpoint = None, weights(name)
    metadata = _safetensors_metadata(checkpoint) if checkpoint else {}
    if name is None:
        name = metadata.get("timm_model")
        if name is None:
            raise ValueError("give a model name (the checkpoint does not record one)")
    kwargs = {**json.loads(metadata.get("model_kwargs", "{}")), **kwargs}
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint:
        model.load_state_dict(load_state_dict(checkpoint))
    if "data_config" in metadata:
        model.pretrained_cfg = {**model.pretrained_cfg, **json.loads(metadata["data_config"])}
    return model.eval()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a local .safetensors or .pth/.pt file (a bare state dict, or one under
    'model' / 'state_dict' as training scripts commonly save)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def _safetensors_metadata(path: str | Path) -> dict[str, str]:
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}
