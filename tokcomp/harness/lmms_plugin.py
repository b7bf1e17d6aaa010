"""The entry point lmms-eval's model registry loads (group `lmms_eval.models`, setup.py): it
names tokcomp's model class without importing it, so lmms-eval imports it only when a run
asks for `--model tokcomp` (tokcomp.harness.lmms_model imports lmms-eval's models)."""

from __future__ import annotations

from typing import Any


def manifest() -> Any:
    """`--model tokcomp` is tokcomp.harness.lmms_model.TokcompModel."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="tokcomp", simple_class_path="tokcomp.harness.lmms_model.TokcompModel"
    )
