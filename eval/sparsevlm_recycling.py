"""What does SparseVLM's recycling add? `sparsevlm_unrecycled` keeps the same top-k visual tokens
at each stage but inserts no merged tokens (docs/methods.md section 6.11). On the easy-VQA demo
VLM this reports both methods' accuracy and MACs (tokcomp's VQA sweep).

    OMP_WAIT_POLICY=PASSIVE python eval/sparsevlm_recycling.py --limit 5000 \\
        --budgets 0.5,0.25,0.125 --output results/sparsevlm-recycling
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import script_parser

from tokcomp.cli import main as tokcomp_main
from tokcomp.harness.arguments import positive_int
from tokcomp.methods import VisualTokens
from tokcomp.methods.registry import register
from tokcomp.methods.sparsevlm import SparseVLM
from tokcomp.methods.visual import VisualGeometry, most_attended


@register
@dataclass(kw_only=True)
class UnrecycledSparseVLM(SparseVLM):
    """SparseVLM without recycling: the deleted tokens are dropped."""

    name: ClassVar[str] = "sparsevlm_unrecycled"

    def after_cut(self, kept: int, tokens: int) -> int:
        return min(kept, tokens)

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        return most_attended(visual.attention, min(keep, visual.tokens))

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--limit", type=positive_int, default=5000)
    parser.add_argument("--budgets", default="0.5,0.25,0.125")
    parser.add_argument("--output", default="results/sparsevlm-recycling")
    args = parser.parse_args(argv)
    methods = "sparsevlm,sparsevlm_unrecycled"
    sweep = ["--methods", methods, "--budgets", args.budgets, "--output", args.output]
    data = ["--data", "easy-vqa", "--limit", str(args.limit), "--threads", "1"]
    return tokcomp_main(["eval", "vqa", *data, *sweep])


if __name__ == "__main__":
    raise SystemExit(main())
