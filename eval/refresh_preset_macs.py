"""Rewrite the MACs fields of the presets in configs/ after the analytic MACs model changed
(here: each method's own selection work is counted). Method, options, schedule, notes and
extra stay as they are; `macs`, `selection_macs` and `base_macs` become what the current model
gives for that schedule. Each preset folder names its architecture: a timm model (a ".mae"
suffix: the fine-tuned, average-pooled classifier DiffRate reports), one of tokcomp's own
checkpoints (SEARCHED), or an offline pretrained model (tokcomp.pretrained.OFFLINE_MODELS).

    python eval/refresh_preset_macs.py                      # every configs/*/*.json
    python eval/refresh_preset_macs.py --configs /tmp/copy  # the presets of another folder
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import script_parser

import tokcomp
from tokcomp.adapters import find_adapter
from tokcomp.models import create_model
from tokcomp.pretrained import OFFLINE_MODELS

ROOT = Path(__file__).resolve().parents[1]
#: Preset folders made on tokcomp's own models: folder -> checkpoint.
SEARCHED = {"vit-fmnist": ROOT / "eval" / "models" / "vit-fmnist" / "model.safetensors"}
MAE_FINETUNED = {"global_pool": "avg", "num_classes": 1000}


def architecture(folder: str) -> torch.nn.Module:
    """The model a preset folder is for (weights do not matter: shapes only)."""
    if folder in SEARCHED:
        return create_model(checkpoint=SEARCHED[folder])
    if folder in OFFLINE_MODELS:
        return create_model(folder)
    overrides = MAE_FINETUNED if folder.endswith(".mae") else {}
    with torch.device("meta"):
        return timm.create_model(folder, pretrained=False, **overrides)


def refresh(path: Path) -> bool:
    """Rewrite `path`'s MACs fields; whether they changed."""
    config = tokcomp.Config.load(path)
    fields = config.macs_on(find_adapter(architecture(path.parent.name)).spec())
    if all(getattr(config, name) == value for name, value in fields.items()):
        return False
    replace(config, **fields).save(path, overwrite=True)
    return True


def main(argv: list[str] | None = None) -> None:
    """Rewrite the MACs fields of every preset under --configs, saying which changed."""
    parser = script_parser(__doc__)
    parser.add_argument(
        "--configs", type=Path, default=ROOT / "configs", help="the folder of preset folders"
    )
    args = parser.parse_args(argv)
    paths = sorted(args.configs.glob("*/*.json"))
    if not paths:
        parser.error(f"--configs {args.configs} holds no preset (FOLDER/*.json)")
    for path in paths:
        print(f"{path}: {'updated' if refresh(path) else 'unchanged'}")


if __name__ == "__main__":
    main()
