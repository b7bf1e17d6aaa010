"""Option validation of every registered method: a value of another type is refused in one line
naming the option; numpy, torch and tuple values mean the Python numbers and lists they hold."""

from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
import pytest
import torch
from conftest import tiny_vit

import tokcomp
from tokcomp.methods import BlockMethod, create_method, method_class, method_names

#: Per type hint, what a refusal says the option takes, and values a user might pass that the
#: hint does not take.
BAD_VALUES = {
    "float": ("float", ["0.5", True, None, [0.5], np.array([0.5, 0.5]), torch.tensor([0.5, 1])]),
    "float | None": ("float or none", ["0.5", True, [0.5], np.array([0.5, 0.5])]),
    "int": ("int", [2.5, 12.0, "3", True, None, [2], np.float64(2.0), torch.tensor([2, 3])]),
    "int | None": ("int or none", [2.5, "3", True, [2]]),
    "int | float": ("int or float", ["0.5", True, None, [1], np.array([1, 2])]),
    "bool": ("bool", [1, "yes", None, np.int64(1), torch.tensor([True, False])]),
    "str": ("str", [1, None, ["keep"]]),
    "str | None": ("str or none", [1, ["keys"]]),
    "int | list[int]": (
        "int or list of int",
        [2.5, "2", True, None, [2.5], [True], [[2]], np.array([0.5])],
    ),
    "list[int] | None": (
        "list of int or none",
        ["1", 1, [1.5], ["1"], [True], [[1], [3]], np.array([0.5]), (1.0, 2)],
    ),
    "list[float] | None": ("list of float or none", [0.5, ["x"], [[0.1, 0.2]], [True, 0.5]]),
}


def _hint_name(hint: typing.Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _options(method: str) -> list[tuple[str, str]]:
    """(option, type hint) of every option of `method`."""
    hints = typing.get_type_hints(method_class(method))
    return [(f.name, _hint_name(hints[f.name])) for f in dataclasses.fields(method_class(method))]


@pytest.mark.parametrize("method", method_names())
def test_a_value_of_another_type_is_refused_in_one_line_naming_the_option(method):
    for option, hint in _options(method):
        assert hint in BAD_VALUES, f"{method}.{option}: add bad values for {hint}"
        takes, values = BAD_VALUES[hint]
        for value in values:
            with pytest.raises(ValueError) as refused:
                create_method(method, **{option: value})
            message = str(refused.value)
            assert message.startswith(f"{method}: {option}=") and "\n" not in message, message
            assert message.endswith(f", but its {option} takes {takes}"), message


def _numpy_and_torch(value: typing.Any) -> list[typing.Any]:
    """`value` as a numpy scalar and a 0-d tensor of the same precision."""
    dtype = {bool: torch.bool, int: torch.int64, float: torch.float64}[type(value)]
    return [np.array(value)[()], torch.tensor(value, dtype=dtype)]


@pytest.mark.parametrize("method", method_names())
def test_numpy_and_torch_scalars_mean_the_python_numbers_they_hold(method):
    defaults = create_method(method).options()
    for option, value in defaults.items():
        if type(value) not in (bool, int, float):
            continue
        for given in _numpy_and_torch(value):
            options = create_method(method, **{option: given}).options()
            assert options == defaults and type(options[option]) is type(value), (option, given)
    json.dumps(defaults)


@pytest.mark.parametrize(
    ("method", "options", "plain"),
    [
        ("evit", {"layers": np.array([1, 3])}, {"layers": [1, 3]}),
        ("evit", {"layers": torch.tensor([1, 3])}, {"layers": [1, 3]}),
        ("tome", {"r": (3, 2)}, {"r": [3, 2]}),
        ("tome", {"r": np.array([3, 2])}, {"r": [3, 2]}),
        ("tome", {"r": np.int64(3)}, {"r": 3}),
        ("zero_tprune", {"iterations": np.array([5, 5, 5, 5])}, {"iterations": [5, 5, 5, 5]}),
        ("pitome", {"keep_ratio": np.float32(0.75)}, {"keep_ratio": 0.75}),
    ],
)
@torch.no_grad()
def test_numpy_torch_and_tuple_options_run_as_their_python_values(method, options, plain):
    model = tokcomp.apply(tiny_vit(), method, **options)
    reference = tokcomp.apply(tiny_vit(), method, **plain)
    assert tokcomp.config_of(model) == tokcomp.config_of(reference)
    json.dumps(tokcomp.config_of(model).options)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(images), reference(images))


