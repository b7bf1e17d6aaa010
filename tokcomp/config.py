"""The exportable description of a compressed model: method, options, per-block schedule,
the model it was made for and its MACs. Versioned, validated, saved as JSON or YAML."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tokcomp.errors import UsageError
from tokcomp.files import blocking_file, written_whole
from tokcomp.methods import Method, create_method, method_class, option_names
from tokcomp.methods.registry import mistyped_option
from tokcomp.schedule import (
    ModelSpec,
    VLMSpec,
    model_macs,
    resolve_with_tower,
    selection_macs,
)

CONFIG_VERSION = 1
#: Where a model's own method defaults live: in its timm pretrained_cfg and in the metadata of
#: a tokcomp .safetensors checkpoint, as {method name: {option: value}} (tokcomp.apply).
METHOD_DEFAULTS = "tokcomp_method_defaults"
#: The file types a config is saved as.
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

#: Spec fields that must agree for a config to apply to a model (name is informational).
_MODEL_FIELDS = (
    "family",
    "depth",
    "tokens",
    "protected",
    "class_token",
    "width",
    "heads",
    "attn_dim",
    "mlp_hidden",
    "stem_macs",
)
#: Every field a saved model shape can have (a VLM's holds them all).
_SHAPE_FIELDS = frozenset(f.name for f in fields(VLMSpec))
#: The kinds of the model fields that are no int.
_MODEL_KINDS = {"family": (str, "a text"), "class_token": (bool, "true or false")}
#: Method options a config holds elsewhere: the schedule they settle into is its 'schedule'.
_SETTLED_OPTIONS = ("schedule", "target_macs")


class ConfigError(UsageError):
    """A config file or dict that tokcomp cannot use; the message names the field and fix."""


@dataclass
class Config:
    """A compressed model's configuration (what `tokcomp.config_of` returns).

    schedule: tokens left after each block. macs / base_macs: analytic MACs per image with
    and without compression; selection_macs: the part of macs that is the method's own work
    (matching, scores, signals; 0 in configs saved before it was counted). tower: on a VLM,
    the block method merging inside its vision tower beside the visual-token method, as
    {"method": name, "options": {...}} (its schedule is the tower part of 'schedule'), or
    None. notes: free-form provenance (e.g. where a preset comes from).
    """

    method: str
    options: dict[str, Any]
    schedule: list[int]
    model: dict[str, Any]
    macs: int
    base_macs: int
    selection_macs: int = 0
    tower: dict[str, Any] | None = None
    notes: str = ""
    version: int = CONFIG_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: How messages name this config (its file, once loaded from one).
    source: ClassVar[str] = "this config"

    @property
    def selection_share(self) -> float:
        """The part of `macs` that is the method's own work (matching, scoring, selection)."""
        return self.selection_macs / self.macs

    @property
    def macs_ratio(self) -> float:
        """MACs under compression as a fraction of the unpruned MACs."""
        return self.macs / self.base_macs

    @property
    def on_video(self) -> bool:
        """Whether this config's MACs are counted on a reference video (for reports, not to
        apply); configs saved before model.video mark a video by its frames."""
        return self.model.get("video", self.model.get("frames", 1) > 1)

    def tower_method(self) -> Method | None:
        """The block method merging inside the VLM's vision tower (None: none)."""
        if self.tower is None:
            return None
        return create_method(self.tower["method"], **self.tower["options"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> Config:
        """Validate `data` (as parsed from a file) and build a Config."""
        _check_fields(source, data, {f.name for f in fields(cls)})
        _check_version(source, data.get("version", CONFIG_VERSION))
        _check_method(source, data)
        _expect(source, "model", data["model"], dict)
        _expect(source, "notes", data.get("notes", ""), str)
        _expect(source, "extra", data.get("extra", {}), dict)
        _check_counts(source, data)
        _check_model_fields(source, data["model"])
        _check_model_kinds(source, data["model"])
        return cls(**data)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write as JSON (.json) or YAML (.yaml/.yml), creating its folder if need be; whole
        or not at all (an interrupted write leaves the file as it was). A file that exists
        is replaced only with `overwrite=True`."""
        path = Path(path)
        if path.suffix not in CONFIG_SUFFIXES:
            raise ConfigError(f"{path}: save a config as .json, .yaml or .yml")
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give a config file name in it")
        blocking = blocking_file(path)
        if blocking is not None:
            raise ConfigError(f"{path}: {blocking} is a file, not a folder; save elsewhere")
        data = self.to_dict()
        yaml_file = path.suffix in (".yaml", ".yml")
        text = yaml.safe_dump(data, sort_keys=False) if yaml_file else json.dumps(data, indent=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as partial:
            partial.write_text(text if yaml_file else text + "\n")
            if not overwrite and path.exists():
                raise ConfigError(
                    f"{path} exists: give another file name, or overwrite it (--force on the "
                    "command line, where a search resumes from its saved state; "
                    "overwrite=True in Config.save)"
                )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a config saved by `save` (or written by hand); clear errors on bad files."""
        path = existing_config_file(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad) is dropped
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {err.start} cannot be decoded); save it as UTF-8"
            ) from None
        try:
            if path.suffix in (".yaml", ".yml"):
                data = yaml.load(text, Loader=_UniqueKeysLoader)
            elif path.suffix == ".json":
                data = json.loads(text, object_pairs_hook=_unique_keys)
            else:
                raise ConfigError(f"{path}: a config file ends in .json, .yaml or .yml")
        except _DuplicateKeyError as err:
            raise ConfigError(f"{path}: {err}; keep one of them") from None
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            where = " ".join(str(err).split())  # YAML's message spans lines
            raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {where}") from None
        config = cls.from_dict(data, source=str(path))
        config.source = str(path)
        return config

    def check_model(self, spec: ModelSpec) -> None:
        """Refuse a model this config was not made for (naming the first differing field),
        and a config whose MACs or budget options disagree with its schedule on it."""
        actual = spec.as_dict()
        if self.on_video:
            raise ConfigError(
                f"{self.source} holds the schedule and MACs of a reference video (model.video, "
                "from tokcomp.config_of(model, frames=...)), not a config to apply: export it "
                "without frames= (tokcomp.config_of(model)) and apply that"
            )
        for name in (*_MODEL_FIELDS, *spec.checked):
            if self.model.get(name) != actual[name]:
                raise ConfigError(
                    f"{self.source} was made for {self.model.get('name')!r} with model.{name}="
                    f"{self.model.get(name)!r}, but the model has {name}={actual[name]!r}; "
                    "use a config exported from this architecture (or build a new one with "
                    "tokcomp.apply(model, method, ...))"
                )
        self._check_macs(spec)
        self._check_budget_options(spec)

    def macs_on(self, spec: ModelSpec) -> dict[str, int]:
        """The MACs fields (macs, selection_macs, base_macs) that this config's method and
        schedule cost on `spec`. A config made on the same backbone with another
        classification head (its model.head_macs) counts that head's."""
        try:
            method = create_method(self.method, **self.options, schedule=self.schedule)
            settled, tower, schedule = resolve_with_tower(method, self.tower_method(), spec)
        except ValueError as err:
            raise ConfigError(f"{self.source}: {err}; re-export it for this model") from None
        selection = selection_macs(spec, settled, schedule, tower)
        head = self.model.get("head_macs", spec.head_macs) - spec.head_macs
        return {
            "macs": model_macs(spec, schedule) + selection + head,
            "selection_macs": selection,
            "base_macs": model_macs(spec) + head,
        }

    def _check_macs(self, spec: ModelSpec) -> None:
        """Refuse MACs that are not what the schedule costs on `spec` (a hand edit)."""
        how = {
            "macs": "under its schedule",
            "selection_macs": "in the method's own work",
            "base_macs": "unpruned",
        }
        expected = self.macs_on(spec)
        if self._saved_before_selection_macs(expected):
            return
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise ConfigError(
                    f"{self.source}: {name} is {getattr(self, name)}, but this model costs "
                    f"{value} MACs per image {how[name]}: fix {name!r} (or re-export the config "
                    "with tokcomp export)"
                )

    def _saved_before_selection_macs(self, expected: dict[str, int]) -> bool:
        """Whether this config was saved before a method's own work was counted: no
        selection_macs, and macs without it (such configs apply; config_of counts it)."""
        return (
            self.selection_macs == 0 < expected["selection_macs"]
            and self.macs == expected["macs"] - expected["selection_macs"]
            and self.base_macs == expected["base_macs"]
        )

    def _check_budget_options(self, spec: ModelSpec) -> None:
        """Refuse budget options (r, keep_ratio, keep, ...) that give another schedule than
        the config's own; a config made for an explicit schedule has none."""
        knobs = sorted(budget_knobs(self.method, spec) & set(self.options))
        if not knobs:
            self._check_overridden_shapers(spec)
            return
        method = create_method(self.method, **self.options)
        _, _, own = resolve_with_tower(method, self.tower_method(), spec)
        if own != self.schedule:
            given = ", ".join(f"{name}={self.options[name]!r}" for name in knobs)
            raise ConfigError(
                f"{self.source}: options {given} give the schedule {own}, but its 'schedule' is "
                f"{self.schedule}: correct one of them (or re-export the config)"
            )

    def _check_overridden_shapers(self, spec: ModelSpec) -> None:
        """Refuse, in a config made for an explicit schedule, an option that would shape a
        budget's schedule (layers, inflection) with another value than the one the method
        derives there, which config_of states: the schedule overrides it, so an edit of it
        would change nothing."""
        shapers = [
            name for name in method_class(self.method).schedule_shapers if name in self.options
        ]
        if not shapers:
            return
        others = {name: value for name, value in self.options.items() if name not in shapers}
        method = create_method(self.method, **others, schedule=self.schedule)
        settled, _, _ = resolve_with_tower(method, self.tower_method(), spec)
        for name in shapers:
            derived = getattr(settled, name)
            if self.options[name] != derived:
                raise ConfigError(
                    f"{self.source}: options.{name} is {self.options[name]!r}, which the explicit "
                    f"schedule overrides (config_of states {derived!r}): set it back, or give a "
                    "budget option in place of the schedule"
                )


