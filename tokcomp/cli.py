"""The `tokcomp` command: bench, eval, search, export, show."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

from tokcomp import api, ops
from tokcomp.bench import BenchSettings, benchmark, format_table, parse_variant, rows_to_json
from tokcomp.config import Config
from tokcomp.errors import (
    INTERRUPTED,
    RUNTIME,
    USAGE,
    TokcompError,
    UsageError,
    original_message,
)
from tokcomp.files import write_text_whole
from tokcomp.harness import backbone, imagenet, lmms, vqa
from tokcomp.harness.arguments import (
    DTYPES,
    add_model_arguments,
    check_config_output,
    check_json_output,
    device,
    non_negative_int,
    positive_int,
)
from tokcomp.models import create_model
from tokcomp.search import diffrate, zero_tprune


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage text is in --help)."""

    def error(self, message: str) -> NoReturn:
        """Print `message` on one line and exit with the usage code."""
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = OneLineParser(prog="tokcomp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench", parents=[debug], help="speed of methods vs the unpruned model"
    )
    add_model_arguments(bench, pretrained=False)
    bench.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        help="method:key=value,... (repeatable), e.g. tome:r=13",
    )
    bench.add_argument("--batch-size", type=positive_int, default=32)
    bench.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    bench.add_argument("--dtype", default="float32", choices=DTYPES)
    bench.add_argument("--warmup", type=non_negative_int, default=2)
    bench.add_argument("--repeats", type=positive_int, default=7)
    bench.add_argument(
        "--threads", type=positive_int, help="torch.set_num_threads (default: torch's)"
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="run every model (the unpruned one too) under torch.compile (inductor); the "
        "warm-up rounds compile",
    )
    bench.add_argument("--json", type=Path, help="also write the results here")
    bench.add_argument("--force", action="store_true", help="overwrite an existing --json file")

    export = commands.add_parser(
        "export", parents=[debug], help="write the config of a method on a model"
    )
    add_model_arguments(export, pretrained=False)
    export.add_argument(
        "--vlm",
        help="a Hugging Face VLM (local folder or hub id) instead of a timm --model: the "
        "config of a visual-token method on it (for lmms-eval's config=FILE)",
    )
    export.add_argument("variant", type=parse_variant, help="method:key=value,...")
    export.add_argument("-o", "--output", type=Path, required=True, help=".json or .yaml")
    export.add_argument("--force", action="store_true", help="overwrite an existing -o file")

    show = commands.add_parser("show", parents=[debug], help="summarise a saved config")
    show.add_argument("config", type=Path)

    evaluate = commands.add_parser("eval", help="accuracy and speed of a sweep of methods")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    imagenet.add_arguments(
        tasks.add_parser(
            "imagenet", parents=[debug], help="top-1/top-5 on an image folder or Fashion-MNIST"
        )
    )
    backbone.add_arguments(
        tasks.add_parser(
            "backbone",
            parents=[debug],
            help="feature fidelity and drop-in head accuracy of a headless backbone",
        )
    )
    vqa.add_arguments(
        tasks.add_parser(
            "vqa", parents=[debug], help="VQA accuracy and speed of a VLM (VQAv2, JSONL, easy-VQA)"
        )
    )
    lmms.add_arguments(
        tasks.add_parser(
            "lmms", parents=[debug], help="lmms-eval benchmarks of a VLM (needs tokcomp[lmms])"
        )
    )

    search = commands.add_parser("search", help="learn a compression schedule on data")
    searches = search.add_subparsers(dest="method", required=True)
    diffrate.add_arguments(
        searches.add_parser(
            "diffrate", parents=[debug], help="DiffRate's per-block prune/merge rates"
        )
    )
    zero_tprune.add_arguments(
        searches.add_parser(
            "zero_tprune",
            parents=[debug],
            help="Zero-TPrune's similarity share (and pruning blocks) for a model",
        )
    )
    return parser


def _bench(args: argparse.Namespace) -> None:
    check_json_output(args.json, args.force)
    model = create_model(args.model, args.checkpoint)
    settings = BenchSettings(
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        compile=args.compile,
    )
    rows = benchmark(model, args.variant, settings)
    context = {
        "model": args.model or str(args.checkpoint),
        "threads": args.threads or torch.get_num_threads(),
        "ops_backend": ops.backend(args.device),
        "torch": torch.__version__,
    }
    print(
        f"model {context['model']}, batch {args.batch_size}, {args.device} {args.dtype}"
        f"{' compiled' if args.compile else ''}, {context['threads']} threads, ops backend "
        f"{context['ops_backend']}, medians of {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up"
    )
    print(format_table(rows))
    if args.json:
        write_text_whole(args.json, rows_to_json(rows, settings, **context))


