"""The public functions: apply, remove, config_of, forward_tokens, methods."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import numbers
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from tokcomp.adapters import Compression, Patch, find_adapter
from tokcomp.adapters.base import PATCH_ATTRIBUTE, check_unshared, patched_on_its_own
from tokcomp.config import METHOD_DEFAULTS, Config, ConfigError, budget_knobs
from tokcomp.methods import (
    BlockMethod,
    Method,
    TokenState,
    VisualMethod,
    create_method,
    method_class,
    method_names,
)
from tokcomp.methods.visual import VisualSignal
from tokcomp.schedule import ModelSpec, VLMSpec, model_macs, resolve_with_tower, selection_macs

M = TypeVar("M", bound=nn.Module)

_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def apply(
    model: M,
    method_or_config: str | Path | Config | Method,
    tower: str | Method | None = None,
    tower_options: dict[str, Any] | None = None,
    **options: Any,
) -> M:
    """Make `model` compress its tokens, in place; returns it.

    `method_or_config` is a method name (see `methods()`) with its options, a Config, the
    path of a saved config, or a Method object. Applying again replaces the previous method.
    A method named on a model that carries its own defaults for it (tokcomp's offline
    pretrained models: `model_defaults`) starts from those; `options` override them.
    `tower` (a VLM of the LLaVA families, beside a visual-token method): a block method that
    only merges (tome, pitome; a name with `tower_options`, or a Method) run inside the vision
    tower, its tokens unmerged onto the tower's grid at its end (docs/methods.md section 10.1).
    """
    adapter = find_adapter(model)
    spec = adapter.spec()
    tower_method = _tower_of(tower, tower_options)
    compression = _requested(method_or_config, options, spec, tower_method, model_defaults(model))
    adapter.check(compression)
    check_unshared(model)
    if is_patched(model):
        remove(model)
    patch = Patch(adapter, compression)
    adapter.install(patch)
    object.__setattr__(model, PATCH_ATTRIBUTE, patch)
    return model


def _tower_of(tower: str | Method | None, options: dict[str, Any] | None) -> Method | None:
    """The tower method `apply` was given (None: none)."""
    if tower is None:
        if options:
            raise ValueError("tower_options were given without tower=: name the tower method")
        return None
    if isinstance(tower, Method):
        _refuse_options(options or {}, "a Method object as tower (set them on it)")
        return _own_copy(tower)
    return create_method(tower, **(options or {}))


def _own_copy(method: Method) -> Method:
    """The patch's own copy of a Method object (its option lists too), so that changing the
    object afterwards does not change what the patched model runs; modules it holds (the
    DiffRate search's rates) stay shared."""
    lists = {
        field.name: copy.deepcopy(value)
        for field in dataclasses.fields(method)
        if isinstance(value := getattr(method, field.name), list)
    }
    return dataclasses.replace(method, **lists)


def _merges_frames(method: Method) -> bool:
    """Whether `method` prunes only across video frames (nothing on the reference image)."""
    return isinstance(method, VisualMethod) and VisualSignal.FRAMES in method.visual_needs


def model_defaults(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The method options chosen for this model's weights ({method: {option: value}}), which
    tokcomp.apply uses where the caller gives none; empty for most models."""
    return (getattr(model, "pretrained_cfg", None) or {}).get(METHOD_DEFAULTS, {})


def _requested(
    method_or_config: str | Path | Config | Method,
    options: dict[str, Any],
    spec: ModelSpec,
    tower: Method | None,
    defaults: dict[str, dict[str, Any]],
) -> Compression:
    if isinstance(method_or_config, Method):
        _refuse_options(options, "a Method object (set them on it)")
        return _bound(_own_copy(method_or_config), tower, spec)
    config = _as_config(method_or_config)
    if config is None:
        _refuse_a_visual_schedule(str(method_or_config), options, spec)
        _refuse_what_the_schedule_overrides(str(method_or_config), options)
        chosen = {**defaults.get(str(method_or_config), {}), **options}
        compression = _bound(create_method(str(method_or_config), **chosen), tower, spec)
        method, schedule = compression.method, list(compression.schedule)
        unpruned = model_macs(spec, schedule) == model_macs(spec)
        if not options and unpruned and not _merges_frames(method):
            warnings.warn(
                f"tokcomp.apply(model, {method.name!r}) without options compresses nothing: its "
                f"defaults keep every token; give its budget ({method.budget}=...) or "
                "target_macs (e.g. target_macs=0.6)",
                UserWarning,
                stacklevel=3,
            )
        return compression
    _refuse_options(options, "a config (edit its 'options' field, or apply the method by name)")
    if tower is not None:
        raise ValueError("tower= cannot be given with a config: its 'tower' field holds it")
    config.check_model(spec)
    method = create_method(config.method, **config.options, schedule=config.schedule)
    return _bound(method, config.tower_method(), spec)


def _bound(method: Method, tower: Method | None, spec: ModelSpec) -> Compression:
    """`method` (and `tower`, merging inside a VLM's vision tower) resolved on `spec`."""
    method, tower, schedule = resolve_with_tower(method, tower, spec)
    in_tower = None
    if tower is not None:
        in_tower = Compression(tower, tuple(schedule[: spec.depth]), spec.tower(), unmerge=True)
    return Compression(method, tuple(schedule), spec, tower=in_tower)


def _refuse_a_visual_schedule(name: str, options: dict[str, Any], spec: ModelSpec) -> None:
    """Refuse a schedule given to a visual-token method on a VLM: there it follows from the
    budget (a saved config's is checked against its options, not taken as is)."""
    cls = method_class(name)
    if options.get("schedule") is None or not isinstance(spec, VLMSpec):
        return
    if issubclass(cls, VisualMethod):
        raise ValueError(
            f"{name}: on a VLM the schedule follows from {cls.budget}; give "
            f"{cls.budget_choices()} instead of schedule (or apply a saved config)"
        )


def _refuse_what_the_schedule_overrides(name: str, options: dict[str, Any]) -> None:
    """Refuse a method's budget option, or an option shaping the schedule derived from it,
    beside an explicit schedule, which overrides them."""
    cls = method_class(name)
    if options.get("schedule") is None:
        return
    for option in (getattr(cls, "budget", None), *cls.schedule_shapers):
        if options.get(option) is not None:
            raise ValueError(
                f"{name}: give either schedule or {option}, not both (the schedule sets the "
                "tokens kept at every block)"
            )


def _refuse_options(options: dict[str, Any], given: str) -> None:
    if options:
        raise ValueError(f"options {sorted(options)} cannot be given with {given}")


def remove(model: M) -> M:
    """Undo `apply`: the model's original forward, exactly; returns the model."""
    patch = _patch_of(model)
    patch.adapter.uninstall()
    del model.__dict__[PATCH_ATTRIBUTE]
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether tokcomp has patched `model`."""
    return isinstance(model, nn.Module) and patched_on_its_own(model)


def config_of(model: nn.Module, frames: int | None = None) -> Config:
    """The resolved configuration of a patched model: method, options, schedule, MACs (the
    model's plus the method's own work, which selection_macs gives apart). `frames`: a VLM's
    schedule and MACs on a reference video of that many frames instead of the reference image."""
    patch = _patch_of(model)
    compression = patch.compression if frames is None else _on_video(patch, frames)
    method, spec, schedule = compression.method, compression.spec, list(compression.schedule)
    tower = None if compression.tower is None else compression.tower.method
    selection = selection_macs(spec, method, schedule, tower)
    return Config(
        method=method.name,
        options=_settled_options(method, spec),
        schedule=schedule,
        model=spec.as_dict(),
        macs=model_macs(spec, schedule) + selection,
        base_macs=model_macs(spec),
        selection_macs=selection,
        tower=None if tower is None else _tower_entry(compression.tower),
    )


def _tower_entry(tower: Compression) -> dict[str, Any]:
    """A config's 'tower': the block method merging inside a VLM's vision tower."""
    return {"method": tower.method.name, "options": _settled_options(tower.method, tower.spec)}


def _settled_options(method: Method, spec: ModelSpec) -> dict[str, Any]:
    """A settled method's options as a config holds them: every one, so that the config runs
    the same after a default changes, but its schedule, and budget knobs left at their defaults
    where it was given a schedule (they had no part in it)."""
    options = method.options()
    for name in ("schedule", "target_macs", *_unused_knobs(method, spec)):
        options.pop(name, None)
    return options


def _unused_knobs(method: Method, spec: ModelSpec) -> set[str]:
    """The budget knobs of a method given a schedule that it holds at their defaults."""
    if method.schedule is None:
        return set()
    default = create_method(method.name)
    knobs = budget_knobs(method.name, spec)
    return {name for name in knobs if getattr(method, name) == getattr(default, name)}


def _on_video(patch: Patch, frames: int) -> Compression:
    """The patch's methods re-resolved (the budget per video) on a reference video."""
    spec = _video_spec(patch.adapter, frames)
    compression = patch.compression
    tower = compression.tower
    tower = None if tower is None else tower.method.with_options(schedule=None)
    return _bound(compression.method.with_options(schedule=None), tower, spec)


def _video_spec(adapter: Any, frames: int) -> ModelSpec:
    """A VLM adapter's geometry of a reference video of `frames` frames."""
    video_spec = getattr(adapter, "video_spec", None)
    if video_spec is None:
        raise ValueError("frames= gives a VLM's MACs on a video; this model is no VLM")
    if isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 1:
        raise ValueError(f"frames={frames!r}: give the video's frame count (an int >= 1)")
    return video_spec(int(frames))


def macs(model: nn.Module, frames: int | None = None) -> int:
    """Analytic MACs per image of `model` (`frames`: a VLM's, per reference video of that many
    frames): under its compression (the method's own work included) if patched, else
    unpruned."""
    if is_patched(model):
        return config_of(model, frames).macs
    adapter = find_adapter(model)
    return model_macs(adapter.spec() if frames is None else _video_spec(adapter, frames))


def forward_tokens(model: nn.Module, *inputs: Any, **kwargs: Any) -> TokenState:
    """Run a patched model's trunk and return the final tokens with their sizes (and
    sources when the method was applied with trace_source=True)."""
    patch = _patch_of(model)
    with _inference_unless_grad():
        return patch.adapter.forward_tokens(patch.compression, *inputs, **kwargs)


def _inference_unless_grad() -> contextlib.AbstractContextManager:
    """Inference mode where gradients are off; nothing under torch.compile, where entering it
    inside the compiled region fails to compile (the caller's mode applies there)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.inference_mode(not torch.is_grad_enabled())


#: What `methods(kind)` lists: methods for vision-encoder tokens, or for a VLM's visual tokens.
METHOD_KINDS = ("vision", "vlm")


def methods(kind: str | None = None) -> list[str]:
    """Names of every method tokcomp ships; kind="vision": the block methods, which compress a
    vision encoder's tokens (a VLM applies them inside its vision tower where supported);
    kind="vlm": the visual-token methods, which choose a VLM's visual tokens (random is both)."""
    if kind is None:
        return method_names()
    if kind not in METHOD_KINDS:
        raise ValueError(f"kind must be one of {METHOD_KINDS} or None, got {kind!r}")
    kind_class = VisualMethod if kind == "vlm" else BlockMethod
    return [name for name in method_names() if issubclass(method_class(name), kind_class)]


def _patch_of(model: nn.Module) -> Patch:
    if not is_patched(model):
        raise ValueError(
            "this model is not patched by tokcomp; call tokcomp.apply(model, ...) first"
        )
    return model.__dict__[PATCH_ATTRIBUTE]


def _as_config(method_or_config: str | Path | Config) -> Config | None:
    if isinstance(method_or_config, Config):  # checked as a file's would be: it may be edited
        checked = Config.from_dict(method_or_config.to_dict(), source=method_or_config.source)
        checked.source = method_or_config.source
        return checked
    if not isinstance(method_or_config, (str, Path)):
        raise ConfigError(
            f"expected a method name, a Method, a Config or a config path, got {method_or_config!r}"
        )
    path = Path(method_or_config)
    if isinstance(method_or_config, str) and method_or_config in method_names():
        return None  # a method's name, even where a file of that name sits in the folder
    if path.suffix in _CONFIG_SUFFIXES or path.is_file() or path.is_dir():
        return Config.load(path)  # which refuses a folder, naming it
    if isinstance(method_or_config, Path):
        raise ConfigError(f"no config file {path}: give the path of a saved config")
    return None
