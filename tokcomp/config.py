"""The exportable description of a compressed model: method, options, per-block schedule,
the model it was made for and its MACs. Versioned, validated, saved as JSON or YAML."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tokcomp.errors import UsageError
from tokcomp.methods import method_class
from tokcomp.schedule import ModelSpec

CONFIG_VERSION = 1
#: The file types a config is saved as.
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")

#: Spec fields that must agree for a config to apply to a model (name is informational).
_MODEL_FIELDS = ("family", "depth", "tokens", "protected", "class_token", "width", "heads",
                 "attn_dim", "mlp_hidden")  # fmt: skip


class ConfigError(UsageError):
    """A config file or dict that tokcomp cannot use; the message names the field and fix."""


@dataclass
class Config:
    """A compressed model's configuration (what `tokcomp.config_of` returns).

    schedule: tokens left after each block. macs / base_macs: analytic MACs per image with
    and without compression. notes: free-form provenance (e.g. where a preset comes from).
    """

    method: str
    options: dict[str, Any]
    schedule: list[int]
    model: dict[str, Any]
    macs: int
    base_macs: int
    notes: str = ""
    version: int = CONFIG_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        """MACs under compression as a fraction of the unpruned MACs."""
        return self.macs / self.base_macs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> Config:
        """Validate `data` (as parsed from a file) and build a Config."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of config fields, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {unknown}; a tokcomp config has {sorted(known)}"
            )
        missing = sorted(
            {"method", "options", "schedule", "model", "macs", "base_macs"} - set(data)
        )
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing}")
        _expect(source, "version", data.get("version", CONFIG_VERSION), int)
        if data.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise ConfigError(
                f"{source}: config version {data['version']} is newer than this tokcomp "
                f"understands ({CONFIG_VERSION}); upgrade tokcomp"
            )
        _expect(source, "method", data["method"], str)
        try:
            method_class(data["method"])
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
        _expect(source, "options", data["options"], dict)
        _expect(source, "model", data["model"], dict)
        _expect(source, "notes", data.get("notes", ""), str)
        _expect(source, "extra", data.get("extra", {}), dict)
        schedule = data["schedule"]
        if not isinstance(schedule, list) or not all(_is_int(v) for v in schedule):
            raise ConfigError(
                f"{source}: 'schedule' must be a list of ints (tokens left after each block)"
            )
        for name in ("macs", "base_macs"):
            if not _is_int(data[name]) or data[name] <= 0:
                raise ConfigError(f"{source}: {name!r} must be a positive int (MACs per image)")
        missing_model = sorted(set(_MODEL_FIELDS) - set(data["model"]))
        if missing_model:
            raise ConfigError(f"{source}: 'model' lacks {missing_model}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write as JSON (.json) or YAML (.yaml/.yml)."""
        path = Path(path)
        text = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(text, sort_keys=False))
        elif path.suffix == ".json":
            path.write_text(json.dumps(text, indent=2) + "\n")
        else:
            raise ConfigError(f"{path}: save a config as .json, .yaml or .yml")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a config saved by `save` (or written by hand); clear errors on bad files."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ConfigError(f"{path}: a config file ends in .json, .yaml or .yml")
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {err}") from None
        return cls.from_dict(data, source=str(path))

    def check_model(self, spec: ModelSpec) -> None:
        """Refuse a model this config was not made for, naming the first differing field."""
        actual = spec.as_dict()
        for name in (*_MODEL_FIELDS, *spec.checked):
            if self.model.get(name) != actual[name]:
                raise ConfigError(
                    f"this config was made for {self.model.get('name')!r} with model.{name}="
                    f"{self.model.get(name)!r}, but the model has {name}={actual[name]!r}; "
                    "use a config exported from this architecture (or build a new one with "
                    "tokcomp.apply(model, method, ...))"
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(source: str, name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name!r} must be a {kind.__name__}, got {value!r}")
