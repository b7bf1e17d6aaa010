"""Write DiffRate's published per-block schedules as tokcomp configs under configs/.

Usage: python eval/make_diffrate_presets.py PATH/diffrate_published_schedules.json

That file holds the counts of compression_rate.json in OpenGVLab/DiffRate (commit 91ae3e3) as
{"schedules": {MODEL: {GMACS: {"prune_kept": [...], "merge_kept": [...]}}}}, MODEL one of the
keys of MODELS below, each list a count per block from block 0, the class token included.

The published lists are DiffRate's exported (prune_kept, merge_kept) counts. Some are not
monotone; DiffRate's own inference slices with them, so a block effectively keeps
min(tokens so far, prune_kept) and then min(that, merge_kept). The presets store those
effective counts, which give exactly the released inference behaviour.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import timm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import REPO, refusing, script_parser

import tokcomp

#: Published model key -> timm architecture (also the preset's folder under configs/).
MODELS = {
    "ViT-T-DeiT": "deit_tiny_patch16_224",
    "ViT-S-DeiT": "deit_small_patch16_224",
    "ViT-B-DeiT": "deit_base_patch16_224",
    "ViT-B-MAE": "vit_base_patch16_224.mae",
    "ViT-L-MAE": "vit_large_patch16_224.mae",
    "ViT-H-MAE": "vit_huge_patch14_224.mae",
}
#: DiffRate's MAE numbers are for fine-tuned classifiers: average pool and a 1000-class head.
MAE_FINETUNED = {"global_pool": "avg", "num_classes": 1000}


def effective_counts(
    prune: list[int], merge: list[int], tokens: int
) -> tuple[list[int], list[int]]:
    """What DiffRate's inference really keeps per block for the published lists."""
    pruned, merged = [], []
    for p, m in zip(prune, merge, strict=True):
        pruned.append(min(tokens, p))
        tokens = min(pruned[-1], m)
        merged.append(tokens)
    return pruned, merged


def write_presets(published: dict, output: Path) -> list[Path]:
    """One config per (model, GMACs) entry of DiffRate's published schedules."""
    written = []
    for key, arch in MODELS.items():
        overrides = MAE_FINETUNED if arch.endswith(".mae") else {}
        model = timm.create_model(arch, pretrained=False, **overrides)
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        for gmacs, lists in published["schedules"][key].items():
            pruned, merged = effective_counts(lists["prune_kept"], lists["merge_kept"], tokens)
            tokcomp.apply(model, "diffrate", prune_kept=pruned, merge_kept=merged)
            config = tokcomp.config_of(model)
            config.notes = (
                f"DiffRate's published schedule for {key} at {gmacs} GMACs (Chen et al., "
                "ICCV 2023; compression_rate.json of OpenGVLab/DiffRate, commit 91ae3e3), "
                "as the counts its inference effectively keeps."
            )
            path = output / arch / f"diffrate-{gmacs}g.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            written.append(config.save(path, overwrite=True))
            print(f"{path}: {config.macs / 1e9:.2f} GMACs ({config.macs_ratio:.3f})")
        del model
    return written


def read_published(path: Path) -> dict:
    """The published schedules file, refused (ValueError, FileNotFoundError) unless it holds
    both lists of every model of MODELS."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give diffrate_published_schedules.json")
    try:
        published = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    schedules = published.get("schedules") if isinstance(published, dict) else None
    if not isinstance(schedules, dict):
        raise ValueError(f'{path}: no "schedules" object; is it diffrate_published_schedules.json?')
    for key in MODELS:
        entries = schedules.get(key)
        if not isinstance(entries, dict) or not all(
            isinstance(lists, dict) and {"prune_kept", "merge_kept"} <= lists.keys()
            for lists in entries.values()
        ):
            raise ValueError(
                f'{path}: "schedules" lacks {key!r} with prune_kept and merge_kept per GMACs'
            )
    return published


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__)
    parser.add_argument("published", type=Path, help="diffrate_published_schedules.json")
    parser.add_argument(
        "--output", type=Path, default=REPO / "configs", help="presets folder (the repository's)"
    )
    args = parser.parse_args(argv)
    with refusing(parser):
        published = read_published(args.published)
    write_presets(published, args.output)


if __name__ == "__main__":
    main()
