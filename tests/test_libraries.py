"""The model libraries' oldest supported releases: refused in one line naming the upgrade."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from test_encoders import tiny
from vlm_fixtures import tiny_vlm

import tokcomp
from tokcomp import libraries
from tokcomp.adapters import UnsupportedModelError
from tokcomp.libraries import (
    HF_VISION,
    HF_VLM,
    LIBRARIES,
    OPEN_CLIP,
    TIMM,
    TORCH,
    extras,
    release,
)

ROOT = Path(__file__).resolve().parents[1]


def _pretend_installed(monkeypatch, release_: str) -> None:
    """Every model library reads as installed at `release_`."""
    monkeypatch.setattr(libraries, "installed", lambda distribution: release_)


def _older(library) -> str:
    """A release just below `library`'s minimum."""
    *head, last = release(library.minimum)
    return ".".join(map(str, [*head[:-1], head[-1] - 1] if last == 0 else [*head, last - 1]))


@pytest.mark.parametrize(
    ("version", "expected"),
    [("5.24.0", (5, 24, 0)), ("5.24.0.dev0", (5, 24, 0)), ("1.0.31+cu130", (1, 0, 31))],
)
def test_release_reads_the_numeric_part(version, expected):
    assert release(version) == expected


def test_release_refuses_what_is_not_a_version():
    with pytest.raises(ValueError, match="not a version"):
        release("main")


FAMILIES = pytest.mark.parametrize(
    ("library", "build", "options"),
    [
        (TIMM, tiny_vit, {"keep_ratio": 0.5}),
        (OPEN_CLIP, lambda: tiny("open_clip_clip"), {"keep_ratio": 0.5}),
        (HF_VISION, lambda: tiny("hf_clip"), {"keep_ratio": 0.5}),
        (HF_VLM, lambda: tiny_vlm("llava"), {"keep_ratio": 0.5}),
    ],
    ids=["timm", "open_clip", "hf_vision", "hf_vlm"],
)


@FAMILIES
def test_a_release_older_than_the_adapter_supports_is_refused_naming_the_upgrade(
    monkeypatch, library, build, options
):
    model = build()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    forward = model.forward
    _pretend_installed(monkeypatch, _older(library))
    with pytest.raises(UnsupportedModelError) as refused:
        tokcomp.apply(model, "random", **options)
    message = str(refused.value)
    assert f"found {_older(library)}" in message
    assert f"pip install -U '{library.distribution}>={library.minimum}'" in message
    assert "\n" not in message
    assert model.forward == forward  # nothing patched
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items())


@FAMILIES
def test_the_minimum_release_itself_is_accepted(monkeypatch, library, build, options):
    model = build()
    _pretend_installed(monkeypatch, library.minimum)
    tokcomp.apply(model, "random", **options)
    assert tokcomp.config_of(model).method == "random"


def test_an_encoder_runs_on_a_transformers_release_too_old_for_vlms(monkeypatch):
    assert release(_older(HF_VLM)) >= release(HF_VISION.minimum)
    _pretend_installed(monkeypatch, _older(HF_VLM))
    model = tiny("hf_clip")
    tokcomp.apply(model, "tome", r=2)
    with pytest.raises(
        UnsupportedModelError, match=f"transformers>={HF_VLM.minimum} for Hugging Face VLMs"
    ):
        tokcomp.apply(tiny_vlm("llava"), "random", keep_ratio=0.5)


def test_each_extra_asks_for_the_highest_minimum_of_its_library():
    for library in LIBRARIES:
        (requirement,) = extras()[library.module]
        distribution, minimum = requirement.split(">=")
        assert distribution == library.distribution
        assert release(minimum) >= release(library.minimum)
        same = [other.minimum for other in LIBRARIES if other.module == library.module]
        assert minimum in same


def test_import_refuses_a_torch_older_than_supported():
    """`import tokcomp` under a torch that pip records as older: one line naming the upgrade."""
    older = _older(TORCH)
    program = (
        "from importlib import metadata\n"
        "real = metadata.version\n"
        f"metadata.version = lambda name: {older!r} if name == 'torch' else real(name)\n"
        "import tokcomp\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert ran.returncode == 1
    last = ran.stderr.strip().splitlines()[-1]
    assert last == (
        f"ImportError: tokcomp needs torch>={TORCH.minimum} for {TORCH.serves} (found {older}): "
        f"pip install -U 'torch>={TORCH.minimum}'"
    )


def test_the_installed_torch_is_supported():
    assert TORCH.too_old() is None
    assert release(torch.__version__) >= release(TORCH.minimum)


def test_torch_is_no_extra():
    assert TORCH not in LIBRARIES
    assert "torch" not in extras()
