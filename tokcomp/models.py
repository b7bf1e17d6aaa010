"""Build the models the command line and eval scripts work on, from names and local files."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from tokcomp.bench import input_size_of
from tokcomp.config import METHOD_DEFAULTS
from tokcomp.errors import UsageError
from tokcomp.harness import hub
from tokcomp.pretrained import OFFLINE_MODELS, weights


def create_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """A timm model by name, optionally with weights from a local checkpoint.

    A .safetensors checkpoint written by tokcomp's training scripts carries its timm name,
    constructor arguments and data config (preprocessing) in its metadata, so `name` may
    then be omitted and timm's resolve_data_config sees the right preprocessing. The names
    of `tokcomp.pretrained.OFFLINE_MODELS` (e.g. "dinov2_vits14") load pretrained weights
    that a registry package ships, converted and cached on first use, with the method
    options chosen for them (in pretrained_cfg[METHOD_DEFAULTS], which tokcomp.apply reads).
    """
    if checkpoint and pretrained:
        raise UsageError(
            "give --checkpoint or --pretrained, not both: the checkpoint's weights would replace "
            "timm's pretrained ones (pretrained=True and checkpoint= in Python)"
        )
    method_defaults = {}
    if name in OFFLINE_MODELS:
        if checkpoint or pretrained:
            raise ValueError(f"{name} brings its own weights: drop --checkpoint/--pretrained")
        method_defaults = copy.deepcopy(OFFLINE_MODELS[name].method_defaults)
        name, checkpoint = None, weights(name)
    metadata = _safetensors_metadata(checkpoint) if checkpoint else {}
    hub_config = _hub_config(Path(checkpoint)) if checkpoint else {}
    method_defaults = json.loads(metadata.get(METHOD_DEFAULTS, "{}")) or method_defaults
    saved_as = metadata.get("timm_model") or hub_config.get("architecture")
    name = _timm_name(name, checkpoint, saved_as)
    kwargs = {
        **_hub_model_kwargs(hub_config),
        **json.loads(metadata.get("model_kwargs", "{}")),
        **kwargs,
    }
    if pretrained:
        _require_pretrained(name)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint:
        state = load_state_dict(checkpoint)
        _check_fits(model, state, checkpoint, name)
        model.load_state_dict(state)
    if checkpoint:
        _take_data_config(model, metadata, hub_config)
    if method_defaults:
        model.pretrained_cfg = {**model.pretrained_cfg, METHOD_DEFAULTS: method_defaults}
    return model.eval()


def _timm_name(name: str | None, checkpoint: str | Path | None, saved_as: str | None) -> str:
    """The timm model to build: `name`, or the one the checkpoint records (`saved_as`); the
    two must be one architecture (a pretrained tag after a dot aside)."""
    if name is not None and saved_as is not None and _architecture(name) != _architecture(saved_as):
        raise UsageError(
            f"checkpoint {checkpoint} holds timm model {saved_as}, not {name}: drop --model (the "
            f"checkpoint names its model), or pass --model {saved_as}"
        )
    if name or saved_as:
        return name or saved_as
    if not checkpoint:
        raise UsageError("give a model: a timm model name (--model) or a checkpoint (--checkpoint)")
    _check_checkpoint_file(Path(checkpoint))
    raise UsageError(
        f"give a model name (--model): checkpoint {checkpoint} does not record its timm model"
    )


def _architecture(name: str) -> str:
    """A timm model name without its pretrained tag ("vit_base_patch16_224.augreg_in21k" ->
    "vit_base_patch16_224")."""
    return name.split(".")[0]


def _take_data_config(
    model: nn.Module, metadata: dict[str, str], hub_config: dict[str, Any]
) -> None:
    """Give `model` the preprocessing its checkpoint records (in its metadata or in the hub
    folder's config.json beside it); without one, at least the image size it was built for
    where that is not the default tag's (timm keeps the tag's input_size when img_size is
    overridden)."""
    data_config = (
        json.loads(metadata.get("data_config", "{}"))
        or _hub_data_config(hub_config)
        or _built_size(model)
    )
    if data_config:  # the default tag's test-time size would win over the checkpoint's own
        default = {k: v for k, v in model.pretrained_cfg.items() if not k.startswith("test_")}
        model.pretrained_cfg = {**default, **data_config}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a local .safetensors or .pth/.pt file (a bare state dict, or one under
    'model' / 'state_dict' as training scripts commonly save)."""
    path = Path(path)
    _check_checkpoint_file(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        with _readable(path):
            return load_file(str(path))
    with _readable(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"checkpoint {path} holds no state dict of tensors; {_RESAVE}")
    return state


#: How to get a checkpoint tokcomp reads.
_RESAVE = (
    "save the weights where the model was made, with torch.save(model.state_dict(), PATH) "
    "or safetensors' save_file"
)


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn a failure to read checkpoint `path` into one line (torch's own message may
    suggest unpickling arbitrary objects, which a file of unknown origin must not get)."""
    try:
        yield
    except Exception as err:  # safetensors and torch.load fail in many ways on bad files
        raise UsageError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: it is damaged, truncated, "
            f"not a {path.suffix} file, or holds Python objects besides tensors); {_RESAVE}"
        ) from None


def _check_fits(
    model: nn.Module, state: dict[str, torch.Tensor], checkpoint: str | Path, name: str
) -> None:
    """Refuse a checkpoint whose tensors do not match the model's, naming the first one."""
    own = model.state_dict()
    wrong = [key for key in state if key in own and state[key].shape != own[key].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if wrong:
        key = wrong[0]
        problem = f"{key} is {list(state[key].shape)} there but {list(own[key].shape)} in {name}"
    elif missing or unexpected:
        problem = f"it lacks {missing[:3]} and has {unexpected[:3]} that {name} does not"
    else:
        return
    raise UsageError(
        f"checkpoint {checkpoint} does not fit model {name}: {problem}; give the --model "
        "it was trained as (a head for another number of classes needs that model)"
    )


def _require_pretrained(name: str) -> None:
    """Refuse in one line, before timm's minute of download retries, hub weights for `name`
    that are not in the local cache when the hub cannot be reached."""
    if name.startswith(("hf-hub:", "hf_hub:")):
        repo = name.split(":", 1)[1].split("@")[0]
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        repo = cfg.hf_hub_id if cfg is not None and not (cfg.file or cfg.state_dict) else None
    if repo:
        hub.require(repo, "model", "pass --checkpoint FILE (local weights)", f"--pretrained {name}")


def _is_safetensors(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".safetensors"


#: The preprocessing entries of a timm pretrained_cfg.
DATA_KEYS = (
    "input_size",
    "interpolation",
    "mean",
    "std",
    "crop_pct",
    "crop_mode",
    "test_input_size",
    "test_crop_pct",
)


def _built_size(model: nn.Module) -> dict[str, Any]:
    """The image size `model` was built for where its default tag states another, else {}."""
    built_for = list(input_size_of(model))
    stated = list(model.pretrained_cfg.get("input_size", built_for))
    return {} if built_for == stated else {"input_size": built_for}


def _hub_config(checkpoint: Path) -> dict[str, Any]:
    """A Hugging Face hub folder's config.json beside the weights (timm's layout:
    model.safetensors or pytorch_model.bin next to config.json), {} without one."""
    path = checkpoint.with_name("config.json")
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(
            f"{path} (beside checkpoint {checkpoint.name}, whose model and preprocessing it "
            f"would give) is not valid JSON ({err}); fix it or move it away"
        ) from None
    return config if isinstance(config, dict) else {}


def _hub_model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments a hub config gives its architecture, as timm reads them: its
    model_args and its class count."""
    kwargs = dict(config.get("model_args") or {})
    if "num_classes" in config:
        kwargs["num_classes"] = config["num_classes"]
    return kwargs


def _hub_data_config(config: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing a hub config gives the weights beside it ({} without one: the
    architecture's default tag may preprocess otherwise: crop_pct, mean and std)."""
    cfg = config.get("pretrained_cfg")
    return {key: cfg[key] for key in DATA_KEYS if key in cfg} if isinstance(cfg, dict) else {}


def _check_checkpoint_file(path: Path) -> None:
    """Refuse a checkpoint path that is a folder or names no file, in one line."""
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a folder; give the weights file in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")


def _safetensors_metadata(path: str | Path) -> dict[str, str]:
    if not _is_safetensors(path):
        return {}
    _check_checkpoint_file(Path(path))
    from safetensors import safe_open

    with _readable(Path(path)), safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}
