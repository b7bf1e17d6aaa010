"""Method names to method classes."""

from __future__ import annotations

from typing import Any

from tokcomp.methods.base import Method, option_names, option_takes, plain_value

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
        offered = [
            o for o in valid if o != "target_macs" or getattr(cls, "takes_target_macs", True)
        ]
        raise ValueError(
            f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(offered)}"
        )
    budget = getattr(cls, "budget", None)
    if options.get("target_macs") is not None and budget in options:
        raise ValueError(
            f"{name}: give either target_macs or {budget}, not both (target_macs chooses {budget})"
        )
    return cls(**options)


def mistyped_option(cls: type[Method], options: dict[str, Any]) -> tuple[str, Any, str] | None:
    """The first option holding a value of a type `cls` does not take there (numpy and torch
    values count as the Python numbers and lists they hold, a tuple as a list), as (name,
    value, what it takes); None if there is none."""
    for name, value in options.items():
        takes = option_takes(cls, name, plain_value(value))
        if takes is not None:
            return name, value, takes
    return None