class _DuplicateKeyError(ValueError):
    """A config file names one key twice in one mapping (its reader would keep the last)."""


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A mapping from its (key, value) pairs, refusing a key named twice."""
    seen: dict[Any, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKeyError(f"key {key!r} is given twice")
        seen[key] = value
    return seen


class _UniqueKeysLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key named twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping of `node` (see `_unique_keys`)."""
        pairs = [
            (self.construct_object(key, deep=deep), self.construct_object(value, deep=deep))
            for key, value in node.value
        ]
        return _unique_keys(pairs)


def existing_config_file(path: str | Path) -> Path:
    """`path` as a Path, refused (ConfigError) unless it is a file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a config file in it")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return path


def budget_knobs(method: str, spec: ModelSpec) -> set[str]:
    """The options `method`'s family of schedules varies (its budget knobs: tome's r, a keep
    ratio, ...); none for a method without such a family (e.g. diffrate's searched lists)."""
    try:
        first, second = itertools.islice(create_method(method).candidates(spec), 2)
    except (NotImplementedError, ValueError):
        return set()
    return {f.name for f in fields(first) if getattr(first, f.name) != getattr(second, f.name)}


def _check_tower(source: str, tower: Any) -> None:
    """Refuse a 'tower' that is not {"method": a method name, "options": {...}}."""
    if not isinstance(tower, dict) or sorted(tower) != ["method", "options"]:
        raise ConfigError(
            f"{source}: 'tower' must be null or a mapping of 'method' (a name) and 'options' "
            "(the block method merging inside the vision tower)"
        )
    _check_method_and_options(source, tower, "tower")


def _check_model_fields(source: str, model: dict[str, Any]) -> None:
    """Refuse a 'model' that lacks a field every model's shape has, or has one no shape has
    (a misspelt field would be ignored)."""
    missing = sorted(set(_MODEL_FIELDS) - set(model))
    if missing:
        raise ConfigError(f"{source}: 'model' lacks {missing}")
    unknown = sorted(set(model) - _SHAPE_FIELDS)
    if unknown:
        raise ConfigError(
            f"{source}: 'model' has unknown field(s) {unknown}; a model's shape has "
            f"{sorted(_SHAPE_FIELDS)}"
        )


def _check_model_kinds(source: str, model: dict[str, Any]) -> None:
    """Refuse a 'model' field holding another kind of value than a model's shape has there
    (it could never match a model, or would fail the MACs check with a crash)."""
    for name in (*_MODEL_FIELDS, "head_macs"):
        kind, described = _MODEL_KINDS.get(name, (int, "an int"))
        value = model.get(name, 0)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(
                f"{source}: model.{name} must be {described}, got {value!r}; restore it "
                "from the model (or re-export the config with tokcomp export)"
            )


def _check_options(
    source: str, cls: type[Method], options: dict[str, Any], where: str = "options"
) -> None:
    """Refuse options settled elsewhere in a config, options the method does not have, a bool
    or text where the option takes numbers, and values the method refuses on any model."""
    for name in _SETTLED_OPTIONS:
        if name in options:
            raise ConfigError(
                f"{source}: {where}.{name} cannot be in a config: its schedule is the 'schedule' "
                f"field; remove {where}.{name}"
            )
    known = [name for name in option_names(cls) if name not in _SETTLED_OPTIONS]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: {where} has {', '.join(map(repr, unknown))}, which {cls.name} does not "
            f"take: remove or rename it ({cls.name}'s options are {', '.join(known)})"
        )
    wrong = mistyped_option(cls, options)
    if wrong is not None:
        name, value, takes = wrong
        raise ConfigError(
            f"{source}: {where}.{name} is {value!r}, but {cls.name}'s {name} takes {takes}"
        )
    try:
        create_method(cls.name, **options)
    except ValueError as err:  # a value out of its range, options that exclude each other
        raise ConfigError(f"{source}: {where}: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(source: str, data: Any, known: set[str]) -> None:
    """Raise ConfigError unless `data` is a mapping of known fields with the required ones."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of config fields, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {unknown}; a tokcomp config has {sorted(known)}"
        )
    missing = sorted({"method", "options", "schedule", "model", "macs", "base_macs"} - set(data))
    if missing:
        raise ConfigError(f"{source}: missing field(s) {missing}")


def _check_version(source: str, version: Any) -> None:
    """Raise ConfigError unless `version` is one this tokcomp reads."""
    _expect(source, "version", version, int)
    if version < 1:
        raise ConfigError(
            f"{source}: 'version' must be a positive int (this tokcomp writes {CONFIG_VERSION})"
        )
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"{source}: config version {version} is newer than this tokcomp "
            f"understands ({CONFIG_VERSION}); upgrade tokcomp"
        )


def _check_method(source: str, data: dict) -> None:
    """Raise ConfigError unless the method is registered and its options and tower valid."""
    _check_method_and_options(source, data)
    if data.get("tower") is not None:
        _check_tower(source, data["tower"])


def _check_method_and_options(source: str, data: dict, part: str = "") -> None:
    """Refuse a 'method' that names no registered method, or 'options' it does not take (of
    the config's `part`, such as its tower, or of the config itself)."""
    prefix = f"{part}." if part else ""
    _expect(source, f"{prefix}method", data["method"], str)
    try:
        cls = method_class(data["method"])
    except ValueError as err:
        raise ConfigError(f"{source}: {part + ': ' if part else ''}{err}") from None
    _expect(source, f"{prefix}options", data["options"], dict)
    _check_options(source, cls, data["options"], f"{prefix}options")


def _check_counts(source: str, data: dict) -> None:
    """Raise ConfigError unless the schedule and the MACs are counts."""
    schedule = data["schedule"]
    if not isinstance(schedule, list) or not all(_is_int(v) for v in schedule):
        raise ConfigError(
            f"{source}: 'schedule' must be a list of ints (tokens left after each block)"
        )
    for name in ("macs", "base_macs"):
        if not _is_int(data[name]) or data[name] <= 0:
            raise ConfigError(f"{source}: {name!r} must be a positive int (MACs per image)")
    selection = data.get("selection_macs", 0)
    if not _is_int(selection) or selection < 0:
        raise ConfigError(
            f"{source}: 'selection_macs' must be a non-negative int (the method's own MACs "
            f"per image), got {selection!r}"
        )


#: How a config's error names each JSON type it expects.
_KIND_NAMES = {int: "an int", str: "a string", dict: "a mapping"}


def _expect(source: str, name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name!r} must be {_KIND_NAMES[kind]}, got {value!r}")
