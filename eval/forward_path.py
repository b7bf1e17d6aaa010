"""Which tokcomp files one forward call passes through, in order: the path a reader follows to
understand a compressed forward. Prints, for one block of a ViT (timm, ToMe) and a VLM prefill
(LLaVA-1.5 with ZOO, and with FastV), the sequence of files entered (each run of calls within
one file is one visit) and, per file, how many times the path enters it.

    python eval/forward_path.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import transformers as hf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import script_parser

import tokcomp

PACKAGE = Path(tokcomp.__file__).resolve().parent


def visited_files(call: Callable[[], object]) -> list[str]:
    """Files of tokcomp entered while `call` runs (after one warm-up call, so that once-per-
    process work such as the kernels' first-call checks is not counted), consecutive calls
    in one file merged."""
    call()
    path: list[str] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        file = Path(frame.f_code.co_filename)
        if file.is_relative_to(PACKAGE):
            name = str(file.relative_to(PACKAGE.parent))
            if not path or path[-1] != name:
                path.append(name)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return path


def tiny_llava() -> torch.nn.Module:
    """A randomly initialised LLaVA-1.5-shaped model small enough to run in a second."""
    vision = hf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = hf.LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    config = hf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=127, image_seq_length=16
    )
    return hf.LlavaForConditionalGeneration(config).eval()


def show(title: str, path: list[str]) -> None:
    """Print one forward's path and its visits per file."""
    print(f"{title}: {len(path)} visits to {len(set(path))} files")
    print("  " + " -> ".join(path))
    counts = {name: path.count(name) for name in dict.fromkeys(path)}
    print("  visits: " + ", ".join(f"{name} {count}" for name, count in counts.items()))


def main(argv: list[str] | None = None) -> None:
    """Print the three paths (the script takes no options; --help says what it does)."""
    script_parser(__doc__).parse_args(argv)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", depth=1).eval()
    tokcomp.apply(vit, "tome", r=8)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        show("ViT block (timm, tome)", visited_files(lambda: vit(images)))

    vlm = tiny_llava()
    ids = torch.tensor([[1] + [127] * 16 + list(range(2, 12))])
    pixels = torch.randn(1, 3, 32, 32)
    for method in ("zoo", "fastv"):
        tokcomp.apply(vlm, method, keep=4)
        with torch.no_grad():
            path = visited_files(lambda: vlm(input_ids=ids, pixel_values=pixels))
        show(f"VLM (LLaVA-1.5, {method}, one prefill)", path)


if __name__ == "__main__":
    main()
