"""Why do attention-ranking methods (EViT, Zero-TPrune) lose fidelity on DINOv2 ViT-S/14?

Part 1 (`stats`): per block of the unpruned model, on the photos: how spread the class
token's attention is (perplexity = exp(entropy), in tokens, averaged over heads), how much
of it the top 4 patch tokens take, how concentrated Zero-TPrune's PageRank importance is,
and whether the tokens that take the attention are DINOv2's high-norm tokens (hidden-state
norm over 3x the image's median) or border tokens.

Part 2 (`ablate`): mean and worst class-token cosine to the unpruned model at equal token
counts (the same schedule for every ranking), for schedules that cut at EViT's blocks and at
every block, with rankings: random, class attention (EViT's; also its opposite), Zero-TPrune
at several similarity shares, and the same rankings computed without the high-norm tokens.

Part 3 (`coherence`): on Fashion-MNIST test images, whether each method's class-token errors
share one direction (a shift a frozen head reads on every image) or point anywhere.

    OMP_WAIT_POLICY=PASSIVE python eval/probe_dinov2_attention.py --photos foolbox-cifar+skimage
    OMP_WAIT_POLICY=PASSIVE python eval/probe_dinov2_attention.py --part coherence --target 0.65
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import add_json_arguments, check_json_argument, fraction, refusing, script_parser

import tokcomp
from tokcomp.adapters import find_adapter
from tokcomp.files import write_text_whole
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.backbone import Photos, photo_paths
from tokcomp.harness.data import FASHION_MNIST, limited, open_dataset
from tokcomp.harness.imagenet import data_config, model_transform
from tokcomp.methods.base import BlockMethod, BlockPosition, Geometry, Method
from tokcomp.methods.budget import ratio_schedule
from tokcomp.methods.state import Signal, Signals, TokenState, top_in_order
from tokcomp.methods.zero_tprune import ZeroTPrune
from tokcomp.models import create_model
from tokcomp.ops import attention_pagerank

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dinov2_vits14"
HIGH_NORM = 3.0  # a token is "high-norm" above this multiple of its image's median norm


# -- part 1: attention statistics of the unpruned model ---------------------------------------
def block_attention(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, N) attention probabilities of a timm block on its input `x`."""
    attn = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def perplexity(p: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of distributions along the last axis (renormalised)."""
    p = p / p.sum(-1, keepdim=True)
    return (-(p * p.clamp_min(1e-12).log()).sum(-1)).exp()


def border_mask(grid: int) -> torch.Tensor:
    """(grid*grid,) True on the outer ring of patches."""
    index = torch.arange(grid)
    edge = (index == 0) | (index == grid - 1)
    return (edge[:, None] | edge[None, :]).flatten()


def attention_stats(model: torch.nn.Module, images: torch.Tensor) -> list[dict[str, float]]:
    """Per block: class-attention perplexity and top-4 share, PageRank concentration, the
    share of class attention on high-norm tokens, their count, and border share of the
    top 10% by class attention."""
    grid = model.patch_embed.grid_size[0]
    border = border_mask(grid)
    zero_tprune = ZeroTPrune().settle(find_adapter(model).spec())
    rows = []
    with torch.inference_mode():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for index, block in enumerate(model.blocks):
            attn = block_attention(block, x)
            norms = x[:, 1:].norm(dim=-1)
            high = norms > HIGH_NORM * norms.median(dim=1, keepdim=True).values
            cls = attn[:, :, 0, 1:]  # (B, H, P)
            cls_mean = cls.mean(1)
            wpr = zero_tprune.importance(attn, 1, zero_tprune.iterations[index])[:, 1:]
            top = cls_mean.topk(cls_mean.shape[1] // 10, dim=1).indices
            received = attn[:, :, 1:, 1:].mean(dim=(1, 2))  # attention each patch receives
            rows.append(
                {
                    "block": index,
                    "cls_perplexity": float(perplexity(cls).mean()),
                    "cls_top4_share": float(
                        (cls.topk(4, dim=-1).values.sum(-1) / cls.sum(-1)).mean()
                    ),
                    "cls_to_class_token": float(attn[:, :, 0, 0].mean()),
                    "patches_to_class_token": float(attn[:, :, 1:, 0].mean()),
                    "wpr_perplexity": float(perplexity(wpr).mean()),
                    "high_norm_tokens": float(high.sum(1).float().mean()),
                    "cls_share_on_high_norm": float(
                        ((cls_mean * high).sum(1) / cls_mean.sum(1)).mean()
                    ),
                    "patch_share_on_high_norm": float(
                        ((received * high).sum(1) / received.sum(1)).mean()
                    ),
                    "top10pct_on_border": float(border[top].float().mean()),
                    "border_fraction": float(border.float().mean()),
                }
            )
            x = block(x)
    return rows


# -- part 2: rankings at equal schedules ------------------------------------------------------
def class_attention(state: TokenState, signals: Signals, layer: BlockPosition) -> torch.Tensor:
    """EViT's score: the class token's attention, averaged over heads."""
    return signals.attn[:, :, 0, state.protected :].mean(dim=1).float()


def high_norm(state: TokenState) -> torch.Tensor:
    """(B, T) True for the unprotected tokens of high hidden-state norm."""
    norms = state.x[:, state.protected :].norm(dim=-1).float()
    return norms > HIGH_NORM * norms.median(dim=1, keepdim=True).values


@dataclass(kw_only=True)
class Ranked(BlockMethod):
    """Keep the protected tokens and the top of a score, in order (diagnostic only)."""

    name: ClassVar[str] = "ranked"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.ATTN, Signal.KEYS})
    rule: str = "class_attention"
    keep_ratio: float = 1.0
    layers: list[int] | None = None
    seed: int = 0
    zero_tprune: ZeroTPrune = field(default_factory=ZeroTPrune)
    oracle: torch.Tensor | None = field(default=None, compare=False)

    def settle(self, geometry: Geometry) -> Method:
        return self.with_options(zero_tprune=self.zero_tprune.settle(geometry))

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        return ratio_schedule(geometry, self.keep_ratio, self.layers)

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, layer: BlockPosition
    ) -> TokenState:
        score = self.score(state, signals, layer)
        return state.prune(top_in_order(score, keep - state.protected, state.protected))

    def score(self, state: TokenState, signals: Signals, layer: BlockPosition) -> torch.Tensor:
        """The rule's (B, T) score of the unprotected tokens (the top are kept)."""
        ztp = self.zero_tprune
        if self.rule == "class_attention":
            return class_attention(state, signals, layer)
        if self.rule == "least_class_attention":
            return -class_attention(state, signals, layer)
        if self.rule == "wpr":
            return ztp.importance(signals.attn, state.protected, ztp.iterations[layer.index])[
                :, state.protected :
            ]
        if self.rule == "wpr_without_class_token":
            patches = signals.attn[:, :, state.protected :, state.protected :]
            patches = patches / patches.sum(-1, keepdim=True)
            return ztp.importance(patches, 0, ztp.iterations[layer.index])
        if self.rule == "wpr_head_mean":
            scores = attention_pagerank(signals.attn, ztp.iterations[layer.index])
            return scores.mean(1)[:, state.protected :]
        if self.rule == "final_class_attention":
            inside = state.source[:, state.protected :, state.protected :]
            return (inside @ self.oracle[:, :, None])[..., 0]
        if self.rule == "high_norm_first":
            return state.x[:, state.protected :].norm(dim=-1).float()
        raise ValueError(self.rule)


def final_class_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, P) the unpruned model's last-block class attention to each patch (head mean)."""
    with torch.inference_mode():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:-1]:
            x = block(x)
        return block_attention(model.blocks[-1], x)[:, :, 0, 1:].mean(1)


