"""Does the precision of the tower attention move what FasterVLM keeps? tokcomp ranks the
class token's attention in float32 (docs/methods.md section 6.6); the released code ranks the
tower's float16 attention, whose rounding ties and reorders near-equal scores. This compares
the tokens kept from both on the easy-VQA LLaVA's test images, at each kept fraction.

    python eval/probe_attention_precision.py --images 300
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import REPO, fractions_of_one, script_parser

from tokcomp.adapters.base import attention_probs, split_heads
from tokcomp.adapters.hf_vision import HFVisionAdapter
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.vqa import load_vlm
from tokcomp.harness.vqa_data import read_easy_vqa

MODEL = REPO / "eval" / "models" / "vlm-easyvqa"


def class_attention(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, N) float32 attention the class token gives each patch in the tower's last block
    (the layer whose output this model's projector takes)."""
    tower_class = HFVisionAdapter(tower).tower_class
    layers = tower_class.layers(tower)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        layer = tower_class.parts(layers[-1])
        x = layer.norm1(hidden)
        q = split_heads(layer.attention.q_proj(x[:, :1]), layer.attention.head_dim)
        k = split_heads(layer.attention.k_proj(x), layer.attention.head_dim)
        return attention_probs(q, k, layer.scale)[:, :, 0, 1:]


def kept(scores: torch.Tensor, keep: int) -> list[set[int]]:
    """Each image's `keep` highest-scoring tokens."""
    return [set(row.tolist()) for row in scores.float().topk(keep, dim=1).indices]


def main(argv: list[str] | None = None) -> None:
    """Print, per kept fraction, how many images and kept tokens differ."""
    parser = script_parser(__doc__)
    parser.add_argument("--images", type=positive_int, default=300)
    parser.add_argument("--keeps", type=fractions_of_one, default=[0.125, 0.25, 0.5])
    args = parser.parse_args(argv)
    model, processor = load_vlm(MODEL)
    files = sorted({question.image for question in read_easy_vqa("test")})[: args.images]
    pictures = [Image.open(path).convert("RGB") for path in files]
    pixels = processor.image_processor(pictures, return_tensors="pt")["pixel_values"]
    probs = class_attention(model.model.vision_tower, pixels)
    exact, rounded = probs.mean(dim=1), probs.half().mean(dim=1)
    tokens = probs.shape[-1]
    for fraction in args.keeps:
        keep = max(1, round(fraction * tokens))
        pairs = list(zip(kept(exact, keep), kept(rounded, keep), strict=True))
        images = sum(a != b for a, b in pairs)
        moved = sum(len(a - b) for a, b in pairs) / (keep * len(pairs))
        print(
            f"{len(files)} images, {tokens} tokens, keep {keep}: {images} images keep other "
            f"tokens; {moved:.2%} of the kept tokens differ (float16 vs float32 scores)"
        )


if __name__ == "__main__":
    main()
