"""Arguments shared by the commands, and their types (counts, comma lists, devices, timm
model names), each value refused with one line that names the rule."""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from tokcomp.config import CONFIG_SUFFIXES, ConfigError, existing_config_file
from tokcomp.errors import UsageError
from tokcomp.files import blocking_file

#: The precisions the harnesses run models in.
DTYPES = ("float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    """An int of at least 1 ('0' and '-1' are refused)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An int of at least 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def names(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [name.strip() for name in text.split(",") if name.strip()]


def fractions(text: str) -> list[float]:
    """'0.5,0.25' -> [0.5, 0.25]."""
    try:
        return [float(name) for name in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated numbers such as 0.5,0.25, got {text!r}"
        ) from None


def existing_folder(text: str) -> Path:
    """The path of a folder that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


def config_file(text: str) -> Path:
    """A saved config's path: an existing file."""
    try:
        return existing_config_file(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def device(text: str) -> str:
    """A device this machine has: cpu, cuda or cuda:N (only with a visible GPU)."""
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; use cpu, cuda or cuda:N"
        ) from None
    if chosen.type == "cpu":
        return str(chosen)
    if chosen.type != "cuda":
        raise argparse.ArgumentTypeError(
            f"device {text!r} is not supported; use cpu, cuda or cuda:N"
        )
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
            "use --device cpu"
        )
    if chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    return str(chosen)


def timm_model(text: str) -> str:
    """A model name timm knows (a pretrained tag such as '.mae' included; hf-hub: names
    pass through to timm)."""
    if text.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(text):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown timm model {text!r}; timm.list_models('*{text.split('_')[0]}*') lists the "
        "names near it"
    )


def model_name(text: str) -> str:
    """An offline pretrained model's name (tokcomp.pretrained) or a model name timm knows."""
    from tokcomp.pretrained import OFFLINE_MODELS

    if text in OFFLINE_MODELS:
        return text
    try:
        return timm_model(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(
            f"{err} (or an offline pretrained model: {', '.join(OFFLINE_MODELS)})"
        ) from None


def add_model_arguments(parser: argparse.ArgumentParser, pretrained: bool = True) -> None:
    """--model and --checkpoint (and --pretrained when `pretrained`): a timm model by name,
    with weights from a local file or timm's hub."""
    parser.add_argument(
        "--model",
        type=model_name,
        help="timm model name (random weights unless loaded) or an offline pretrained one",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="local .safetensors/.pth weights (a tokcomp .safetensors names its model)",
    )
    if pretrained:
        parser.add_argument(
            "--pretrained", action="store_true", help="timm's weights (needs network or a cache)"
        )


def check_config_output(path: Path, force: bool, option: str = "-o") -> None:
    """Refuse a config output that cannot be written or would overwrite a file without
    --force, before any work is done."""
    if path.suffix not in CONFIG_SUFFIXES:
        raise UsageError(f"{option} {path}: a config file ends in {', '.join(CONFIG_SUFFIXES)}")
    check_new_file(path, force, option)


def check_json_output(path: Path | None, force: bool) -> None:
    """Refuse --force without a --json file (it would overwrite nothing), and a --json file
    that `check_new_file` refuses."""
    if force and path is None:
        raise UsageError("--force overwrites the --json file; give --json FILE, or drop --force")
    if path is not None:
        check_new_file(path, force, "--json")


def check_new_file(path: Path, force: bool, option: str) -> None:
    """Refuse, before any work, an output file that is a folder, would overwrite a file
    without --force, or whose folder cannot be made because a file stands in its place."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not force:
        raise UsageError(
            f"{option} {path} exists; pass --force to overwrite it, or give another file name"
        )
    blocking = blocking_file(path)
    if blocking is not None:
        raise UsageError(f"{option} {path}: {blocking} is a file, not a folder")
