"""Compression methods, one file each. A method never touches model classes: it reduces a
TokenState given the signals it declared (`needs`) and this layer's budget."""

from tokcomp.methods import diffrate, evit, pitome, random, tome, zero_tprune  # noqa: F401  (registers them)
from tokcomp.methods.base import Layer, Layout, Method, option_names
from tokcomp.methods.registry import create_method, method_class, method_names, register
from tokcomp.methods.state import Signal, Signals, TokenState

__all__ = [
    "Layer",
    "Layout",
    "Method",
    "Signal",
    "Signals",
    "TokenState",
    "create_method",
    "method_class",
    "method_names",
    "option_names",
    "register",
]
