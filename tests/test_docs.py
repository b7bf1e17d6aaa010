"""The commands the documentation shows parse with the real parsers, and the methods, options
and configs they name exist (nothing runs: a command stops once its arguments are parsed)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch
from fixtures import eval_script

import tokcomp
from tokcomp import cli
from tokcomp.bench import Variant
from tokcomp.harness import video_shapes
from tokcomp.methods import registry

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    REPO / "README.md",
    REPO / "docs" / "methods.md",
    *sorted(REPO.glob("eval/models/*/README.md")),
]
#: How a documented command starts, after a virtual environment's bin/ and variables it sets.
PREFIX = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:\.venv[\w-]*/bin/)?")
STARTS = ("tokcomp ", "python -m tokcomp ", "python -m tokcomp.harness.", "python eval/")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) of every tokcomp, `python -m tokcomp ...` and `python eval/...` line in
    the docs' fenced sh blocks, continuations joined and comments dropped; inside a loop `for X
    in A B ...; do` the variable is its first value A; a line that uses other shell expansions
    ($VAR, $(...)) is left out."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"^```sh\n(.*?)^```", text, re.M | re.S):
            line_number = text[: block.start()].count("\n") + 1
            loops: dict[str, str] = {}
            for line in re.sub(r"\\\n\s*", " ", block.group(1)).splitlines():
                loops |= dict(re.findall(r"^for (\w+) in (\S+)[^;]*; do$", line.strip()))
                command = PREFIX.sub("", line.split("  #")[0].strip()).removesuffix(" ...")
                for name, value in loops.items():
                    command = command.replace(f"${name}", value)
                if command.startswith(STARTS) and "$" not in command:
                    found.append((f"{doc.relative_to(REPO)}:{line_number}", command))
    return found


COMMANDS = documented_commands()


class Parsed(Exception):
    """Raised in place of running a command once its arguments are parsed."""


def parsed(argv: list[str], monkeypatch) -> argparse.Namespace:
    """The namespace the command `argv` parses to, by its own parser."""
    if argv[0] == "tokcomp":
        return cli._build_parser().parse_args(argv[1:])
    if argv[:3] == ["python", "-m", "tokcomp"]:
        return cli._build_parser().parse_args(argv[3:])
    parse_args = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    module = video_shapes if argv[1:3] == ["-m", "tokcomp.harness.video_shapes"] else None
    module = module or eval_script(Path(argv[1]).stem)
    with pytest.raises(Parsed) as done:
        module.main(argv[3:] if module is video_shapes else argv[2:])
    return done.value.args[0]


def problems(args: argparse.Namespace) -> list[str]:
    """What in parsed arguments names no method, no option of one, or no loadable config."""
    found = []
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, Variant):
                options = dict(item.options)
                tower, tower_options = options.pop("tower", None), options.pop("tower_options", {})
                try:
                    tokcomp.create_method(item.method, **options)
                    if tower is not None:
                        tokcomp.create_method(tower, **tower_options)
                except ValueError as err:
                    found.append(f"{item.label}: {err}")
            if name == "methods" and isinstance(item, str):
                found += [
                    f"unknown method {m}" for m in item.split(",") if m not in tokcomp.methods()
                ]
            if isinstance(item, Path) and item.parts[:1] == ("configs",):
                try:
                    tokcomp.Config.load(REPO / item)
                except tokcomp.ConfigError as err:
                    found.append(str(err))
    return found


def test_the_docs_show_commands_of_every_kind():
    assert {command.split()[0] for _, command in COMMANDS} == {"tokcomp", "python"}
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses_and_names_what_exists(where, command, monkeypatch, capsys):
    # eval scripts that register a study method on import keep it out of other tests' registry
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda commands
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    try:
        args = parsed(shlex.split(command), monkeypatch)
    except SystemExit:
        pytest.fail(f"{where}: {command}\n{capsys.readouterr().err}")
    found = problems(args)
    assert not found, (where, command, found)
