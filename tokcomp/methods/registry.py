"""Method names to method classes."""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from tokcomp.methods.base import Method, option_names

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available under `cls.name`."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered as `name`; a clear error listing the known names otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; known methods: {', '.join(method_names())}"
        ) from None


def create_method(name: str, **options: Any) -> Method:
    """Build method `name` from its options, naming any option it does not take."""
    cls = method_class(name)
    valid = option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(valid)}"
        )
    wrong = mistyped_option(cls, options)
    if wrong is not None:
        option, value, takes = wrong
        raise ValueError(f"{name}: {option}={value!r}, but its {option} takes {takes}")
    budget = getattr(cls, "budget", None)
    if options.get("target_macs") is not None and budget in options:
        raise ValueError(
            f"{name}: give either target_macs or {budget}, not both (target_macs chooses {budget})"
        )
    return cls(**options)


def mistyped_option(cls: type[Method], options: dict[str, Any]) -> tuple[str, Any, str] | None:
    """The first option holding a plain value (a bool, number, text, list or None) of a kind
    `cls` does not take there, as (name, value, what it takes); None if there is none."""
    hints = get_type_hints(cls)
    for name, value in options.items():
        allowed = _kinds(hints.get(name, Any))
        kind = _plain_kind(value)
        if allowed is not None and kind is not None and not _admits(allowed, kind):
            return name, value, _kind_names(allowed)
    return None


def _plain_kind(value: Any) -> type | None:
    """The JSON-like kind of `value` (a tuple counts as a list), None for other objects."""
    for kind in (bool, int, float, str, type(None)):
        if isinstance(value, kind):
            return kind
    return list if isinstance(value, list | tuple) else None


def _admits(allowed: tuple[type, ...], kind: type) -> bool:
    return kind in allowed or (kind is int and float in allowed)


def _kinds(hint: Any) -> tuple[type, ...] | None:
    """The plain types a type hint admits (None: anything)."""
    if hint is Any:
        return None
    args = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    return tuple(get_origin(arg) or arg for arg in args)


def _kind_names(kinds: tuple[type, ...]) -> str:
    return " or ".join("none" if kind is type(None) else kind.__name__ for kind in kinds)