def _export(args: argparse.Namespace) -> None:
    check_config_output(args.output, args.force)
    if args.vlm and (args.model or args.checkpoint):
        raise UsageError("--vlm replaces --model and --checkpoint; give one model")
    model = vqa.load_vlm(args.vlm)[0] if args.vlm else create_model(args.model, args.checkpoint)
    api.apply(model, args.variant.method, **args.variant.options)
    path = api.config_of(model).save(args.output, overwrite=args.force)
    print(f"wrote {path}")


def _show(args: argparse.Namespace) -> None:
    config = Config.load(args.config)
    print(f"method    {config.method} {json.dumps(config.options)}")
    if config.tower is not None:
        print(f"tower     {config.tower['method']} {json.dumps(config.tower['options'])}")
    kind = ", ".join(str(config.model[k]) for k in ("family", "architecture") if k in config.model)
    print(f"model     {config.model.get('name')} ({kind})")
    macs = f"{config.macs / 1e9:.3f} G of {config.base_macs / 1e9:.3f} G"
    share = f"{config.selection_share:.1%} of it the method's own work"
    print(f"MACs      {macs} ({config.macs_ratio:.3f}){_per_item(config)}, {share}")
    print(f"schedule  {config.schedule}")
    if config.notes:
        print(f"notes     {config.notes}")


def _per_item(config: Config) -> str:
    """What a config's MACs are counted on, where it is not an image: a reference video."""
    if not config.on_video:
        return ""
    frames = config.model.get("frames")
    counted = "" if frames is None else f"model.frames={frames}: "
    return f" per reference video ({counted}for reports, not to apply)"


def _run(args: argparse.Namespace) -> None:
    args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokcomp` console script: runs the command; an error it can explain
    is one line on stderr and its exit code (`--debug` re-raises it with its traceback)."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error argparse has printed
        return done.code
    handlers = {"bench": _bench, "export": _export, "show": _show, "eval": _run, "search": _run}
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = _warning_line
            handlers[args.command](args)
    except (Exception, KeyboardInterrupt) as err:
        code = _exit_code(err)
        if args.debug or code is None:
            raise
        _end_progress_bars()
        print(f"{_command(args)}: {_one_line(err)}", file=sys.stderr)
        return code
    return 0


def _warning_line(message: Warning | str, category: type[Warning], *_: object) -> None:
    """A warning as one line on stderr, as the command's errors are (--debug: Python's form,
    with the file and line)."""
    print(f"warning: {_first_line(str(message))} ({category.__name__})", file=sys.stderr)


def _end_progress_bars() -> None:
    """Close the progress bars an error left open, ending their lines, so that its message
    starts a line of its own (Ctrl-C can land while a bar is being made, before any `with`
    around it closes it)."""
    for bar in list(tqdm._instances):
        with contextlib.suppress(AttributeError):  # cut off before its fields were set
            bar.close()


#: Errors raised by checks on what was asked (library code raises these for bad options,
#: files or configs): usage. Failures of the run itself (torch, the system): runtime.
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
_RUNTIME_ERRORS = (OSError, RuntimeError, FloatingPointError, MemoryError)


def _command(args: argparse.Namespace) -> str:
    """'tokcomp eval imagenet', 'tokcomp search diffrate', 'tokcomp bench', ..."""
    sub = {"eval": "task", "search": "method"}.get(args.command)
    return " ".join(["tokcomp", args.command, *([getattr(args, sub)] if sub else [])])


def _exit_code(err: BaseException) -> int | None:
    """The exit code of an error the command explains in one line; None for a bug (its
    traceback is the report)."""
    if isinstance(err, TokcompError):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(err, USAGE_ERRORS):
        return USAGE
    if isinstance(err, _RUNTIME_ERRORS):
        return RUNTIME
    return None


def _one_line(err: BaseException) -> str:
    """The error as one line: tokcomp's own message, else the first line of the message
    with the error's type."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, TokcompError):
        return f"error: {err}" if err.exit_code != INTERRUPTED else str(err)
    message = _first_line(original_message(str(err)))
    return f"error: {message} ({type(err).__name__}; --debug shows the traceback)"


def _first_line(message: str) -> str:
    """A message's first line, with " ..." where more lines follow."""
    lines = message.strip().splitlines() or [""]
    return lines[0] + (" ..." if len(lines) > 1 else "")
