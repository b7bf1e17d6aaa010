"""The command line the eval scripts share with `tokcomp` (tokcomp/cli.py): a value or a file
that cannot work is refused before any long work, in one line that names the option and the
fix, with exit code 2. The argument types of tokcomp.harness.arguments (positive_int, device,
DTYPES...) are the rules; this module adds the parser, the refusal of what tokcomp's own
checks reject, and the list types the scripts take.

A script imports it from eval/ (sys.path[0] when the script is run)."""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path

from tokcomp.api import methods
from tokcomp.cli import USAGE_ERRORS, OneLineParser
from tokcomp.harness.arguments import (
    check_json_output,
    check_new_file,
    names,
    positive_int,
    timm_model,
)

#: The repository: the scripts' default paths are relative to it, not to where they are run.
REPO = Path(__file__).resolve().parent.parent


def add_json_arguments(
    parser: argparse.ArgumentParser, help: str = "also write the rows here"
) -> None:
    """--json FILE (`help`) and --force (to overwrite it)."""
    parser.add_argument("--json", type=Path, help=help)
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")


def check_json_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through `parser`, what `check_json_output` refuses."""
    with refusing(parser):
        check_json_output(args.json, args.force)


#: A training script's finished model, in its --out folder (written at the end of the run).
MODEL_FILE = "model.safetensors"


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """--force (to train over a finished model in --out)."""
    parser.add_argument(
        "--force", action="store_true", help=f"overwrite a finished model ({MODEL_FILE}) in --out"
    )


def check_model_output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through `parser`, a finished model in --out without --force (resuming has none)."""
    with refusing(parser):
        check_new_file(Path(args.out) / MODEL_FILE, args.force, "--out")


def refuse_ignored(
    parser: argparse.ArgumentParser, args: argparse.Namespace, option: str, needs: str, used: bool
) -> None:
    """Refuse, through `parser`, `option` given away from its default where it is not `used`
    (it would be ignored): it works only with `needs`."""
    name = _destination(option)
    if not used and getattr(args, name) != parser.get_default(name):
        parser.error(f"{option} has no effect without {needs}")


def check_heads_divide(
    parser: argparse.ArgumentParser, args: argparse.Namespace, heads: str, *widths: str
) -> None:
    """Refuse, through `parser`, a width option the `heads` option does not divide: each
    attention head takes an equal share of the width."""
    count = getattr(args, _destination(heads))
    for option in widths:
        width = getattr(args, _destination(option))
        if width % count:
            parser.error(
                f"{option} {width} is not a multiple of {heads} {count}: each attention head "
                "takes an equal share of the width"
            )


def _destination(option: str) -> str:
    """The attribute argparse stores `option` in ("--embed-dim" -> "embed_dim")."""
    return option.removeprefix("--").replace("-", "_")


def finite_loss(loss: float, where: str) -> float:
    """`loss`, which must be finite: a training run that diverged ends there, writing nothing."""
    if not math.isfinite(loss):
        raise SystemExit(
            f"the training loss is {loss} at {where}: the run diverged; lower the learning "
            "rate (or check the other options) and rerun with --fresh; no model was written"
        )
    return loss


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser, described by the first paragraph of `doc`: a usage error is one line
    (`tokcomp`'s parser) and exit code 2."""
    return OneLineParser(description=doc.split("\n\n")[0])


@contextlib.contextmanager
def refusing(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Inside the block (the checks before the long work), an error about what was asked
    (what `tokcomp` counts as usage: a value tokcomp refuses, a missing file) ends the script
    through `parser.error`: its first line, exit code 2."""
    try:
        yield
    except USAGE_ERRORS as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        parser.error(lines[0])


def positive_ints(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4], each a whole number of at least 1."""
    values = [positive_int(item) for item in names(text)]
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, got {text!r}")
    return values


def timm_models(text: str) -> list[str]:
    """'deit_small_patch16_224,vit_base_patch16_224' -> the names, each one timm knows."""
    values = [timm_model(item) for item in names(text)]
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated timm model names, got {text!r}")
    return values


def method_names(kind: str | None = None) -> Callable[[str], list[str]]:
    """The type of a comma list of tokcomp method names (of `kind`: see `tokcomp.methods`)."""
    known = methods(kind)

    def parse(text: str) -> list[str]:
        values = names(text)
        unknown = [name for name in values if name not in known]
        if unknown or not values:
            what = f"{kind} methods" if kind else "methods"
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown) or repr(text)}: not among tokcomp's {what}; choose from "
                f"{', '.join(known)}"
            )
        return values

    return parse


def method_name(kind: str | None = None) -> Callable[[str], str]:
    """The type of one tokcomp method name (of `kind`)."""
    several = method_names(kind)

    def parse(text: str) -> str:
        if "," in text:
            raise argparse.ArgumentTypeError(f"takes one method name, got {text!r}")
        return several(text)[0]

    return parse


def _number(text: str, rule: str, within: Callable[[float], bool]) -> float:
    """`text` as a finite float `within` its bounds, else an error saying it must be `rule`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and within(value)):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    return _number(text, "a fraction in (0, 1]", lambda value: 0 < value <= 1)


def positive_float(text: str) -> float:
    """A finite number above 0 (a learning rate)."""
    return _number(text, "a number above 0", lambda value: value > 0)


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (a weight, a warm-up length)."""
    return _number(text, "a number of at least 0", lambda value: value >= 0)


def share(text: str) -> float:
    """A number in [0, 1]."""
    return _number(text, "a number in [0, 1]", lambda value: 0 <= value <= 1)


def fractions_of_one(text: str) -> list[float]:
    """'0.7,0.55' -> [0.7, 0.55], each in (0, 1]."""
    values = [fraction(item) for item in names(text)]
    if not values:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated fractions in (0, 1], got {text!r}"
        )
    return values
