"""Rewrite the MACs fields of the presets in configs/ after the analytic MACs model changed
(here: each method's own selection work is counted). Method, options, schedule, notes and
extra stay as they are; `macs`, `selection_macs` and `base_macs` become what the current model
gives for that schedule. Each preset folder names its architecture: a timm model (a ".mae"
suffix: the fine-tuned, average-pooled classifier DiffRate reports), one of tokcomp's own
checkpoints (SEARCHED), or an offline pretrained model (tokcomp.pretrained.OFFLINE_MODELS).

    python eval/refresh_preset_macs.py            # every configs/*/*.json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import timm
import torch

import tokcomp
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
    model = architecture(path.parent.name)
    tokcomp.apply(model, config.method, **config.options, schedule=config.schedule)
    applied = tokcomp.config_of(model)
    fields = {name: getattr(applied, name) for name in ("macs", "selection_macs", "base_macs")}
    if all(getattr(config, name) == value for name, value in fields.items()):
        return False
    replace(config, **fields).save(path)
    return True


def main() -> None:
    for path in sorted((ROOT / "configs").glob("*/*.json")):
        print(f"{path.relative_to(ROOT)}: {'updated' if refresh(path) else 'unchanged'}")


if __name__ == "__main__":
    main()
