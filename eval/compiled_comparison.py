"""What the scripts that compare compiled models on the CPU share (eval/bench_compile.py,
eval/profile_compiled.py, eval/bench_cpp_wrapper.py): the compressed models they time by
default, their command line, and the unpruned model beside its compressed copies.

A script imports it from eval/ (sys.path[0] when the script is run)."""

from __future__ import annotations

import argparse

import timm
import torch
from script_args import refusing
from torch import nn

from tokcomp.bench import BASELINE, Variant, input_size_of, parse_variant, variant_model
from tokcomp.harness.arguments import positive_int, timm_model

#: ToMe r=13 and PiToMe at 0.6 of the MACs: the settings of issue 24's compiled CPU floors.
TOME_AND_PITOME = (
    Variant("tome r=13", "tome", {"r": 13}),
    Variant("pitome target_macs=0.6", "pitome", {"target_macs": 0.6}),
)


def add_model_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """--model, --dtype, --batch-size, --threads and --variant (what to `verb` beside the
    unpruned model; default TOME_AND_PITOME)."""
    parser.add_argument("--model", type=timm_model, default="deit_small_patch16_224")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help=f"a compressed model to {verb} beside the unpruned one, as METHOD:key=value,... "
        "(repeatable; default: ToMe r=13 and PiToMe at 0.6 of the MACs)",
    )


def models_by_label(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[torch.Tensor, dict[str, nn.Module]]:
    """Random images and the unpruned model (random weights: speed does not depend on them)
    with a compressed copy per --variant, by label, on --threads threads. A variant the model
    cannot take is refused through `parser`, before any compiling."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    images = torch.randn(args.batch_size, *input_size_of(model))
    with refusing(parser):
        variants = {
            v.label: variant_model(model, v) for v in (BASELINE, *(args.variant or TOME_AND_PITOME))
        }
    return images, variants
