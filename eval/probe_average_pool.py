"""Why tokcomp's average pools weight each token by its size: on the real DINOv2 ViT-S/14, the
mean patch token after merging (ToMe, PiToMe), size-weighted as tokcomp pools it and plain as
the released ToMe and PiToMe timm patches leave timm's mean, each against the unpruned model's
mean patch token on the same photos (cosine similarity and relative L2 error, averaged over the
photos). docs/methods.md section 7 quotes its output.

    python eval/probe_average_pool.py
    python eval/probe_average_pool.py --photos foolbox-imagenet+skimage --variant tome:r=13
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import refusing, script_parser

import tokcomp
from tokcomp.adapters.base import size_weighted_mean
from tokcomp.bench import Variant, parse_variant
from tokcomp.harness.backbone import Photos, backbone_features, photo_paths
from tokcomp.harness.imagenet import data_config, model_transform
from tokcomp.models import create_model

VARIANTS = [
    parse_variant(text)
    for text in (
        "tome:r=8",
        "tome:r=13",
        "tome:r=16",
        "pitome:target_macs=0.6",
        "pitome:target_macs=0.5",
    )
]


def mean_patch_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The final normed patch tokens' mean, size-weighted (tokcomp's pool) and plain."""
    with torch.inference_mode():
        state = tokcomp.forward_tokens(model, images)
    patches = state.x[:, state.protected :]
    sizes = None if state.size is None else state.size[:, state.protected :]
    return size_weighted_mean(patches, sizes), patches.mean(dim=1)


def agreement(pooled: torch.Tensor, reference: torch.Tensor) -> str:
    """Mean cosine similarity and relative L2 error of `pooled` against `reference`."""
    cosine = F.cosine_similarity(pooled, reference).mean()
    error = ((pooled - reference).norm(dim=1) / reference.norm(dim=1)).mean()
    return f"{cosine:>8.4f}{error:>8.3f}"


def main(argv: list[str] | None = None) -> None:
    """Print one row per variant."""
    parser = script_parser(__doc__)
    parser.add_argument("--photos", default="foolbox-imagenet", help="as tokcomp eval backbone")
    parser.add_argument("--variant", type=parse_variant, action="append", help="method:k=v,...")
    args = parser.parse_args(argv)
    variants: list[Variant] = args.variant or VARIANTS
    with refusing(parser):
        paths = photo_paths(args.photos)
    torch.manual_seed(0)
    model = create_model("dinov2_vits14").eval()
    photos = Photos(paths, model_transform(data_config(model)))
    images = torch.stack([photos[index][0] for index in range(len(photos))])
    with torch.inference_mode():
        reference = backbone_features(model, images)[1]
    print(f"dinov2_vits14, {len(photos)} photos ({args.photos}); cosine, relative L2 error")
    print(f"{'variant':<28}{'tokens':>7}{'size-weighted':>16}{'plain':>16}")
    for variant in variants:
        with refusing(parser):
            tokcomp.apply(model, variant.method, **variant.options)
        weighted, plain = mean_patch_tokens(model, images)
        tokens = tokcomp.config_of(model).schedule[-1]
        print(
            f"{variant.label:<28}{tokens:>7}{agreement(weighted, reference):>16}"
            f"{agreement(plain, reference):>16}"
        )
        tokcomp.remove(model)


if __name__ == "__main__":
    main()