@pytest.mark.parametrize(
    ("method", "option"),
    [("evit", "layers"), ("random", "layers"), ("zero_tprune", "layers"), ("pitome", "bsm_layers")],
)
def test_block_indices_beyond_the_depth_are_refused_when_applied(method, option):
    for layers in ([4], [-1], [0, 9]):
        with pytest.raises(ValueError) as refused:
            tokcomp.apply(tiny_vit(), method, keep_ratio=0.9, **{option: layers})
        message = str(refused.value)
        assert f"{method}: {option} {layers} must be block indices in 0..3" == message


def test_random_keep_ratio_one_as_an_int_keeps_every_visual_token():
    for keep_ratio in (1, 0.5):
        method = create_method("random", keep_ratio=keep_ratio)
        assert method.kept_of(16) == int(16 * keep_ratio)
    with pytest.raises(ValueError, match=r"random: a fractional keep_ratio must be in \(0, 1\]"):
        create_method("random", keep_ratio=12.0)


@pytest.mark.parametrize(
    ("method", "ratio", "interval"),
    [
        ("pitome", 0.4, r"\[0\.5, 1\]"),
        ("pitome", 1.2, r"\[0\.5, 1\]"),
        ("evit", 0.0, r"\(0\.0, 1\]"),
    ],
)
def test_a_keep_ratio_out_of_range_is_refused_naming_its_interval(method, ratio, interval):
    """PiToMe merges at most half the tokens per block: 0.5 is allowed, shown as such."""
    with pytest.raises(ValueError, match=rf"{method}: keep_ratio must be a number in {interval}"):
        create_method(method, keep_ratio=ratio)
    if method == "pitome":
        assert create_method(method, keep_ratio=0.5).keep_ratio == 0.5
        assert create_method(method, keep_ratio=0.5 - 1e-12).keep_ratio == 0.5 - 1e-12


def test_zero_tprune_iterations_are_checked_before_the_first_forward():
    with pytest.raises(ValueError, match=r"iterations must be None or a list of ints >= 0"):
        create_method("zero_tprune", iterations=[-1, 1, 1, 1])
    with pytest.raises(ValueError, match="zero_tprune: iterations lists 0 blocks, the model has 4"):
        tokcomp.apply(tiny_vit(), "zero_tprune", keep_ratio=0.9, iterations=[])


@pytest.mark.parametrize("layers", [[], [2, 2], [3, 2], [0, 2]])
def test_pyramiddrop_refuses_no_repeated_or_descending_layers(layers):
    with pytest.raises(ValueError, match=r"pyramiddrop: layers must be None or distinct ascending"):
        create_method("pyramiddrop", layers=layers)


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_the_decoder_layer_option_is_named_when_refused(method):
    with pytest.raises(ValueError, match=f"{method}: layer must be a decoder layer >= 1 "):
        create_method(method, layer=0)
    with pytest.raises(ValueError, match=rf"{method}: layer=5 prunes before decoder layers \[5\]"):
        create_method(method, layer=5).llm_schedule(llm_depth=4, selectable=16, fixed=0)


def test_zoo_refuses_an_infinite_step():
    with pytest.raises(ValueError, match="zoo: step must be a finite number > 0, got inf"):
        create_method("zoo", step=float("inf"))


@dataclasses.dataclass
class _Weighted(BlockMethod):
    """A user's method whose options are a tensor and a callable (not registered)."""

    name: typing.ClassVar[str] = "weighted_for_test"
    weights: torch.Tensor = dataclasses.field(default_factory=lambda: torch.ones(3))
    score: typing.Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid
    keep_ratio: float = 0.5


def test_a_tensor_or_callable_option_is_kept_as_given_and_numbers_are_still_plain():
    weights = torch.tensor([0.2, 0.3, 0.5])
    method = _Weighted(weights=weights, score=torch.tanh, keep_ratio=np.float32(0.25))
    assert method.weights is weights and method.score is torch.tanh
    assert type(method.keep_ratio) is float and method.keep_ratio == 0.25
    with pytest.raises(ValueError, match="weights takes Tensor"):
        _Weighted(weights=[0.2, 0.3])