def cosines(model: torch.nn.Module, images: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean and worst class-token cosine of the (patched) model to `reference`."""
    with torch.inference_mode():
        cos = F.cosine_similarity(model.forward_features(images)[:, 0], reference, dim=1)
    return {"mean": round(float(cos.mean()), 4), "worst": round(float(cos.min()), 4)}


def equal_schedule(model: torch.nn.Module, target: float, layers: list[int] | None) -> list:
    """The schedule random pruning at `layers` reaches for `target` of the MACs."""
    tokcomp.apply(model, "random", target_macs=target, layers=layers)
    schedule = tokcomp.config_of(model).schedule
    tokcomp.remove(model)
    return schedule


def ablations(model, images, reference, target: float) -> list[dict]:
    """Each ranking (and method setting) at the same schedule, for two schedules."""
    depth = len(model.blocks)
    oracle = final_class_attention(model, images)
    rows = []
    for where, layers in (("blocks 3,6,9", [3, 6, 9]), ("every block", list(range(1, depth)))):
        schedule = equal_schedule(model, target, layers)
        variants = {
            "random (seed 0)": ("random", {}),
            "random (seed 1)": ("random", {"seed": 1}),
            "evit (fused; its own counts at the target)": (
                "evit",
                {"target_macs": target, "layers": layers},
            ),
            "evit (no fuse)": ("evit", {"fuse": False}),
            "class attention": (Ranked(rule="class_attention"), {}),
            "least class attention": (Ranked(rule="least_class_attention"), {}),
            "oracle: the last block's class attention": (
                Ranked(rule="final_class_attention", trace_source=True, oracle=oracle),
                {},
            ),
            "highest norm first": (Ranked(rule="high_norm_first"), {}),
            "zero_tprune WPR only": (Ranked(rule="wpr"), {}),
            "WPR without the class token": (Ranked(rule="wpr_without_class_token"), {}),
            "WPR, plain head mean": (Ranked(rule="wpr_head_mean"), {}),
            **{  # rankings alone: without the sizes this model's default hands to twins
                f"zero_tprune share {share}": (
                    "zero_tprune",
                    {"similarity_share": share, "similarity_sizes": False},
                )
                for share in (0.0, 0.5, 1.0)
            },
        }
        for label, (method, options) in variants.items():
            if isinstance(method, Method):
                tokcomp.apply(model, method.with_options(schedule=schedule))
            else:
                options = {"schedule": schedule, **options}
                if "target_macs" in options:
                    del options["schedule"]
                tokcomp.apply(model, method, **options)
            macs = tokcomp.config_of(model).macs_ratio
            rows.append(
                {
                    "schedule": where,
                    "ranking": label,
                    "macs": round(macs, 3),
                    **cosines(model, images, reference),
                }
            )
            tokcomp.remove(model)
            print(rows[-1], flush=True)
    return rows


# -- part 3: are a method's errors the same on every image? ----------------------------------
def error_coherence(model: torch.nn.Module, images: torch.Tensor, target: float) -> list[dict]:
    """Per method at `target` of the MACs (its defaults, the model's own included; DiffRate:
    its config for this model): |mean_i d_i| / mean_i |d_i| for the class-token errors d_i
    (compressed minus unpruned, after the final norm). Near 0: errors that point anywhere
    (they average out); near 1: one shift shared by every image, which a frozen head reads
    as a move of every feature."""
    reference = class_tokens(model, images)
    variants = {
        **{f"random (seed {seed})": ("random", {"seed": seed}) for seed in range(3)},
        **{name: (name, {}) for name in ("tome", "pitome", "zero_tprune", "evit")},
        "zero_tprune without sizes": ("zero_tprune", {"similarity_sizes": False}),
    }
    rows = []
    for label, (name, options) in variants.items():
        tokcomp.apply(model, name, target_macs=target, **options)
        rows.append({"ranking": label, **coherence(class_tokens(model, images) - reference)})
        tokcomp.remove(model)
    config = CONFIGS / f"diffrate-{target}.json"
    if config.is_file():
        tokcomp.apply(model, config)
        rows.append({"ranking": "diffrate", **coherence(class_tokens(model, images) - reference)})
        tokcomp.remove(model)
    for row in rows:
        print(row, flush=True)
    return rows


def class_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, C) class tokens after the final norm, in batches of 32."""
    with torch.inference_mode():
        return torch.cat([model.forward_features(batch)[:, 0] for batch in images.split(32)])


def coherence(errors: torch.Tensor) -> dict:
    """How much the (B, C) errors share one direction, and their mean size."""
    size = errors.norm(dim=1).mean()
    return {
        "coherence": round(float(errors.mean(0).norm() / size), 3),
        "size": round(float(size), 3),
    }


def test_images(model: torch.nn.Module, count: int) -> torch.Tensor:
    """`count` Fashion-MNIST test images spread over the split, as the harness reads them."""
    data = limited(open_dataset(FASHION_MNIST, model_transform(data_config(model))), count)
    return torch.stack([data[i][0] for i in range(len(data))])


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--photos", default="foolbox-cifar+skimage")
    parser.add_argument("--target", type=fraction, default=0.6, help="fraction of the MACs")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--part",
        choices=("stats", "ablate", "both", "coherence"),
        default="both",
        help="coherence: how systematic each method's class-token errors are, on --test-images "
        "Fashion-MNIST test images (not the photos)",
    )
    parser.add_argument("--test-images", type=positive_int, default=160)
    add_json_arguments(parser, "also write the results here")
    args = parser.parse_args(argv)
    check_json_argument(parser, args)
    with refusing(parser):  # the photos, before the model
        paths = photo_paths(args.photos)
    torch.set_num_threads(args.threads)
    model = create_model("dinov2_vits14")
    photos = Photos(paths, model_transform(data_config(model)))
    images = torch.stack([photos[i][0] for i in range(len(photos))])
    results = {"photos": args.photos, "images": len(photos)}
    if args.part in ("stats", "both"):
        results["stats"] = attention_stats(model, images)
        for row in results["stats"]:
            print({k: round(v, 3) for k, v in row.items()}, flush=True)
    if args.part in ("ablate", "both"):
        with torch.inference_mode():
            reference = model.forward_features(images)[:, 0]
        results["ablations"] = ablations(model, images, reference, args.target)
    if args.part == "coherence":
        results["coherence"] = error_coherence(
            model, test_images(model, args.test_images), args.target
        )
    if args.json:
        write_text_whole(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
