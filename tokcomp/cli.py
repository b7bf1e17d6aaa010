"""The `tokcomp` command: bench, eval, search, export, show."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from tokcomp import api, ops
from tokcomp.bench import BenchSettings, benchmark, format_table, parse_variant, rows_to_json
from tokcomp.config import Config
from tokcomp.harness import backbone, imagenet, vqa
from tokcomp.models import create_model
from tokcomp.search import diffrate, zero_tprune


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="timm model name (random weights unless --checkpoint)")
    parser.add_argument("--checkpoint", help="local .safetensors/.pth weights")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokcomp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="speed of methods vs the unpruned model")
    _add_model_arguments(bench)
    bench.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        help="method:key=value,... (repeatable), e.g. tome:r=13",
    )
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--repeats", type=int, default=7)
    bench.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    bench.add_argument("--json", type=Path, help="also write the results here")

    export = commands.add_parser("export", help="write the config of a method on a model")
    _add_model_arguments(export)
    export.add_argument("variant", type=parse_variant, help="method:key=value,...")
    export.add_argument("-o", "--output", type=Path, required=True, help=".json or .yaml")

    show = commands.add_parser("show", help="summarise a saved config")
    show.add_argument("config", type=Path)

    evaluate = commands.add_parser("eval", help="accuracy and speed of a sweep of methods")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    imagenet.add_arguments(
        tasks.add_parser("imagenet", help="top-1/top-5 on an image folder or Fashion-MNIST")
    )
    backbone.add_arguments(
        tasks.add_parser(
            "backbone", help="feature fidelity and drop-in head accuracy of a headless backbone"
        )
    )
    vqa.add_arguments(
        tasks.add_parser("vqa", help="VQA accuracy and speed of a VLM (VQAv2, JSONL, easy-VQA)")
    )

    search = commands.add_parser("search", help="learn a compression schedule on data")
    searches = search.add_subparsers(dest="method", required=True)
    diffrate.add_arguments(
        searches.add_parser("diffrate", help="DiffRate's per-block prune/merge rates")
    )
    zero_tprune.add_arguments(
        searches.add_parser(
            "zero_tprune", help="Zero-TPrune's similarity share (and pruning blocks) for a model"
        )
    )
    return parser


def _bench(args: argparse.Namespace) -> None:
    model = create_model(args.model, args.checkpoint)
    settings = BenchSettings(
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
    )
    input_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    rows = benchmark(model, args.variant, settings, input_size)
    context = {
        "model": args.model or args.checkpoint,
        "threads": torch.get_num_threads(),
        "ops_backend": ops.backend(args.device),
        "torch": torch.__version__,
    }
    print(
        f"model {context['model']}, batch {args.batch_size}, {args.device} {args.dtype}, "
        f"{context['threads']} threads, ops backend {context['ops_backend']}, "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    print(format_table(rows))
    if args.json:
        args.json.write_text(rows_to_json(rows, settings, **context))


def _export(args: argparse.Namespace) -> None:
    model = create_model(args.model, args.checkpoint)
    api.apply(model, args.variant.method, **args.variant.options)
    path = api.config_of(model).save(args.output)
    print(f"wrote {path}")


def _show(args: argparse.Namespace) -> None:
    config = Config.load(args.config)
    print(f"method    {config.method} {json.dumps(config.options)}")
    print(f"model     {config.model.get('name')} ({config.model.get('family')})")
    print(f"MACs      {config.macs / 1e9:.3f} G of {config.base_macs / 1e9:.3f} G "
          f"({config.macs_ratio:.3f})")  # fmt: skip
    print(f"schedule  {config.schedule}")
    if config.notes:
        print(f"notes     {config.notes}")


def _run(args: argparse.Namespace) -> None:
    args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokcomp` console script."""
    args = _build_parser().parse_args(argv)
    handlers = {"bench": _bench, "export": _export, "show": _show, "eval": _run, "search": _run}
    try:
        handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"tokcomp {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
